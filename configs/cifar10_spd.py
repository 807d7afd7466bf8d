"""SPD on CIFAR-10, the paper's setting (docs/math.md §2.5, §8): guided-diffusion U-Net (~52.5M), eps-MSE,
Adam lr 1e-4 without weight decay, warm-up, annealing or clipping, EMA 0.9999, flips.

Differences from the official code: continuous t in place of the T = 4000 grid, and the spectrum
estimated from the training images (``--config.process.spectrum=preset`` uses the official
power law). Needs the prepared TFDS dataset (``python -m spd_jax.prepare cifar10 --data_dir=D --archive=cifar-10-python.tar.gz``).
"""

from configs import defaults


def get_config():
    config = defaults.get_config()
    config.data.name = "cifar10"
    config.data.flip = True
    config.process.name = "spd"
    config.model.base_channels = 128
    config.model.channel_mult = (1, 2, 2, 2)
    config.model.num_res_blocks = 3
    config.model.attention_resolutions = (16, 8)
    config.model.num_heads = 4
    config.model.dropout = 0.3
    config.model.mid_attention = True
    config.optim.learning_rate = 1e-4
    config.optim.warmup_steps = 0
    config.optim.grad_clip = 0.0
    config.train.batch_size = 256
    config.train.num_steps = 500_000
    config.train.steps_per_dispatch = 10
    config.train.ema = 0.9999
    config.train.log_every = 100
    config.train.checkpoint_every = 5000
    config.train.sample_every = 20000
    config.sample.method = "gradient_estimation"
    config.sample.nfe = 10
    config.sample.clip_x0 = True
    return config
