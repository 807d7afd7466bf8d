"""The persistent compilation cache (spd_jax.training.compile_cache): a new process that compiles
the same train step loads it from the cache instead of writing new entries."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from spd_jax.training import compile_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# a small U-Net and the real train step (loss, AdamW, EMA, non-finite check), jitted and sharded
# exactly as a run does; prints the cache entries and the cache hits of this process
SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    import jax
    from spd_jax.training import compile_cache

    start = time.perf_counter()
    path = compile_cache.enable(sys.argv[1], min_compile_time_secs=0.0)
    hits = []
    jax.monitoring.register_event_listener(
        lambda event, **kw: hits.append(event) if event == "/jax/compilation_cache/cache_hits" else None)

    import numpy as np
    from spd_jax import losses, training
    from spd_jax.diffusion import processes
    from spd_jax.models.unet import UNet

    shape = (8, 8, 1)
    model = UNet(base_channels=8, channel_mult=(1,), num_res_blocks=1, attention_resolutions=(8,),
                 num_heads=1, norm_groups=4, dropout=0.1)
    process = processes.make("vp_cosine", shape=shape)
    tx = training.make_optimizer(training.learning_rate_schedule(1e-3, 0), grad_clip=1.0)
    mesh = training.make_mesh(jax.devices()[:1])
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1,) + shape, np.float32),
                                               np.zeros((1,), np.float32)))
    params = jax.tree.map(lambda s: np.full(s.shape, 0.01, s.dtype), shapes)
    state = training.replicate(training.create_train_state(params, tx, jax.random.PRNGKey(1)), mesh)
    step = training.shard_train_step(training.scan_steps(training.make_train_step(
        losses.make_denoising_loss(model, process), tx, 0.99)), mesh)
    images = np.random.default_rng(0).uniform(-1, 1, (1, 4) + shape).astype(np.float32)
    batches = training.global_batch({"image": images}, mesh)
    state, metrics = step(state, batches)
    loss = float(metrics["loss"])
    print(json.dumps({"path": path, "entries": compile_cache.entries(path), "hits": len(hits),
                      "loss": loss, "seconds": time.perf_counter() - start}))
    """
)


def _run(cache_dir: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop(compile_cache.ENV_VAR, None)
    out = subprocess.run([sys.executable, "-c", SCRIPT, cache_dir], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_second_process_reuses_the_cache(tmp_path):
    cache_dir = str(tmp_path / "xla")
    first = _run(cache_dir)
    assert first["path"] == cache_dir
    assert first["entries"], "the first process wrote no cache entry"
    second = _run(cache_dir)
    assert second["entries"] == first["entries"], "the second process compiled something new"
    assert second["hits"] >= 1  # the train step (at least) was loaded, not compiled
    assert second["loss"] == first["loss"]  # same executable, same result


def test_default_directory_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv(compile_cache.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache.default_directory() == str(tmp_path / "spd_jax" / "xla")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert compile_cache.default_directory() == os.path.join(os.path.expanduser("~"), ".cache", "spd_jax", "xla")


@pytest.mark.parametrize("off", ["off", "OFF", "none", "0"])
def test_off_disables(monkeypatch, off):
    monkeypatch.setenv(compile_cache.ENV_VAR, off)
    assert compile_cache.resolve_directory() is None
    assert compile_cache.resolve_directory("/some/dir") == "/some/dir"  # an explicit argument wins


def test_resolution_order(monkeypatch, tmp_path):
    monkeypatch.setenv(compile_cache.ENV_VAR, str(tmp_path / "env"))
    assert compile_cache.resolve_directory(tmp_path / "arg") == str(tmp_path / "arg")
    assert compile_cache.resolve_directory() == str(tmp_path / "env")
