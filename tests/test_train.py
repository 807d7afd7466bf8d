"""The training system: skipped non-finite updates, EMA warm-up, scan = sequential steps, every
config family at tiny size, 4 devices = 1 device, exact resume and a 2-process run."""

import importlib
import json
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spd_jax import training
from spd_jax.run import sampling
from spd_jax.run import train as experiment
from spd_jax.training.logging import MetricsWriter, drop_rows_after

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ("digits_spd", "patches_spd", "cifar10_spd", "cifar10_ddpm", "cifar10_blur", "cifar10_ddm",
           "cifar10_smd", "celeba64_spd")
#: one config per family (process, head, loss and sampler); the others differ only in data and size
FAMILIES = ("digits_spd", "cifar10_ddpm", "cifar10_blur", "cifar10_ddm", "cifar10_smd")


def tiny(name: str, **train):
    """Config ``name`` at tiny size on the embedded digits (no download, seconds to compile)."""
    sys.path.insert(0, ROOT)
    config = importlib.import_module(f"configs.{name}").get_config()
    config.data.name = "digits"
    config.data.image_size = 0
    config.process.spectrum_images = 64
    m = config.model
    m.base_channels, m.channel_mult, m.num_res_blocks = 8, (1,), 1
    m.attention_resolutions, m.mid_attention, m.head_channels, m.num_heads = (), False, 0, 1
    m.latent_dim, m.latent_base_channels = 4, 4
    config.train.update(batch_size=8, num_steps=1, steps_per_dispatch=1, log_every=1, checkpoint_every=1,
                        fast_compile=True)
    config.train.update(train)
    config.optim.warmup_steps = 0
    config.sample.update(nfe=min(config.sample.nfe, 3), grid_images=4, num_samples=4, batch_size=4)
    return config


class _Linear(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(1)(x.reshape(x.shape[0], -1))


def _regression(poison: float | None = None):
    """(loss_fn, params) of a linear least-squares fit; ``poison`` makes batches with that mean NaN."""
    model = _Linear()
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4)))

    def loss_fn(variables, batch, key):
        pred = model.apply(variables, batch["image"])[:, 0]
        noise = jax.random.normal(key, pred.shape) * 0.01
        loss = jnp.mean((pred - batch["image"].sum(axis=1) + noise) ** 2)
        if poison is not None:
            loss = jnp.where(jnp.mean(batch["image"]) == poison, jnp.nan, loss)
        return loss, {}

    return loss_fn, params


def _state(params, tx):
    return training.create_train_state(params, tx, jax.random.PRNGKey(1))


def test_ema_decay_warms_up():
    np.testing.assert_allclose(training.ema_decay(0, 0.999), 0.1)
    np.testing.assert_allclose(training.ema_decay(90, 0.999), 91 / 100)
    np.testing.assert_allclose(training.ema_decay(10**6, 0.999), 0.999)


def test_nonfinite_update_is_skipped_and_counted():
    loss_fn, params = _regression(poison=7.0)
    tx = training.make_optimizer(training.learning_rate_schedule(1e-2, 0))
    step = jax.jit(training.make_train_step(loss_fn, tx, ema=0.9))
    good = {"image": jnp.arange(8.0).reshape(2, 4)}
    state, metrics = step(_state(params, tx), good)
    assert int(metrics["skipped"]) == 0
    before = state
    state, metrics = step(state, {"image": jnp.full((2, 4), 7.0)})
    assert int(metrics["skipped"]) == 1 and int(state.skipped) == 1 and int(state.nonfinite_streak) == 1
    assert int(state.step) == 2
    for a, b in zip(jax.tree.leaves((before.params, before.ema_params, before.opt_state)),
                    jax.tree.leaves((state.params, state.ema_params, state.opt_state)), strict=True):
        np.testing.assert_array_equal(a, b)
    state, _ = step(state, good)
    assert int(state.nonfinite_streak) == 0 and int(state.skipped) == 1


def test_scan_of_k_steps_equals_k_single_steps():
    loss_fn, params = _regression()
    tx = training.make_optimizer(training.learning_rate_schedule(1e-2, 2))
    single = jax.jit(training.make_train_step(loss_fn, tx, ema=0.99))
    multi = jax.jit(training.scan_steps(training.make_train_step(loss_fn, tx, ema=0.99)))
    batches = {"image": jax.random.normal(jax.random.PRNGKey(2), (3, 4, 4))}
    state = _state(params, tx)
    for k in range(3):
        state, _ = single(state, {"image": batches["image"][k]})
    scanned, metrics = multi(_state(params, tx), batches)
    assert int(scanned.step) == 3 and metrics["loss"].shape == ()
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(scanned), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", FAMILIES)
def test_every_config_family_trains_and_samples_at_tiny_size(name, tmp_path):
    state = experiment.train(tiny(name), str(tmp_path))
    assert int(state.step) == 1 and int(state.skipped) == 0
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert np.isfinite(row["loss"]) and row["step"] == 1
    assert (tmp_path / "samples" / "step_0000001.png").exists()
    assert (tmp_path / "checkpoints" / "1").is_dir()


def _resume_config(steps: int = 4):
    config = tiny("digits_spd", num_steps=steps, checkpoint_every=2)
    config.sample.grid_images = 0
    return config


def _train_in_subprocess(workdir, signal_name: str, step: int) -> subprocess.CompletedProcess:
    """Train in a new process that sends itself ``signal_name`` once training reaches ``step``
    (through the training loop's callback argument; a SIGKILL waits for started checkpoints)."""
    code = f"""
        import os, signal, sys
        sys.path.insert(0, {ROOT!r})
        from tests.test_train import _resume_config
        from spd_jax.run import train as experiment

        def interrupt(info):
            if info.step >= {step}:
                if signal.{signal_name} == signal.SIGKILL:
                    info.wait_for_checkpoints()
                os.kill(os.getpid(), signal.{signal_name})

        experiment.train(_resume_config(), {str(workdir)!r}, callbacks=[interrupt])
        """
    return _run(code)


def test_preempted_killed_and_resumed_run_equals_uninterrupted_run_bit_for_bit(tmp_path):
    straight = experiment.train(_resume_config(), str(tmp_path / "a"))
    workdir = tmp_path / "b"
    preempted = _train_in_subprocess(workdir, "SIGTERM", 1)
    assert preempted.returncode == 0, preempted.stderr[-3000:]  # SIGTERM: checkpoint at step 1, clean exit
    assert sorted(os.listdir(workdir / "checkpoints")) == ["1"]
    killed = _train_in_subprocess(workdir, "SIGKILL", 3)
    assert killed.returncode == -9, killed.stderr[-3000:]  # SIGKILL after step 3; last checkpoint: 2
    assert sorted(os.listdir(workdir / "checkpoints")) == ["1", "2"]
    resumed = experiment.train(_resume_config(), str(workdir))
    assert int(resumed.step) == 4
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sample_mode_writes_npz_and_png_with_another_sampler(tmp_path):
    config = tiny("digits_spd", num_steps=1)
    experiment.train(config, str(tmp_path))
    config.sample.update(method="ddim", nfe=2, num_samples=6)
    path = sampling.sample(config, str(tmp_path))
    assert path.endswith("ddim_nfe2.npz") and os.path.exists(path.replace(".npz", ".png"))
    out = np.load(path)
    assert out["images"].shape == (6, 8, 8, 1) and int(out["nfe"]) == 2 and int(out["step"]) == 1


def _scalars(workdir, tag: str = "train/loss") -> list[tuple[int, float]]:
    """(step, value) of every ``tag`` event TensorBoard's own reader keeps in ``workdir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(workdir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_tensorboard_shows_each_step_once_after_a_resume_from_an_earlier_checkpoint(tmp_path):
    first = MetricsWriter(tmp_path)
    for step in (1, 2, 3, 4):
        first.write(step, {"loss": float(step)})
    first.close()
    resumed = MetricsWriter(tmp_path, start_step=2)  # steps 3 and 4 are redone
    for step in (3, 4, 5):
        resumed.write(step, {"loss": 10.0 * step})
    resumed.close()
    assert _scalars(tmp_path) == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0), (5, 50.0)]


def test_resuming_drops_the_metrics_rows_of_lost_steps_and_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (10, 20, 30, 40)]
    path.write_text("\n".join(rows) + "\n" + rows[0][:7])  # killed mid-write
    assert drop_rows_after(str(path), 20) == 3
    assert path.read_text() == rows[0] + "\n" + rows[1] + "\n"
    before = path.stat().st_mtime_ns
    assert drop_rows_after(str(path), 20) == 0 and path.stat().st_mtime_ns == before  # untouched
    writer = MetricsWriter(str(tmp_path), start_step=10)
    writer.write(20, {"loss": 0.25})
    writer.close()
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines()]
    assert steps == [10, 20] and json.loads(path.read_text().splitlines()[-1])["loss"] == 0.25


def _run(code: str, env: dict | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", **(env or {}))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=ROOT)


_STEPS = """
    import sys
    sys.path.insert(0, {root!r})
    import jax, numpy as np
    from tests.test_train import tiny
    from spd_jax.run import builders
    from spd_jax import training

    def run(devices, steps=3):
        config = tiny("digits_spd")
        source = builders.build_source(config)
        shape = source[0].shape
        process = builders.build_process(config, builders.build_spectrum(config, source, shape), shape)
        model = builders.build_model(config)
        tx, schedule = builders.build_optimizer(config)
        mesh = training.make_mesh(devices)
        state = training.create_train_state(builders.init_variables(model, shape, jax.random.PRNGKey(0)),
                                            tx, jax.random.PRNGKey(1))
        state = training.replicate(state, mesh)
        step = training.shard_train_step(training.scan_steps(training.make_train_step(
            builders.build_loss(config, model, process), tx, 0.99, schedule)), mesh, fast_compile=True)
        local = 16 // jax.process_count()
        losses = []
        for k in range(steps):
            images = np.asarray(source[k * 16 : (k + 1) * 16])
            mine = images[jax.process_index() * local : (jax.process_index() + 1) * local][None]
            state, metrics = step(state, training.global_batch({{"image": mine}}, mesh))
            losses.append(float(metrics["loss"]))
        params = [np.asarray(x.addressable_data(0)) for x in jax.tree.leaves(state.params)]
        return np.asarray(losses), params
"""


def test_four_devices_match_one_device():
    code = _STEPS.format(root=ROOT) + """
    assert jax.device_count() == 4
    loss1, params1 = run(jax.devices()[:1])
    loss4, params4 = run(jax.devices())
    np.testing.assert_allclose(loss4, loss1, rtol=1e-5)
    for a, b in zip(params1, params4):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    print("OK", loss1)
    """
    out = _run(code, {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


def test_two_process_run_ends_with_identical_params(tmp_path):
    from tests.multiprocess import run_processes

    run_processes(textwrap.dedent(_STEPS.format(root=ROOT)) + textwrap.dedent(f"""
        assert jax.process_count() == 2
        losses, params = run(None)
        np.savez({str(tmp_path)!r} + f"/p{{jax.process_index()}}.npz", losses, *params)
        """), timeout=240)
    first, second = np.load(tmp_path / "p0.npz"), np.load(tmp_path / "p1.npz")
    assert len(first.files) > 2
    for name in first.files:
        np.testing.assert_array_equal(first[name], second[name])
    assert np.all(np.isfinite(first["arr_0"]))


def test_corrupted_latest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    from absl import logging as absl_logging

    from spd_jax.training import checkpoint

    ckpt = checkpoint.Checkpointer(str(tmp_path), max_to_keep=3, asynchronous=False)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    for step in (1, 2):
        ckpt.save(step, {"w": jnp.full((3,), float(step))}, {"next_index": step}, {"spectrum": np.ones(2)}, {})
    ckpt.wait()
    for root, _, files in os.walk(tmp_path / "2" / "state"):
        for name in files:
            os.remove(os.path.join(root, name))
    abstract = checkpoint.abstract_like({"w": jnp.zeros((3,))}, sharding)
    with pytest.MonkeyPatch.context() as patch:
        warnings = []
        patch.setattr(absl_logging, "warning", lambda msg, *args: warnings.append(msg % args))
        step, state, data_state, arrays, _ = ckpt.restore_latest(abstract)
    ckpt.close()
    assert step == 1 and data_state == {"next_index": 1}
    np.testing.assert_array_equal(state["w"], np.ones(3))
    assert any("checkpoint 2" in w for w in warnings) and any("step 1 instead" in w for w in warnings)
    assert (tmp_path / "2.unreadable").is_dir() and not (tmp_path / "2").exists()  # moved aside, not deleted


def test_an_smd_model_trains_with_the_k_sample_mixture_loss_from_its_config(tmp_path):
    config = tiny("cifar10_smd", num_steps=2)
    config.loss.update(smd="mixture", smd_samples=3, smd_step=0.05)
    config.sample.grid_images = 0
    state = experiment.train(config, str(tmp_path))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert int(state.step) == 2 and int(state.skipped) == 0 and all(np.isfinite(r["loss"]) for r in rows)
    config.loss.smd_step = 0.0  # a continuous process needs an explicit step
    with pytest.raises(ValueError, match="config.loss.smd_step = 0.0 is invalid"):
        experiment.train(config, str(tmp_path / "other"))


def test_bfloat16_compute_trains_digits_to_within_5_percent_of_float32(tmp_path):
    """Mixed precision: bfloat16 activations and matmuls, float32 parameters, optimiser state, loss
    and sampler arithmetic; the same budget ends at a loss within 5 % of float32's."""
    losses = {}
    for dtype in ("float32", "bfloat16"):
        config = tiny("digits_spd", num_steps=150, log_every=10, checkpoint_every=150)
        config.model.dtype = dtype
        config.optim.learning_rate = 1e-3
        config.sample.grid_images = 4
        state = experiment.train(config, str(tmp_path / dtype))
        rows = [json.loads(line) for line in (tmp_path / dtype / "metrics.jsonl").read_text().splitlines()]
        losses[dtype] = float(np.mean([r["loss"] for r in rows[-5:]]))
        leaves = jax.tree.leaves(state.params) + jax.tree.leaves(state.ema_params)
        assert all(leaf.dtype == jnp.float32 for leaf in leaves)  # parameters stay float32
        assert int(state.skipped) == 0
    print("final losses", losses)
    assert losses["float32"] < 0.6  # it learned
    assert abs(losses["bfloat16"] - losses["float32"]) <= 0.05 * losses["float32"], losses
