"""Inpainting of 64x64 CelebA faces: the CelebA SPD U-Net (configs/celeba64_spd.py) conditioned on
concat(m x, m) with one random box hole per example (``--config.task.mask=free_form`` for brush
strokes); known pixels re-imposed at every sampler step. Needs the prepared TFDS dataset
(``python -m spd_jax.prepare celeb_a --data_dir=D --archive=DIR``).

Process: spd (default), vp_linear or ddm_constant via the config argument (ddm_constant: DDM dual
head, log-t label and ddm_bridge, as configs/cifar10_ddm.py)::

    python launch.py --config=configs/celeba64_inpaint.py --workdir=runs/celeba_inpaint
    python launch.py --config=configs/celeba64_inpaint.py --workdir=runs/celeba_inpaint --mode=sample \\
        [--config.task.inputs=face1.jpg,face2.jpg]
    python launch.py --config=configs/celeba64_inpaint.py --workdir=runs/celeba_inpaint --mode=eval
"""

from configs import celeba64_spd
from configs.patches_sr4 import with_process


def get_config(process: str = "spd"):
    config = celeba64_spd.get_config()
    config.task.name = "inpaint"
    config.task.mask = "box"
    config.task.enforce_known = True
    config.sample.grid_images = 16
    return with_process(config, process)
