"""A small residual MLP denoiser for low-dimensional data such as the 2-D mixture toy (docs/math.md §7.4).

:class:`MLP` flattens each example (H, W, C) to a vector, adds a time embedding, runs ``num_blocks``
residual dense blocks and maps back to (H, W, out_channels). It takes the U-Net's call signature
``(x, t, cond=None, latent=None, train=False)`` so that :class:`~spd_jax.models.smd.SMDNet` can
compose two of them: a latent network g_xi (``out_channels = latent_dim``, fed concat(x_t, eta))
and a denoiser built with ``hyper_dim = latent_dim``, whose blocks are modulated by the latent z
(a FiLM scale and shift per block computed from z and the time embedding, and z concatenated to
the input layer).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from spd_jax.models.smd import SMDNet
from spd_jax.models.unet import FiLM, TimeEmbedding


class MLPBlock(nn.Module):
    """h + Dense(SiLU(Dense(SiLU(LayerNorm(h) (1 + scale) + shift)))); (scale, shift) from ``cond``."""

    width: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array, cond: jax.Array) -> jax.Array:
        scale, shift = FiLM(self.width, dtype=self.dtype, name="film")(nn.silu(cond))
        y = nn.LayerNorm(dtype=self.dtype, name="norm")(h) * (1.0 + scale) + shift
        y = nn.Dense(self.width, dtype=self.dtype, name="dense_0")(nn.silu(y))
        y = nn.Dense(self.width, kernel_init=nn.initializers.zeros, dtype=self.dtype, name="dense_1")(nn.silu(y))
        return h + y


class MLP(nn.Module):
    """Residual MLP over flattened examples, with the U-Net's call signature.

    Attributes:
      width: hidden width; the time embedding has ``width`` features.
      num_blocks: residual blocks.
      out_channels: output channels per position; None: the channels of ``x``.
      hyper_dim: size of the SMD latent z (None: no latent input). z (B, H, W, hyper_dim) is
        flattened, concatenated to the input and added (through a dense layer) to every block's
        FiLM conditioning.
      cond_channels: must be 0 (no conditioning image); kept for the U-Net's interface.
      time_embedding, time_scale, time_levels: the network's time label (see
        :func:`spd_jax.models.unet.time_label`).
      zero_output_init: start the output layer at zero (a fresh denoiser predicts 0).

    ``__call__(x, t, cond=None, latent=None, train=False)``: x (B, H, W, C), t (B,) continuous
    time in [0, 1]; returns (B, H, W, out_channels) float32.
    """

    width: int = 256
    num_blocks: int = 3
    out_channels: int | None = None
    hyper_dim: int | None = None
    cond_channels: int = 0
    time_embedding: str = "linear"
    time_scale: float = 1000.0
    time_levels: int | None = None
    zero_output_init: bool = True
    dtype: Any = jnp.float32

    def _check_inputs(self, x, t, cond, latent) -> None:
        if x.ndim != 4:
            raise ValueError(f"x must have shape (B, H, W, C); got {x.shape}")
        if jnp.shape(t) != (x.shape[0],):
            raise ValueError(f"t must have shape ({x.shape[0]},) to match x; got {jnp.shape(t)}")
        if self.cond_channels or cond is not None:
            raise ValueError("the MLP takes no conditioning image (cond_channels must be 0, cond None)")
        if (self.hyper_dim is None) != (latent is None):
            raise ValueError("latent must be given exactly when the MLP has a latent input (hyper_dim)")
        if latent is not None and latent.shape != x.shape[:3] + (self.hyper_dim,):
            raise ValueError(f"latent must have shape {x.shape[:3] + (self.hyper_dim,)}; got {latent.shape}")

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        cond: jax.Array | None = None,
        latent: jax.Array | None = None,
        train: bool = False,
    ) -> jax.Array:
        del train  # no dropout or batch statistics
        self._check_inputs(x, t, cond, latent)
        batch = x.shape[0]
        out_channels = self.out_channels or x.shape[-1]
        emb = TimeEmbedding(self.width // 4, self.time_embedding, self.time_scale, self.time_levels,
                            dtype=self.dtype, name="time_embed")(t)  # (B, width)
        inputs = x.reshape(batch, -1).astype(self.dtype)
        if latent is not None:
            z = latent.reshape(batch, -1).astype(self.dtype)
            inputs = jnp.concatenate([inputs, z], axis=-1)
            emb = emb + nn.Dense(self.width, dtype=self.dtype, name="latent_embed")(z)
        h = nn.Dense(self.width, dtype=self.dtype, name="dense_in")(inputs) + emb
        for i in range(self.num_blocks):
            h = MLPBlock(self.width, dtype=self.dtype, name=f"block_{i}")(h, emb)
        h = nn.silu(nn.LayerNorm(dtype=self.dtype, name="norm_out")(h))
        init = nn.initializers.zeros if self.zero_output_init else nn.initializers.lecun_normal()
        size = x.shape[1] * x.shape[2] * out_channels
        out = nn.Dense(size, kernel_init=init, dtype=self.dtype, name="dense_out")(h)
        return out.reshape(x.shape[:3] + (out_channels,)).astype(jnp.float32)


def smd_mlp(denoiser: MLP, latent_dim: int = 8, latent_width: int = 128, latent_blocks: int = 2) -> SMDNet:
    """SMDNet of MLPs: g_xi maps concat(x_t, eta) and t to z (B, H, W, ``latent_dim``), and
    ``denoiser`` (rebuilt with ``hyper_dim = latent_dim``) reads z (docs/math.md §5.3)."""
    latent_net = MLP(width=latent_width, num_blocks=latent_blocks, out_channels=latent_dim,
                     time_embedding=denoiser.time_embedding, time_scale=denoiser.time_scale,
                     time_levels=denoiser.time_levels, zero_output_init=False, dtype=denoiser.dtype)
    return SMDNet(denoiser=denoiser.clone(hyper_dim=latent_dim), latent_net=latent_net)
