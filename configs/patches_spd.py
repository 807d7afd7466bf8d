"""SPD on 32x32x3 crops of scikit-image's bundled photographs (embedded, no download).

A colour testbed between digits and CIFAR-10 with a small U-Net. On 2 CPU cores a step of 64 images
takes about 3.5 s, so a full run wants a GPU; the NFE table's 3000-step runs took minutes on one.
"""

from configs import defaults


def get_config():
    config = defaults.get_config()
    config.data.name = "patches"
    config.data.flip = True
    config.process.name = "spd"
    config.model.base_channels = 64
    config.model.channel_mult = (1, 2, 2)
    config.model.num_res_blocks = 1
    config.model.attention_resolutions = (8,)
    config.model.mid_attention = True
    config.optim.learning_rate = 5e-4
    config.optim.warmup_steps = 200
    config.train.batch_size = 64
    config.train.num_steps = 20000
    config.train.checkpoint_every = 1000
    config.train.sample_every = 2000
    config.sample.method = "gradient_estimation"
    config.sample.nfe = 10
    config.sample.clip_x0 = True
    config.sample.upscale = 2
    return config
