"""Soft mixture denoising on the 8x8 digits (docs/math.md §5.3, §6.7): the digits U-Net trained three ways with
the same budget, chosen by the config argument:

* ``configs/digits_smd.py:plain`` — the U-Net with an eps head, sampled with the ancestral sampler;
* ``configs/digits_smd.py:single_eta`` — SMD (latent U-Net g_xi, hypernetworks at both sites) with the
  official single-eta loss;
* ``configs/digits_smd.py:mixture`` (the default) — SMD with the K-sample log-mean-exp loss, trained down to
  t = 0 with an x0-space bandwidth (``loss.smd_bandwidth``).

Continuous VP-linear process; SMD models sample with the ``smd`` sampler::

    python launch.py --config=configs/digits_smd.py:mixture --workdir=/tmp/digits_smd_mixture
    python launch.py --config=configs/digits_smd.py:mixture --workdir=/tmp/digits_smd_mixture --mode=eval \\
        --config.eval.settings=smd:2,smd:5,smd:10,smd:50
    python -m benchmarks.smd_claim --dataset digits  # trains and scores all three
"""

from configs import defaults

VARIANTS = ("plain", "single_eta", "mixture")


def get_config(variant: str = "mixture"):
    if variant not in VARIANTS:
        raise ValueError(f"unknown digits_smd variant {variant!r}; expected one of {VARIANTS}")
    config = defaults.get_config()
    config.data.name = "digits"
    config.process.name = "vp_linear"
    config.model.kind = "unet" if variant == "plain" else "smd"
    config.model.head = "eps"
    config.model.base_channels = 32
    config.model.channel_mult = (1, 2)
    config.model.num_res_blocks = 1
    config.model.latent_dim = 16
    config.model.latent_base_channels = 16
    config.loss.smd = "single_eta" if variant == "single_eta" else "mixture"
    config.loss.smd_samples = 4
    config.loss.smd_step = 0.1  # one step of the 10-step uniform grid; the last step ends at t = 0
    config.loss.smd_bandwidth = 0.1  # x0-space std per pixel added to each component
    config.optim.learning_rate = 1e-3
    config.optim.warmup_steps = 100
    config.optim.schedule = "cosine"
    config.optim.end_factor = 0.05
    config.train.batch_size = 128
    config.train.num_steps = 2000
    config.train.ema = 0.998
    config.train.log_every = 100
    config.train.checkpoint_every = 2000
    config.sample.method = "ancestral" if variant == "plain" else "smd"
    config.sample.nfe = 10
    config.sample.clip_x0 = True
    config.sample.grid_images = 100
    config.sample.upscale = 4
    return config
