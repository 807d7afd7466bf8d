"""The predict-project projection network T_theta on the 2-D 7x7 Gaussian-mixture toy
(docs/math.md §5.4, §6.6, §7.4).

Needs the plain score model of ``configs/toy_smd.py:plain`` (frozen, EMA parameters)::

    python launch.py --config=configs/toy_smd.py:plain --workdir=runs/toy_plain
    python launch.py --config=configs/toy_projection.py --workdir=runs/toy_proj5
    python -m benchmarks.projection_claim --dataset mixture2d   # trains both and scores every variant

T_theta is an MLP of the score model's size (zero-initialised output: the untrained T is 0) trained
for N = ``projection.num_steps`` = 5 uniform steps; predict_project then runs at 10 NFE (5 score +
5 projection calls).
"""

from configs import toy_smd


def get_config():
    config = toy_smd.get_config("plain")  # the score model's data and process; config.model is now T_theta's
    config.projection.score_workdir = "runs/toy_plain"
    config.projection.num_steps = 5
    config.train.num_steps = 1000
    config.optim.warmup_steps = 50
    config.train.checkpoint_every = 1000
    config.sample.method = "predict_project"
    config.sample.nfe = 10  # 2 x projection.num_steps
    config.sample.options.kappa = 1.0  # a trained T is the whole projection step
    return config
