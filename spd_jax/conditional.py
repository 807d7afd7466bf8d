"""Image-conditioned generation: super-resolution and inpainting (SPEC §0 "Conditional tasks").

The network sees concat(x_t, y) in pixel space, y the conditioning image of the task; the process
diffuses x_0 itself, so every head (eps, x0, v, DDM dual) and every sampler works unchanged with
the conditioned denoiser ``model_denoiser(..., cond=y)``.

* ``sr`` (super-resolution, ``config.task.factor`` 2 or 4): area down-sampling; y = the bicubic
  up-sampling of the low-resolution image (C channels). Baseline: that bicubic image.
* ``inpaint``: per-example random ``box`` or ``free_form`` masks (1 = known); y = concat(m x, m)
  (C + 1 channels). Baseline: mean fill. With ``config.task.enforce_known`` the known pixels are
  re-imposed after every sampler step through the process's own forward law,
  u <- B[m B^-1(alpha_s B y + sigma_s B z) + (1 - m) B^-1 u] (exact for pixel-diagonal processes,
  an approximation for spectral ones, SPEC §0), and pasted exactly into the final output, so the
  known pixels of the result are bit-identical to the input's.

Randomness is per example (SPEC §0): the mask of example i is drawn from
fold_in(fold_in(key, MASK_STREAM), i); in training, key is the step key, inside the jitted step, so
conditioning does not depend on batch position or device count.

Entry points: :func:`validate_task` (called by ``config_utils.validate``), :func:`wrap_loss`,
:func:`make_task_sampler` (training grids), :func:`sample_task` (``launch.py --mode=sample``) and
:func:`evaluate_task` (PSNR / SSIM per (sampler, NFE) beside the bicubic / mean-fill baseline).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from spd_jax import samplers, tasks
from spd_jax.models.heads import DDM_HEADS, model_denoiser

TASK_NAMES = ("", "sr", "inpaint")
TASK_LABELS = {"sr": "super-resolution", "inpaint": "inpainting"}
MASKS = ("box", "free_form")
FACTORS = (2, 4)
BASELINES = {"sr": "bicubic", "inpaint": "mean_fill"}
#: fold_in constant of the degradation stream (distinct from the loss's streams 0..4)
MASK_STREAM = 0x6D61736B
#: image channels of each data set (the conditioning image has these, plus a mask channel)
DATA_CHANNELS = {"digits": 1, "mnist": 1, "fashion_mnist": 1, "patches": 3, "cifar10": 3, "celeb_a": 3,
                 "svhn_cropped": 3}
REPORT_SCHEMA = "spd_jax.conditional/1"
#: examples kept (npz and PNG) per evaluated setting
EXAMPLES = 16
#: held-out images scored by :func:`evaluate_task` unless told otherwise
EVAL_SAMPLES = 256


class Task(NamedTuple):
    """A conditional task: ``name`` in ("sr", "inpaint") and its options."""

    name: str
    factor: int = 4
    mask: str = "box"
    enforce_known: bool = True

    @property
    def label(self) -> str:
        return TASK_LABELS[self.name]

    @property
    def projects(self) -> bool:
        """Whether sampling re-imposes known pixels (inpainting with ``enforce_known``)."""
        return self.name == "inpaint" and bool(self.enforce_known)


class Degraded(NamedTuple):
    """A batch's degradation: ``cond`` the network's conditioning image, ``display`` what an
    "input" panel shows (nearest up-sampled low-res image / masked image), ``baseline`` the
    bicubic / mean-fill estimate, ``mask`` (B, H, W, 1) with 1 = known (ones for SR) and ``known``
    m * x (the known pixels; zeros for SR)."""

    cond: Any
    display: Any
    baseline: Any
    mask: Any
    known: Any


def task_of(config) -> Task | None:
    """The :class:`Task` of ``config.task`` (None for unconditional configs)."""
    t = config.get("task", None)
    if t is None or not t.name:
        return None
    return Task(str(t.name), int(t.factor), str(t.mask), bool(t.enforce_known))


def image_channels(config) -> int:
    return DATA_CHANNELS[config.data.name]


def cond_channels(config) -> int:
    """Channels of the conditioning image of ``config`` (0 for unconditional configs)."""
    task = task_of(config)
    if task is None:
        return 0
    channels = image_channels(config)
    return channels if task.name == "sr" else channels + 1


def validate_task(config) -> None:
    """Raise ``config_utils.ConfigError`` naming the first bad ``config.task`` value."""
    from spd_jax import config_utils

    def fail(field, value, expected):
        raise config_utils.ConfigError(f"config.task.{field} = {value!r} is invalid: expected {expected}")

    t = config.get("task", None)
    if t is None:
        return
    if t.name not in TASK_NAMES:
        fail("name", t.name, f"one of {TASK_NAMES} ('' = unconditional, sr = super-resolution, inpaint = inpainting)")
    if not isinstance(t.enforce_known, bool):
        fail("enforce_known", t.enforce_known, "True or False")
    if t.name == "sr":
        if isinstance(t.factor, bool) or t.factor not in FACTORS:
            fail("factor", t.factor, f"one of {FACTORS}")
        size = config_utils.image_size(config)
        if size % t.factor:
            fail("factor", t.factor, f"a divisor of the {size}-pixel image size")
    if t.name == "inpaint" and t.mask not in MASKS:
        fail("mask", t.mask, f"one of {MASKS}")
    for path in input_files(config):
        if not os.path.isfile(path):
            fail("inputs", t.inputs, f"a comma list of existing image files; {path!r} does not exist")
    if t.inputs and not t.name:
        fail("inputs", t.inputs, "'' for an unconditional config (task.name = '')")


def input_files(config) -> list[str]:
    inputs = config.task.get("inputs", "") if config.get("task", None) is not None else ""
    return [p.strip() for p in str(inputs).split(",") if p.strip()]


# ---- degradations (pure, jit-able) ----------------------------------------------------------


def masks(task: Task, key, shape, index=None):
    """Per-example masks (B, H, W, 1), 1 = known; example i's mask depends only on (key, i)."""
    make = tasks.box_masks if task.mask == "box" else tasks.free_form_masks
    return make(key, shape, index=index)


def degrade_low_res(task: Task, low) -> Degraded:
    """SR degradation from given low-resolution images (B, H/f, W/f, C)."""
    f = task.factor
    cond = tasks.upsample(low, f, "bicubic")
    ones = jnp.ones(cond.shape[:3] + (1,), cond.dtype)
    return Degraded(cond, tasks.upsample(low, f, "nearest"), cond, ones, jnp.zeros_like(cond))


def degrade_masked(images, mask) -> Degraded:
    """Inpainting degradation of ``images`` with given masks (B, H, W, 1)."""
    known = images * mask
    return Degraded(tasks.inpainting_condition(images, mask), known, tasks.mean_fill(images, mask), mask, known)


def degrade(task: Task, images, key, index=None) -> Degraded:
    """The task's degradation of clean ``images`` (B, H, W, C); ``key`` draws the masks (from
    fold_in(key, MASK_STREAM), per example with the global ``index``)."""
    if task.name == "sr":
        return degrade_low_res(task, tasks.area_downsample(images, task.factor))
    return degrade_masked(images, masks(task, jax.random.fold_in(key, MASK_STREAM), images.shape, index))


def wrap_loss(loss_fn: Callable, config) -> Callable:
    """``loss_fn`` with the batch's conditioning image added (unchanged for unconditional configs).

    The conditioning is computed inside the loss from the clean images, the step key and the
    global example indices (``batch["index"]``), so it stays pure and device-count invariant.
    """
    task = task_of(config)
    if task is None:
        return loss_fn

    def conditioned(params, batch, key):
        d = degrade(task, batch["image"], key, batch.get("index"))
        return loss_fn(params, dict(batch, cond=jax.lax.stop_gradient(d.cond)), key)

    return conditioned


# ---- conditioned sampling ---------------------------------------------------------------------


def sample_with_known_pixels(denoiser, process, *, known, mask, enforce_known: bool = True, **sample_kwargs):
    """:func:`spd_jax.samplers.sample` for a conditioned ``denoiser``; with ``enforce_known`` the
    known pixels ``known`` (= m * y, zeros elsewhere) are re-imposed after every step through
    :func:`spd_jax.tasks.known_pixel_projection` and pasted exactly into the result (where
    ``mask`` > 0.5). Returns (x, info)."""
    if not enforce_known:
        return samplers.sample(denoiser, process, **sample_kwargs)
    project = tasks.known_pixel_projection(process, known, mask)
    x, info = samplers.sample(denoiser, process, project=project, **sample_kwargs)
    return jnp.where(mask > 0.5, known, x), info


def conditional_sample(model, variables, process, head: str, task: Task, degraded: Degraded, *, key, index,
                       settings: dict):
    """Samples (B, H, W, C) of a conditional ``model`` given a batch's :class:`Degraded`."""
    denoiser = model_denoiser(model, variables, process, head, cond=degraded.cond)
    shape = degraded.display.shape
    return sample_with_known_pixels(denoiser, process, known=degraded.known, mask=degraded.mask,
                                    enforce_known=task.projects, key=key, shape=shape, index=index, **settings)


def make_task_sampler(model, process, head: str, task: Task, settings: dict, fast_compile: bool = False):
    """jitted ``run(variables, key, degraded, index) -> (images (B, H, W, C) NumPy, nfe)``."""
    from spd_jax import train as training

    def draw(variables, key, degraded, index):
        x, info = conditional_sample(model, variables, process, head, task, degraded, key=key, index=index,
                                     settings=settings)
        return x, info["nfe"]

    jitted = jax.jit(draw, compiler_options=training.FAST_COMPILE if fast_compile else None)

    def run(variables, key, degraded, index):
        x, nfe = jitted(variables, key, degraded, index)
        return np.asarray(x.addressable_data(0)), int(nfe)

    return run


def draw_conditioned(sampler: Callable, variables, key, degraded: Degraded, batch: int):
    """Run ``sampler`` over a whole :class:`Degraded` set in chunks of ``batch`` (the last chunk is
    padded; per-example keys make the result chunking invariant). Returns (images, nfe)."""
    count = int(np.shape(degraded.cond)[0])
    out, nfe = [], 0
    for start in range(0, count, batch):
        rows = np.minimum(np.arange(start, start + batch), count - 1)
        chunk = Degraded(*(jnp.asarray(np.asarray(a)[rows]) for a in degraded))
        x, nfe = sampler(variables, key, chunk, jnp.arange(start, start + batch, dtype=jnp.uint32))
        out.append(x[: count - start])
    return np.concatenate(out), nfe


def sampler_settings(config, method: str | None = None, nfe: int | None = None) -> dict:
    """:func:`spd_jax.experiment.sampler_settings` with ``config.sample.options`` filtered to the
    knobs ``method`` accepts (so one config can be evaluated with several samplers)."""
    from spd_jax import experiment, grids

    method = method or config.sample.method
    s = config.sample
    grid = s.grid or samplers.DEFAULT_GRIDS[method]
    valid = set(samplers.KNOBS[method]) | set(grids.GRID_OPTIONS[grid]) | {"method", "num_steps", "grid", "clip_x0"}
    settings = experiment.sampler_settings(config, method, nfe)
    return {k: v for k, v in settings.items() if k in valid}


def training_grid(config, model, process, settings: dict, batch: int, fast_compile: bool, key):
    """For task configs, ``grid(variables, path) -> outputs``: samples conditioned on
    ``config.sample.grid_images`` held-out images, written to ``path`` (if not None) as input |
    output | reference panels. None for unconditional configs."""
    task = task_of(config)
    if task is None or not config.sample.grid_images:
        return None
    sampler = make_task_sampler(model, process, config.model.head, task, settings, fast_compile)
    cache: dict = {}

    def grid(variables, path: str | None):
        if not cache:
            references = held_out_images(config, config.sample.grid_images, fallback_to_train=True)
            cache["refs"] = references
            cache["degraded"] = jax.jit(lambda x: degrade(task, x, key))(jnp.asarray(references))
        degraded = cache["degraded"]
        outputs, _ = draw_conditioned(sampler, variables, key, degraded, max(1, min(batch, len(cache["refs"]))))
        if path is not None:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            write_panels(path, [np.asarray(degraded.display), outputs, cache["refs"]], config.sample.upscale)
        return outputs

    return grid


# ---- image panels -------------------------------------------------------------------------------


def panel_grid(columns: Sequence[np.ndarray], upscale: int = 1, pad: int = 1, gap: int = 4) -> np.ndarray:
    """uint8 picture of examples side by side: each example is one row of panels (``columns``,
    e.g. input | output | reference, each (N, H, W, C) in [-1, 1]); rows wrap into several groups."""
    cols = [np.clip((np.asarray(c, np.float32) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8) for c in columns]
    if upscale > 1:
        cols = [c.repeat(upscale, axis=1).repeat(upscale, axis=2) for c in cols]
    n, h, w, ch = cols[0].shape
    k = len(cols)
    groups = max(1, min(n, math.ceil(math.sqrt(n / k))))
    rows = math.ceil(n / groups)
    group_w = k * (w + pad) + pad
    out = np.full((rows * (h + pad) + pad, groups * group_w + (groups - 1) * gap, ch), 255, np.uint8)
    for i in range(n):
        g, r = divmod(i, rows)
        y = pad + r * (h + pad)
        for j, col in enumerate(cols):
            x = g * (group_w + gap) + pad + j * (w + pad)
            out[y : y + h, x : x + w] = col[i]
    return out


def write_panels(path: str, columns: Sequence[np.ndarray], upscale: int = 1) -> None:
    from PIL import Image

    grid = panel_grid(columns, upscale)
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)


# ---- data -----------------------------------------------------------------------------------------


def held_out_images(config, count: int, fallback_to_train: bool = False) -> np.ndarray:
    """``count`` evenly spaced images of the held-out (test) split, (N, H, W, C) float32; with
    ``fallback_to_train`` the training split's when the test split is not available (a TFDS
    dataset prepared without it)."""
    from absl import logging

    from spd_jax import experiment

    try:
        source = experiment.build_source(config, "test")
    except (FileNotFoundError, ValueError, KeyError) as err:
        if not fallback_to_train:
            raise
        logging.warning("no test split for the sample grid (%s): conditioning on training images", err)
        source = experiment.build_source(config, "train")
    count = min(int(count), len(source))
    # evenly spaced over the split (the embedded patches' test crops come photo by photo)
    rows = np.linspace(0, len(source) - 1, count).round().astype(int) if count > 1 else np.zeros(count, int)
    if isinstance(source, np.ndarray):
        return np.asarray(source[rows], np.float32)
    return np.stack([np.asarray(source[int(i)], np.float32) for i in rows])


def load_image_file(path: str, size: int, channels: int) -> np.ndarray:
    """An image file as (h, w, C) float32 in [-1, 1]: center-cropped to a square and resized
    (bicubic) to ``size`` unless it already is ``size`` pixels or smaller than it."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("L" if channels == 1 else "RGB")
        w, h = im.size
        side = min(w, h)
        if w != h:
            left, top = (w - side) // 2, (h - side) // 2
            im = im.crop((left, top, left + side, top + side))
        if side > size:
            im = im.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=None)
        arr = np.asarray(im, np.float32)
    if arr.ndim == 2:
        arr = arr[..., None]
    return arr / 127.5 - 1.0


def file_inputs(config, task: Task, key) -> tuple[Degraded, np.ndarray, np.ndarray, list[str]]:
    """(degraded, references, has_reference, names) of ``config.task.inputs``. SR: a file of the
    low-resolution size (image size / factor) is the input itself (no reference); any other size
    is the reference, resized to the image size and down-sampled. Inpainting: each file is the
    reference and gets a random mask."""
    from spd_jax import config_utils

    size, channels = config_utils.image_size(config), image_channels(config)
    paths = input_files(config)
    refs, lows, has_ref = [], [], []
    for path in paths:
        img = load_image_file(path, size, channels)
        side = img.shape[0]
        if task.name == "sr" and side == size // task.factor:
            lows.append(img)
            refs.append(np.zeros((size, size, channels), np.float32))
            has_ref.append(False)
            continue
        if side != size:  # smaller than the image size: bicubic up-sampling
            img = _resize(img, size)
        refs.append(img)
        lows.append(np.asarray(tasks.area_downsample(jnp.asarray(img[None]), task.factor)[0])
                    if task.name == "sr" else None)
        has_ref.append(True)
    references = np.stack(refs)
    if task.name == "sr":
        degraded = degrade_low_res(task, jnp.asarray(np.stack(lows)))
    else:
        degraded = degrade(task, jnp.asarray(references), key)
    return degraded, references, np.asarray(has_ref), [os.path.basename(p) for p in paths]


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(jax.image.resize(jnp.asarray(img), (size, size, img.shape[-1]), "bicubic"))


# ---- sample and evaluate modes ----------------------------------------------------------------


def _restore(config, workdir: str, step: int = 0):
    from spd_jax import config_utils, experiment

    config_utils.validate(config, jax.device_count(), jax.process_count())
    workdir = config_utils.check_workdir(workdir)
    task = task_of(config)
    if task is None:
        raise config_utils.ConfigError("config.task.name is '': not a conditional task config")
    return workdir, task, experiment.restore_ema(config, workdir, step)


def _metrics(references: np.ndarray, estimates: np.ndarray) -> dict:
    p, s = tasks.psnr(references, estimates), tasks.ssim(references, estimates)
    n = len(p)
    return {
        "psnr": float(p.mean()), "psnr_sem": float(p.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0,
        # the mean is dominated by near-flat images (PSNR >> 50 dB): also the median, and the PSNR of
        # the mean squared error over the set (10 log10(range^2 / mean MSE))
        "psnr_median": float(np.median(p)), "psnr_of_mean_mse": float(-10.0 * np.log10(np.mean(10.0 ** (-p / 10.0)))),
        "ssim": float(s.mean()), "ssim_sem": float(s.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0,
    }


def sample_task(config, workdir: str) -> str | None:
    """``--mode=sample`` for a task config: condition on ``config.sample.num_samples`` evenly
    spaced held-out images (or on the files of ``config.task.inputs``), sample with
    ``config.sample``'s method and NFE, and write ``samples/{sr<factor>|inpaint_<mask>}_<method>_nfe<N>.{npz,png}``
    (panels input | output | reference). Returns the npz path (process 0)."""
    workdir, task, restored = _restore(config, workdir)
    key = jax.random.PRNGKey(config.sample.seed)
    names: list[str] = []
    if input_files(config):
        degraded, references, has_ref, names = file_inputs(config, task, key)
    else:
        references = held_out_images(config, config.sample.num_samples)
        has_ref = np.ones(len(references), bool)
        degraded = jax.jit(lambda x: degrade(task, x, key))(jnp.asarray(references))
    settings = sampler_settings(config)
    batch = min(config.sample.batch_size, len(references))
    sampler = make_task_sampler(restored.model, restored.process, config.model.head, task, settings,
                                config.train.fast_compile)
    outputs, nfe = draw_conditioned(sampler, restored.variables, key, degraded, batch)
    if jax.process_index() != 0:
        return None
    out_dir = os.path.join(workdir, "samples")
    os.makedirs(out_dir, exist_ok=True)
    variant = f"sr{task.factor}" if task.name == "sr" else f"inpaint_{task.mask}"
    stem = os.path.join(out_dir, f"{variant}_{settings['method']}_nfe{nfe}")
    arrays = {k: np.asarray(v) for k, v in degraded._asdict().items()}
    extra = {}
    if has_ref.any():
        extra = {k: np.float64(v) for k, v in _metrics(references[has_ref], outputs[has_ref]).items()}
        print(f"{task.label}: PSNR {extra['psnr']:.2f} dB, SSIM {extra['ssim']:.4f} over {int(has_ref.sum())} "
              f"references ({BASELINES[task.name]}: PSNR "
              f"{_metrics(references[has_ref], arrays['baseline'][has_ref])['psnr']:.2f} dB)")
    np.savez(stem + ".npz", outputs=outputs, inputs=arrays["display"], references=references,
             has_reference=has_ref, cond=arrays["cond"], mask=arrays["mask"], baseline=arrays["baseline"],
             names=np.asarray(names), nfe=nfe, step=restored.step, method=settings["method"], task=task.name,
             **extra)
    write_panels(stem + ".png", [arrays["display"], outputs, references], config.sample.upscale)
    return stem + ".npz"


def _parse_settings(config, settings) -> list[tuple[str, int]]:
    if not settings:
        return [(config.sample.method, int(config.sample.nfe))]
    if isinstance(settings, str):  # "method:nfe,method:nfe" (config.eval.settings)
        settings = [s.strip() for s in settings.split(",") if s.strip()]
    out = []
    for s in settings:
        if isinstance(s, str):
            if s.count(":") != 1 or not s.split(":")[1].strip().isdigit():
                from spd_jax import config_utils

                raise config_utils.ConfigError(f"setting {s!r} is invalid: expected 'method:NFE' with an integer "
                                               "NFE >= 1, e.g. 'ddm_bridge:5'")
            method, nfe = s.split(":")
        elif isinstance(s, dict):
            method, nfe = s["method"], s["nfe"]
        else:
            method, nfe = s
        if int(nfe) < 1:
            from spd_jax import config_utils

            raise config_utils.ConfigError(f"setting {method}:{nfe} is invalid: NFE must be >= 1")
        try:
            method = samplers._check_method(str(method).strip())
        except ValueError as err:
            from spd_jax import config_utils

            raise config_utils.ConfigError(str(err)) from None
        out.append((method, int(nfe)))
    return out


def setting_note(method: str, nfe: int, head: str, process_name: str, scalar: bool) -> str:
    """Why a (sampler, NFE) pair of the table is special, or ''."""
    notes = []
    if nfe == 1:
        notes.append("1 NFE: one call at t_max, every sampler returns x0_hat(x_T) (ddm_bridge = "
                     "gradient_estimation here)")
    elif method == "gradient_estimation" and nfe == 2:
        notes.append("GE's first step has no cached eps: gamma acts on 1 of 2 steps")
    if method == "ddm_bridge" and head not in DDM_HEADS:
        notes.append(f"ddm_bridge on the {head!r} head with c_hat = -clip(x0_hat)"
                     + ("" if scalar else f" per frequency for spectral {process_name!r} (extension)"))
    return "; ".join(notes)


def evaluate_task(config, workdir: str, settings=None, num_samples: int | None = None) -> dict:
    """PSNR / SSIM against the reference for each (sampler, NFE) setting, beside the bicubic (SR) /
    mean-fill (inpainting) baseline, on ``num_samples`` evenly spaced held-out images (default
    :data:`EVAL_SAMPLES`, at most the split); SWD between outputs and references where the images
    are >= 16 px. ``settings``: (method, nfe) pairs, "method:nfe" strings or dicts, or one
    comma-separated string like ``config.eval.settings`` (default: the config's sampler). The
    checkpoint is ``config.eval.checkpoint_step`` when the config has it (0 = the latest). Writes ``task_eval/report.json`` after every setting (finished settings of a
    matching earlier report are reused) and ``task_eval/<method>_nfe<N>.{npz,png}`` (16 evenly spaced examples).
    Returns the report."""
    from spd_jax.metrics.swd import sliced_wasserstein_distance

    eval_config = config.get("eval", None)
    step = int(eval_config.get("checkpoint_step", 0)) if eval_config is not None else 0
    workdir, task, restored = _restore(config, workdir, step)
    wanted = _parse_settings(config, settings)
    num = int(num_samples or EVAL_SAMPLES)
    references = held_out_images(config, num)
    key = jax.random.PRNGKey(config.sample.seed)
    degraded = jax.jit(lambda x: degrade(task, x, key))(jnp.asarray(references))
    baseline = np.asarray(degraded.baseline)
    out_dir = os.path.join(workdir, "task_eval")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "report.json")
    use_swd = min(references.shape[1:3]) >= 16 and len(references) >= 2
    head = config.model.head
    scalar = bool(restored.process.is_scalar)
    header = {
        "schema": REPORT_SCHEMA,
        "task": task._asdict(),
        "process": config.process.name,
        "head": head,
        "data": config.data.name,
        "split": "test",
        "checkpoint_step": int(restored.step),
        "num_samples": len(references),
        "seed": int(config.sample.seed),
        "clip_x0": bool(config.sample.clip_x0),
        "projection": ("known pixels re-imposed every step, exact for this pixel-diagonal process" if scalar else
                       "known pixels re-imposed every step, approximate for this spectral process")
        if task.projects else "none",
    }
    previous = {}
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        if {k: old.get(k) for k in header} == json.loads(json.dumps(header)):
            previous = {(r["method"], r["requested_nfe"]): r for r in old.get("settings", [])}
    base = _metrics(references, baseline)
    if use_swd:
        base["swd"] = sliced_wasserstein_distance(references, baseline)["swd"]
    report = dict(header, baseline={"name": BASELINES[task.name], **base}, settings=[])
    batch = min(config.sample.batch_size, len(references))
    for method, nfe in wanted:
        if (method, nfe) in previous:
            report["settings"].append(previous[(method, nfe)])
            continue
        row = {"method": method, "requested_nfe": nfe,
               "note": setting_note(method, nfe, head, config.process.name, scalar)}
        try:
            s = sampler_settings(config, method, nfe)
        except ValueError as err:  # e.g. a method that needs more NFE than requested
            row.update(skipped=str(err))
            report["settings"].append(row)
            _write_json(path, report)
            continue
        sampler = make_task_sampler(restored.model, restored.process, head, task, s, config.train.fast_compile)
        start = time.perf_counter()
        outputs, actual = draw_conditioned(sampler, restored.variables, key, degraded, batch)
        row.update(nfe=actual, num_steps=s["num_steps"], seconds=round(time.perf_counter() - start, 3),
                   **_metrics(references, outputs))
        if use_swd:
            row["swd"] = sliced_wasserstein_distance(references, outputs)["swd"]
        stem = os.path.join(out_dir, f"{method}_nfe{actual}")
        pick = np.unique(np.linspace(0, len(references) - 1, min(EXAMPLES, len(references))).round().astype(int))
        shown = [np.asarray(degraded.display)[pick], outputs[pick], references[pick]]
        np.savez(stem + ".npz", outputs=shown[1], inputs=shown[0], references=shown[2], baseline=baseline[pick],
                 index=pick, nfe=actual, method=method)
        write_panels(stem + ".png", shown, config.sample.upscale)
        report["settings"].append(row)
        _write_json(path, report)
        print(f"  {task.name} {config.process.name} {method} NFE {actual}: PSNR {row['psnr']:.2f} dB, "
              f"SSIM {row['ssim']:.4f} ({row['seconds']:.1f} s)", flush=True)
    _write_json(path, report)
    return report


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def check_same_task(config, meta: dict, where: str) -> None:
    """Raise ``ConfigError`` (a ValueError) when ``config.task.name`` differs from the task a
    checkpoint was trained on (it fixes the network's conditioning input; checkpoints without a
    task block are unconditional); a different factor or mask type only logs a warning (the
    model is then evaluated out of its training distribution)."""
    from absl import logging

    from spd_jax import config_utils

    saved = (meta.get("config") or {}).get("task") or {}
    now = json.loads(config.task.to_json()) if config.get("task", None) is not None else {}
    if saved.get("name", "") != now.get("name", ""):
        raise config_utils.ConfigError(
            f"config.task.name = {now.get('name', '')!r} differs from the checkpoint's {saved.get('name', '')!r} in "
            f"{where}: use the training config (or a new workdir)")
    field = {"sr": "factor", "inpaint": "mask"}.get(now.get("name", ""))
    if field and saved.get(field) != now.get(field):
        logging.warning("config.task.%s = %r differs from the training run's %r: evaluating out of the training "
                        "distribution", field, now.get(field), saved.get(field))
