"""launch.py: bad config values stop with a clear message before anything compiles or is written."""

import importlib
import os
import subprocess
import sys

import pytest

from spd_jax.run import checks
from tests.test_train import CONFIGS, ROOT, tiny


def _launch(workdir, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "launch.py", "--config=configs/digits_spd.py", f"--workdir={workdir}", *overrides]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.process.name=spdd", "config.process.name 'spdd' (did you mean 'spd'?)"),
        ("--config.sample.method=gradient_estimaton", "did you mean 'gradient_estimation'?"),
        ("--config.train.batch_size=0", "config.train.batch_size = 0 is invalid: expected an integer >= 1"),
        ("--config.train.num_step=5", 'Did you mean "num_steps" instead of "num_step"?'),
    ],
)
def test_bad_value_stops_before_writing_anything(tmp_path, override, message):
    workdir = tmp_path / "run"
    out = _launch(workdir, override)
    assert out.returncode != 0
    assert message in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert not workdir.exists()


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("process.name", "heat", "config.process.name 'heat'"),
        ("process.name", "ihdm", "config.process.name 'ihdm'"),
        ("sample.method", "euler", "config.sample.method 'euler'"),
        ("data.name", "imagenet", "config.data.name 'imagenet'"),
        ("model.base_channels", -8, "config.model.base_channels = -8"),
        ("train.num_steps", 0, "config.train.num_steps = 0"),
        ("sample.nfe", 0, "config.sample.nfe = 0"),
        ("model.channel_mult", (1, 2, 2, 2, 2), "divisible by 2^(levels - 1)"),
        ("train.ema", 1.0, "config.train.ema = 1.0"),
        ("sample.method", "smd", "a method other than 'smd' for a model without latent network"),
    ],
)
def test_validate_names_the_field_and_the_expectation(field, value, message):
    config = tiny("digits_spd")
    section, key = field.split(".")
    config[section][key] = value
    with pytest.raises(checks.ConfigError) as err:
        checks.validate(config, device_count=1)
    assert message in str(err.value)


def test_batch_must_divide_over_devices_and_processes():
    config = tiny("digits_spd")
    config.train.batch_size = 6
    with pytest.raises(checks.ConfigError, match="a multiple of the device count \\(4\\)"):
        checks.validate(config, device_count=4)
    with pytest.raises(checks.ConfigError, match="a multiple of the process count \\(4\\)"):
        checks.validate(config, device_count=2, process_count=4)


def test_unknown_sampler_option_is_rejected():
    config = tiny("digits_spd")
    config.sample.options.gama = 2.0
    with pytest.raises(checks.ConfigError, match="did you mean 'gamma'"):
        checks.validate(config, device_count=1)


def test_unwritable_workdir_is_rejected(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(checks.ConfigError, match="not a directory"):
        checks.check_workdir(str(blocker))
    with pytest.raises(checks.ConfigError, match="cannot be created"):
        checks.check_workdir(str(blocker / "run"))


@pytest.mark.parametrize("name", CONFIGS)
def test_every_shipped_config_is_valid(name):
    config = importlib.import_module(f"configs.{name}").get_config()
    checks.validate(config, device_count=1)
