"""Checks of a training config, run before anything is compiled or written.

:func:`validate` raises a :class:`ConfigError` (a ``ValueError``) naming the offending field, its value and what was
expected; it reads only the config, the names registries and the device count.
"""

from __future__ import annotations

import os

import ml_collections
from etils import epath

from spd_jax import data
from spd_jax.diffusion import grids, processes, samplers
from spd_jax.losses import DDM_WEIGHTINGS
from spd_jax.models.heads import DDM_HEADS, HEAD_DECODERS, HEADS
from spd_jax.models.unet import RESAMPLE_MODES, TIME_EMBEDDINGS
from spd_jax.tasks import FACTORS, MASKS, TASK_NAMES
from spd_jax.training import SCHEDULES

MODEL_KINDS = ("unet", "smd", "mlp", "smd_mlp")
SMD_KINDS = ("smd", "smd_mlp")  #: model kinds with SMD's latent network (sampled with method 'smd')
MLP_KINDS = ("mlp", "smd_mlp")  #: small residual MLPs (low-dimensional data such as the mixture2d toy)
#: processes the training system can train and sample (IHDM needs its residual loss and sampler)
TRAINABLE_PROCESSES = tuple(p for p in processes.PROCESS_NAMES if p != "ihdm")
SPECTRUM_SOURCES = ("estimate", "preset")
SMD_LOSSES = ("single_eta", "mixture")
COMPUTE_DTYPES = ("float32", "bfloat16")


def _fail(field: str, value, expected: str):
    raise ConfigError(f"config.{field} = {value!r} is invalid: expected {expected}")


def _name(config, field: str, valid) -> None:
    value = _get(config, field)
    try:
        processes.check_name(value, valid, f"config.{field}")
    except ValueError as err:
        raise ConfigError(str(err).replace("unknown config.", "config.", 1)) from None


def _get(config, field: str):
    node = config
    for part in field.split("."):
        node = node[part]
    return node


def _positive(config, *fields: str) -> None:
    for field in fields:
        value = _get(config, field)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            _fail(field, value, "an integer >= 1")


class ConfigError(ValueError):
    """A config value (or the workdir) is unusable; raised before anything compiles or is written."""


def validate(config: ml_collections.ConfigDict, device_count: int, process_count: int = 1) -> None:
    """Raise :class:`ConfigError` for the first invalid value of a training config."""
    try:
        _validate(config, device_count, process_count)
    except ConfigError:
        raise
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(str(err)) from None


def _validate(config, device_count: int, process_count: int) -> None:
    _name(config, "data.name", data.DATASETS)
    _name(config, "process.name", TRAINABLE_PROCESSES)
    _name(config, "process.spectrum", SPECTRUM_SOURCES)
    _name(config, "model.kind", MODEL_KINDS)
    _name(config, "model.dtype", COMPUTE_DTYPES)
    _name(config, "model.head", HEADS)
    _name(config, "model.resample", RESAMPLE_MODES)
    _name(config, "model.time_embedding", TIME_EMBEDDINGS)
    _name(config, "loss.ddm_weighting", DDM_WEIGHTINGS)
    _name(config, "loss.smd", SMD_LOSSES)
    _name(config, "optim.schedule", SCHEDULES)
    _name(config, "sample.method", samplers.METHODS)
    tuned = grids.is_tuned(config.sample.grid)  # read (and checked) with the workdir, see builders
    if config.sample.grid and not tuned:
        _name(config, "sample.grid", grids.GRIDS)
    _positive(
        config,
        "train.batch_size",
        "train.num_steps",
        "train.steps_per_dispatch",
        "train.log_every",
        "train.checkpoint_every",
        "train.keep_checkpoints",
        "train.max_nonfinite_streak",
        "sample.nfe",
        "sample.num_samples",
        "sample.batch_size",
        "sample.upscale",
        "model.base_channels",
        "model.num_res_blocks",
        "model.num_heads",
        "model.norm_groups",
        "model.input_kernel",
        "process.spectrum_images",
        "data.worker_buffer",
        "loss.smd_samples",
    )
    grid = None if tuned else config.sample.grid or None
    samplers.steps_for_nfe(config.sample.method, config.sample.nfe, grid=grid)
    grid = grid or samplers.DEFAULT_GRIDS[config.sample.method]
    knobs = tuple(samplers.KNOBS[config.sample.method]) + (() if tuned else tuple(grids.GRID_OPTIONS[grid]))
    for name in config.sample.options:
        processes.check_name(name, knobs, f"key of config.sample.options for method {config.sample.method!r}")
    try:  # option values (eta, gamma, mu, kappa, ...): otherwise first checked at the first sample grid
        samplers.resolve_knobs(config.sample.method, grid, dict(config.sample.options))
    except ValueError as err:
        raise ConfigError(f"config.sample.options: {err}") from None
    if config.train.sample_every < 0:
        _fail("train.sample_every", config.train.sample_every, "an integer >= 0 (0 = only at the end)")
    if config.sample.grid_images < 0:
        _fail("sample.grid_images", config.sample.grid_images, "an integer >= 0 (0 = no sample grids)")
    for field in ("data.num_threads", "data.prefetch", "data.worker_count"):
        value = _get(config, field)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            _fail(field, value, "an integer >= 0")
    if config.data.uint8 and config.data.name == "digits":
        _fail("data.uint8", True, "False for the digits (they are not 8-bit images)")
    if config.data.image_size < 0:
        _fail("data.image_size", config.data.image_size, "an integer >= 0 (0 = native size)")
    native = data.image_size(config.data.name)
    if config.data.name in data.EMBEDDED and config.data.image_size not in (0, native):
        _fail("data.image_size", config.data.image_size,
              f"0 for the embedded {config.data.name!r} images (native {native} px)")
    mult = tuple(config.model.channel_mult)
    if not mult or any(not isinstance(m, int) or m < 1 for m in mult):
        _fail("model.channel_mult", mult, "a non-empty tuple of integers >= 1")
    size = data.image_size(config.data.name, config.data.image_size)
    if config.model.kind not in MLP_KINDS and size % 2 ** (len(mult) - 1):
        _fail("model.channel_mult", mult, f"at most log2-many levels for {size}-pixel images "
              f"({size} must be divisible by 2^(levels - 1))")
    batch = config.train.batch_size
    if batch % device_count:
        _fail("train.batch_size", batch, f"a multiple of the device count ({device_count})")
    if batch % process_count:
        _fail("train.batch_size", batch, f"a multiple of the process count ({process_count})")
    if not config.optim.learning_rate > 0:
        _fail("optim.learning_rate", config.optim.learning_rate, "a number > 0")
    if config.optim.warmup_steps < 0:
        _fail("optim.warmup_steps", config.optim.warmup_steps, "an integer >= 0")
    if config.optim.schedule == "cosine" and config.train.num_steps <= config.optim.warmup_steps:
        _fail("train.num_steps", config.train.num_steps, "more steps than optim.warmup_steps for a cosine schedule")
    if not 0.0 <= config.train.ema < 1.0:
        _fail("train.ema", config.train.ema, "a decay in [0, 1)")
    if not 0.0 <= config.model.dropout < 1.0:
        _fail("model.dropout", config.model.dropout, "a rate in [0, 1)")
    if not 0.0 <= config.loss.t_min < config.loss.t_max <= 1.0:
        _fail("loss.t_min", (config.loss.t_min, config.loss.t_max), "0 <= t_min < t_max <= 1")
    if not 0.0 < config.sample.t_max <= 1.0:
        _fail("sample.t_max", config.sample.t_max, "a time in (0, 1]")
    if config.model.kind in SMD_KINDS and config.loss.smd == "mixture":
        if config.loss.smd_bandwidth > 0 and config.loss.smd_step < 0:
            _fail("loss.smd_step", config.loss.smd_step, "a reverse step >= 0 (0 = one discrete level)")
        if not config.loss.smd_bandwidth > 0 and not 0.0 <= config.loss.smd_step < config.loss.t_max:
            _fail("loss.smd_step", config.loss.smd_step, "a reverse step in [0, loss.t_max) (0 = one discrete level; "
                  "larger steps need loss.smd_bandwidth > 0)")
        if not config.loss.smd_step and not config.process.num_levels:
            _fail("loss.smd_step", config.loss.smd_step, "a reverse step > 0 for a continuous process")
    if config.process.num_levels and config.process.name != "vp_linear":
        _fail("process.num_levels", config.process.num_levels, "0 unless process.name is 'vp_linear'")
    if config.process.num_levels < 0 or config.process.num_levels == 1:
        _fail("process.num_levels", config.process.num_levels, "0 (continuous) or an integer >= 2")
    _check_families(config)
    _check_task(config)
    _check_projection(config)
    _check_points(config)


def _check_families(config) -> None:
    """Model head, process and sampler must fit together."""
    head, kind, method = config.model.head, config.model.kind, config.sample.method
    scalar = config.process.name not in processes.SPECTRAL_PROCESSES
    if head in DDM_HEADS and not scalar:
        _fail("model.head", head, f"a non-DDM head for the spectral process {config.process.name!r}")
    if head in DDM_HEADS and kind != "unet":
        _fail("model.head", head, f"a non-DDM head for model.kind {kind!r} (DDM heads need the U-Net's decoders)")
    linear = config.process.name == "ddm_linear"
    if linear != (head == "ddm_linear"):
        _fail("model.head", head, "'ddm_linear' exactly when config.process.name is 'ddm_linear' (its (a, C) "
              "and eps heads)")
    if linear and kind != "unet":
        _fail("model.kind", kind, "'unet' for the ddm_linear head")
    if linear and method != "ddm_bridge":
        _fail("sample.method", method, "'ddm_bridge' for process 'ddm_linear' (its only sampler)")
    if method == "smd" and kind not in SMD_KINDS:
        _fail("sample.method", method, "a method other than 'smd' for a model without latent network")
    if kind in SMD_KINDS and method not in ("smd",):
        _fail("sample.method", method, "'smd' for an SMD model (its denoiser draws a latent per step)")


def _check_points(config) -> None:
    """Point clouds (``data.POINT_DATASETS``) have no image spectrum, PNG grids or conditioning; MLPs
    take no conditioning image."""
    name = config.data.name
    task = config.get("task", None)
    if config.model.kind in MLP_KINDS:  # (DDM heads on an MLP are refused by _check_families)
        _positive(config, "model.mlp_width", "model.mlp_blocks", "model.latent_base_channels")
        if config.model.mlp_width % 4:
            _fail("model.mlp_width", config.model.mlp_width, "a multiple of 4 (the time embedding's size)")
        if task is not None and task.name:
            _fail("task.name", task.name, f"'' for model.kind {config.model.kind!r} (an MLP takes no conditioning)")
    if config.model.kind in SMD_KINDS:
        _positive(config, "model.latent_dim")
    if config.loss.smd_bandwidth < 0:
        _fail("loss.smd_bandwidth", config.loss.smd_bandwidth, "a std >= 0 (0 = none)")
    if name not in data.POINT_DATASETS:
        return
    if config.process.spectrum != "preset":
        _fail("process.spectrum", config.process.spectrum, f"'preset' for the point cloud {name!r} (no image "
              "spectrum to estimate)")
    if config.process.name in processes.SPECTRAL_PROCESSES:
        _fail("process.name", config.process.name, f"a scalar process for the point cloud {name!r}")
    if config.sample.grid_images:
        _fail("sample.grid_images", config.sample.grid_images, f"0 for the point cloud {name!r} (no PNG grids)")
    if task is not None and task.name:
        _fail("task.name", task.name, f"'' for the point cloud {name!r}")


def _check_projection(config) -> None:
    """A projection run (``config.projection.score_workdir`` set; spd_jax.run.projection) trains a
    single-output U-Net (or, for point clouds, MLP) T_theta for unconditional predict-project sampling with N uniform steps."""
    block = config.get("projection", None)
    if block is None:
        return
    _positive(config, "projection.num_steps")
    if not block.score_workdir:
        return
    task = config.get("task", None)
    if task is not None and task.name:
        _fail("task.name", task.name, "'' for a projection run (unconditional predict-project sampling)")
    if config.model.kind not in ("unet", "mlp") or config.model.head in HEAD_DECODERS:
        _fail("model.kind", (config.model.kind, config.model.head), "a single-output 'unet' or 'mlp' (head eps, "
              "x0, v, flow or score) for the projection network T_theta")
    if config.sample.method != "predict_project":
        return  # other samplers draw from the score model alone
    if config.sample.grid not in ("", "uniform_t"):
        _fail("sample.grid", config.sample.grid, "'' or 'uniform_t' for predict_project with a trained projection "
              "(it is trained for N uniform steps)")
    steps = samplers.steps_for_nfe("predict_project", config.sample.nfe)
    if steps != block.num_steps:
        _fail("sample.nfe", config.sample.nfe, f"{2 * block.num_steps} (2 x projection.num_steps = "
              f"{block.num_steps}): the projection network was trained for that many steps; predict_project "
              f"at {config.sample.nfe} NFE takes {steps}")


def input_files(config) -> list[str]:
    """The image files of ``config.task.inputs`` (a comma list; empty for none)."""
    inputs = config.task.get("inputs", "") if config.get("task", None) is not None else ""
    return [p.strip() for p in str(inputs).split(",") if p.strip()]


def _check_task(config) -> None:
    t = config.get("task", None)
    if t is None:
        return
    if t.name not in TASK_NAMES:
        _fail("task.name", t.name,
              f"one of {TASK_NAMES} ('' = unconditional, sr = super-resolution, inpaint = inpainting)")
    if not isinstance(t.enforce_known, bool):
        _fail("task.enforce_known", t.enforce_known, "True or False")
    if t.name == "sr":
        if isinstance(t.factor, bool) or t.factor not in FACTORS:
            _fail("task.factor", t.factor, f"one of {FACTORS}")
        size = data.image_size(config.data.name, config.data.image_size)
        if size % t.factor:
            _fail("task.factor", t.factor, f"a divisor of the {size}-pixel image size")
    if t.name == "inpaint" and t.mask not in MASKS:
        _fail("task.mask", t.mask, f"one of {MASKS}")
    for path in input_files(config):
        if not epath.Path(path).is_file():
            _fail("task.inputs", t.inputs, f"a comma list of existing image files; {path!r} does not exist")
    if t.inputs and not t.name:
        _fail("task.inputs", t.inputs, "'' for an unconditional config (task.name = '')")


def _is_local(path: epath.Path) -> bool:
    return "://" not in str(path)


def check_workdir(workdir: str | epath.PathLike) -> epath.Path:
    """The workdir as an absolute ``epath.Path`` (local folders or any filesystem epath supports,
    e.g. ``gs://bucket/run``); raises if it exists as a file or, for a local folder, cannot be
    created or written."""
    if not workdir:
        raise ConfigError("--workdir is required")
    path = epath.Path(workdir)
    if not _is_local(path):  # remote stores: permissions are checked by the first write
        if path.exists() and not path.is_dir():
            raise ConfigError(f"workdir {str(path)!r} exists and is not a directory")
        return path
    path = path.absolute()
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"workdir {str(path)!r} exists and is not a directory")
        if not os.access(path, os.W_OK):
            raise ConfigError(f"workdir {str(path)!r} is not writable")
        return path
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise ConfigError(f"workdir {str(path)!r} cannot be created: {str(parent)!r} is not a writable directory")
    return path
