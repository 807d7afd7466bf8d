"""Sampler compilation shared across NFE settings (not a timed test).

An evaluation scores one sampler at several NFEs (e.g. gradient_estimation at 5, 10, 20 and 50).
Compiled one program per setting (:func:`spd_jax.run.sampling.make_sampler`), each NFE pays its own
compilation; in a :class:`spd_jax.run.sampling.SamplerPool` with ``pad_to`` = the largest step count
(what ``--mode=eval`` uses), the tables are arguments and the scan is padded with steps that do
nothing, so every NFE runs the same program. This script measures both side by side in one
process, with the persistent compilation cache off:

* first call per setting (compilation + one batch), summed over the settings;
* the steady-state time of one batch per setting (the padded scan's cost of its idle steps);
* that both give the same samples.

    python -m benchmarks.sampler_compile                                   # digits U-Net
    python -m benchmarks.sampler_compile --model cifar10_spd --nfes 5,10,20  # the 52.5 M U-Net on 32x32x3
"""

from __future__ import annotations

import argparse
import importlib
import os
import pathlib
import sys
import time

import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # configs import configs.defaults

from spd_jax import tasks  # noqa: E402
from spd_jax.run import builders, sampling  # noqa: E402
from spd_jax.training import compile_cache  # noqa: E402


def build(model_config: str):
    """(config, model, process, shape, variables): the model block of ``model_config`` on embedded data
    of its image size (digits 8x8x1, else the 32x32x3 patches)."""
    config = importlib.import_module("configs.digits_spd").get_config()
    if model_config != "digits_spd":
        other = importlib.import_module(f"configs.{model_config}").get_config()
        config = importlib.import_module("configs.patches_spd").get_config()
        config.model = other.model
    source = builders.build_source(config, "train")
    shape = builders.image_shape(config)
    process = builders.build_process(config, builders.build_spectrum(config, source, shape), shape)
    model = builders.build_model(config)
    variables = builders.init_variables(model, shape, jax.random.PRNGKey(0))
    variables = jax.tree.map(lambda w: w + 0.01, variables)  # a non-zero output layer
    return config, model, process, shape, variables


def measure(make, settings: dict, variables, batch: int, repeats: int) -> dict:
    """First-call and steady-state seconds per NFE for samplers made by ``make(settings)``."""
    out = {}
    for nfe, setting in settings.items():
        run = make(setting)
        start = time.perf_counter()
        images, _ = sampling.draw(run, variables, jax.random.PRNGKey(1), batch, batch)
        first = time.perf_counter() - start
        steady = []
        for _ in range(repeats):
            start = time.perf_counter()
            sampling.draw(run, variables, jax.random.PRNGKey(1), batch, batch)
            steady.append(time.perf_counter() - start)
        out[nfe] = {"first": first, "steady": float(np.min(steady)), "images": images}
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="digits_spd", help="config whose model block is measured")
    parser.add_argument("--method", default="gradient_estimation")
    parser.add_argument("--nfes", default="5,10,20,50")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    compile_cache.disable()
    config, model, process, shape, variables = build(args.model)
    nfes = [int(n) for n in args.nfes.split(",")]
    settings = {n: builders.sampler_settings(config, args.method, n) for n in nfes}
    pad_to = max(s["num_steps"] for s in settings.values())
    head, task = config.model.head, tasks.Task()
    print(f"{args.model} on {shape}, {args.method} at NFE {nfes}, batch {args.batch}, "
          f"{jax.device_count()} {jax.devices()[0].platform} device(s), load {os.getloadavg()[0]:.2f}")

    separate = measure(lambda s: sampling.make_sampler(model, process, head, task, s, shape), settings,
                       variables, args.batch, args.repeats)
    load = os.getloadavg()[0]
    pool = sampling.SamplerPool(model, process, head, task, shape, pad_to=pad_to)
    shared = measure(pool, settings, variables, args.batch, args.repeats)
    print(f"| NFE | first call: one program each (s) | first call: shared (s) | batch: one program each (s) "
          f"| batch: shared, padded to {pad_to} steps (s) | max abs difference |")
    print("|---|---|---|---|---|---|")
    for n in nfes:
        a, b = separate[n], shared[n]
        diff = float(np.max(np.abs(a["images"] - b["images"])))
        print(f"| {n} | {a['first']:.2f} | {b['first']:.2f} | {a['steady']:.3f} | {b['steady']:.3f} | {diff:.1e} |")
    total_a = sum(v["first"] for v in separate.values())
    total_b = sum(v["first"] for v in shared.values())
    steady_ratio = sum(v["steady"] for v in shared.values()) / sum(v["steady"] for v in separate.values())
    print(f"all first calls: {total_a:.1f} s one program each, {total_b:.1f} s shared: ratio {total_a / total_b:.2f}; "
          f"steady-state batches shared / separate {steady_ratio:.3f}; load {load:.2f} -> {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
