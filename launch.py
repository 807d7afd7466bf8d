"""spd_jax launcher.

    python launch.py --config=configs/digits_spd.py --workdir=DIR [--mode=train|sample|eval|tune] [--config.a.b=value]

Training configs (``job = "train"``) train or resume the run in DIR (``--mode=train``), draw
samples from its latest checkpoint's EMA parameters (``--mode=sample``, with any sampler and NFE,
e.g. ``--config.sample.method=ddim --config.sample.nfe=50``), or score the EMA samples of a list of
(sampler, NFE) settings against the held-out split (``--mode=eval``, e.g.
``--config.eval.settings=gradient_estimation:10,ddim:10``; report, quality-vs-NFE plot and grids in
DIR/eval/<name>; an interrupted evaluation resumes, see ``spd_jax/run/evaluate.py``), or tune the
time grid and per-step weights of ``config.sample.method`` at ``config.sample.nfe`` on the exact law
of the training data's spectrum (``--mode=tune``, written to DIR/tuned/<method>_nfe<N>.json and used
with ``--config.sample.grid=tuned:<method>_nfe<N>``).
``configs/path_report.py`` runs the Fisher-length report (no training).
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # configs import configs.defaults

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for outputs (created if needed).")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "sample", "eval", "tune"],
                          "Train (or resume), sample from a checkpoint, evaluate a checkpoint, or tune "
                          "config.sample.method's grid and weights at config.sample.nfe on the exact law.")
flags.mark_flags_as_required(["config", "workdir"])

JOBS = ("path_report", "train")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    job = config.get("job", None)
    if job == "path_report":
        from spd_jax.run import path_report

        path_report.run(config, _WORKDIR.value)
        return
    if job != "train":
        raise app.UsageError(f"config job {job!r} is not available; expected one of {JOBS}")
    import jax

    from spd_jax.run import builders, checks, sampling, train
    from spd_jax.training import compile_cache

    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step, JAX its cache, at INFO
    compile_cache.enable(config.train.compile_cache_dir or None)  # before the first compilation
    builders.maybe_initialize_distributed(config)
    # every check runs before anything compiles or is written
    checks.validate(config, jax.device_count(), jax.process_count())
    checks.check_workdir(_WORKDIR.value)
    if _MODE.value == "train":
        train.train(config, _WORKDIR.value)
    elif _MODE.value == "tune":
        from spd_jax.run import tune

        print(tune.summary(tune.run(config, _WORKDIR.value)))
    elif _MODE.value == "eval":  # one pipeline for unconditional models and tasks
        from spd_jax.run import evaluate

        report = evaluate.run(config, _WORKDIR.value)  # every check runs before anything is restored or written
        print(f"eval report: {os.path.join(report['description']['eval_dir'], 'report.json')} "
              f"(checkpoint step {report['description']['checkpoint_step']}, EMA params)")
    else:
        path = sampling.sample(config, _WORKDIR.value)
        if path:
            print(f"samples written to {path} (and .png)")


def _parse_flags(argv):
    """absl flag parsing; an override of a config key that does not exist exits with a message."""
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as err:  # raised by ml_collections for unknown keys
        text = str(err).encode().decode("unicode_escape").replace("'", "").replace("\n", "; ")
        sys.exit(f"error: a --config override names a key that does not exist: {text}")
    except flags.Error as err:
        sys.exit(f"error: {err}")


def _run():
    from spd_jax.run.checks import ConfigError
    from spd_jax.training.checkpoint import CheckpointError

    try:
        app.run(main, flags_parser=_parse_flags)
    except (ConfigError, CheckpointError, FileNotFoundError, FloatingPointError) as err:  # a clear message, no traceback
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    from spd_jax import host_malloc

    host_malloc.reexec_if_needed()  # CPU-only JAX: restart once with glibc malloc tuned for XLA's scratch
    _run()
