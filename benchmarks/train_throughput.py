"""Training throughput on this machine: images/s, peak memory, and the overhead of the full
``train_step`` over a bare forward + backward pass of the same network.

    python -m benchmarks.train_throughput [--configs=digits_spd,cifar10_spd] [--batch=0] [--steps=10]

For each config (its network and process at full size; ``--batch`` overrides the global batch,
0 keeps the config's digits batch and uses 8 for the CIFAR-10 sizes on CPU) it times, after a
warm-up call:

* ``train_step``: the jitted, mesh-sharded step of :mod:`spd_jax.train` (time and noise sampling,
  forward process, loss, gradients, clipping, AdamW, EMA, non-finite check);
* ``bare``: ``jax.grad`` of the mean squared network output on a fixed (x_t, t) batch.

The ratio train_step / bare is the training system's overhead (target <= 1.10). Data loading is
not included (CIFAR-10 sizes use random images and the preset spectrum, so no dataset is needed).
Peak memory is XLA's compiled estimate (arguments + outputs + temporaries) and the process's peak
resident set size.
"""

from __future__ import annotations

import argparse
import importlib
import os
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from spd_jax import experiment  # noqa: E402
from spd_jax import train as training  # noqa: E402

CPU_CIFAR_BATCH = 8


def _median_seconds(fn, args_fn, steps: int) -> float:
    times = []
    for _ in range(steps):
        args = args_fn()
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _compiled_bytes(compiled) -> int | None:
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    return int(stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes)


def bench(name: str, batch: int, steps: int) -> dict:
    config = importlib.import_module(f"configs.{name}").get_config()
    synthetic = config.data.name not in ("digits", "patches")
    if batch:
        config.train.batch_size = batch
    elif synthetic and jax.default_backend() == "cpu":
        config.train.batch_size = CPU_CIFAR_BATCH
    batch = config.train.batch_size
    if synthetic:
        config.process.spectrum = "preset"
        size = 64 if config.data.name == "celeb_a" else 32
        images = np.clip(np.random.default_rng(0).normal(0, 0.5, (batch, size, size, 3)), -1, 1).astype(np.float32)
        shape = images.shape[1:]
        spec = experiment.build_spectrum(config, None, shape)
    else:
        source = experiment.build_source(config)
        images = np.asarray(source[:batch])
        shape = images.shape[1:]
        spec = experiment.build_spectrum(config, source, shape)
    process = experiment.build_process(config, spec, shape)
    model = experiment.build_model(config)
    tx, schedule = experiment.build_optimizer(config)
    mesh = training.make_mesh()
    variables = experiment.init_variables(model, shape, jax.random.PRNGKey(0))
    params = sum(x.size for x in jax.tree.leaves(variables))
    state = training.replicate(training.create_train_state(variables, tx, jax.random.PRNGKey(1)), mesh)
    step = training.shard_train_step(
        training.scan_steps(training.make_train_step(experiment.build_loss(config, model, process), tx,
                                                     config.train.ema, schedule)), mesh)
    batches = training.global_batch({"image": images[None]}, mesh)
    compiled_step = step.lower(state, batches).compile()

    holder = {"state": state}

    def run_step(b):
        holder["state"], metrics = compiled_step(holder["state"], b)
        return metrics

    run_step(batches)
    t_step = _median_seconds(run_step, lambda: (batches,), steps)

    x_t = jnp.asarray(images)
    t = jnp.full((batch,), 0.5, jnp.float32)
    extra = (x_t,) if hasattr(model, "latent_net") else ()

    def bare_loss(v):
        out = model.apply(v, x_t, t, *extra, train=True, rngs={"dropout": jax.random.PRNGKey(2)})
        return sum(jnp.mean(o**2) for o in (out if isinstance(out, tuple) else (out,)))

    bare = jax.jit(jax.grad(bare_loss)).lower(variables).compile()
    jax.block_until_ready(bare(variables))
    t_bare = _median_seconds(bare, lambda: (variables,), steps)
    return {
        "config": name,
        "params_M": params / 1e6,
        "batch": batch,
        "image": "x".join(map(str, shape)),
        "step_s": t_step,
        "images_per_s": batch / t_step,
        "bare_s": t_bare,
        "ratio": t_step / t_bare,
        "xla_step_MiB": (_compiled_bytes(compiled_step) or 0) / 2**20,
        "peak_rss_MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="digits_spd,cifar10_spd")
    parser.add_argument("--batch", type=int, default=0)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    print(f"backend={jax.default_backend()} devices={jax.device_count()} jax={jax.__version__}")
    header = ("config", "params_M", "batch", "image", "step_s", "images_per_s", "bare_s", "ratio", "xla_step_MiB",
              "peak_rss_MiB")
    print(" | ".join(header))
    for name in args.configs.split(","):
        row = bench(name.strip(), args.batch, args.steps)
        print(" | ".join(f"{row[k]:.3f}" if isinstance(row[k], float) else str(row[k]) for k in header), flush=True)


if __name__ == "__main__":
    main()
