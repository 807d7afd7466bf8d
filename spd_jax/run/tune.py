"""Tune a sampler's time grid and per-step weights on the exact law of the config's data spectrum.

    python -m spd_jax.run.tune --config=configs/patches_spd.py --workdir=DIR \
        [--sampler=dpm_solver_pp] [--nfe=10] [--name=NAME] [--objective=robust] [--iterations=200] \
        [--start=dpm_solver_pp_nfe5]

Builds the config's process and the spectrum of its training data (as training does,
:mod:`spd_jax.run.builders`), runs :func:`spd_jax.diffusion.tune.tune` (exact KL of Gaussian data
with that spectrum, float64, autodiff) and writes DIR/tuned/NAME.json (default NAME:
``<sampler>_nfe<N>``) with the grid, the weights, the tuned and default KLs and their worst case
under +-2 % level perturbations. Sampling then uses it with ``--config.sample.grid=tuned:NAME``
(or a path to the JSON), see :func:`spd_jax.diffusion.grids.load_tuned`. ``--start=NAME`` warm-starts
from an earlier tuning of the same sampler in DIR/tuned (typically the next lower NFE): its levels
and weights are resampled onto the new steps, which keeps the tuned KL falling as the NFE grows.
"""

from __future__ import annotations

import os
import sys

import numpy as np
from etils import epath

from spd_jax.diffusion import grids, spectrum, tune


def data_spectrum(config, process) -> tuple[np.ndarray, str]:
    """(S, description): the training data's spectrum in the process's basis (DFT for scalar
    processes), estimated as :func:`spd_jax.run.builders.build_spectrum` does."""
    from spd_jax import data
    from spd_jax.run import builders

    shape = builders.image_shape(config)
    source = builders.build_source(config, "train")
    basis = "dft" if process.is_scalar else process.basis
    if basis == "dft":
        spec = builders.build_spectrum(config, source, shape)
        what = "preset power law" if config.process.spectrum == "preset" else "training data"
    else:
        images = data.spectrum_images(source, config.process.spectrum_images, config.data.flip)
        spec = spectrum.estimate(images, basis, per_channel=config.process.per_channel)
        what = "training data"
    return spec, f"{what} ({config.data.name}, {basis})"


def run(config, workdir: str, *, method: str | None = None, nfe: int | None = None, name: str | None = None,
        objective: str = "robust", iterations: int = 200, start: str | None = None) -> dict:
    """Tune ``method`` (default config.sample.method) at ``nfe`` (default config.sample.nfe) and
    save DIR/tuned/NAME.json; returns the saved record. ``start``: the name (under DIR/tuned) or
    path of an earlier tuning of the same method to warm-start from."""
    from spd_jax.run import builders

    method = method or config.sample.method
    start_grid = grids.load_tuned(start, workdir) if start else None  # read (and checked) before any work
    if start_grid is not None and start_grid.method != method:
        raise ValueError(f"--start={start!r} is a tuning of {start_grid.method!r}; expected one of {method!r}")
    nfe = int(nfe or config.sample.nfe)
    shape = builders.image_shape(config)
    if config.process.name == "spd":  # SPD's process is built from the data spectrum itself
        spec = builders.build_spectrum(config, builders.build_source(config, "train"), shape)
        process = builders.build_process(config, spec, shape)
    else:
        process = builders.build_process(config, None, shape)
    spec, source = data_spectrum(config, process)
    result = tune.tune(process, spec, method=method, nfe=nfe, objective=objective, iterations=iterations,
                       t_max=float(config.sample.t_max), start=start_grid)
    name = name or f"{method}_nfe{result.nfe}"
    path = str(epath.Path(workdir) / grids.TUNED_DIR / (name + ".json"))
    record = tune.save(result, path, name=name, spectrum_source=source, config_process=config.process.name,
                       config_data=config.data.name)
    record["path"] = path
    return record


def summary(record: dict) -> str:
    return (f"{record['method']} at {record['nfe']} NFE on {record['process']}: KL {record['kl']:.4g} nats "
            f"(default grid {record['kl_default']:.4g}); worst under +-2% level perturbations "
            f"{record['kl_perturbed']:.4g} (default {record['kl_default_perturbed']:.4g}); "
            f"{record['seconds']:.1f} s -> {record['path']}")


def main(argv=None) -> None:
    from absl import app, flags
    from ml_collections import config_flags

    config_flag = config_flags.DEFINE_config_file("config", None, "Path to an experiment config file.")
    workdir = flags.DEFINE_string("workdir", None, "Run directory; the result goes to WORKDIR/tuned/NAME.json.")
    sampler = flags.DEFINE_enum("sampler", None, sorted(tune.TUNABLE), "Sampler (default config.sample.method).")
    nfe = flags.DEFINE_integer("nfe", None, "Target NFE (default config.sample.nfe).")
    name = flags.DEFINE_string("name", None, "Result name (default <sampler>_nfe<N>).")
    objective = flags.DEFINE_enum("objective", "robust", list(tune.OBJECTIVES), "Tuning objective.")
    iterations = flags.DEFINE_integer("iterations", 200, "Adam iterations.")
    start = flags.DEFINE_string("start", None, "Warm start from this earlier tuning (name in WORKDIR/tuned or path).")
    flags.mark_flags_as_required(["config", "workdir"])

    def _main(args):
        if len(args) > 1:
            raise app.UsageError(f"unexpected arguments: {args[1:]}")
        record = run(config_flag.value, workdir.value, method=sampler.value, nfe=nfe.value, name=name.value,
                     objective=objective.value, iterations=iterations.value, start=start.value)
        print(summary(record))

    app.run(_main, argv=argv)


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())  # configs import configs.defaults
    main()
