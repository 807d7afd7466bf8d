"""Training throughput on this machine: images/s, peak memory, and the overhead of the full
``train_step`` over a bare forward + backward pass of the same network.

    python -m benchmarks.train_throughput [--configs=digits_spd,cifar10_spd] [--batch=0] [--steps=10]
    python -m benchmarks.train_throughput --configs=cifar10_spd --profile=/tmp/prof [--cpu_options]
    python -m benchmarks.train_throughput --second_start [--config=configs/digits_spd.py]

For each config (its network and process at full size; ``--batch`` overrides the global batch,
0 keeps the config's digits batch and uses 8 for the CIFAR-10 sizes on CPU) it times, after a
warm-up call:

* ``train_step``: the jitted, mesh-sharded step of :mod:`spd_jax.training` (time and noise sampling,
  forward process, loss, gradients, clipping, AdamW, EMA, non-finite check);
* ``bare``: ``jax.grad`` of the mean squared network output on a fixed (x_t, t) batch.

The ratio train_step / bare is the training system's overhead (target <= 1.10). Data loading is
not included (CIFAR-10 sizes use random images and the preset spectrum, so no dataset is needed).
Peak memory is XLA's compiled estimate (arguments + outputs + temporaries) and the process's peak
resident set size; ``page_faults_per_step`` counts the process's minor page faults over the timed
steps, which follow two warm-up steps. Run as a script on a CPU-only JAX it restarts itself once
with the glibc malloc settings that ``launch.py`` uses (:mod:`spd_jax.host_malloc`;
``SPD_JAX_MALLOC_TUNING=0`` for glibc's defaults).

``--profile=DIR`` also traces three train steps with the JAX profiler and prints where the time
goes: each executed thunk is joined to its HLO instruction, whose ``op_name`` metadata names the Flax
module (convolutions, attention, GroupNorm, dropout's random bits, optimizer/EMA, ...), forward and
backward apart. ``--cpu_options`` compiles with ``compile_cache.CPU_COMPILER_OPTIONS`` (before/after).

Each row also gives the step's FLOPs (XLA's cost analysis of the compiled step), the achieved
TFLOP/s and the MFU against the device's peak (:data:`PEAK_TFLOPS`, or on a CPU the measured
float32 matmul rate; ``--peak_tflops`` overrides). It runs unchanged on a GPU or TPU.

``--second_start`` instead measures the persistent compilation cache
(:mod:`spd_jax.training.compile_cache`): it launches ``launch.py --config=CONFIG
--config.train.num_steps=1`` twice in new processes, each in a fresh workdir, with one fresh cache
directory given through JAX's own environment variables (the same settings as
``compile_cache.enable``, so no launcher wiring is needed), and prints each launch's wall time
(launch to exit: start-up, data, init, the first train step, checkpoint and the final sample grid)
and the cache entries it added.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from spd_jax import training  # noqa: E402
from spd_jax.run import builders as experiment  # noqa: E402

CPU_CIFAR_BATCH = 8


_RNG = ("_uniform", "_normal", "threefry", "random_bits", "fold_in", "_bernoulli")


def _category(opcode: str, op_name: str) -> str:
    """A profile category of one HLO instruction, from its opcode and ``op_name`` metadata."""
    where = "bwd " if "transpose(" in op_name else "fwd "
    if "UNet" not in op_name and "SMDNet" not in op_name:
        if any(k in op_name for k in _RNG):
            return "rng: time/noise (per example)"
        if any(k in op_name for k in ("/cond", "reduce_and", "is_finite")):
            return "finite check + cond select"
        if not op_name:
            return f"no metadata ({opcode}: layout transposes, param copies, optimizer)"
        if "jvp(" not in op_name:
            return "optimizer/EMA/grad-norm"
        return "loss/process"
    if "Dropout" in op_name:
        return "dropout: random bits" if any(k in op_name for k in _RNG) else where + "dropout mask"
    if "attn" in op_name:
        if re.search(r"attn\w*/norm/", op_name):
            return where + "groupnorm"
        if "/qkv" in op_name or "/proj" in op_name:
            return where + "attention qkv/proj"
        return where + "attention core"
    if re.search(r"/(norm_in|norm_out|norm)/", op_name):
        return where + "groupnorm"
    if "conv_general_dilated" in op_name:
        return where + "convolution"
    return where + "other (silu, adds, bias, concat, resample, embeddings)"


def profile_breakdown(compiled, run, calls: int, directory: str) -> list[tuple[str, float, float]]:
    """Trace ``calls`` calls of ``run()`` with the JAX profiler and group the executed thunks by
    :func:`_category` of their HLO instruction: (category, thread-seconds per call, share).

    Thread-seconds sum the thunks' durations over XLA's threads. Thunks that run asynchronously
    (XLA's Eigen convolutions) only show their dispatch, so read a run with YNNPACK convolutions
    for the convolutions' share."""
    import collections
    import glob

    info = {}
    for line in compiled.as_text().splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .*? ([a-z][a-z\-]*)\(", line)
        if m:
            op = re.search(r'op_name="([^"]*)"', line)
            info[m.group(1)] = (m.group(2), op.group(1) if op else "")
    with jax.profiler.trace(directory):
        for _ in range(calls):
            run()
    path = sorted(glob.glob(os.path.join(directory, "**", "*.xplane.pb"), recursive=True))[-1]
    totals = collections.Counter()
    for plane in jax.profiler.ProfileData.from_file(path).planes:
        for line in plane.lines:
            for event in line.events:
                if event.name in info:
                    totals[_category(*info[event.name])] += event.duration_ns
    whole = sum(totals.values()) or 1
    return [(c, v / calls / 1e9, v / whole) for c, v in totals.most_common()]


def _median_seconds(fn, args_fn, steps: int) -> float:
    times = []
    for _ in range(steps):
        args = args_fn()
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


#: dense peak TFLOP/s per device (float32 via TF32 tensor cores on NVIDIA; bfloat16), by a substring
#: of ``jax.devices()[0].device_kind``; ``--peak_tflops`` overrides, the CPU's is measured
PEAK_TFLOPS = {
    "H200": {"float32": 494.0, "bfloat16": 989.0},
    "H100": {"float32": 494.0, "bfloat16": 989.0},
    "A100": {"float32": 156.0, "bfloat16": 312.0},
    "L4": {"float32": 60.0, "bfloat16": 121.0},
    "TPU v4": {"float32": 275.0, "bfloat16": 275.0},
    "TPU v5 lite": {"float32": 197.0, "bfloat16": 197.0},
    "TPU v5p": {"float32": 459.0, "bfloat16": 459.0},
    "TPU v6": {"float32": 918.0, "bfloat16": 918.0},
}


def measured_matmul_tflops(size: int = 2048, repeats: int = 5) -> float:
    """This device's float32 matmul rate (TFLOP/s): the best of ``repeats`` size x size products."""
    a = jax.random.normal(jax.random.PRNGKey(0), (size, size), jnp.float32)
    product = jax.jit(lambda x: x @ x)
    jax.block_until_ready(product(a))
    best = min(_median_seconds(product, lambda: (a,), 1) for _ in range(repeats))
    return 2 * size**3 / best / 1e12


def peak_tflops(dtype: str = "float32") -> tuple[float, str]:
    """(peak TFLOP/s per device, where it comes from) for MFU."""
    kind = jax.devices()[0].device_kind
    for name, peaks in PEAK_TFLOPS.items():
        if name.lower() in kind.lower():
            return peaks[dtype], f"{name} table ({dtype})"
    return measured_matmul_tflops(), f"measured float32 matmul on {kind}"


def _flops(compiled) -> float | None:
    """FLOPs of one call of a compiled program (per device), from XLA's cost analysis."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def _compiled_bytes(compiled) -> int | None:
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    return int(stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes)


def bench(name: str, batch: int, steps: int, profile: str = "", compiler_options: dict | None = None,
          dtype: str = "float32") -> dict:
    config = importlib.import_module(f"configs.{name}").get_config()
    config.model.dtype = dtype
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
    multi_step = training.scan_steps(training.make_train_step(experiment.build_loss(config, model, process), tx,
                                                              config.train.ema, schedule))
    if compiler_options is None:  # exactly what a run compiles
        step = training.shard_train_step(multi_step, mesh)
    else:  # shard_train_step's jit with these XLA options
        rep = training.replicated(mesh)
        step = jax.jit(multi_step, in_shardings=(rep, training.batch_sharding(mesh, 1)), out_shardings=(rep, rep),
                       donate_argnums=(0,), compiler_options=compiler_options)
    batches = training.global_batch({"image": images[None]}, mesh)
    compiled_step = step.lower(state, batches).compile()

    holder = {"state": state}

    def run_step(b):
        holder["state"], metrics = compiled_step(holder["state"], b)
        return metrics

    for _ in range(2):  # warm-up, waited for (a dispatch returns at once): the heap grows over the first steps
        jax.block_until_ready(run_step(batches))
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t_step = _median_seconds(run_step, lambda: (batches,), steps)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps

    x_t = jnp.asarray(images)
    t = jnp.full((batch,), 0.5, jnp.float32)
    extra = (x_t,) if hasattr(model, "latent_net") else ()

    def bare_loss(v):
        out = model.apply(v, x_t, t, *extra, train=True, rngs={"dropout": jax.random.PRNGKey(2)})
        return sum(jnp.mean(o**2) for o in (out if isinstance(out, tuple) else (out,)))

    if profile:
        rows = profile_breakdown(compiled_step, lambda: float(run_step(batches)["loss"]), 3,
                                 os.path.join(profile, name))
        print(f"{name}: train step, thread-seconds per step by category (load {os.getloadavg()[0]:.2f})")
        for category, seconds, share in rows:
            print(f"  {seconds:8.3f} s  {100 * share:5.1f}%  {category}")
    bare = jax.jit(jax.grad(bare_loss), compiler_options=compiler_options).lower(variables).compile()
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
        "step_GFLOP": (_flops(compiled_step) or 0.0) / 1e9,
        "TFLOP_per_s": (_flops(compiled_step) or 0.0) / t_step / 1e12,
        "peak_rss_MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "page_faults_per_step": faults,
    }


def second_start(config: str, overrides: list[str]) -> list[dict]:
    """Wall time of two launches of ``config`` for one step, sharing one fresh compilation cache."""
    import subprocess
    import tempfile

    from spd_jax.training import compile_cache

    root = tempfile.mkdtemp(prefix="spd_second_start_")
    cache = os.path.join(root, "xla")
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache, JAX_ENABLE_COMPILATION_CACHE="true",
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=str(compile_cache.MIN_COMPILE_TIME_SECS),
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=str(compile_cache.MIN_ENTRY_SIZE_BYTES))
    env.pop(compile_cache.ENV_VAR, None)
    launcher = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch.py")
    rows = []
    for run in ("first", "second"):
        before = len(compile_cache.entries(cache))
        load = os.getloadavg()
        start = time.perf_counter()
        out = subprocess.run([sys.executable, launcher, f"--config={config}", f"--workdir={root}/{run}",
                              "--config.train.num_steps=1", *overrides], env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if out.returncode:
            raise SystemExit(f"{run} launch failed:\n{out.stderr[-3000:]}")
        rows.append({"run": run, "wall_s": wall, "new_entries": len(compile_cache.entries(cache)) - before,
                     "load": tuple(round(x, 2) for x in load)})
        print(f"{run:6s} launch: {wall:6.1f} s wall, {rows[-1]['new_entries']} new cache entries, load {rows[-1]['load']}",
              flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="digits_spd,cifar10_spd")
    parser.add_argument("--batch", type=int, default=0)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--second_start", action="store_true", help="time two launches sharing the compilation cache")
    parser.add_argument("--config", default="configs/digits_spd.py", help="config of --second_start")
    parser.add_argument("--profile", default="", help="trace 3 steps into this directory and print the breakdown")
    parser.add_argument("--cpu_options", action="store_true",
                        help="compile with spd_jax.training.compile_cache.CPU_COMPILER_OPTIONS")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="compute dtype of the network (config.model.dtype)")
    parser.add_argument("--peak_tflops", type=float, default=0.0,
                        help="peak TFLOP/s per device for MFU (default: the table, or a measured matmul on CPU)")
    parser.add_argument("overrides", nargs="*", help="--second_start: extra --config.a.b=value flags (after --)")
    args = parser.parse_args()
    if args.second_start:
        second_start(args.config, args.overrides)
        return
    print(f"backend={jax.default_backend()} devices={jax.device_count()} jax={jax.__version__}")
    peak, source = (args.peak_tflops, "--peak_tflops") if args.peak_tflops else peak_tflops(args.dtype)
    print(f"MFU against {peak:.3g} TFLOP/s per device ({source}); {args.dtype} compute")
    header = ("config", "params_M", "batch", "image", "step_s", "images_per_s", "bare_s", "ratio", "xla_step_MiB",
              "peak_rss_MiB", "page_faults_per_step", "step_GFLOP", "TFLOP_per_s", "MFU")
    print(" | ".join(header))
    for name in args.configs.split(","):
        options = None
        if args.cpu_options:
            from spd_jax.training import compile_cache

            options = compile_cache.cpu_compiler_options()
        row = bench(name.strip(), args.batch, args.steps, args.profile, options, args.dtype)
        row["MFU"] = row["TFLOP_per_s"] / peak
        print(" | ".join(f"{row[k]:.3f}" if isinstance(row[k], float) else str(row[k]) for k in header), flush=True)


if __name__ == "__main__":
    from spd_jax import host_malloc

    host_malloc.reexec_if_needed()  # on a CPU-only JAX, the glibc settings launch.py runs with
    main()
