"""Input pipeline throughput on this machine: images/s of :func:`spd_jax.data.make_pipeline` over
50,000 CIFAR-10-format records, beside the train step's images/s.

    python benchmarks/input_throughput.py [--data_dir=DIR] [--batch=256] [--seconds=6]
        [--threads=2,8,16] [--workers=0,2] [--train_step=measure|skip|IMAGES_PER_S]
        [--accelerator_images_per_s=3000]

The dataset: without ``--data_dir`` a ``cifar-10-python.tar.gz`` laid out like the real one is
written to a temporary directory with 50,000 training and 1,000 test images (32x32 crops of
scikit-image's photographs, so PNG sizes and decode costs are those of natural images) and
prepared with ``python -m spd_jax.prepare cifar10 --archive=...`` (the array_record files TFDS
writes). ``--data_dir`` reuses a prepared one (e.g. the real CIFAR-10).

Rows: the default pipeline (float32 on the host, flips on the host) and uint8 delivery (flips and
scaling left to :func:`spd_jax.data.to_model_units_on_device`), for each reader-thread count and
worker-process count, plus one row with ``num_threads=0`` (everything in the consuming thread: one
core's rate). Each row reads for ``--seconds`` after a warm-up that drains the prefetch buffers,
and prints the 1-minute load average beside its number (the machine may be shared).

The train step: ``measure`` times the jitted, sharded step of ``configs/cifar10_spd.py`` (52.5M
U-Net, eps loss, Adam, EMA) on this machine's devices with uint8 batches converted inside the
step, at ``--train_batch`` (default 8 on CPU, the global batch 256 on an accelerator); a number
is taken as the step's images/s measured elsewhere. The table's ``x step`` column is pipeline /
train step images/s (>= 1: the pipeline keeps up). ``CPU ms / image`` is the CPU time (user +
system, this process and its worker processes) spent per delivered image in the measured window:
unlike images/s it hardly depends on what else the machine runs. ``cores for accel`` is
``--accelerator_images_per_s`` x that CPU time, the host cores busy to feed one accelerator at
that consumption (an estimate for the 52M U-Net on an H200 is 1,500-3,000 images/s).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

NUM_TRAIN, NUM_TEST = 50_000, 1_000


def load() -> str:
    with open("/proc/loadavg") as f:
        return f.read().split()[0]


def fake_cifar10(directory: str) -> str:
    """Prepare a 50,000-record CIFAR-10-format dataset under ``directory``; returns its data_dir."""
    from spd_jax import data, prepare

    total = NUM_TRAIN + NUM_TEST
    crops = data.load_patches("train", crops_per_photo=-(-total // len(data.PHOTOS)), seed=0)[:total]
    images = np.rint((crops + 1.0) * 127.5).astype(np.uint8)
    labels = np.random.default_rng(0).integers(0, 10, total)
    archive = os.path.join(directory, "cifar-10-python.tar.gz")
    prepare.write_cifar10_python_archive(archive, images, labels, num_test=NUM_TEST)
    data_dir = os.path.join(directory, "tfds")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "spd_jax.prepare", "cifar10", f"--data_dir={data_dir}",
                    f"--archive={archive}"], check=True, cwd=ROOT, capture_output=True)
    print(f"prepared {total} records in {time.perf_counter() - start:.1f} s "
          f"(python -m spd_jax.prepare cifar10 --archive=...), load {load()}")
    return data_dir


def cpu_seconds() -> float:
    """user + system CPU seconds of this process and its live children (grain workers)."""
    import psutil

    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.Error:
            pass
    return total


def pipeline_rate(source, batch: int, seconds: float, **kwargs) -> tuple[float, float]:
    """(steady-state images/s, CPU seconds per image) of one pipeline configuration."""
    from spd_jax import data

    it = iter(data.make_pipeline(source, batch_size=batch, seed=0, flip=True, **kwargs))
    try:
        warm = (kwargs.get("prefetch") or max(4, kwargs.get("num_threads", 2))) + 2
        warm += kwargs.get("worker_count", 0) * kwargs.get("worker_buffer", 2)
        for _ in range(warm):
            next(it)
        start, cpu, images = time.perf_counter(), cpu_seconds(), 0
        while time.perf_counter() - start < seconds or images < 10 * batch:
            images += next(it)["image"].shape[0]
        return images / (time.perf_counter() - start), (cpu_seconds() - cpu) / images
    finally:
        it.close()


def train_step_rate(batch: int, steps: int = 3) -> tuple[float, str]:
    """images/s of the cifar10_spd train step on this machine's devices (uint8 batches)."""
    import importlib

    import jax

    from spd_jax import data, training
    from spd_jax.run import builders

    config = importlib.import_module("configs.cifar10_spd").get_config()
    config.process.spectrum = "preset"
    shape = builders.image_shape(config)
    model = builders.build_model(config)
    process = builders.build_process(config, builders.build_spectrum(config, None, shape), shape)
    tx, schedule = builders.build_optimizer(config)
    mesh = training.make_mesh()
    variables = builders.init_variables(model, shape, jax.random.PRNGKey(0))
    params = sum(x.size for x in jax.tree.leaves(variables))
    state = training.replicate(training.create_train_state(variables, tx, jax.random.PRNGKey(1)), mesh)
    loss = data.with_model_units(builders.build_loss(config, model, process))
    step = training.shard_train_step(
        training.scan_steps(training.make_train_step(loss, tx, config.train.ema, schedule)), mesh)
    rng = np.random.default_rng(0)
    local = {"image": rng.integers(0, 256, (1, batch) + shape, dtype=np.uint8),
             "flip": rng.random((1, batch)) < 0.5}
    batches = training.global_batch(local, mesh)
    start = time.perf_counter()
    state, metrics = step(state, batches)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = step(state, batches)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    t = float(np.median(times))
    what = (f"cifar10_spd train step ({params / 1e6:.1f}M params, global batch {batch}, "
            f"{jax.device_count()} x {jax.devices()[0].device_kind}): {t:.3f} s/step median of {steps} "
            f"(compile + first step {compile_s:.0f} s), load {load()}")
    return batch / t, what


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default="", help="a prepared TFDS data_dir with cifar10 (default: make one)")
    parser.add_argument("--batch", type=int, default=256, help="local batch of the pipeline")
    parser.add_argument("--seconds", type=float, default=6.0, help="measured seconds per row")
    parser.add_argument("--threads", default="2,8,16")
    parser.add_argument("--workers", default="0,2")
    parser.add_argument("--worker_buffer", type=int, default=2)
    parser.add_argument("--train_step", default="measure", help="measure | skip | images/s measured elsewhere")
    parser.add_argument("--train_batch", type=int, default=0, help="0: 8 on CPU, 256 on an accelerator")
    parser.add_argument("--accelerator_images_per_s", type=float, default=3000.0,
                        help="consumption of one accelerator, for the cores-needed column")
    args = parser.parse_args()
    print(f"host: {os.cpu_count()} cores, load {load()}")

    with tempfile.TemporaryDirectory(prefix="spd_jax_input_") as scratch:
        data_dir = args.data_dir or fake_cifar10(scratch)
        from spd_jax import data

        source = data.image_source("cifar10", data_dir=data_dir)
        print(f"records: {len(source)} (cifar10 train split in {data_dir})")

        rows = [("float32", 0, 0)]
        for workers in (int(w) for w in args.workers.split(",")):
            for threads in (int(t) for t in args.threads.split(",")):
                rows += [("float32", threads, workers), ("uint8", threads, workers)]
        results = []
        for dtype, threads, workers in rows:
            rate, cpu = pipeline_rate(source, args.batch, args.seconds, num_threads=threads, worker_count=workers,
                                      worker_buffer=args.worker_buffer, uint8=dtype == "uint8")
            results.append((dtype, threads, workers, rate, cpu, load()))
            print(f"  measured {dtype} threads={threads} workers={workers}: {rate:.0f} images/s", flush=True)

    if args.train_step == "skip":
        step_rate, what = None, "train step not measured"
    elif args.train_step == "measure":
        import jax

        batch = args.train_batch or (8 if jax.default_backend() == "cpu" else 256)
        step_rate, what = train_step_rate(batch)
    else:
        step_rate, what = float(args.train_step), f"train step: {args.train_step} images/s (given)"
    print(what)
    if step_rate:
        print(f"train step: {step_rate:.1f} images/s")

    cores = os.cpu_count() or 1
    header = ("delivery", "threads", "workers", "images/s", "load (1 min)", "x step", "CPU ms / image",
              "cores for accel")
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for dtype, threads, workers, rate, cpu, at_load in results:
        ratio = f"{rate / step_rate:.0f}" if step_rate else "-"
        need = args.accelerator_images_per_s * cpu  # CPU seconds per image x images per second
        print(f"| {dtype} | {threads} | {workers} | {rate:.0f} | {at_load} | {ratio} | {1e3 * cpu:.3f} | {need:.2f} |")
    print(f"\nbatch {args.batch}, flips on; accelerator consumption assumed {args.accelerator_images_per_s:.0f} "
          f"images/s; host has {cores} cores")


if __name__ == "__main__":
    main()
