"""Sampler overhead: wall time of one jitted ``sample`` call with N NFE divided by N x the time of
one jitted call of the same denoiser (CPU; not a timed test). Target: <= 1.05.

The denoiser is a small Flax Linen conv net of realistic per-layer size (3x3 convolutions at 64
channels on 32x32x3, batch 16, time-conditioned) behind an eps head. The row "reference" times N
denoiser calls in a bare jitted ``fori_loop`` (no sampler): the part of the ratio that XLA's loop
itself costs. Times are the minimum over repeats, alternating single calls and samples, after a
warm-up (compilation excluded), as wall time and as CPU time of this process (robust to other
load); the sample time includes the host-side plan (grid and tables)::

    python -m benchmarks.sampler_overhead --out benchmarks/results
"""

from __future__ import annotations

import argparse
import csv
import pathlib
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from spd_jax.diffusion import parameterization, processes, samplers, spectrum

SHAPE = (16, 32, 32, 3)


class ConvNet(nn.Module):
    """Four 3x3 conv layers at ``width`` channels with a time embedding added after the first."""

    width: int = 64
    depth: int = 4

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array) -> jax.Array:
        freqs = jnp.exp(jnp.linspace(0.0, 6.0, 16))
        emb = jnp.concatenate([jnp.sin(t[:, None] * freqs), jnp.cos(t[:, None] * freqs)], axis=-1)
        h = nn.Conv(self.width, (3, 3))(x)
        h = h + nn.Dense(self.width)(emb)[:, None, None, :]
        for _ in range(self.depth - 1):
            h = nn.Conv(self.width, (3, 3))(nn.silu(h))
        return nn.Conv(x.shape[-1], (3, 3))(nn.silu(h))


def timed(fn) -> tuple[float, float]:
    """(wall, CPU) seconds of one ``fn()`` call (``fn`` must block until its result is ready)."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def interleaved_minima(call, run, repeats: int, calls_per_repeat: int = 5) -> dict:
    """Minimum wall and CPU times of ``call`` and ``run``, alternating both after a warm-up of each.

    Other processes may share the CPU: alternating and taking minima compares the two under the
    same conditions; CPU time (all threads of this process) is less sensitive to that load.
    """
    call()
    run()
    call_times, run_times = [], []
    for _ in range(repeats):
        call_times += [timed(call) for _ in range(calls_per_repeat)]
        run_times.append(timed(run))
    call_times += [timed(call) for _ in range(calls_per_repeat)]
    calls, runs = np.array(call_times), np.array(run_times)
    return {"call_wall": calls[:, 0].min(), "call_cpu": calls[:, 1].min(),
            "sample_wall": runs[:, 0].min(), "sample_cpu": runs[:, 1].min()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results", help="directory for the CSV output")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    net = ConvNet()
    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, SHAPE)
    t = jnp.full((SHAPE[0],), 0.5)
    params = net.init(key, x, t)
    print(f"conv net: {sum(p.size for p in jax.tree.leaves(params)):,} parameters, batch {SHAPE}, "
          f"{jax.device_count()} {jax.default_backend()} device(s)")

    # "reference": N denoiser calls in a bare jitted fori_loop (XLA's loop cost, no sampler)
    cases = [(processes.vp_linear(), "reference")]
    cases += [(processes.vp_linear(), m) for m in ("ancestral", "ddim", "gradient_estimation", "heun")]
    cases += [(processes.spd(spectrum.power_law(SHAPE[1:])), "ancestral")]
    rows = []
    for proc, method in cases:
        den = parameterization.make_denoiser(lambda x_t, t_: net.apply(params, x_t, t_), proc, "eps")
        jitted = jax.jit(den)

        def call(jitted=jitted):
            jitted(x, t).x0.block_until_ready()

        for num_steps in (10, 50):
            if method == "reference":
                loop = jax.jit(lambda y, den=den, n=num_steps: jax.lax.fori_loop(
                    0, n, lambda i, v: 0.5 * (v + den(v, t).x0), y))

                def run(loop=loop, num_steps=num_steps):
                    loop(x).block_until_ready()
                    return {"nfe": num_steps}
            else:

                def run(den=den, proc=proc, method=method, num_steps=num_steps):
                    out, info = samplers.sample(den, proc, method=method, num_steps=num_steps, key=key,
                                                shape=SHAPE, clip_x0=False)
                    out.block_until_ready()
                    return info

            nfe = run()["nfe"]
            times = interleaved_minima(call, run, args.repeats)
            row = {"process": proc.name, "method": method, "num_steps": num_steps, "nfe": nfe}
            row.update({name: 1e3 * value for name, value in times.items()})  # milliseconds
            row["ratio_wall"] = times["sample_wall"] / (nfe * times["call_wall"])
            row["ratio_cpu"] = times["sample_cpu"] / (nfe * times["call_cpu"])
            rows.append(row)
            print(f"{proc.name:>10} {method:>20} N={num_steps:>2} NFE={nfe:>3}: call {row['call_wall']:6.1f} ms, "
                  f"sample {row['sample_wall']:7.1f} ms; ratio wall {row['ratio_wall']:.3f}, "
                  f"CPU {row['ratio_cpu']:.3f}", flush=True)

    with (out / "sampler_overhead.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print("\n| process | method | N | NFE | ratio (wall) | ratio (CPU time) |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['process']} | {r['method']} | {r['num_steps']} | {r['nfe']} | {r['ratio_wall']:.3f} | "
              f"{r['ratio_cpu']:.3f} |")
    for kind in ("wall", "cpu"):
        ratios = [r[f"ratio_{kind}"] for r in rows]
        print(f"ratio ({kind}): median {np.median(ratios):.3f}, max {max(ratios):.3f} (target <= 1.05)")


if __name__ == "__main__":
    main()
