"""DDM (decoupled diffusion, constant attenuation) on CIFAR-10 (docs/math.md §2.6a, §5.2, §8): two-decoder
U-Net (192 ch, decouple blocks, log-t label, ~216M) with the dual (c, eps) loss, AdamW lr 1e-4,
weight decay 1e-2, clipping 1.0, EMA 0.999, sampled with the DDM bridge at 10 NFE.

The official polynomial decay (power 0.96) is replaced by a cosine decay to 10 %, and its
batch 128 x 2 accumulation by a global batch of 256."""

from configs import defaults


def get_config():
    config = defaults.get_config()
    config.data.name = "cifar10"
    config.data.flip = True
    config.process.name = "ddm_constant"
    config.model.head = "ddm_dual"
    config.model.base_channels = 192
    config.model.channel_mult = (1, 2, 2, 2)
    config.model.num_res_blocks = 3
    config.model.attention_resolutions = (16, 8)
    config.model.head_channels = 64
    config.model.dropout = 0.1
    config.model.resample = "resblock"
    config.model.decouple = True
    config.model.mid_attention = True
    config.model.time_embedding = "log"
    config.loss.ddm_weighting = "ddm_public"
    config.optim.learning_rate = 1e-4
    config.optim.warmup_steps = 5000
    config.optim.schedule = "cosine"
    config.optim.end_factor = 0.1
    config.optim.weight_decay = 1e-2
    config.train.batch_size = 256
    config.train.num_steps = 800_000
    config.train.steps_per_dispatch = 10
    config.train.log_every = 100
    config.train.checkpoint_every = 5000
    config.train.sample_every = 20000
    config.sample.method = "ddm_bridge"
    config.sample.nfe = 10
    config.sample.clip_x0 = True
    return config
