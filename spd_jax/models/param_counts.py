"""Parameter counts of the papers' configurations beside the published numbers (docs/math.md §8, §9).

Run ``python -m spd_jax.models.param_counts``. Shapes come from ``jax.eval_shape``, so nothing is
allocated and the command runs in seconds on a CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from spd_jax.models import presets
from spd_jax.models.smd import SMDNet


def parameter_shapes(model, image_shape: tuple[int, int, int]):
    """Abstract variables (ShapeDtypeStructs) of ``model`` for images of ``image_shape`` (H, W, C)."""
    x = jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    inputs = (x, t, x) if isinstance(model, SMDNet) else (x, t)
    return jax.eval_shape(lambda *a: model.init(jax.random.key(0), *a), *inputs)


def count_parameters(tree) -> int:
    """Total number of scalars in a pytree of arrays or ShapeDtypeStructs."""
    return int(sum(np.prod(leaf.shape, dtype=np.int64) for leaf in jax.tree.leaves(tree)))


def _hypernet_count(params) -> int:
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return count_parameters(
        [leaf for path, leaf in flat if any("hyper_" in str(getattr(k, "key", "")) for k in path)]
    )


def paper_counts() -> list[tuple[str, int, float]]:
    """(configuration, spd_jax parameter count, published count in millions) rows."""
    cifar = (32, 32, 3)
    rows = [
        ("SPD CIFAR-10 U-Net (128 ch, 3 blocks, attn 16/8)", presets.spd_cifar10(), cifar, 52.5),
        ("DDM CIFAR-10, two decoders (192 ch)", presets.ddm_cifar10(), cifar, 216.1),
        ("ADM-Public const2, one decoder (160 ch)", presets.adm_const2_cifar10(), cifar, 90.1),
        (
            "DDM CelebA-HQ-256 latent (96 ch, 64x64x3)",
            presets.ddm_celeba_latent(),
            (64, 64, 3),
            121.1,
        ),
    ]
    out = [
        (name, count_parameters(parameter_shapes(m, shape)), paper)
        for name, m, shape, paper in rows
    ]
    base = count_parameters(parameter_shapes(presets.smd_cifar10_backbone(), cifar))
    smd = parameter_shapes(presets.smd_cifar10(), cifar)["params"]
    out += [
        ("SMD denoiser without hypernets (ADM stand-in)", base, 28.54),
        ("SMD hypernetworks f_phi (2 sites, d=100, L=2)", _hypernet_count(smd), 0.09),
        ("SMD latent network g_xi (32 ch, 100 out)", count_parameters(smd["latent_net"]), 0.73),
        ("SMD total (denoiser + f_phi + g_xi)", count_parameters(smd), 29.35),
    ]
    return out


def main() -> None:
    rows = paper_counts()
    width = max(len(name) for name, _, _ in rows)
    print(f"{'configuration':<{width}}  {'spd_jax (M)':>11}  {'paper (M)':>9}  {'diff':>7}")
    for name, count, paper in rows:
        print(
            f"{name:<{width}}  {count / 1e6:>11.3f}  {paper:>9.2f}  {100 * (count / 1e6 / paper - 1):>+6.1f}%"
        )


if __name__ == "__main__":
    main()
