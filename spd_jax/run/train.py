"""``launch.py --mode=train``: train (or resume) the run of a config in a workdir.

Outputs under the workdir:

* ``checkpoints/<step>/`` — orbax checkpoints (state, data position, spectrum, config);
* ``metrics.jsonl`` and ``events.out.tfevents.*`` — training scalars (process 0 only);
* ``samples/step_<step>.png`` — sample grids from the EMA parameters during training (for task
  configs: input | output | reference panels of held-out images).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np

from spd_jax import data, training
from spd_jax.run import builders, checks, projection, sampling
from spd_jax.training import checkpoint, compile_cache
from spd_jax.training.logging import MetricsWriter
from spd_jax.training.loop import Callback, LoopSettings, fit


def train(config: ml_collections.ConfigDict, workdir: str, *, callbacks: Sequence[Callback] = ()) -> training.TrainState:
    """Train (or resume) the run in ``workdir``; returns the final state.

    Every process runs this; only process 0 logs and writes images. ``callbacks`` are called
    after every dispatch (see :class:`spd_jax.training.loop.StepInfo`).
    """
    checks.validate(config, jax.device_count(), jax.process_count())
    workdir = checks.check_workdir(workdir)
    compile_cache.enable(config.train.compile_cache_dir or None)  # a re-launched run loads its programs
    is_main = jax.process_index() == 0
    mesh = training.make_mesh()
    tc = config.train

    source = builders.build_source(config)
    shape = tuple(np.asarray(source[0]).shape)
    score = projection.restore_score(config) if projection.is_projection_run(config) else None  # frozen
    ckpt = checkpoint.Checkpointer(workdir / "checkpoints", tc.keep_checkpoints)
    latest = ckpt.latest_step()
    if latest is not None:
        try:
            arrays, meta = ckpt.restore_meta(latest)
        except Exception:  # noqa: BLE001 - an unreadable checkpoint is reported by restore_latest
            meta = None
        if meta is not None:
            builders.check_same_model(config, meta, str(workdir), arrays["spectrum"].shape)
            projection.check_resume(config, meta, str(workdir))
    model = builders.build_model(config)
    tx, schedule = builders.build_optimizer(config)
    init_key, train_key, sample_key = jax.random.split(jax.random.PRNGKey(config.seed), 3)
    state = training.create_train_state(builders.init_variables(model, shape, init_key), tx, train_key)
    state = training.replicate(state, mesh)
    restored = ckpt.restore_latest(checkpoint.abstract_like(state, training.replicated(mesh)))
    if restored is None:
        data_state = None
        spec = builders.build_spectrum(config, source, shape) if score is None else score.spectrum
    else:
        _, state, data_state, arrays, _ = restored
        spec = arrays["spectrum"]
    process = builders.build_process(config, spec, shape)
    step = int(state.step)

    pipeline = data.make_pipeline(
        source, batch_size=tc.batch_size // jax.process_count(), seed=config.data.seed, flip=config.data.flip,
        process_index=jax.process_index(), process_count=jax.process_count(), num_threads=config.data.num_threads,
        prefetch=config.data.prefetch or None, worker_count=config.data.worker_count,
        worker_buffer=config.data.worker_buffer, uint8=config.data.uint8,
    )
    batches = iter(pipeline)
    if data_state is not None:
        batches.set_state(data_state)

    loss = builders.build_loss(config, model, process) if score is None else projection.build_loss(config, model, score)
    loss_fn = data.with_model_units(loss)  # uint8 batches: on device
    step_fn = training.shard_train_step(
        training.scan_steps(training.make_train_step(loss_fn, tx, tc.ema, schedule)), mesh, tc.fast_compile
    )
    grid = sampling.grid_writer(config, model, process, shape, sample_key, workdir, score=score)
    meta = {"model_config": builders.model_config_json(config), "config": json.loads(config.to_json())}

    def save(at: int, current) -> None:
        ckpt.save(at, current, batches.get_state(), {"spectrum": spec}, meta)

    def sample_grid(at: int, current) -> None:
        grid(current.ema_params, workdir / "samples" / f"step_{at:07d}.png" if is_main else None)

    settings = LoopSettings(
        num_steps=tc.num_steps, steps_per_dispatch=tc.steps_per_dispatch, log_every=tc.log_every,
        checkpoint_every=tc.checkpoint_every, sample_every=tc.sample_every,
        max_nonfinite_streak=tc.max_nonfinite_streak, batch_size=tc.batch_size,
    )
    writer = MetricsWriter(workdir, step) if is_main else None
    try:
        return fit(state, step_fn, batches, mesh, settings, save=save, latest_checkpoint=ckpt.latest_step,
                   wait_for_checkpoints=ckpt.wait, sample_grid=sample_grid if grid else None, writer=writer,
                   callbacks=callbacks, progress=is_main)
    finally:
        batches.close()  # stops grain worker processes
        ckpt.close()
        if writer:
            writer.close()
