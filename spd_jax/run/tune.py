"""Tune a sampler's time grid and per-step weights, on the exact law of the config's data
spectrum or on the run's trained model.

    python -m spd_jax.run.tune --config=configs/patches_spd.py --workdir=DIR \
        [--sampler=dpm_solver_pp] [--nfe=10] [--name=NAME] [--objective=robust|nominal|teacher] \
        [--iterations=200] [--start=dpm_solver_pp_nfe5]

(``launch.py --mode=tune`` runs the same with the options of ``config.tune``.)

Builds the config's process and the spectrum of its training data (as training does,
:mod:`spd_jax.run.builders`), runs :func:`spd_jax.diffusion.tune.tune` (exact KL of Gaussian data
with that spectrum, float64, autodiff) and writes DIR/tuned/NAME.json (default NAME:
``<sampler>_nfe<N>``) with the grid, the weights, the tuned and default KLs and their worst case
under +-2 % level perturbations. Sampling then uses it with ``--config.sample.grid=tuned:NAME``
(or a path to the JSON), see :func:`spd_jax.diffusion.grids.load_tuned`. ``--start=NAME`` warm-starts
from an earlier tuning of the same sampler in DIR/tuned (typically the next lower NFE): its levels
and weights are resampled onto the new steps, which keeps the tuned KL falling as the NFE grows.

``--objective=teacher`` needs a trained run in DIR: the sampler's outputs from a fixed set of
starting states are matched to a many-step teacher's outputs from the same states (the same EMA
model, config.tune.teacher), through the network (:func:`spd_jax.diffusion.tune.tune_to_teacher`),
and the result goes to DIR/tuned/<sampler>_nfe<N>_teacher.json. A useful start is the exact-law
tuning of the same sampler and NFE (``--start``).
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
        objective: str | None = None, iterations: int | None = None, start: str | None = None) -> dict:
    """Tune ``method`` (default config.sample.method) at ``nfe`` (default config.sample.nfe) and
    save DIR/tuned/NAME.json; returns the saved record. ``objective``, ``iterations`` and
    ``start`` (the name under DIR/tuned, or path, of an earlier tuning of the same method to
    warm-start from) default to config.tune's; ``objective="teacher"`` tunes on the run's trained
    model (:func:`run_teacher`), the others on the exact law of the training data's spectrum."""
    from spd_jax.run import builders

    method = method or config.sample.method
    objective = objective or str(config.tune.objective)
    iterations = int(iterations or config.tune.iterations or (300 if objective == "teacher" else 200))
    learning_rate = float(config.tune.learning_rate or (0.01 if objective == "teacher" else 0.05))
    start = start if start is not None else (str(config.tune.start) or None)
    if objective not in tune.OBJECTIVES + ("teacher",):
        raise ValueError(f"tune objective must be one of {tune.OBJECTIVES + ('teacher',)}; got {objective!r}")
    start_grid = grids.load_tuned(start, workdir) if start else None  # read (and checked) before any work
    if start_grid is not None and start_grid.method != method:
        raise ValueError(f"--start={start!r} is a tuning of {start_grid.method!r}; expected one of {method!r}")
    nfe = int(nfe or config.sample.nfe)
    # config.sample.options (e.g. order=3) are the sampler's fixed knobs when it is config.sample.method
    options = dict(config.sample.options) if method == config.sample.method else {}
    if objective == "teacher":
        return run_teacher(config, workdir, method=method, nfe=nfe, name=name, iterations=iterations,
                           start=start_grid, learning_rate=learning_rate, **options)
    shape = builders.image_shape(config)
    if config.process.name == "spd":  # SPD's process is built from the data spectrum itself
        spec = builders.build_spectrum(config, builders.build_source(config, "train"), shape)
        process = builders.build_process(config, spec, shape)
    else:
        process = builders.build_process(config, None, shape)
    spec, source = data_spectrum(config, process)
    result = tune.tune(process, spec, method=method, nfe=nfe, objective=objective, iterations=iterations,
                       t_max=float(config.sample.t_max), start=start_grid, learning_rate=learning_rate, **options)
    name = name or f"{method}_nfe{result.nfe}{_knob_suffix(options)}"
    path = str(epath.Path(workdir) / grids.TUNED_DIR / (name + ".json"))
    record = tune.save(result, path, name=name, spectrum_source=source, config_process=config.process.name,
                       config_data=config.data.name)
    record["path"] = path
    return record


def _knob_suffix(knobs: dict) -> str:
    """The default file name's mark of fixed knobs (e.g. "_order3"), so that a tuning with other
    knobs keeps its own file."""
    return "".join(f"_{k}{v}" for k, v in sorted(knobs.items()))


def _apply_denoiser(model, process, head, variables, x_t, t, *, key=None):
    from spd_jax.models.heads import model_denoiser

    return model_denoiser(model, variables, process, head)(x_t, t, key=key)


def run_teacher(config, workdir: str, *, method: str, nfe: int, name: str | None, iterations: int,
                start=None, learning_rate: float = 0.01, **knobs) -> dict:
    """Tune ``method`` at ``nfe`` on the run's latest EMA checkpoint: its samples from
    config.tune.num_examples starting states are matched to the teacher's (config.tune.teacher,
    default ``method`` at 50 NFE) from the same states (:func:`spd_jax.diffusion.tune.tune_to_teacher`).
    Saves DIR/tuned/NAME.json (default NAME ``<method>_nfe<N>_teacher``), usable like the
    exact-law tunings with ``--config.sample.grid=tuned:NAME``."""
    import functools

    import jax
    import jax.numpy as jnp

    from spd_jax.diffusion import samplers
    from spd_jax.run import builders

    t = config.tune
    if config.task.name:
        raise ValueError(f"teacher tuning is for unconditional models; config.task.name = {config.task.name!r}")
    if config.model.kind == "smd" or config.sample.method == "smd":
        raise ValueError("teacher tuning needs a deterministic denoiser; an SMD model draws a latent per call")
    if method not in tune.TEACHER_TUNABLE:
        raise ValueError(f"teacher tuning supports {sorted(tune.TEACHER_TUNABLE)}; got {method!r}")
    teacher_text = str(t.teacher) or f"{method}:50"
    teacher_method, sep, teacher_nfe = (part.strip() for part in teacher_text.partition(":"))
    if not sep or teacher_method not in samplers.METHODS or not teacher_nfe.isdigit() or int(teacher_nfe) < 1:
        raise ValueError(f"config.tune.teacher = {teacher_text!r}: expected 'sampler:NFE' with a sampler of "
                         f"{samplers.METHODS}, e.g. 'gradient_estimation:50'")
    teacher_nfe = int(teacher_nfe)
    count, batch = int(t.num_examples), int(t.batch_size)
    if count < 8 or batch < 1:
        raise ValueError(f"config.tune.num_examples must be >= 8 and batch_size >= 1; got {count}, {batch}")
    restored = builders.restore_ema(config, workdir)
    process, head, clip = restored.process, str(config.model.head), bool(config.sample.clip_x0)
    denoiser = functools.partial(_apply_denoiser, restored.model, process, head)
    key = jax.random.key(int(t.seed))
    index = np.arange(count) + (1 << 24)  # starting states apart from the evaluation's indices
    shape = (count,) + tuple(restored.shape)
    x_T = np.asarray(process.prior_sample(key, shape, index=jnp.asarray(index, jnp.uint32)))
    teacher_settings = builders.sampler_settings(config, teacher_method, teacher_nfe, workdir)
    teacher_settings.pop("clip_x0")
    if samplers.plan(process, **teacher_settings).noisy:
        raise ValueError(f"config.tune.teacher = {teacher_text!r} adds noise: the teacher must be deterministic "
                         "(e.g. gradient_estimation, dpm_solver_pp, ddim with eta = 0)")
    outputs = []
    for lo in range(0, count, 256):
        x, info = samplers.sample(denoiser, process, key=key, x_T=x_T[lo:lo + 256], clip_x0=clip,
                                  variables=restored.variables, **teacher_settings)
        outputs.append(np.asarray(x))
    teacher = np.concatenate(outputs)
    teacher_name = f"{teacher_method}:{info['nfe']}"
    result = tune.tune_to_teacher(denoiser, process, x_T, teacher, method=method, nfe=nfe, clip_x0=clip,
                                  variables=restored.variables, start=start, t_max=float(config.sample.t_max),
                                  batch=batch, iterations=iterations, learning_rate=learning_rate,
                                  teacher_name=teacher_name, tune_time_shift=bool(t.time_shift), **knobs)
    name = name or f"{method}_nfe{result.nfe}{_knob_suffix(knobs)}_teacher"
    path = str(epath.Path(workdir) / grids.TUNED_DIR / (name + ".json"))
    record = tune.save(result, path, name=name, checkpoint_step=int(restored.step),
                       start=None if start is None else start.record.get("name", "given"),
                       config_process=config.process.name, config_data=config.data.name)
    record["path"] = path
    return record


def summary(record: dict) -> str:
    if record.get("objective") == "teacher":
        return (f"{record['method']} at {record['nfe']} NFE on {record['process']}, matched to {record['teacher']}: "
                f"held-out mean squared distance {record['loss']:.4g} (start {record['loss_start']:.4g}, default "
                f"grid {record['loss_default']:.4g}); {record['seconds']:.1f} s -> {record['path']}")
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
    objective = flags.DEFINE_enum("objective", None, list(tune.OBJECTIVES) + ["teacher"],
                                  "Tuning objective (default config.tune.objective).")
    iterations = flags.DEFINE_integer("iterations", None, "Adam iterations (default config.tune.iterations, "
                                      "else 200 for the exact law and 300 for the teacher objective).")
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
