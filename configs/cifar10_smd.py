"""Soft mixture denoising on CIFAR-10 (docs/math.md §5.3, §8): the SMD backbone with hypernetworks at both
sites and latent network g_xi (d = 100), official single-eta v-loss, Adam lr 1e-4 with
betas (0.9, 0.99) and clipping 1.0, EMA 0.995, batch 128, sampled with the SMD ancestral sampler.

The official sigmoid schedule is replaced by the cosine VP process (both VP, v-target)."""

from configs import defaults


def get_config():
    config = defaults.get_config()
    config.data.name = "cifar10"
    config.data.flip = True
    config.process.name = "vp_cosine"
    config.model.kind = "smd"
    config.model.head = "v"
    config.model.base_channels = 128
    config.model.channel_mult = (1, 2, 2, 2)
    config.model.num_res_blocks = 1
    config.model.attention_resolutions = (32, 16, 8, 4)
    config.model.mid_attention = True
    config.model.input_kernel = 7
    config.model.latent_dim = 100
    config.model.latent_base_channels = 32
    config.optim.learning_rate = 1e-4
    config.optim.b2 = 0.99
    config.optim.warmup_steps = 0
    config.train.batch_size = 128
    config.train.num_steps = 500_000
    config.train.steps_per_dispatch = 10
    config.train.ema = 0.995
    config.train.log_every = 100
    config.train.checkpoint_every = 5000
    config.train.sample_every = 20000
    config.sample.method = "smd"
    config.sample.nfe = 100
    config.sample.clip_x0 = True
    return config
