"""Soft mixture denoising on the 2-D 7x7 Gaussian-mixture toy (docs/math.md §5.3, §7.4), three ways with
the same budget, chosen by the config argument:

* ``configs/toy_smd.py:plain`` — a residual MLP with an eps head (the single-Gaussian kernel), sampled
  with the ancestral sampler;
* ``configs/toy_smd.py:single_eta`` — SMD (latent network g_xi and a FiLM-modulated MLP) with the
  official single-eta loss;
* ``configs/toy_smd.py:mixture`` (the default) — SMD with the K-sample log-mean-exp loss, trained down
  to t = 0 with an x0-space bandwidth (``loss.smd_bandwidth``).

Continuous VP-linear process (the oracle rows of ``benchmarks/sampler_quality.py``); SMD models sample
with the ``smd`` sampler (fresh eta per step). 2000 steps of batch 256 for every variant::

    python launch.py --config=configs/toy_smd.py:mixture --workdir=/tmp/toy_smd_mixture
    python -m benchmarks.smd_claim  # trains and scores all three
"""

from configs import defaults

VARIANTS = ("plain", "single_eta", "mixture")


def get_config(variant: str = "mixture"):
    if variant not in VARIANTS:
        raise ValueError(f"unknown toy_smd variant {variant!r}; expected one of {VARIANTS}")
    config = defaults.get_config()
    config.data.name = "mixture2d"
    config.process.name = "vp_linear"
    config.process.spectrum = "preset"  # not used by the VP process; a point cloud has no spectrum
    config.model.kind = "mlp" if variant == "plain" else "smd_mlp"
    config.model.head = "eps"
    config.model.mlp_width = 128
    config.model.mlp_blocks = 3
    config.model.latent_dim = 8
    config.model.latent_base_channels = 64
    config.loss.smd = "single_eta" if variant == "single_eta" else "mixture"
    config.loss.smd_samples = 8
    config.loss.smd_step = 0.1  # one step of the 10-step uniform grid; the last step ends at t = 0
    config.loss.smd_bandwidth = 0.04  # = the components' std
    config.optim.learning_rate = 1e-3
    config.optim.warmup_steps = 100
    config.optim.schedule = "cosine"
    config.optim.end_factor = 0.05
    config.train.batch_size = 256
    config.train.num_steps = 2000
    config.train.ema = 0.995
    config.train.log_every = 250
    config.train.checkpoint_every = 2000
    config.sample.method = "ancestral" if variant == "plain" else "smd"
    config.sample.nfe = 10
    config.sample.clip_x0 = False  # the edge components reach past [-1, 1]
    config.sample.grid_images = 0  # no PNG grids for a point cloud
    config.sample.batch_size = 2000
    return config
