"""spd_jax launcher: ``python launch.py --config=configs/X.py --workdir=DIR [--config.a.b=value]``."""

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for outputs (created if needed).")
flags.mark_flags_as_required(["config", "workdir"])

JOBS = ("path_report",)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    job = config.get("job", None)
    if job == "path_report":
        from spd_jax import path_report

        path_report.run(config, _WORKDIR.value)
        return
    raise app.UsageError(f"config job {job!r} is not available; expected one of {JOBS}")


if __name__ == "__main__":
    app.run(main)
