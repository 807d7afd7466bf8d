"""Inpainting of 32x32x3 photo patches (embedded, no download): the patches U-Net conditioned on
concat(m x, m) with one random box hole per example (25-50 % of each side; free-form strokes with
``--config.task.mask=free_form``); the known pixels are re-imposed at every sampler step
(``--config.task.enforce_known=False`` to switch off) and pasted exactly into the output.

Process: spd (default), vp_linear or ddm_constant via the config argument (ddm_constant: DDM dual
head and ddm_bridge, as configs/cifar10_ddm.py)::

    python launch.py --config=configs/patches_inpaint.py:ddm_constant --workdir=runs/inpaint_ddm
    python launch.py --config=configs/patches_inpaint.py:ddm_constant --workdir=runs/inpaint_ddm --mode=sample
    python launch.py --config=configs/patches_inpaint.py:ddm_constant --workdir=runs/inpaint_ddm --mode=eval

Sample mode masks the held-out split's first images, or image files
(``--config.task.inputs=a.png,b.png``, resized to 32 px), and writes
``samples/inpaint_box_<method>_nfe<N>.{png,npz}`` with input | output | reference panels.
"""

from configs import patches_spd
from configs.patches_sr4 import with_process


def get_config(process: str = "spd"):
    config = patches_spd.get_config()
    config.task.name = "inpaint"
    config.task.mask = "box"
    config.task.enforce_known = True
    config.sample.grid_images = 16
    config.sample.num_samples = 64
    return with_process(config, process)
