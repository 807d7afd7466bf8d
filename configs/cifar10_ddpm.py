"""DDPM baseline on CIFAR-10: discrete linear-beta VP table (T = 1000), eps head, the DDPM U-Net
(128 ch, (1, 2, 2, 2), 2 blocks, attention at 16 px, dropout 0.1), Adam lr 2e-4 with 5000
warm-up steps and clipping 1.0, EMA 0.9999, flips."""

from configs import defaults


def get_config():
    config = defaults.get_config()
    config.data.name = "cifar10"
    config.data.flip = True
    config.process.name = "vp_linear"
    config.process.num_levels = 1000
    config.model.base_channels = 128
    config.model.channel_mult = (1, 2, 2, 2)
    config.model.num_res_blocks = 2
    config.model.attention_resolutions = (16,)
    config.model.dropout = 0.1
    config.model.mid_attention = True
    config.model.time_embedding = "discrete"
    config.optim.learning_rate = 2e-4
    config.optim.warmup_steps = 5000
    config.train.batch_size = 128
    config.train.num_steps = 800_000
    config.train.steps_per_dispatch = 10
    config.train.ema = 0.9999
    config.train.log_every = 100
    config.train.checkpoint_every = 5000
    config.train.sample_every = 20000
    config.sample.method = "gradient_estimation"
    config.sample.nfe = 10
    config.sample.clip_x0 = True
    return config
