"""x4 super-resolution on CIFAR-10 (8x8 -> 32x32): the CIFAR-10 SPD U-Net (configs/cifar10_spd.py)
conditioned on the bicubic up-sampling of the area-down-sampled image. Needs the prepared TFDS
dataset (``python -m spd_jax.prepare cifar10 --data_dir=D --archive=cifar-10-python.tar.gz``).

Process: spd (default), vp_linear or ddm_constant via the config argument (ddm_constant: DDM dual
head, log-t label and ddm_bridge, as configs/cifar10_ddm.py)::

    python launch.py --config=configs/cifar10_sr4.py --workdir=runs/cifar10_sr4
    python launch.py --config=configs/cifar10_sr4.py:ddm_constant --workdir=runs/cifar10_sr4_ddm
    python launch.py --config=configs/cifar10_sr4.py --workdir=runs/cifar10_sr4 --mode=sample \\
        [--config.task.inputs=low1.png,low2.png]
    python launch.py --config=configs/cifar10_sr4.py --workdir=runs/cifar10_sr4 --mode=eval
"""

from configs import cifar10_spd
from configs.patches_sr4 import with_process


def get_config(process: str = "spd"):
    config = cifar10_spd.get_config()
    config.task.name = "sr"
    config.task.factor = 4
    config.sample.grid_images = 16
    config.sample.upscale = 2
    return with_process(config, process)
