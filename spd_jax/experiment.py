"""A training run from a config: builders, the training loop and the sample mode.

Only this module and ``launch.py`` read configs (see ``configs/defaults.py`` for the fields);
everything they build takes explicit arguments. :func:`train` and :func:`sample` are what
``launch.py --mode=train|sample`` run. Outputs under the workdir:

* ``checkpoints/<step>/`` — orbax checkpoints (state, data position, spectrum, config);
* ``metrics.jsonl`` and ``events.out.tfevents.*`` — training scalars (process 0 only);
* ``samples/step_<step>.png`` — sample grids from the EMA params during training;
* ``samples/<method>_nfe<N>.{npz,png}`` — ``--mode=sample`` output.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from PIL import Image
from tqdm import tqdm

from spd_jax import (
    checkpoint,
    conditional,
    config_utils,
    data,
    grids,
    losses,
    processes,
    samplers,
    spectrum,
)
from spd_jax import train as training
from spd_jax.models.heads import DDM_HEADS, model_denoiser
from spd_jax.models.smd import SMDNet, smd_net
from spd_jax.models.unet import UNet
from spd_jax.tensorboard import EventWriter

#: test-only hooks (SPEC §0 "Crash tests"): SIGKILL / SIGTERM the process once training reaches this step
KILL_AT_STEP_ENV = "SPD_JAX_KILL_AT_STEP"
TERM_AT_STEP_ENV = "SPD_JAX_TERM_AT_STEP"
#: the parts of a config that fix the network and its process (must match the checkpoint's)
MODEL_FIELDS = ("data", "process", "model")


# ---- builders ---------------------------------------------------------------------------------


def build_source(config, split: str = "train"):
    """Random-access training images for ``config.data`` (see :func:`spd_jax.data.image_source`)."""
    return data.image_source(
        config.data.name,
        split,
        data_dir=config.data.tfds_data_dir or None,
        image_size=config_utils.image_size(config),
        seed=config.data.seed,
        crops_per_photo=config.data.crops_per_photo,
    )


def build_spectrum(config, source, shape: tuple) -> np.ndarray:
    """S(k) (H, W, C) float64 in model units: estimated from the training images (with their
    flips when training flips) or the official CIFAR-10 preset."""
    if config.process.spectrum == "preset":
        return spectrum.power_law(shape)
    images = data.spectrum_images(source, config.process.spectrum_images, config.data.flip)
    return spectrum.estimate(images, per_channel=config.process.per_channel)


def build_process(config, spec: np.ndarray, shape: tuple):
    """The corruption process of ``config.process`` for images of ``shape`` (H, W, C)."""
    name = config.process.name
    if name == "spd":
        return processes.spd(spec)
    if name == "vp_linear" and config.process.num_levels:
        return processes.vp_linear(num_steps=config.process.num_levels)
    return processes.make(name, shape=shape)


def build_model(config):
    """The network of ``config.model`` (a UNet, or an SMDNet around one)."""
    m = config.model
    unet = UNet(
        base_channels=m.base_channels,
        channel_mult=tuple(m.channel_mult),
        num_res_blocks=m.num_res_blocks,
        attention_resolutions=tuple(m.attention_resolutions),
        num_heads=m.num_heads,
        head_channels=m.head_channels or None,
        dropout=m.dropout,
        resample=m.resample,
        num_decoders=2 if m.head == "ddm_dual" else 1,
        decouple=m.decouple,
        mid_attention=m.mid_attention,
        norm_groups=m.norm_groups,
        input_kernel=m.input_kernel,
        time_embedding=m.time_embedding,
        time_levels=(config.process.num_levels or None) if m.time_embedding == "discrete" else None,
        cond_channels=conditional.cond_channels(config),
    )
    if m.kind == "smd":
        return smd_net(unet, latent_dim=m.latent_dim, latent_base_channels=m.latent_base_channels)
    return unet


def build_loss(config, model, process) -> training.LossFn:
    """The training objective matching the model's head and kind (with the conditioning image of
    ``config.task`` added to each batch, see :func:`spd_jax.conditional.wrap_loss`)."""
    return conditional.wrap_loss(_base_loss(config, model, process), config)


def _base_loss(config, model, process) -> training.LossFn:
    lc, head = config.loss, config.model.head
    if head in DDM_HEADS:
        return losses.make_ddm_loss(model, process, head=head, weighting=lc.ddm_weighting,
                                    rec_weight=lc.ddm_rec_weight, t_min=lc.t_min, t_max=lc.t_max)
    if config.model.kind == "smd":
        return losses.make_smd_loss(model, process, target=head, t_min=lc.t_min, t_max=lc.t_max)
    return losses.make_denoising_loss(model, process, target=head, t_min=lc.t_min, t_max=lc.t_max)


def build_optimizer(config):
    """(optax optimiser, learning-rate schedule) of ``config.optim``."""
    o = config.optim
    schedule = training.learning_rate_schedule(
        o.learning_rate, o.warmup_steps, o.schedule, config.train.num_steps, o.end_factor
    )
    tx = training.make_optimizer(schedule, o.weight_decay, o.b1, o.b2, o.eps, o.grad_clip)
    return tx, schedule


def _init_args(model, shape: tuple, key: jax.Array) -> tuple:
    x = jnp.zeros((1,) + tuple(shape), jnp.float32)
    t = jnp.full((1,), 0.5, jnp.float32)
    args = ({"params": key, "dropout": key}, x, t) + ((x,) if isinstance(model, SMDNet) else ())
    cond = (model.denoiser if isinstance(model, SMDNet) else model).cond_channels
    return args + ((jnp.zeros((1,) + tuple(shape[:2]) + (cond,), jnp.float32),) if cond else ())


def init_variables(model, shape: tuple, key: jax.Array):
    """Initial Flax variables for images of ``shape`` (H, W, C) (batch of 1, t = 0.5)."""
    # runs once: compile without backend optimisation (about 5x faster on CPU)
    return jax.jit(model.init, compiler_options=training.FAST_COMPILE)(*_init_args(model, shape, key))


def abstract_train_state(model, optimizer, shape: tuple):
    """ShapeDtypeStructs of a fresh TrainState (nothing is computed)."""
    key = jax.random.PRNGKey(0)
    return jax.eval_shape(
        lambda: training.create_train_state(model.init(*_init_args(model, shape, key)), optimizer, key)
    )


def sampler_settings(config, method: str | None = None, nfe: int | None = None) -> dict:
    """Keyword arguments for :func:`spd_jax.samplers.sample` from ``config.sample``.

    The step count is the largest whose NFE fits ``nfe`` (SPEC §0 "NFE targets").
    """
    s = config.sample
    method = method or s.method
    grid = s.grid or None
    num_steps = samplers.steps_for_nfe(method, nfe or s.nfe, grid=grid)
    knobs = dict(s.options)
    grid_name = grid or samplers.DEFAULT_GRIDS[method]
    if "t_max" in grids.GRID_OPTIONS[grid_name]:
        knobs.setdefault("t_max", float(s.t_max))
    return dict(method=method, num_steps=num_steps, grid=grid, clip_x0=bool(s.clip_x0), **knobs)


def make_sampler(model, process, head: str, settings: dict, batch: int, shape: tuple,
                 fast_compile: bool = False) -> Callable:
    """jitted ``draw(variables, key, index) -> (images (batch, H, W, C), nfe)``."""

    def draw(variables, key, index):
        denoiser = model_denoiser(model, variables, process, head)  # SMD: eta drawn per example
        x, info = samplers.sample(denoiser, process, key=key, shape=(batch,) + tuple(shape), index=index,
                                  **settings)
        return x, info["nfe"]

    jitted = jax.jit(draw, compiler_options=training.FAST_COMPILE if fast_compile else None)

    def run(variables, key, index):
        x, nfe = jitted(variables, key, index)
        return np.asarray(x.addressable_data(0)), int(nfe)

    return run


def draw_samples(sampler: Callable, variables, key, count: int, batch: int) -> tuple[np.ndarray, int]:
    """``count`` samples in chunks of ``batch`` (per-example keys: chunking does not change them)."""
    out, nfe = [], 0
    for start in range(0, count, batch):
        index = jnp.arange(start, start + batch, dtype=jnp.uint32)
        x, nfe = sampler(variables, key, index)
        out.append(x)
    return np.concatenate(out)[:count], nfe


def image_grid(images: np.ndarray, upscale: int = 1, pad: int = 1) -> np.ndarray:
    """Tile (N, H, W, C) images in [-1, 1] into one uint8 (rows, cols, C) picture."""
    images = np.clip((np.asarray(images, np.float32) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    if upscale > 1:
        images = images.repeat(upscale, axis=1).repeat(upscale, axis=2)
    n, h, w, c = images.shape
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, cols)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = img
    return grid


def write_png(path: str, images: np.ndarray, upscale: int = 1) -> None:
    """Save ``images`` (N, H, W, C) in [-1, 1] as one grid PNG, magnified ``upscale`` times."""
    grid = image_grid(images, upscale)
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)


# ---- logging ----------------------------------------------------------------------------------


def drop_rows_after(path: str, step: int) -> int:
    """Keep only the complete rows of the JSONL file ``path`` with ``"step" <= step`` (a resumed
    run redoes the later ones); rewritten atomically, untouched when nothing is dropped. Returns
    the number of rows dropped (a line cut off by a kill counts as one)."""
    if not os.path.exists(path):
        return 0
    with open(path, "rb") as f:
        blob = f.read()
    kept, dropped = [], 0
    for line in blob.split(b"\n"):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            keep = isinstance(row, dict) and int(row["step"]) <= step
        except (ValueError, KeyError, TypeError):
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += 1
    text = b"".join(line + b"\n" for line in kept)
    if dropped or text != blob:
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(text)
        os.replace(tmp, path)
    return dropped


class MetricsWriter:
    """Appends scalars to ``metrics.jsonl`` and a TensorBoard event file (no TensorFlow needed).

    ``start_step`` is the step training (re)starts from: rows logged after it by an earlier,
    killed run are removed from ``metrics.jsonl`` and purged in TensorBoard, so every step appears
    once. Each row carries the Unix ``wall_time`` at which it was written.
    """

    def __init__(self, workdir: str, start_step: int = 0):
        path = os.path.join(workdir, "metrics.jsonl")
        dropped = drop_rows_after(path, start_step)
        if dropped:
            logging.warning("metrics.jsonl: dropped %d row(s) after step %d (redone from the checkpoint)", dropped,
                            start_step)
        self._jsonl = open(path, "a")
        self._events = EventWriter(workdir, purge_step=start_step + 1)

    def write(self, step: int, scalars: dict) -> None:
        row = {"step": int(step), "wall_time": round(time.time(), 3), **{k: float(v) for k, v in scalars.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        self._events.scalars(int(step), {f"train/{k}": float(v) for k, v in scalars.items()})

    def close(self) -> None:
        self._jsonl.close()
        self._events.close()


def _progress(total: int, initial: int, enabled: bool):
    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)


# ---- distributed ------------------------------------------------------------------------------


def maybe_initialize_distributed(config) -> None:
    """Call ``jax.distributed.initialize`` when ``config.distributed.initialize`` is set or the
    environment names a coordinator (JAX_COORDINATOR_ADDRESS); config values override env ones."""
    d = config.distributed
    if not (d.initialize or os.environ.get("JAX_COORDINATOR_ADDRESS")):
        return
    kwargs: dict[str, Any] = {}
    address = d.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if address:
        kwargs["coordinator_address"] = address
    num = d.num_processes or int(os.environ.get("JAX_NUM_PROCESSES", 0))
    if num:
        kwargs["num_processes"] = num
    pid = d.process_id if d.process_id >= 0 else int(os.environ.get("JAX_PROCESS_ID", -1))
    if pid >= 0:
        kwargs["process_id"] = pid
    jax.distributed.initialize(**kwargs)


# ---- training ---------------------------------------------------------------------------------


def _model_config_json(config) -> dict:
    return {field: json.loads(config[field].to_json()) for field in MODEL_FIELDS}


def _check_same_model(config, meta: dict, where: str) -> None:
    saved = meta.get("model_config", {})
    now = _model_config_json(config)
    for field in MODEL_FIELDS:
        if saved.get(field) != now[field]:
            raise ValueError(
                f"config.{field} differs from the checkpoint in {where}: checkpoint {saved.get(field)} vs "
                f"config {now[field]}; use the training config (or a new workdir)"
            )
    conditional.check_same_task(config, meta, where)


def _crossed(before: int, after: int, every: int) -> bool:
    """True if a multiple of ``every`` lies in (before, after]."""
    return every > 0 and after // every > before // every


class _Preemption:
    """Records SIGTERM so that the loop can checkpoint and stop at the next dispatch boundary."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)


def train(config: ml_collections.ConfigDict, workdir: str) -> training.TrainState:
    """Train (or resume) the run in ``workdir``; returns the final state.

    Every process runs this; only process 0 logs and writes images.
    """
    config_utils.validate(config, jax.device_count(), jax.process_count())
    workdir = config_utils.check_workdir(workdir)
    is_main = jax.process_index() == 0
    mesh = training.make_mesh()
    tc = config.train

    source = build_source(config)
    shape = tuple(np.asarray(source[0]).shape)
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), tc.keep_checkpoints)
    latest = ckpt.latest_step()
    if latest is not None:
        try:
            meta = ckpt.restore_meta(latest)[1]
        except Exception:  # noqa: BLE001 - an unreadable checkpoint is reported by restore_latest
            meta = None
        if meta is not None:
            _check_same_model(config, meta, workdir)
    model = build_model(config)
    tx, schedule = build_optimizer(config)
    init_key, train_key, sample_key = jax.random.split(jax.random.PRNGKey(config.seed), 3)
    state = training.create_train_state(init_variables(model, shape, init_key), tx, train_key)
    state = training.replicate(state, mesh)
    restored = ckpt.restore_latest(checkpoint.abstract_like(state, training.replicated(mesh)))
    if restored is None:
        data_state, spec = None, build_spectrum(config, source, shape)
    else:
        _, state, data_state, arrays, _ = restored
        spec = arrays["spectrum"]
    process = build_process(config, spec, shape)
    step = int(state.step)

    local_batch = tc.batch_size // jax.process_count()
    pipeline = data.make_pipeline(
        source, batch_size=local_batch, seed=config.data.seed, flip=config.data.flip,
        process_index=jax.process_index(), process_count=jax.process_count(),
        num_threads=config.data.num_threads,
    )
    batches = iter(pipeline)
    if data_state is not None:
        batches.set_state(data_state)

    loss_fn = build_loss(config, model, process)
    step_fn = training.shard_train_step(
        training.scan_steps(training.make_train_step(loss_fn, tx, tc.ema, schedule)), mesh, tc.fast_compile
    )
    settings = sampler_settings(config)
    grid_batch = min(config.sample.grid_images, config.sample.batch_size)
    sampler = make_sampler(model, process, config.model.head, settings, max(grid_batch, 1), shape,
                           tc.fast_compile)
    task_grid = conditional.training_grid(config, model, process, settings, grid_batch, tc.fast_compile, sample_key)
    meta = {"model_config": _model_config_json(config), "config": json.loads(config.to_json())}

    def save(at: int) -> None:
        ckpt.save(at, state, batches.get_state(), {"spectrum": spec}, meta)

    def sample_grid(at: int) -> None:
        if not config.sample.grid_images:
            return
        if task_grid is not None:  # input | output | reference panels of held-out images
            return task_grid(state.ema_params, os.path.join(workdir, "samples", f"step_{at:07d}.png") if is_main else None)
        images, _ = draw_samples(sampler, state.ema_params, sample_key, config.sample.grid_images, grid_batch)
        if is_main:
            os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
            write_png(os.path.join(workdir, "samples", f"step_{at:07d}.png"), images, config.sample.upscale)

    writer = MetricsWriter(workdir, step) if is_main else None
    bar = _progress(tc.num_steps, step, is_main)
    preemption = _Preemption()
    kill_at = int(os.environ.get(KILL_AT_STEP_ENV, 0))
    term_at = int(os.environ.get(TERM_AT_STEP_ENV, 0))
    last_log, last_time = step, time.perf_counter()
    stop = False
    # The non-finite streak of a dispatch is read after the next one is dispatched (by then it is
    # ready, and the device already has the next step to run while the host prepares the batch
    # after it), and always before a checkpoint, a log row or a sample grid, which wait for the
    # device anyway; so no checkpoint is written past a streak that should have stopped the run.
    unread: list = []  # [(step, streak array)] of the newest dispatch, not yet checked

    def check_streak() -> None:
        if not unread:
            return
        at, value = unread.pop()
        streak = int(value)
        if streak >= tc.max_nonfinite_streak:
            last = ckpt.latest_step()  # skipped updates leave params unchanged: every checkpoint is good
            kept = f"the last good checkpoint, step {last}, is kept" if last is not None else "no checkpoint yet"
            raise FloatingPointError(
                f"{streak} non-finite updates in a row up to step {at} (config.train.max_nonfinite_streak = "
                f"{tc.max_nonfinite_streak}): stopping; {kept}"
            )

    try:
        while step < tc.num_steps:
            k = min(tc.steps_per_dispatch, tc.num_steps - step)
            local = [next(batches) for _ in range(k)]
            stacked = jax.tree.map(lambda *xs: np.stack(xs), *local)
            state, metrics = step_fn(state, training.global_batch(stacked, mesh))
            before, step = step, step + k
            check_streak()  # the previous dispatch's
            unread.append((step, metrics["nonfinite_streak"]))
            if _crossed(before, step, tc.log_every) or step == tc.num_steps:
                check_streak()
                values = {k_: float(v) for k_, v in jax.device_get(metrics).items()}
                now = time.perf_counter()
                values["steps_per_sec"] = (step - last_log) / (now - last_time)
                values["images_per_sec"] = values["steps_per_sec"] * tc.batch_size
                last_log, last_time = step, now
                if writer:
                    writer.write(step, values)
                bar.set_postfix(loss=f"{values['loss']:.4f}", steps_per_s=f"{values['steps_per_sec']:.1f}")
            bar.update(k)
            if before < term_at <= step:
                os.kill(os.getpid(), signal.SIGTERM)
            stop = preemption.requested  # read once: a SIGTERM after this point stops at the next dispatch
            if jax.process_count() > 1:  # all processes save and stop at the same step
                from jax.experimental import multihost_utils

                stop = bool(np.any(multihost_utils.process_allgather(np.int32(stop))))
            if _crossed(before, step, tc.checkpoint_every) or step == tc.num_steps or stop:
                check_streak()
                save(step)
            if _crossed(before, step, tc.sample_every) and step < tc.num_steps:
                check_streak()
                sample_grid(step)
            if kill_at and step >= kill_at:
                ckpt.wait()
                os.kill(os.getpid(), signal.SIGKILL)
            if stop:
                logging.warning("SIGTERM: wrote the checkpoint of step %d; stopping (rerun to resume)", step)
                break
        if step == tc.num_steps and not stop:
            sample_grid(step)
    finally:
        preemption.restore()
        bar.close()
        ckpt.close()
        if writer:
            writer.close()
    return state


class Restored(NamedTuple):
    """A checkpoint ready for sampling (see :func:`restore_ema`)."""

    step: int
    variables: Any  # the EMA parameters (Flax variables)
    model: Any
    process: Any
    shape: tuple  # (H, W, C)
    meta: dict


def restore_ema(config: ml_collections.ConfigDict, workdir: str, step: int = 0) -> Restored:
    """The EMA parameters, model and process of checkpoint ``step`` (0 = the latest) of the run in
    ``workdir``; raises FileNotFoundError when there is no such checkpoint and ValueError when
    ``config``'s model fields differ from the checkpoint's."""
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"no checkpoints in {ckpt_dir}: train first (--mode=train)")
    ckpt = checkpoint.Checkpointer(ckpt_dir, config.train.keep_checkpoints)
    try:
        steps = ckpt.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoints in {ckpt_dir}: train first (--mode=train)")
        if step and step not in steps:
            raise FileNotFoundError(f"no checkpoint of step {step} in {ckpt_dir}; available: {sorted(steps)}")
        step = int(step or max(steps))
        arrays, meta = ckpt.restore_meta(step)
        _check_same_model(config, meta, workdir)
        spec = arrays["spectrum"]
        shape = tuple(spec.shape)
        process = build_process(config, spec, shape)
        model = build_model(config)
        mesh = training.make_mesh()
        tx, _ = build_optimizer(config)
        fresh = abstract_train_state(model, tx, shape)
        state, _, _, _ = ckpt.restore(step, checkpoint.abstract_like(fresh, training.replicated(mesh)))
    finally:
        ckpt.close()
    return Restored(step, state.ema_params, model, process, shape, meta)


def sample(config: ml_collections.ConfigDict, workdir: str) -> str | None:
    """Draw ``config.sample.num_samples`` images from the latest checkpoint's EMA params with the
    configured sampler and NFE; writes ``samples/<method>_nfe<N>.{npz,png}`` and returns the npz
    path (on process 0). Task configs: see :func:`spd_jax.conditional.sample_task`."""
    if conditional.task_of(config) is not None:
        return conditional.sample_task(config, workdir)
    config_utils.validate(config, jax.device_count(), jax.process_count())
    workdir = config_utils.check_workdir(workdir)
    restored = restore_ema(config, workdir)
    latest, model, process, shape = restored.step, restored.model, restored.process, restored.shape
    settings = sampler_settings(config)
    batch = min(config.sample.batch_size, config.sample.num_samples)
    sampler = make_sampler(model, process, config.model.head, settings, batch, shape, config.train.fast_compile)
    key = jax.random.PRNGKey(config.sample.seed)
    images, nfe = draw_samples(sampler, restored.variables, key, config.sample.num_samples, batch)
    if jax.process_index() != 0:
        return None
    out_dir = os.path.join(workdir, "samples")
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"{settings['method']}_nfe{nfe}")
    np.savez(stem + ".npz", images=images, nfe=nfe, step=latest, method=settings["method"],
             clip_x0=settings["clip_x0"])
    write_png(stem + ".png", images, config.sample.upscale)
    return stem + ".npz"
