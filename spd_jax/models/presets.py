"""The papers' network configurations (docs/math.md §8) as ready-built modules.

Each function returns an unbound Flax module; pass ``dropout`` etc. to override. Parameter counts
are printed by ``python -m spd_jax.models.param_counts``.
"""

from __future__ import annotations

from spd_jax.models.smd import SMDNet, smd_net
from spd_jax.models.unet import UNet


def spd_cifar10(dropout: float = 0.3, time_levels: int | None = None) -> UNet:
    """SPD CIFAR-10 (guided-diffusion UNetModel): 128 ch, (1, 2, 2, 2), 3 blocks, attention at
    16 and 8 px with 4 heads, dropout 0.3, FiLM norm, eps head; ~52.5M parameters.

    ``time_levels=T`` feeds the official discrete label i * 1000 / T; None feeds 1000 t.
    """
    return UNet(
        base_channels=128,
        channel_mult=(1, 2, 2, 2),
        num_res_blocks=3,
        attention_resolutions=(16, 8),
        num_heads=4,
        dropout=dropout,
        time_embedding="linear" if time_levels is None else "discrete",
        time_levels=time_levels,
    )


def ddm_cifar10(dropout: float = 0.1) -> UNet:
    """DDM CIFAR-10 (EDM DhariwalUNet): 192 ch, (1, 2, 2, 2), 3 blocks, attention at 16 and 8 px
    (64 channels per head), residual-block resampling, two decoders with decouple blocks, log-t
    label; ~216.1M parameters. Use with the ``"ddm_dual"`` head."""
    return UNet(
        base_channels=192,
        channel_mult=(1, 2, 2, 2),
        num_res_blocks=3,
        attention_resolutions=(16, 8),
        head_channels=64,
        dropout=dropout,
        resample="resblock",
        num_decoders=2,
        decouple=True,
        time_embedding="log",
    )


def adm_const2_cifar10(dropout: float = 0.1) -> UNet:
    """ADM-Public const2 CIFAR-10: as :func:`ddm_cifar10` with 160 ch and one decoder (c head,
    eps derived, ``"ddm_c"``); ~90.1M parameters."""
    return ddm_cifar10(dropout).clone(base_channels=160, num_decoders=1)


def ddm_celeba_latent(dropout: float = 0.1) -> UNet:
    """DDM CelebA-HQ-256 latent U-Net (64 x 64 x 3 latents): 96 ch, (1, 2, 3, 4), attention at
    32 and 16 px, two decoders; ~121.1M parameters."""
    return ddm_cifar10(dropout).clone(
        base_channels=96, channel_mult=(1, 2, 3, 4), attention_resolutions=(32, 16)
    )


def smd_cifar10_backbone(dropout: float = 0.0) -> UNet:
    """ADM-family stand-in for the SMD code's lucidrains U-Net (dim 128, (1, 2, 2, 2), 7x7 input
    conv, attention at every level): 1 block per level and full attention where the original
    uses linear attention. Not layer-identical; its count is reported beside the paper's 28.54M."""
    return UNet(
        base_channels=128,
        channel_mult=(1, 2, 2, 2),
        num_res_blocks=1,
        attention_resolutions=(32, 16, 8, 4),
        num_heads=4,
        dropout=dropout,
        input_kernel=7,
    )


def smd_cifar10(latent_dim: int = 100, dropout: float = 0.0) -> SMDNet:
    """SMD CIFAR-10: :func:`smd_cifar10_backbone` with hypernetworks (d = 100, L = 2) at both
    sites and g_xi of 32 ch, (1, 2), one head, 100 latent channels per pixel."""
    return smd_net(smd_cifar10_backbone(dropout), latent_dim=latent_dim)
