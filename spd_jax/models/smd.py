"""Soft mixture denoising (SMD, docs/math.md §5.3, §8): latent network g_xi plus a hypernetwork denoiser.

``SMDNet`` composes two :class:`~spd_jax.models.unet.UNet` instances:

* ``latent_net`` (g_xi): input concat(x_t, eta) with eta ~ N(0, I) of x_t's shape, plus the time
  embedding; output the per-pixel latent z of ``latent_dim`` channels (no zero-initialised output,
  so z depends on eta from the start);
* ``denoiser``: a U-Net built with ``hyper_dim = latent_dim``, whose two hypernetwork sites
  (after the input conv and after the last residual block) read z.

The same composition serves the small MLPs of :mod:`spd_jax.models.mlp` (:func:`~spd_jax.models.mlp.smd_mlp`):
any pair of networks with the U-Net's call signature, ``hyper_dim`` on the denoiser and
``out_channels`` on the latent network.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from spd_jax.models.unet import UNet


class SMDNet(nn.Module):
    """``apply(variables, x, t, eta, cond=None, train=False)`` -> the denoiser's output.

    x, eta: (B, H, W, C) pixel space; t: (B,) continuous time in [0, 1]; cond as for
    :class:`UNet` (the denoiser only). Use :meth:`latent` (via ``method=``) to read z alone.
    """

    denoiser: nn.Module  # a UNet (or MLP) with hyper_dim set
    latent_net: nn.Module  # a UNet (or MLP) with out_channels = the denoiser's hyper_dim

    def _check(self) -> None:
        if self.denoiser.hyper_dim is None:
            raise ValueError("the SMD denoiser must be a network with hyper_dim set")
        if self.latent_net.out_channels != self.denoiser.hyper_dim:
            raise ValueError(
                f"latent_net.out_channels ({self.latent_net.out_channels}) must equal the denoiser's "
                f"hyper_dim ({self.denoiser.hyper_dim})"
            )

    def latent(self, x: jax.Array, t: jax.Array, eta: jax.Array, train: bool = False) -> jax.Array:
        """z = g_xi(concat(x_t, eta), t): (B, H, W, latent_dim)."""
        if eta.shape != x.shape:
            raise ValueError(f"eta must have x's shape {x.shape}; got {eta.shape}")
        return self.latent_net(jnp.concatenate([x, eta], axis=-1), t, train=train)

    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        eta: jax.Array,
        cond: jax.Array | None = None,
        train: bool = False,
    ) -> jax.Array:
        self._check()
        z = self.latent(x, t, eta, train=train)
        return self.denoiser(x, t, cond=cond, latent=z, train=train)


def smd_net(
    denoiser: UNet,
    latent_dim: int = 100,
    latent_base_channels: int = 32,
    latent_channel_mult: tuple[int, ...] = (1, 2),
    latent_num_res_blocks: int = 1,
    latent_num_heads: int = 1,
) -> SMDNet:
    """SMDNet from a denoiser U-Net (without hypernetwork) and the latent network's size.

    The returned denoiser is ``denoiser`` with ``hyper_dim = latent_dim``; g_xi is a U-Net with
    self-attention only in its middle block and the denoiser's time embedding.
    """
    latent_net = UNet(
        base_channels=latent_base_channels,
        channel_mult=tuple(latent_channel_mult),
        num_res_blocks=latent_num_res_blocks,
        attention_resolutions=(),
        num_heads=latent_num_heads,
        out_channels=latent_dim,
        zero_output_init=False,
        time_embedding=denoiser.time_embedding,
        time_scale=denoiser.time_scale,
        time_levels=denoiser.time_levels,
    )
    return SMDNet(denoiser=denoiser.clone(hyper_dim=latent_dim), latent_net=latent_net)
