"""DDM with linear attenuation on the embedded digits (docs/math.md §2.6b, §5.2, §6.4).

x_t = (1 - t) x_0 + (a/2)(t^2 - t) + sqrt(t) eps with a random slope a = clip(N(0, 1), -1, 1) per
pixel. A two-decoder U-Net predicts (a, C) on its first decoder (C = -x_0 - a/2) and eps on its
second; the dual loss carries DDM-Public's time weights; sampling is DDM's bridge step with the
predicted slope clipped to [-1, 1] and no c-correction. Same network size and budget as the main job
(configs/digits_spd.py), so the two are comparable:

    python launch.py --config=configs/digits_ddm_linear.py --workdir=runs/digits_ddm_linear
"""

from configs import digits_spd


def get_config():
    config = digits_spd.get_config()
    config.process.name = "ddm_linear"
    config.model.head = "ddm_linear"
    config.model.time_embedding = "log"
    config.loss.ddm_weighting = "ddm_public"
    config.sample.method = "ddm_bridge"
    config.sample.nfe = 10
    config.eval.settings = "ddm_bridge:5,ddm_bridge:10,ddm_bridge:20,ddm_bridge:50"
    return config
