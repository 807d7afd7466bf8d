"""One sampling path for every model: unconditional generation is the task with no conditioning.

:func:`make_sampler` compiles ``run(variables, key, index, degraded=None)`` for a (model,
process, sampler settings), and a :class:`SamplerPool` lets several settings share one compiled
program (evaluation: every NFE of a sampler); :func:`draw` runs it over any number of examples in fixed-size chunks
(example i always gets the keys of index i, so chunking and batch size never change a sample).
For a task (super-resolution, inpainting) each chunk carries its :class:`~spd_jax.tasks.Degraded`
rows, the network sees the conditioning image and, for inpainting with ``enforce_known``, the
known pixels are re-imposed after every step (docs/math.md §0 "Conditional tasks").

``launch.py --mode=sample`` runs :func:`sample`: it writes ``samples/<stem>.{npz,png}`` under the
workdir, ``<stem>`` = ``<method>_nfe<N>`` for unconditional models and
``<sr4|inpaint_box|...>_<method>_nfe<N>`` for tasks (panels input | output | reference). During
training, :func:`grid_writer` draws the periodic grids through the same path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath

from spd_jax import data, images, tasks, training
from spd_jax.diffusion import samplers
from spd_jax.models.heads import model_denoiser, model_projection
from spd_jax.run import builders, checks, projection

Sampler = Callable[..., tuple[np.ndarray, int]]


def _global(x, sharding) -> jax.Array:
    """A global array with ``sharding`` from a host array every process holds whole."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def _to_host(x: jax.Array) -> np.ndarray:
    """The whole of a global array on this host (gathered from the other processes if needed)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


class SamplerPool:
    """Compiled samplers of one model (:func:`make_sampler`) that share programs.

    The coefficient tables (grid, per-step weights) enter the compiled program as arguments, so
    settings that differ only in their grid share one program; with ``pad_to`` (>= every
    setting's step count) settings that differ only in their step count share it too: each runs a
    scan of ``pad_to`` steps whose first ones do nothing (no network call;
    :func:`spd_jax.diffusion.samplers.device_tables`) and gives the samples of its unpadded run.
    Settings with another method, clipping or knob values get their own program.
    """

    def __init__(self, model, process, head: str, task: tasks.Task, shape: tuple, fast_compile: bool = False,
                 mesh: jax.sharding.Mesh | None = None, projection_model=None, pad_to: int | None = None):
        self.model, self.process, self.head, self.task, self.shape = model, process, head, task, tuple(shape)
        self.fast_compile, self.projection_model, self.pad_to = fast_compile, projection_model, pad_to
        self.mesh = mesh or training.make_mesh()
        self._programs: dict = {}

    def _plan(self, settings: dict) -> samplers.Plan:
        knobs = {k: v for k, v in settings.items() if k not in ("method", "num_steps", "grid", "clip_x0")}
        if self.projection_model is not None and settings["method"] == "predict_project":
            knobs["projection"] = _counted_projection  # counts the trained network's calls
        return samplers.plan(self.process, method=settings["method"], num_steps=settings["num_steps"],
                             grid=settings.get("grid"), **knobs)

    @staticmethod
    def _signature(settings: dict, plan_: samplers.Plan) -> tuple:
        """What the compiled program depends on besides its tables' values."""
        items = []
        for name, value in sorted(settings.items()):
            if name in ("num_steps", "grid"):
                continue
            if np.ndim(value):
                value = ("per-step", tuple(np.ravel(np.asarray(value, np.float64)).tolist()))
            items.append((name, value))
        return tuple(items) + (("noisy", plan_.noisy),)

    def _compile(self, settings: dict):
        rows = training.batch_sharding(self.mesh, 0)
        model, process, head, task, shape = self.model, self.process, self.head, self.task, self.shape
        projection_model = self.projection_model

        def run_batch(variables, key_data, index, degraded, tables, impl):
            key = key_data if impl is None else jax.random.wrap_key_data(key_data, impl=impl)
            batch_shape = (index.shape[0],) + shape
            knobs = dict(settings, tables=tables)
            if projection_model is not None:
                if settings["method"] == "predict_project":
                    knobs["projection"] = model_projection(projection_model, variables["projection"])
                variables = variables["score"]
            if degraded is None:
                denoiser = model_denoiser(model, variables, process, head)
                x, _ = samplers.sample(denoiser, process, key=key, shape=batch_shape, index=index, **knobs)
            else:
                denoiser = model_denoiser(model, variables, process, head, cond=degraded.cond)
                x, _ = tasks.sample_with_known_pixels(
                    denoiser, process, known=degraded.known, mask=degraded.mask, enforce_known=task.projects,
                    key=key, shape=batch_shape, index=index, **knobs)
            return jax.lax.with_sharding_constraint(x, rows)

        return jax.jit(run_batch, out_shardings=rows, static_argnames="impl",
                       compiler_options=training.compiler_options(self.mesh, self.fast_compile))

    def __call__(self, settings: dict) -> Sampler:
        """The sampler of ``settings`` (:func:`spd_jax.run.builders.sampler_settings`)."""
        plan_ = self._plan(settings)
        if self.pad_to is not None and plan_.num_steps > self.pad_to:
            raise ValueError(f"{settings['method']} with {plan_.num_steps} steps does not fit the pool's "
                             f"pad_to = {self.pad_to}")
        signature = self._signature(settings, plan_)
        if signature not in self._programs:
            self._programs[signature] = self._compile(settings)
        jitted = self._programs[signature]
        mesh, rep, rows = self.mesh, training.replicated(self.mesh), training.batch_sharding(self.mesh, 0)
        tables = jax.tree.map(lambda a: _global(a, rep), samplers.device_tables(plan_, self.pad_to))

        def run(variables, key, index, degraded=None):
            if len(index) % mesh.size:
                raise ValueError(f"a sampling batch of {len(index)} examples does not split over {mesh.size} devices")
            index = _global(np.asarray(index, np.uint32), rows)
            if degraded is not None:
                degraded = jax.tree.map(lambda a: _global(a, rows), degraded)
            typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)  # jax.random.key or PRNGKey
            impl = str(jax.random.key_impl(key)) if typed else None
            key_data = jax.random.key_data(key) if typed else key
            x = jitted(variables, _global(key_data, rep), index, degraded, tables, impl=impl)
            return _to_host(x), plan_.nfe

        run.jitted = jitted  # the compiled function (shared by the pool's settings of one signature)
        run.devices = mesh.size
        run.nfe, run.aux_nfe = plan_.nfe, plan_.aux_nfe
        return run


def _counted_projection(x, t):  # a stand-in for a trained projection when only the plan (the counts) is needed
    raise NotImplementedError


def make_sampler(model, process, head: str, task: tasks.Task, settings: dict, shape: tuple,
                 fast_compile: bool = False, mesh: jax.sharding.Mesh | None = None,
                 projection_model=None) -> Sampler:
    """A compiled ``run(variables, key, index, degraded=None) -> (images (B, H, W, C) NumPy, nfe)``.

    With ``projection_model`` (a trained predict-project network T_theta, docs/math.md §6.6)
    ``variables`` is {"score": the score model's, "projection": T_theta's}, and ``predict_project``
    runs with projection = T_theta (other methods sample the score model alone).

    ``index`` (B,) holds the examples' global indices (their noise keys); ``degraded`` the
    batch's conditioning (None for unconditional generation). The batch is split over the devices
    of ``mesh`` (default: every device of every process), each device drawing its rows; B must be
    a multiple of the mesh size. ``variables`` is traced: one compilation serves every parameter
    set of the same structure. Every process gets the whole batch back. Several settings of one
    model share compiled programs through a :class:`SamplerPool`.
    """
    return SamplerPool(model, process, head, task, shape, fast_compile, mesh, projection_model)(settings)


def draw(sampler: Sampler, variables, key, count: int, batch: int, *, degraded: tasks.Degraded | None = None,
         offset: int = 0) -> tuple[np.ndarray, int]:
    """``count`` examples (indices ``offset`` .. ``offset + count - 1``) in chunks of ``batch``
    (rounded up to a multiple of the sampler's device count).

    ``degraded`` (rows = examples) conditions a task model; the last chunk is padded (its extra
    examples are dropped). Returns (images (count, H, W, C), nfe)."""
    devices = getattr(sampler, "devices", 1)
    batch = -(-batch // devices) * devices
    out, nfe = [], 0
    for start in range(0, count, batch):
        index = np.arange(start, start + batch)
        chunk = None
        if degraded is not None:
            rows = np.minimum(index, count - 1)
            chunk = tasks.Degraded(*(np.asarray(a)[rows] for a in degraded))
        x, nfe = sampler(variables, key, offset + index, chunk)
        out.append(x[: count - start])
    return np.concatenate(out), nfe


# ---- inputs of task models ----------------------------------------------------------------------


def held_out_images(config, count: int, fallback_to_train: bool = False) -> np.ndarray:
    """``count`` evenly spaced images of the held-out (test) split, (N, H, W, C) float32; with
    ``fallback_to_train`` the training split's when the test split is not available (a TFDS
    dataset prepared without it)."""
    try:
        source = builders.build_source(config, "test")
    except (FileNotFoundError, ValueError, KeyError) as err:
        if not fallback_to_train:
            raise
        logging.warning("no test split (%s): conditioning on training images", err)
        source = builders.build_source(config, "train")
    count = min(int(count), len(source))
    # evenly spaced over the split (the embedded patches' test crops come photo by photo)
    rows = np.linspace(0, len(source) - 1, count).round().astype(int) if count > 1 else np.zeros(count, int)
    return data.take(source, rows)


def load_image_file(path: str, size: int, channels: int) -> np.ndarray:
    """An image file as (h, w, C) float32 in [-1, 1]: center-cropped to a square and resized
    (bicubic) to ``size`` unless it already is ``size`` pixels or smaller than it."""
    from PIL import Image

    with epath.Path(path).open("rb") as f, Image.open(f) as im:
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


def file_inputs(config, task: tasks.Task, key) -> tuple[tasks.Degraded, np.ndarray, np.ndarray, list[str]]:
    """(degraded, references, has_reference, names) of ``config.task.inputs``. SR: a file of the
    low-resolution size (image size / factor) is the input itself (no reference); any other size
    is the reference, resized to the image size and down-sampled. Inpainting: each file is the
    reference and gets a random mask."""
    size, _, channels = builders.image_shape(config)
    paths = checks.input_files(config)
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
            img = np.asarray(jax.image.resize(jnp.asarray(img), (size, size, img.shape[-1]), "bicubic"))
        refs.append(img)
        lows.append(np.asarray(tasks.area_downsample(jnp.asarray(img[None]), task.factor)[0])
                    if task.name == "sr" else None)
        has_ref.append(True)
    references = np.stack(refs)
    if task.name == "sr":
        degraded = tasks.degrade_low_res(task, jnp.asarray(np.stack(lows)))
    else:
        degraded = tasks.degrade(task, jnp.asarray(references), key)
    return degraded, references, np.asarray(has_ref), [epath.Path(p).name for p in paths]


def degrade_references(task: tasks.Task, references: np.ndarray, key) -> tasks.Degraded:
    """The task's degradation of held-out ``references`` (masks keyed by ``key`` and the row)."""
    return jax.jit(lambda x: tasks.degrade(task, x, key))(jnp.asarray(references))


def stem(task: tasks.Task, method: str, nfe: int) -> str:
    """File-name stem of a sample set: ``<method>_nfe<N>``, prefixed by the task variant."""
    return "_".join(p for p in (task.variant, method, f"nfe{nfe}") if p)


# ---- training grids and --mode=sample -------------------------------------------------------------


def grid_writer(config, model, process, shape: tuple, key, workdir=None,
                score: projection.Score | None = None) -> Callable[[Any, epath.Path | None], None] | None:
    """``write(variables, path)``: the sample grid of ``config.sample`` (``grid_images`` samples, or
    input | output | reference panels of as many held-out images for a task) written to ``path``
    (None: sample only, as the processes other than 0 do). None when ``grid_images`` is 0. With the
    frozen ``score`` model of a projection run, ``model`` is T_theta and ``variables`` its own."""
    count = int(config.sample.grid_images)
    if not count:
        return None
    task = builders.task_of(config)
    batch = max(1, min(count, config.sample.batch_size))
    settings = builders.sampler_settings(config, workdir=workdir)
    if score is None:
        sampler = make_sampler(model, process, config.model.head, task, settings, shape, config.train.fast_compile)
    else:
        sampler = make_sampler(score.restored.model, score.restored.process, score.head, task, settings, shape,
                               config.train.fast_compile, projection_model=model)
    cache: dict = {}

    def write(variables, path):
        if score is not None:
            variables = {"score": score.restored.variables, "projection": variables}
        if task.conditional and not cache:
            cache["refs"] = held_out_images(config, count, fallback_to_train=True)
            cache["degraded"] = degrade_references(task, cache["refs"], key)
        degraded = cache.get("degraded")
        outputs, _ = draw(sampler, variables, key, len(cache["refs"]) if task.conditional else count, batch,
                          degraded=degraded)
        if path is None:
            return
        columns = [np.asarray(degraded.display), outputs, cache["refs"]] if task.conditional else outputs
        images.write_png(path, columns, upscale=config.sample.upscale)

    return write


def sample(config, workdir: str) -> str | None:
    """``--mode=sample``: draw from the latest checkpoint's EMA parameters with ``config.sample``'s
    method and NFE. Unconditional models draw ``num_samples`` images; task models condition on
    ``num_samples`` evenly spaced held-out images or on the files of ``config.task.inputs``.
    Writes ``samples/<stem>.{npz,png}`` (process 0; no PNG for a point cloud such as ``mixture2d``)
    and returns the npz path (None elsewhere)."""
    checks.validate(config, jax.device_count(), jax.process_count())
    workdir = checks.check_workdir(workdir)
    parts = projection.sampling_parts(config, builders.restore_ema(config, workdir))
    restored = parts.restored
    task = builders.task_of(config)
    key = jax.random.PRNGKey(config.sample.seed)
    settings = builders.sampler_settings(config, workdir=workdir)
    sampler = make_sampler(restored.model, restored.process, parts.head, task, settings, restored.shape,
                           config.train.fast_compile, projection_model=parts.projection_model)
    arrays: dict = {}
    if not task.conditional:
        count = int(config.sample.num_samples)
        outputs, nfe = draw(sampler, restored.variables, key, count, min(config.sample.batch_size, count))
        columns = outputs
        arrays["images"] = outputs
    else:
        names: list[str] = []
        if checks.input_files(config):
            degraded, references, has_ref, names = file_inputs(config, task, key)
        else:
            references = held_out_images(config, config.sample.num_samples)
            has_ref = np.ones(len(references), bool)
            degraded = degrade_references(task, references, key)
        outputs, nfe = draw(sampler, restored.variables, key, len(references),
                            min(config.sample.batch_size, len(references)), degraded=degraded)
        parts = {k: np.asarray(v) for k, v in degraded._asdict().items()}
        columns = [parts["display"], outputs, references]
        arrays.update(outputs=outputs, inputs=parts["display"], references=references, has_reference=has_ref,
                      cond=parts["cond"], mask=parts["mask"], baseline=parts["baseline"], names=np.asarray(names),
                      task=task.name)
        if has_ref.any():
            scores = tasks.paired_metrics(references[has_ref], outputs[has_ref])
            base = tasks.paired_metrics(references[has_ref], parts["baseline"][has_ref])
            arrays.update({k: np.float64(v) for k, v in scores.items()})
            print(f"{task.label}: PSNR {scores['psnr']:.2f} dB, SSIM {scores['ssim']:.4f} over {int(has_ref.sum())} "
                  f"references ({tasks.BASELINES[task.name]}: PSNR {base['psnr']:.2f} dB)")
    if jax.process_index() != 0:
        return None
    path = workdir / "samples" / stem(task, settings["method"], nfe)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.with_suffix(".npz").open("wb") as f:
        np.savez(f, nfe=nfe, step=restored.step, method=settings["method"], clip_x0=settings["clip_x0"], **arrays)
    if config.data.name not in data.POINT_DATASETS:  # a point cloud has no picture
        images.write_png(path.with_suffix(".png"), columns, upscale=config.sample.upscale)
    return str(path.with_suffix(".npz"))
