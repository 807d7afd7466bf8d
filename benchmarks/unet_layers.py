"""The U-Net's GroupNorm and attention against their textbook Flax forms, side by side on the CPU.

    taskset -c 0 python benchmarks/unet_layers.py --threads=1      # one core (see below)
    python benchmarks/unet_layers.py --threads=2

Two builds of the SPD CIFAR-10 U-Net (``configs/cifar10_spd.py``, 52.5 M parameters, batch 8 of
32x32x3) with the same parameters:

* ``current``: :mod:`spd_jax.models.unet` as it is: :func:`~spd_jax.models.unet.group_norm` (per-channel
  spatial sums, then groups) and heads-major attention (q, k, v as (B, H, T, c), plain batched
  matmuls);
* ``reference``: ``flax.linen.GroupNorm`` and token-major attention (the einsums
  ``bqhc,bkhc->bhqk`` and ``bhqk,bkhc->bqhc``), the forms the network used before.

Timed in interleaved rounds, compiled with :func:`spd_jax.training.compile_cache.cpu_compiler_options`:
the forward pass (``train=False``), and forward + backward with dropout on (the gradient of a
squared output w.r.t. the parameters). Also the two layers alone: GroupNorm + SiLU on 8x32x32x128
and attention on 8x16x16x256. Prints medians, the ratio reference / current (> 1: current is
faster) and the largest difference between the two builds' outputs.

XLA:CPU runs some work outside its intra-op pool, so ``--threads=1`` alone does not keep it on one
core; pin the process with ``taskset`` for one-core figures.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import sys
import time

# the side-by-side benchmark beside this file; it imports no JAX, so threads are set before JAX starts
from official_speed import ROOT, _set_threads


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--reps", type=int, default=2, help="calls per block")
    parser.add_argument("--what", default="layers,forward,train")
    args = parser.parse_args(argv)
    _set_threads(args.threads)

    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    sys.path.insert(0, ROOT)
    from configs import cifar10_spd
    from spd_jax.models import unet
    from spd_jax.run import builders
    from spd_jax.training import compile_cache

    def flax_group_norm(channels, max_groups, dtype=jnp.float32, name=None):
        return nn.GroupNorm(num_groups=unet.norm_groups_for(channels, max_groups), epsilon=1e-5, dtype=dtype,
                            name=name)

    class TokenMajorAttention(unet.SelfAttention):
        """The attention as the network computed it before: token-major einsums."""

        @nn.compact
        def __call__(self, x):
            batch, height, width, channels = x.shape
            heads = channels // self.head_channels if self.head_channels else self.num_heads
            h = flax_group_norm(channels, self.norm_groups, dtype=self.dtype, name="norm")(x)
            qkv = nn.Dense(3 * channels, dtype=self.dtype, name="qkv")(h.reshape(batch, height * width, channels))
            q, k, v = jnp.split(qkv.reshape(batch, height * width, 3 * heads, channels // heads), 3, axis=2)
            logits = jnp.einsum("bqhc,bkhc->bhqk", q, k) / math.sqrt(channels // heads)
            weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
            out = jnp.einsum("bhqk,bkhc->bqhc", weights, v)
            out = nn.Dense(channels, kernel_init=nn.initializers.zeros, dtype=self.dtype, name="proj")(
                out.reshape(batch, height * width, channels))
            return x + out.reshape(x.shape)

    @contextlib.contextmanager
    def build(kind):
        """While tracing, the U-Net's module-level layers are the chosen kind's."""
        saved = unet.SelfAttention, unet._group_norm
        if kind == "reference":
            unet.SelfAttention, unet._group_norm = TokenMajorAttention, flax_group_norm
        try:
            yield
        finally:
            unet.SelfAttention, unet._group_norm = saved

    options = compile_cache.cpu_compiler_options()
    config = cifar10_spd.get_config()
    model = builders.build_model(config)
    shape = (32, 32, 3)
    rng = np.random.default_rng(0)
    variables = builders.init_variables(model, shape, jax.random.PRNGKey(0))
    # non-zero everywhere (the output convolutions start at zero), so the outputs can be compared
    variables = jax.tree.map(lambda a: a + 0.02 * rng.standard_normal(a.shape).astype(np.float32), variables)
    x = jnp.asarray(np.clip(rng.normal(0, 0.5, (args.batch,) + shape), -1, 1).astype(np.float32))
    t = jnp.full((args.batch,), 0.5, jnp.float32)

    def forward(v, x, t):
        return model.apply(v, x, t, train=False)

    def train(v, x, t):
        def loss(v):
            out = model.apply(v, x, t, train=True, rngs={"dropout": jax.random.PRNGKey(3)})
            return jnp.mean(out**2)
        return jax.grad(loss)(v)

    gn_x = jnp.asarray(rng.standard_normal((args.batch, 32, 32, 128)), jnp.float32)
    gn_params = {"params": {"scale": jnp.ones(128), "bias": jnp.zeros(128)}}
    at_x = jnp.asarray(rng.standard_normal((args.batch, 16, 16, 256)), jnp.float32)
    at_module = unet.SelfAttention(num_heads=4)
    at_params = jax.tree.map(lambda a: a + 0.05 * rng.standard_normal(a.shape).astype(np.float32),
                             at_module.init(jax.random.PRNGKey(1), at_x))

    cases = {}
    what = args.what.split(",")
    if "layers" in what:
        cases["groupnorm+silu 8x32x32x128"] = (
            {"current": lambda p, y: jax.nn.silu(unet.GroupNorm(32).apply(p, y)),
             "reference": lambda p, y: jax.nn.silu(nn.GroupNorm(num_groups=32, epsilon=1e-5).apply(p, y))},
            (gn_params, gn_x))
        cases["attention 8x16x16x256, 4 heads"] = (
            {"current": at_module.apply,
             "reference": TokenMajorAttention(num_heads=4).apply},
            (at_params, at_x))
    if "forward" in what:
        cases["U-Net forward"] = ({"current": forward, "reference": forward}, (variables, x, t))
    if "train" in what:
        cases["U-Net forward+backward"] = ({"current": train, "reference": train}, (variables, x, t))

    print(f"jax {jax.__version__} threads={args.threads} batch={args.batch} load={os.getloadavg()[0]:.2f}")
    compiled = {}
    for case, (fns, operands) in cases.items():
        for kind, fn in fns.items():
            with build(kind):
                start = time.perf_counter()
                # a fresh function per build: jit's cache must not hand one build the other's program
                traced = jax.jit(lambda *a, fn=fn: fn(*a), compiler_options=options)
                compiled[case, kind] = traced.lower(*operands).compile()
            print(f"compiled {case} / {kind}: {time.perf_counter() - start:.1f} s", flush=True)
    results = {}
    for case, (fns, operands) in cases.items():
        outs = {k: jax.tree.leaves(compiled[case, k](*operands)) for k in fns}
        diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(outs["current"], outs["reference"], strict=True))
        times = {k: [] for k in fns}
        for r in range(args.rounds):
            for kind in (("current", "reference") if r % 2 == 0 else ("reference", "current")):
                for _ in range(args.reps):
                    start = time.perf_counter()
                    jax.block_until_ready(compiled[case, kind](*operands))
                    times[kind].append(time.perf_counter() - start)
        med = {k: statistics.median(v) for k, v in times.items()}
        results[case] = dict(med, ratio=med["reference"] / med["current"], max_abs_diff=diff)
        print(f"{case:34s} reference {1e3 * med['reference']:9.2f} ms  current {1e3 * med['current']:9.2f} ms  "
              f"reference/current {med['reference'] / med['current']:.2f}  max |diff| {diff:.1e}", flush=True)
    print(f"load at the end: {os.getloadavg()[0]:.2f}")
    return results


if __name__ == "__main__":
    main()
