"""From a config to the objects the lower layers take: data, spectrum, process, model, loss,
optimiser, sampler settings, and a restored checkpoint.

Every builder reads the config and passes explicit arguments down; nothing below this layer sees
a config. The fields are documented in ``configs/defaults.py``.
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from spd_jax import data, losses, tasks, training
from spd_jax.diffusion import grids, processes, samplers, spectrum
from spd_jax.models.heads import DDM_HEADS, HEAD_DECODERS
from spd_jax.models.mlp import MLP, smd_mlp
from spd_jax.models.smd import SMDNet, smd_net
from spd_jax.models.unet import UNet
from spd_jax.run.checks import MLP_KINDS, SMD_KINDS, ConfigError
from spd_jax.training import checkpoint

#: the parts of a config that define the network and its process; a checkpoint restored for
#: resuming, sampling or evaluation must match them (run-only settings such as data paths, reader
#: threads, batch sizes of sampling and the compute dtype may change)
MODEL_FIELDS = {
    "data": ("name", "image_size"),
    "process": None,  # every field
    "model": None,  # every field but the RUN_ONLY ones
}
RUN_ONLY = {"model": ("dtype",)}


def task_of(config) -> tasks.Task:
    """The :class:`~spd_jax.tasks.Task` of ``config.task`` (name '' = unconditional generation)."""
    t = config.get("task", None)
    if t is None:
        return tasks.Task()
    return tasks.Task(str(t.name), int(t.factor), str(t.mask), bool(t.enforce_known))


def image_shape(config) -> tuple[int, int, int]:
    """(H, W, C) of the training images of ``config.data``."""
    size = data.image_size(config.data.name, config.data.image_size)
    return size, size, data.image_channels(config.data.name)


def build_source(config, split: str = "train"):
    """Random-access images of ``split`` of ``config.data`` (see :func:`spd_jax.data.image_source`)."""
    return data.image_source(
        config.data.name,
        split,
        data_dir=config.data.tfds_data_dir or None,
        image_size=image_shape(config)[0],
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
    """The network of ``config.model`` (a UNet or MLP, or an SMDNet around one)."""
    m = config.model
    if m.kind in MLP_KINDS:
        mlp = MLP(width=m.mlp_width, num_blocks=m.mlp_blocks, time_embedding=m.time_embedding,
                  time_levels=(config.process.num_levels or None) if m.time_embedding == "discrete" else None,
                  dtype=jnp.dtype(m.dtype))
        return smd_mlp(mlp, latent_dim=m.latent_dim, latent_width=m.latent_base_channels) if m.kind == "smd_mlp" else mlp
    unet = UNet(
        base_channels=m.base_channels,
        channel_mult=tuple(m.channel_mult),
        num_res_blocks=m.num_res_blocks,
        attention_resolutions=tuple(m.attention_resolutions),
        num_heads=m.num_heads,
        head_channels=m.head_channels or None,
        dropout=m.dropout,
        resample=m.resample,
        num_decoders=len(HEAD_DECODERS.get(m.head, (1,))),
        first_output_mult=HEAD_DECODERS.get(m.head, (1,))[0],
        decouple=m.decouple,
        mid_attention=m.mid_attention,
        norm_groups=m.norm_groups,
        input_kernel=m.input_kernel,
        time_embedding=m.time_embedding,
        time_levels=(config.process.num_levels or None) if m.time_embedding == "discrete" else None,
        cond_channels=task_of(config).cond_channels(data.image_channels(config.data.name)),
        dtype=jnp.dtype(m.dtype),
    )
    if m.kind == "smd":
        return smd_net(unet, latent_dim=m.latent_dim, latent_base_channels=m.latent_base_channels)
    return unet


def build_loss(config, model, process) -> training.LossFn:
    """The training objective matching the model's head and kind, with the task's conditioning
    image added to each batch (:func:`spd_jax.losses.conditioned_loss`)."""
    lc, head = config.loss, config.model.head
    if head in DDM_HEADS + ("ddm_linear",):
        loss = losses.make_ddm_loss(model, process, head=head, weighting=lc.ddm_weighting,
                                    rec_weight=lc.ddm_rec_weight, t_min=lc.t_min, t_max=lc.t_max)
    elif config.model.kind in SMD_KINDS and lc.smd == "mixture":
        loss = losses.make_smd_mixture_loss(model, process, num_samples=lc.smd_samples, step=lc.smd_step or None,
                                            target=head, bandwidth=lc.smd_bandwidth, t_min=lc.t_min,
                                            t_max=lc.t_max)
    elif config.model.kind in SMD_KINDS:
        loss = losses.make_smd_loss(model, process, target=head, t_min=lc.t_min, t_max=lc.t_max)
    else:
        loss = losses.make_denoising_loss(model, process, target=head, t_min=lc.t_min, t_max=lc.t_max)
    return losses.conditioned_loss(loss, task_of(config))


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


def tuned_grid(config, workdir=None) -> grids.TunedGrid | None:
    """The tuned grid ``config.sample.grid`` names (``tuned:NAME`` under WORKDIR/tuned/, or a JSON
    path), or None; raises :class:`ConfigError` when it cannot be read or is for another method."""
    grid = config.sample.grid
    if not grids.is_tuned(grid):
        return None
    try:
        tuned = grids.load_tuned(grid, None if workdir is None else str(workdir))
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"config.sample.grid = {grid!r}: {err}") from None
    if tuned.method != config.sample.method:
        raise ConfigError(f"config.sample.grid = {grid!r} was tuned for {tuned.method!r}, not "
                          f"config.sample.method = {config.sample.method!r}")
    return tuned


def sampler_settings(config, method: str | None = None, nfe: int | None = None, workdir=None) -> dict:
    """Keyword arguments of :func:`spd_jax.diffusion.samplers.sample` for ``method`` at ``nfe``
    (default: ``config.sample``'s). ``config.sample.grid`` and ``config.sample.options`` apply
    when ``method`` is ``config.sample.method``; another method gets its own default grid and
    knobs. The step count is the largest whose NFE fits ``nfe`` (docs/math.md §0 "NFE targets").
    A tuned grid (``config.sample.grid = "tuned:NAME"``, found under ``workdir``) is used as saved,
    with its per-step weights, for the NFE it was tuned at; other NFEs use the default grid."""
    s = config.sample
    method = method or s.method
    own = method == s.method
    tuned = tuned_grid(config, workdir) if own else None
    if tuned is not None:
        if int(tuned.record.get("nfe", tuned.num_steps)) == int(nfe or s.nfe):
            return dict(method=method, num_steps=tuned.num_steps, grid=tuned.grid, clip_x0=bool(s.clip_x0),
                        **tuned.knobs)
        own = False
    grid = (s.grid or None) if own else None
    num_steps = samplers.steps_for_nfe(method, nfe or s.nfe, grid=grid)
    knobs = dict(s.options) if own else {}
    grid_name = grid or samplers.DEFAULT_GRIDS[method]
    if "t_max" in grids.GRID_OPTIONS[grid_name]:
        knobs.setdefault("t_max", float(s.t_max))
    return dict(method=method, num_steps=num_steps, grid=grid, clip_x0=bool(s.clip_x0), **knobs)


# ---- checkpoints ------------------------------------------------------------------------------


def model_config_json(config) -> dict:
    """The fields of ``config`` that define the model (:data:`MODEL_FIELDS`), as JSON values."""
    out = {}
    for block, fields in MODEL_FIELDS.items():
        values = json.loads(config[block].to_json())
        out[block] = values if fields is None else {k: values[k] for k in fields if k in values}
        for field in RUN_ONLY.get(block, ()):
            out[block].pop(field, None)
    out["task"] = {"name": task_of(config).name}
    return out


def check_same_model(config, meta: dict, where: str, spectrum_shape: tuple | None = None) -> None:
    """Raise :class:`ConfigError` naming the first field of ``config`` that defines the model and
    differs from checkpoint ``meta`` (or the image shape, when the checkpoint's spectrum shape is
    given); run-only settings may differ."""
    if spectrum_shape is not None and tuple(spectrum_shape) != image_shape(config):
        raise ConfigError(
            f"the checkpoint in {where} was trained on {'x'.join(map(str, spectrum_shape))} images but "
            f"config.data ({config.data.name!r}) gives {'x'.join(map(str, image_shape(config)))}: use the "
            "training config (or a new workdir)")
    saved = meta.get("model_config", {})
    now = model_config_json(config)
    if "task" not in saved:  # checkpoints of unconditional runs written before tasks existed
        saved = dict(saved, task={"name": ((meta.get("config") or {}).get("task") or {}).get("name", "")})
    for block, values in now.items():
        old = saved.get(block) or {}
        for field, value in values.items():
            if old.get(field, value) != value:
                raise ConfigError(
                    f"config.{block}.{field} = {value!r} differs from the checkpoint's {old.get(field)!r} in "
                    f"{where}: it defines the model; use the training value (or a new workdir)")


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
    ``workdir``; raises FileNotFoundError when there is no such checkpoint and ConfigError when
    ``config``'s model fields differ from the checkpoint's."""
    ckpt_dir = epath.Path(workdir) / "checkpoints"
    if not ckpt_dir.is_dir():
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
        check_same_model(config, meta, str(workdir), arrays["spectrum"].shape)
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
