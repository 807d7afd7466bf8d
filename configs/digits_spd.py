"""The embedded default: SPD on scikit-learn's 8x8 digits, trained on a 2-core CPU in minutes.

``python launch.py --config=configs/digits_spd.py --workdir=/tmp/digits`` trains, then writes
``/tmp/digits/samples/step_<N>.png`` with the gradient-estimation sampler at 10 NFE.
"""

from configs import defaults


def get_config():
    config = defaults.get_config()
    config.data.name = "digits"
    config.process.name = "spd"
    config.model.base_channels = 32
    config.model.channel_mult = (1, 2)
    config.model.num_res_blocks = 1
    config.optim.learning_rate = 1e-3
    config.optim.warmup_steps = 100
    config.optim.schedule = "cosine"  # short run: anneal to 5 % for a clean final model
    config.optim.end_factor = 0.05
    config.train.batch_size = 128
    config.train.num_steps = 2000  # ~4 min on 2 idle CPU cores (~9 steps/s)
    config.train.ema = 0.998  # with warm-up; 0.999 would still hold early weights after 2000 steps
    config.train.log_every = 50
    config.train.checkpoint_every = 500
    config.sample.method = "gradient_estimation"
    config.sample.nfe = 10
    config.sample.clip_x0 = True
    config.sample.grid_images = 100
    config.sample.upscale = 4
    return config
