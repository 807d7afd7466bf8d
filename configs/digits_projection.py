"""The predict-project projection network T_theta on the 8x8 digits (docs/math.md §5.4, §6.6).

Needs the score model of ``configs/digits_spd.py`` (frozen, EMA parameters)::

    python launch.py --config=configs/digits_spd.py --workdir=runs/digits
    python launch.py --config=configs/digits_projection.py --workdir=runs/digits_proj5
    python launch.py --config=configs/digits_projection.py --workdir=runs/digits_proj5 --mode=eval

T_theta is a U-Net of the score model's size trained for N = ``projection.num_steps`` = 5 sampler steps;
predict_project then runs at 10 NFE (5 score + 5 projection calls). For 20 NFE train another run with
``--config.projection.num_steps=10 --config.sample.nfe=20``.
"""

from configs import digits_spd


def get_config():
    config = digits_spd.get_config()  # the score model's data and process; config.model is now T_theta's
    config.projection.score_workdir = "runs/digits"
    config.projection.num_steps = 5
    config.train.num_steps = 800
    config.optim.warmup_steps = 50
    config.train.ema = 0.995
    config.train.checkpoint_every = 400
    config.sample.method = "predict_project"
    config.sample.nfe = 10  # 2 x projection.num_steps
    config.sample.options.kappa = 1.0  # a trained T is the whole projection step (the surrogate's default is 0.5)
    config.eval.settings = "predict_project:10,gradient_estimation:10,ddim:10"
    return config
