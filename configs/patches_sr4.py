"""x4 super-resolution of 32x32x3 photo patches (embedded, no download): the patches U-Net
conditioned on the bicubic up-sampling of the 8x8 area-down-sampled image (spd_jax.run.sampling).

Process: spd (default), vp_linear or ddm_constant, chosen by the config argument, which also sets
the matching head and sampler (ddm_constant: the DDM dual (c, eps) head with the log-t label and
the ddm_bridge sampler, as configs/cifar10_ddm.py; the others: x0 head, gradient_estimation)::

    python launch.py --config=configs/patches_sr4.py:vp_linear --workdir=runs/sr4_vp_linear
    python launch.py --config=configs/patches_sr4.py:vp_linear --workdir=runs/sr4_vp_linear --mode=sample
    python launch.py --config=configs/patches_sr4.py:vp_linear --workdir=runs/sr4_vp_linear --mode=eval

(``--config.process.name=vp_linear`` alone switches only the process; for ddm_constant also pass
``--config.model.head=ddm_dual --config.model.time_embedding=log --config.sample.method=ddm_bridge``.)
Sample mode conditions on the held-out split, or on image files:
``--config.task.inputs=a.png,b.png`` (a file of 8x8 pixels is the low-resolution input itself;
others are the reference, resized to 32 px and down-sampled); it writes
``samples/sr4_<method>_nfe<N>.{png,npz}`` with input | output | reference panels. ×2:
``--config.task.factor=2``. The six patches models of the README table:
``benchmarks/task_table.py``.
"""

from configs import patches_spd

PROCESSES = ("spd", "vp_linear", "ddm_constant")


def with_process(config, process: str):
    """Set ``process`` with its head, time label and sampler (the DDM head for ddm_constant)."""
    if process not in PROCESSES:
        raise ValueError(f"unknown process {process!r} for a task config; expected one of {PROCESSES}")
    config.process.name = process
    if process == "ddm_constant":
        config.model.head = "ddm_dual"
        config.model.time_embedding = "log"
        config.loss.ddm_weighting = "ddm_public"
        config.sample.method = "ddm_bridge"
    else:
        # x0, not eps: x0 = (x_t - sigma eps) / alpha_t(k) amplifies eps errors where alpha_t(k) is
        # tiny, and eps-head task models stayed far below the baselines (README, conditional tasks)
        config.model.head = "x0"
        config.model.time_embedding = "linear"
        config.sample.method = "gradient_estimation"
    return config


def get_config(process: str = "spd"):
    config = patches_spd.get_config()
    config.task.name = "sr"
    config.task.factor = 4
    config.sample.grid_images = 16
    config.sample.num_samples = 64
    return with_process(config, process)
