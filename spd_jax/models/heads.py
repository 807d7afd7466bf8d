"""Prediction heads: turn a trained network into a denoiser for every sampler (docs/math.md §0, §4).

A head names what the network outputs in pixel space:

* ``"eps"``, ``"x0"``, ``"v"``, ``"flow"``, ``"score"``: one output, converted per frequency by
  :func:`spd_jax.diffusion.parameterization.prediction_from_output`;
* ``"ddm_dual"``: two outputs (c, eps) from a two-decoder U-Net, c = -x_0 (docs/math.md §4);
* ``"ddm_c"``: one output c, with eps derived as (x_t + alpha c) / sigma (single-decoder DDM/ADM);
* ``"ddm_linear"``: two decoders, (a, C) on the first (twice the image's channels: a, then C) and
  eps on the second, for DDM's linear attenuation (docs/math.md §2.6b, process ``ddm_linear``).

Every denoiser follows ``denoiser(x_t, t, *, key=None) -> Prediction(x0, eps[, c])``; SMD models
draw their latent noise eta from ``key`` (one draw per example, docs/math.md §6.7).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from spd_jax.diffusion import parameterization as param
from spd_jax.diffusion.rng import per_example_normal
from spd_jax.models.smd import SMDNet

HEADS = param.TARGETS + ("ddm_dual", "ddm_c", "ddm_linear")
DDM_HEADS = ("ddm_dual", "ddm_c")  #: heads of the Gaussian DDM processes (ddm_constant, rectified_flow)
#: decoders and output channels (in multiples of the image's) of each head's network
HEAD_DECODERS = {"ddm_dual": (1, 1), "ddm_linear": (2, 1)}


def check_head(head: str) -> str:
    """Return ``head`` if it is one of :data:`HEADS`, else raise ValueError."""
    if head not in HEADS:
        raise ValueError(f"unknown prediction head {head!r}; expected one of {HEADS}")
    return head


def ddm_outputs(process, x_t, t, output, head: str):
    """(c, eps) of a DDM head's network output (a (c, eps) pair, or c alone for ``"ddm_c"``)."""
    if head == "ddm_dual":
        if not isinstance(output, tuple) or len(output) != 2:
            raise ValueError("head 'ddm_dual' needs a network with two decoders returning (c, eps)")
        return output
    if isinstance(output, tuple):
        raise ValueError("head 'ddm_c' needs a single-decoder network")
    alpha, sigma = process.marginal(t)
    return output, param.ddm_eps_from_c(x_t, output, alpha, sigma)


def linear_outputs(x_t, output):
    """(a, C, eps) of a ``"ddm_linear"`` network's output ((a, C) stacked on channels, eps)."""
    channels = x_t.shape[-1]
    if (not isinstance(output, tuple) or len(output) != 2 or output[0].shape[-1] != 2 * channels
            or output[1].shape[-1] != channels):
        got = tuple(o.shape for o in output) if isinstance(output, tuple) else output.shape
        raise ValueError(f"head 'ddm_linear' needs two decoders with {2 * channels} and {channels} output "
                         f"channels ((a, C), eps); got outputs of shapes {got}")
    slope_and_c, eps = output
    return slope_and_c[..., :channels], slope_and_c[..., channels:], eps


def prediction_from_head(process, x_t, t, output, head: str) -> param.Prediction:
    """Prediction(x0, eps[, c][, a]) of a network ``output`` for any head of :data:`HEADS`."""
    check_head(head)
    if head == "ddm_linear":
        if getattr(process, "name", None) != "ddm_linear":
            raise ValueError(f"head 'ddm_linear' belongs to process 'ddm_linear'; got {process.name!r}")
        slope, c, eps = linear_outputs(x_t, output)
        t_b = t.reshape(t.shape + (1,) * (x_t.ndim - 1))
        return param.Prediction(x0=param.ddm_linear_x0(x_t, slope, c, eps, t_b), eps=eps, c=c, a=slope)
    if head in DDM_HEADS:
        c, eps = ddm_outputs(process, x_t, t, output, head)
        return param.ddm_prediction(process, x_t, t, c, eps)
    if isinstance(output, tuple):
        raise ValueError(
            f"head {head!r} needs a single-decoder network; this one returns {len(output)} outputs"
        )
    return param.prediction_from_output(process, x_t, t, output, head)


def latent_noise(key, shape: tuple, dtype) -> jax.Array:
    """SMD latent noise eta of ``shape`` (B, ...): row b from ``key[b]`` when ``key`` holds one key
    per example (typed keys (B,) or raw uint32 (B, 2), as the ``smd`` sampler passes them), else
    from ``fold_in(key, b)`` (docs/math.md §0: per-example randomness)."""
    typed = isinstance(key, jax.Array) and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    per_example = np.shape(key) == (shape[0],) if typed else np.shape(key) == (shape[0], 2)
    if per_example:
        return jax.vmap(lambda k: jax.random.normal(k, tuple(shape[1:]), dtype))(key)
    return per_example_normal(key, shape, dtype)


def model_projection(model: Any, variables: Any, *, cond: jax.Array | None = None):
    """The predict-project network T_theta (a :class:`UNet`) as ``projection(x_pred, t_next)``:
    pixel-space correction added to x_pred (docs/math.md §5.4, §6.6), ``train=False``."""

    def projection(x_pred, t_next):
        return model.apply(variables, x_pred, t_next, cond=cond, train=False)

    return projection


def model_denoiser(
    model: Any, variables: Any, process, head: str, *, cond: jax.Array | None = None
):
    """Denoiser of a trained ``model`` (a :class:`UNet` or :class:`SMDNet`) for ``process``.

    ``variables`` is the dict returned by ``model.init`` (``{"params": ...}``), ``head`` one of
    :data:`HEADS` matching how the model was trained, ``cond`` the conditioning image (B, H, W,
    cond_channels) of a conditional model (then every call must use the same batch). The network
    runs with ``train=False`` (no dropout). SMD models need ``key`` at every call.
    """
    check_head(head)
    smd = isinstance(model, SMDNet)

    def denoiser(x_t, t, *, key=None) -> param.Prediction:
        if smd:
            if key is None:
                raise ValueError(
                    "an SMD denoiser is stochastic: pass key= to draw its latent noise eta"
                )
            eta = latent_noise(key, x_t.shape, x_t.dtype)
            output = model.apply(variables, x_t, t, eta, cond=cond, train=False)
        else:
            output = model.apply(variables, x_t, t, cond=cond, train=False)
        return prediction_from_head(process, x_t, t, output, head)

    return denoiser
