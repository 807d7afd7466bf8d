"""Networks (docs/math.md §8): the ADM-family U-Net, SMD's latent network and hypernetwork, prediction heads.

* :class:`UNet` — one configurable U-Net for eps/x0/v/flow/score heads, DDM's dual (c, eps) head
  (``num_decoders=2``), the predict-project projection network T_theta, and conditional inputs.
* :class:`SMDNet` / :func:`smd_net` — SMD's latent network g_xi with hypernetwork sites.
* :class:`MLP` / :func:`smd_mlp` — a small residual MLP for low-dimensional data (the 2-D mixture
  toy), alone or as SMD's denoiser and latent network.
* :func:`model_denoiser` — a trained model as a ``denoiser(x_t, t, *, key=None)`` for any sampler;
  :func:`model_projection` — a trained T_theta as ``projection(x_pred, t_next)``.
* :mod:`spd_jax.models.presets` — the papers' configurations; counts via
  ``python -m spd_jax.models.param_counts``.
"""

from spd_jax.models.heads import (
    DDM_HEADS,
    HEADS,
    model_denoiser,
    model_projection,
    prediction_from_head,
)
from spd_jax.models.mlp import MLP, smd_mlp
from spd_jax.models.smd import SMDNet, smd_net
from spd_jax.models.unet import TIME_EMBEDDINGS, HyperAdapter, UNet, time_label

__all__ = [
    "DDM_HEADS",
    "HEADS",
    "TIME_EMBEDDINGS",
    "HyperAdapter",
    "MLP",
    "SMDNet",
    "UNet",
    "model_denoiser",
    "model_projection",
    "prediction_from_head",
    "smd_mlp",
    "smd_net",
    "time_label",
]
