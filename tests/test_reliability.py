"""Reliability: SIGKILL / SIGTERM at random points and exact resume, corrupted and
half-written checkpoints, non-finite updates, and bad input stopped before anything runs."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest
from absl import logging as absl_logging

from spd_jax import data
from spd_jax.diffusion import processes, spectrum
from spd_jax.run import builders, checks
from spd_jax.run import train as experiment
from spd_jax.training import checkpoint
from tests.multiprocess import run_processes
from tests.test_train import ROOT, tiny

CHAIN_STEPS = 18


def _chain_config(checkpoint_every: int = 3):
    """A tiny run long enough that three interruptions never reach its end."""
    config = tiny("digits_spd", num_steps=CHAIN_STEPS, checkpoint_every=checkpoint_every, keep_checkpoints=10)
    config.sample.grid_images = 0
    return config


def _env(cache: str) -> dict:
    """Subprocess environment sharing a persistent XLA cache (the step compiles once, not per run)."""
    return dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=cache,
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def _steps(workdir) -> list[int]:
    """Finalized checkpoint steps (orbax writes into <step>.orbax-checkpoint-tmp, then renames)."""
    names = os.listdir(workdir / "checkpoints") if (workdir / "checkpoints").is_dir() else []
    return sorted(int(n) for n in names if n.isdigit())


def _rows(metrics, since: float = 0.0) -> list[dict]:
    """The complete metrics.jsonl rows written at or after the Unix time ``since``."""
    if not metrics.exists():
        return []
    with open(metrics, "rb") as f:
        lines = f.read().split(b"\n")[:-1]  # the last piece is an unfinished line (or empty)
    rows = [json.loads(line) for line in lines]
    return [row for row in rows if row["wall_time"] >= since]


def _new_rows(metrics, since: float) -> list[int]:
    """Steps of the complete metrics.jsonl rows written since ``since`` (the resumed run first
    drops the rows of the steps it redoes, so rows are told apart by time, not file offset)."""
    return [row["step"] for row in _rows(metrics, since)]


def _interrupt(workdir, sig: int, rng, after_new_checkpoint: bool, cache: str):
    """Train in a subprocess and send it ``sig`` at a random point: once it has logged a step (or,
    with ``after_new_checkpoint``, finished writing a new checkpoint), after 0-2 more steps and a
    random 0-40 ms. Returns (return code, steps it logged, stderr)."""
    metrics = workdir / "metrics.jsonl"
    offset = time.time()
    before = max(_steps(workdir), default=0)
    code = f"""
        import sys
        sys.path.insert(0, {ROOT!r})
        from tests.test_reliability import _chain_config
        from spd_jax.run import train as experiment
        experiment.train(_chain_config(), {str(workdir)!r})
        """
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=_env(cache), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    extra, delay = int(rng.integers(0, 3)), float(rng.uniform(0.0, 0.04))
    target, deadline = None, time.monotonic() + 240
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            rows = _new_rows(metrics, offset)
            ready = max(_steps(workdir), default=0) > before if after_new_checkpoint else bool(rows)
            if ready and target is None:
                target = len(rows) + extra
            if target is not None and len(rows) >= target:
                time.sleep(delay)
                proc.send_signal(sig)
                break
            time.sleep(0.005)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert target is not None, f"the run ended before it could be interrupted: {err[-3000:]}"
    return proc.returncode, _new_rows(metrics, offset), err


def _flip_bytes(step_dir) -> None:
    """Bit rot: invert 64 bytes in the middle of the largest file of the state item."""
    files = [os.path.join(root, n) for root, _, names in os.walk(step_dir / "state") for n in names]
    path = max(files, key=os.path.getsize)
    blob = bytearray(open(path, "rb").read())
    middle = len(blob) // 2
    blob[middle : middle + 64] = bytes(b ^ 0xFF for b in blob[middle : middle + 64])
    open(path, "wb").write(bytes(blob))


def _record(warnings: list):
    """A stand-in for absl's logging.warning that keeps the formatted messages."""
    return lambda msg, *args, **kwargs: warnings.append(str(msg) % args if args else str(msg))


def _file_count(path) -> int:
    return sum(len(names) for _, _, names in os.walk(path))


def test_sigkill_and_sigterm_at_random_points_then_a_corrupted_checkpoint_resume_bit_for_bit(tmp_path):
    """SIGKILL, SIGTERM, SIGKILL at seeded random points (mid-step, mid-save, mid-log), then bit rot
    in the newest checkpoint: the final state equals an uninterrupted run's bit for bit."""
    workdir, cache, reference = tmp_path / "interrupted", str(tmp_path / "xla_cache"), tmp_path / "straight.npz"
    code = f"""
        import sys
        sys.path.insert(0, {ROOT!r})
        import jax, numpy as np
        from tests.test_reliability import CHAIN_STEPS, _chain_config
        from spd_jax.run import train as experiment
        state = experiment.train(_chain_config(checkpoint_every=CHAIN_STEPS), {str(tmp_path / "straight")!r})
        np.savez({str(reference)!r}, *[np.asarray(x) for x in jax.tree.leaves(state)])
        """
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=_env(cache), cwd=ROOT,
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    straight = np.load(reference)
    rng = np.random.default_rng(7)

    rc, rows, err = _interrupt(workdir, signal.SIGKILL, rng, after_new_checkpoint=True, cache=cache)
    assert rc == -signal.SIGKILL, err[-3000:]
    rc, rows, err = _interrupt(workdir, signal.SIGTERM, rng, after_new_checkpoint=False, cache=cache)
    assert rc == 0, err[-3000:]  # preemption notice: checkpoint of the step it stopped at, clean exit
    assert rows and max(_steps(workdir)) == rows[-1] < CHAIN_STEPS, (rows, _steps(workdir))
    assert "SIGTERM: wrote the checkpoint of step" in err
    rc, rows, err = _interrupt(workdir, signal.SIGKILL, rng, after_new_checkpoint=True, cache=cache)
    assert rc == -signal.SIGKILL, err[-3000:]

    steps = _steps(workdir)
    assert len(steps) >= 2 and steps[-1] < CHAIN_STEPS, steps
    newest, fallback = steps[-1], steps[-2]
    files = _file_count(workdir / "checkpoints" / str(newest))
    _flip_bytes(workdir / "checkpoints" / str(newest))
    warnings = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(absl_logging, "warning", _record(warnings))
        resumed = experiment.train(_chain_config(), str(workdir))

    assert any(w.startswith(f"checkpoint {newest} under") for w in warnings), warnings
    assert any(f"resuming from step {fallback} instead of the newer checkpoint(s) [{newest}]" in w
               for w in warnings), warnings
    aside = workdir / "checkpoints" / f"{newest}{checkpoint.SET_ASIDE_SUFFIX}"
    assert aside.is_dir() and _file_count(aside) == files  # moved aside, nothing deleted
    assert newest in _steps(workdir) and newest % 3 == 0  # the regular step was written again after the fallback
    assert int(resumed.step) == CHAIN_STEPS and int(resumed.skipped) == 0
    # the log holds every step once, in order, with the uninterrupted run's values (lost steps dropped)
    logged, reference_rows = _rows(workdir / "metrics.jsonl"), _rows(tmp_path / "straight" / "metrics.jsonl")
    assert [r["step"] for r in logged] == [r["step"] for r in reference_rows] == list(range(1, CHAIN_STEPS + 1))
    assert [r["loss"] for r in logged] == [r["loss"] for r in reference_rows]
    leaves = jax.tree.leaves(resumed)
    assert len(leaves) == len(straight.files) > 10
    for i, leaf in enumerate(leaves):
        np.testing.assert_array_equal(straight[f"arr_{i}"], np.asarray(leaf))


_TWO_PROCESS_RUN = """
import os, signal, time
import numpy as np
workdir, out, term_at = sys.argv[2:5]
from tests.test_train import tiny
from spd_jax.run import train as experiment
config = tiny("digits_spd", num_steps=8, checkpoint_every=100)
config.sample.grid_images = 0

def preempt(info):  # a real SIGTERM to this process once it reaches step term_at (0 = never)
    if int(term_at) and info.step == int(term_at):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1.0)  # a preemption notice comes ahead of the kill: the hosts agree on a stop step meanwhile

state = experiment.train(config, workdir, callbacks=[preempt])
np.savez(out, np.asarray(state.step), *[np.asarray(x) for x in jax.tree.leaves(state.params)])
"""


def _two_processes(workdir, out, term_process: int | None, term_step: int) -> list[str]:
    outs = run_processes(_TWO_PROCESS_RUN, timeout=240, args=lambda i: (
        workdir, f"{out}{i}.npz", term_step if i == term_process else 0))
    return [err for _, err in outs]


def test_sigterm_to_one_process_stops_every_process_at_the_same_step_and_both_resume(tmp_path):
    """Multi-process preemption: only process 1 gets SIGTERM (at step 3); JAX's preemption service
    makes both processes agree on the next step to stop at (no host sync of spd_jax's own per
    dispatch), both save it and exit 0; a restart of both resumes there and ends with identical
    params on both processes."""
    workdir = tmp_path / "run"
    errs = _two_processes(workdir, tmp_path / "stopped", term_process=1, term_step=3)
    stopped = [np.load(tmp_path / f"stopped{i}.npz") for i in range(2)]
    at = int(stopped[1]["arr_0"])
    assert int(stopped[0]["arr_0"]) == at and 3 <= at < 8  # process 0 stopped too, at the same step
    assert _steps(workdir) == [at]
    assert f"SIGTERM: wrote the checkpoint of step {at}" in errs[0] and f"of step {at}" in errs[1]
    _two_processes(workdir, tmp_path / "final", term_process=None, term_step=0)
    final = [np.load(tmp_path / f"final{i}.npz") for i in range(2)]
    assert int(final[0]["arr_0"]) == 8 and _steps(workdir)[-1] == 8
    for name in final[0].files:
        np.testing.assert_array_equal(final[0][name], final[1][name])
    assert any(not np.array_equal(final[0][n], stopped[0][n]) for n in final[0].files[1:])  # it trained on


# ---- corrupted and half-written checkpoints (no training) ---------------------------------------


def _save_three(directory) -> tuple:
    ckpt = checkpoint.Checkpointer(str(directory), max_to_keep=5, asynchronous=False)
    rng = np.random.default_rng(0)
    states = {s: {"w": rng.normal(size=(64, 64)).astype(np.float32), "b": np.full((3,), s, np.int32)} for s in (1, 2, 3)}
    for s, state in states.items():
        ckpt.save(s, state, {"next_index": s}, {"spectrum": np.full(4, s, np.float64)}, {"note": s})
    ckpt.wait()
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return ckpt, states, checkpoint.abstract_like(states[1], sharding)


def _state_files(step_dir) -> list[str]:
    return sorted(os.path.join(r, n) for r, _, names in os.walk(step_dir / "state") for n in names)


def _truncate(step_dir):
    path = max(_state_files(step_dir), key=os.path.getsize)
    blob = open(path, "rb").read()
    open(path, "wb").write(blob[: len(blob) // 2])


def _delete_data_file(step_dir):
    os.remove(max(_state_files(step_dir), key=os.path.getsize))


def _delete_manifest(step_dir):
    os.remove(step_dir / "state" / "manifest.ocdbt")


def _empty_meta_json(step_dir):
    (step_dir / "meta" / "metadata").write_text("")


CORRUPTIONS = {"bit_rot": _flip_bytes, "truncated_file": _truncate, "missing_data_file": _delete_data_file,
               "missing_manifest": _delete_manifest, "empty_meta_json": _empty_meta_json}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupted_latest_checkpoint_falls_back_names_both_and_deletes_nothing(tmp_path, corruption):
    ckpt, states, abstract = _save_three(tmp_path)
    CORRUPTIONS[corruption](tmp_path / "3")
    files = _file_count(tmp_path / "3")
    warnings = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(absl_logging, "warning", _record(warnings))
        step, state, data_state, arrays, meta = ckpt.restore_latest(abstract)
    assert step == 2 and data_state == {"next_index": 2} and meta == {"note": 2}
    np.testing.assert_array_equal(state["w"], states[2]["w"])
    np.testing.assert_array_equal(arrays["spectrum"], np.full(4, 2.0))
    assert any(w.startswith("checkpoint 3 under") for w in warnings), warnings
    assert any("resuming from step 2 instead of the newer checkpoint(s) [3]" in w for w in warnings), warnings
    assert all(len(w) < 1000 for w in warnings)  # no 60-line tensorstore specs
    assert _file_count(tmp_path / "3.unreadable") == files and not (tmp_path / "3").exists()
    assert sorted(os.listdir(tmp_path)) == ["1", "2", "3.unreadable"]
    ckpt.save(3, states[3], {"next_index": 3}, {"spectrum": np.ones(4)}, {})  # the step can be written again
    ckpt.wait()
    assert ckpt.restore_latest(abstract)[0] == 3
    ckpt.close()


def test_half_written_checkpoint_is_never_listed_and_is_replaced(tmp_path):
    """A write cut short (a crash before orbax's final rename) leaves <step>.orbax-checkpoint-tmp."""
    ckpt, states, abstract = _save_three(tmp_path)
    ckpt.close()
    partial = tmp_path / "4.orbax-checkpoint-tmp"
    shutil.copytree(tmp_path / "3", partial)
    _delete_data_file(partial)
    ckpt = checkpoint.Checkpointer(str(tmp_path), max_to_keep=5, asynchronous=False)
    assert ckpt.all_steps() == [1, 2, 3]
    assert ckpt.restore_latest(abstract)[0] == 3
    ckpt.save(4, states[3], {"next_index": 4}, {"spectrum": np.ones(4)}, {})
    ckpt.wait()
    step, state, data_state, _, _ = ckpt.restore_latest(abstract)
    ckpt.close()
    assert step == 4 and data_state == {"next_index": 4} and not partial.exists()


def test_when_no_checkpoint_restores_the_error_names_them_all_and_moves_nothing(tmp_path):
    ckpt, _, abstract = _save_three(tmp_path)
    for step in (1, 2, 3):
        _flip_bytes(tmp_path / str(step))
    with pytest.raises(checkpoint.CheckpointError, match=r"step 3: .*step 2: .*step 1: .*Nothing was moved"):
        ckpt.restore_latest(abstract)
    ckpt.close()
    assert sorted(os.listdir(tmp_path)) == ["1", "2", "3"]


# ---- non-finite updates -------------------------------------------------------------------------


def test_nonfinite_streak_stops_naming_the_step_keeps_the_checkpoint_and_launch_prints_it(tmp_path, monkeypatch,
                                                                                          capsys):
    """A learning rate of 1e30 makes step 1's update huge and every later loss non-finite: with
    max_nonfinite_streak = 2 the run stops after step 3; checkpoint 2 (a skipped update) is kept."""
    cfg = tmp_path / "diverging.py"
    cfg.write_text(textwrap.dedent("""
        from tests.test_train import tiny


        def get_config():
            config = tiny("digits_spd", num_steps=6, checkpoint_every=1, max_nonfinite_streak=2)
            config.sample.grid_images = 0
            config.optim.learning_rate = 1e30
            return config
        """))
    workdir = tmp_path / "run"
    sys.path.insert(0, ROOT)
    import launch

    monkeypatch.setattr(sys, "argv", ["launch.py", f"--config={cfg}", f"--workdir={workdir}"])
    with pytest.raises(SystemExit) as stop:
        launch._run()
    message = str(stop.value.code)
    assert message.startswith("error: 2 non-finite updates in a row up to step 3 "), message
    assert "the last good checkpoint, step 2, is kept" in message
    assert "Traceback" not in capsys.readouterr().err
    assert _steps(workdir) == [1, 2]

    config = launch._CONFIG.value
    model = builders.build_model(config)
    tx, _ = builders.build_optimizer(config)
    abstract = checkpoint.abstract_like(builders.abstract_train_state(model, tx, (8, 8, 1)),
                                        jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    ckpt = checkpoint.Checkpointer(str(workdir / "checkpoints"))
    one, two = ckpt.restore(1, abstract)[0], ckpt.restore(2, abstract)[0]
    ckpt.close()
    assert (int(one.skipped), int(two.skipped), int(two.nonfinite_streak)) == (0, 1, 1)
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(two.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # the skipped update changed nothing
        assert np.all(np.isfinite(np.asarray(b)))


def test_nonfinite_streak_read_one_dispatch_late_still_names_its_step_and_saves_nothing_after_it(tmp_path):
    """The streak is read after the next dispatch (no host sync per step): with checkpoints every
    4 steps and no log rows before the end, the streak of 2 reached at step 3 still stops the run
    with step 3 named, before the checkpoint of step 4 is written."""
    config = tiny("digits_spd", num_steps=8, checkpoint_every=4, log_every=100, max_nonfinite_streak=2)
    config.sample.grid_images = 0
    config.optim.learning_rate = 1e30
    with pytest.raises(FloatingPointError, match=r"^2 non-finite updates in a row up to step 3 .*no checkpoint yet"):
        experiment.train(config, str(tmp_path))
    assert _steps(tmp_path) == []


# ---- bad input: a clear error before anything compiles or is written ------------------------------


@pytest.fixture
def no_compile(monkeypatch):
    """Fail the test if train() gets as far as building the network."""
    def refuse(*args, **kwargs):
        raise AssertionError("train() reached init_variables before rejecting the input")

    monkeypatch.setattr(builders, "init_variables", refuse)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("process.name", "spdd", "config.process.name 'spdd' (did you mean 'spd'?)"),
        ("sample.method", "dddim", "config.sample.method 'dddim' (did you mean 'ddim'?)"),
        ("data.name", "digit", "config.data.name 'digit' (did you mean 'digits'?)"),
        ("train.num_steps", 0, "config.train.num_steps = 0 is invalid: expected an integer >= 1"),
        ("sample.nfe", 0, "config.sample.nfe = 0 is invalid: expected an integer >= 1"),
        ("data.image_size", 16, "config.data.image_size = 16 is invalid: expected 0 for the embedded 'digits'"),
        ("sample.options", {"eta": 1.5}, "config.sample.options: ddim eta must be in [0, 1]; got 1.5"),
        ("sample.options", {"etta": 0.5}, "'etta' (did you mean 'eta'?)"),
    ],
)
def test_bad_config_value_stops_train_before_compiling_or_writing(tmp_path, no_compile, field, value, message):
    config = tiny("digits_spd")
    config.sample.method = "ddim"
    section, key = field.split(".")
    if key == "options":
        config.sample.options.update(value)
    else:
        config[section][key] = value
    with pytest.raises(checks.ConfigError) as err:
        experiment.train(config, str(tmp_path / "run"))
    assert message in str(err.value)
    assert not (tmp_path / "run").exists()


def test_missing_tfds_dataset_stops_train_before_compiling_or_writing(tmp_path, no_compile):
    config = tiny("digits_spd")
    config.data.name, config.data.tfds_data_dir = "cifar10", str(tmp_path / "tfds")
    with pytest.raises(FileNotFoundError) as err:
        experiment.train(config, str(tmp_path / "run"))
    assert "'cifar10' is not prepared" in str(err.value)
    assert f"tfds build cifar10 --data_dir={tmp_path / 'tfds'} --file_format=array_record" in str(err.value)
    assert not (tmp_path / "run").exists() and not (tmp_path / "tfds").exists()


def test_unwritable_workdir_stops_train_before_compiling(tmp_path, no_compile, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(checks.ConfigError, match="cannot be created: .* is not a writable directory"):
        experiment.train(tiny("digits_spd"), str(blocker / "run"))
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # tests may run as root, which may write anywhere
    with pytest.raises(checks.ConfigError, match=re.escape(f"workdir '{readonly}' is not writable")):
        experiment.train(tiny("digits_spd"), str(readonly))
    assert os.listdir(readonly) == []


def test_resuming_with_another_image_shape_or_model_stops_before_compiling(tmp_path, no_compile):
    """A workdir whose checkpoint was trained on 32x32x3 patches cannot be resumed on 8x8 digits."""
    other = tiny("patches_spd")
    ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), asynchronous=False)
    ckpt.save(1, {"w": np.zeros(2, np.float32)}, {}, {"spectrum": np.ones((32, 32, 3))},
              {"model_config": builders.model_config_json(other)})
    ckpt.close()
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(checks.ConfigError, match="trained on 32x32x3 images but config.data .'digits'. gives 8x8x1"):
        experiment.train(tiny("digits_spd"), str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == before
    changed = tiny("digits_spd")
    changed.model.base_channels = 16  # defines the network: refused
    with pytest.raises(checks.ConfigError, match="config.model.base_channels = 16 differs from the checkpoint's 8"):
        builders.check_same_model(changed, {"model_config": builders.model_config_json(tiny("digits_spd"))}, "here")
    moved = tiny("digits_spd")
    moved.data.update(tfds_data_dir="/elsewhere", num_threads=16)  # run-only settings: accepted
    moved.sample.batch_size = 3
    builders.check_same_model(moved, {"model_config": builders.model_config_json(tiny("digits_spd"))}, "here")


@pytest.mark.parametrize(
    "images, message",
    [
        (np.full((4, 8, 8, 1), 255.0, np.float32), r"values in \[255, 255\]: expected model units \[-1, 1\]"),
        (np.full((4, 8, 8, 1), 200, np.uint8), "dtype uint8: expected floats in model units"),
        (np.full((4, 8, 8, 1), np.nan, np.float32), r"values in \[nan, nan\]"),
        (np.zeros((4, 8, 8), np.float32), r"shape \(8, 8\): expected \(H, W, C\)"),
    ],
)
def test_data_outside_model_units_is_rejected_by_the_pipeline_and_the_spectrum(images, message):
    with pytest.raises(ValueError, match=message):
        data.make_pipeline(images, batch_size=2, seed=0)
    with pytest.raises(ValueError, match="the first 4 images of the data source"):
        data.spectrum_images(images, 4, flip=False)


def test_image_shape_not_matching_the_spectrum_is_rejected_before_tracing():
    from spd_jax.diffusion import samplers

    process = processes.spd(spectrum.power_law((8, 8, 1)))

    def never(x_t, t, *, key=None):
        raise AssertionError("the denoiser must not be traced")

    with pytest.raises(ValueError, match=r"image shape \(2, 16, 16, 1\) does not match the process 'spd' "
                                         r"spectral grid \(H, W, C\) = \(8, 8, 1\)"):
        samplers.sample(never, process, method="ddim", num_steps=2, key=jax.random.PRNGKey(0),
                        shape=(2, 16, 16, 1), clip_x0=False)
    with pytest.raises(ValueError, match="num_steps must be an integer >= 1; got 0"):
        samplers.sample(never, process, method="ddim", num_steps=0, key=jax.random.PRNGKey(0),
                        shape=(2, 8, 8, 1), clip_x0=False)
