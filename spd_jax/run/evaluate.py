"""``launch.py --mode=eval``: score a trained run's EMA samples for a list of (sampler, NFE) settings.

One pipeline for every model: an unconditional model is the task with no conditioning. :func:`check`
resolves the config into a :class:`Plan` (every check, before anything is restored or written);
:func:`run` restores checkpoint ``config.eval.checkpoint_step`` (0 = the latest) of the run in
WORKDIR, samples every setting with the EMA parameters through :mod:`spd_jax.run.sampling`, and
scores the samples with the engine :func:`spd_jax.run.scoring.evaluate`:

* unconditional generation (``config.task.name = ''``): against the whole held-out split
  ``config.eval.reference_split``, beside the floor (real training images scored like samples);
* a task (``sr``, ``inpaint``): example i is conditioned on the degradation of held-out image i
  (``num_samples`` evenly spaced images of the test split, :func:`spd_jax.run.sampling.held_out_images`),
  scored against it (PSNR, SSIM), beside the task's baseline (bicubic / mean fill).

Output, the same for both, under ``WORKDIR/eval/<name>`` (``<name>`` = ``config.eval.name`` or
``step_<checkpoint step>``)::

    run.json              what the samples depend on; a rerun must match it (the one resume rule:
                          finished settings and stored chunks are reused)
    report.json           the report (below)
    quality_vs_nfe.png    every metric against the actual NFE, one line per sampler
    floor.json | baseline.json, paired.npz (tasks), settings/<stem>/{grid.png, result.json, samples_*.npz}

(details in :mod:`spd_jax.run.scoring`; ``<stem>`` = :func:`spd_jax.run.sampling.stem` of the task,
sampler and requested NFE, e.g. ``ddim_nfe10`` or ``sr4_ddim_nfe10``).

report.json (schema ``spd_jax.eval/2``)::

    schema        "spd_jax.eval/2"
    created       local time, ISO 8601
    task          "" (unconditional generation) | "sr" | "inpaint"
    protocol      the FID protocol stamp (spd_jax.metrics.protocol.protocol_stamp): num_samples,
                  seed, weights ("ema"), last_step, reference {name, num_images}, fid_reference,
                  fid_status, small_sample_override, ...
    metrics       the scalar keys of every entry's "metrics", in order
    description   workdir, eval_dir, dataset, process, model_head, model_kind, checkpoint_step,
                  params ("ema"), ema_decay, train_num_steps, clip_x0, t_max, sample_batch_size,
                  task {name, label; tasks also factor, mask, enforce_known}, projection (how
                  known pixels are kept: inpainting with enforce_known, else "none"); a projection
                  run (spd_jax.run.projection) adds projection_network {score_workdir,
                  score_checkpoint_step, score_head, num_steps, kappa}
    settings      one entry per setting, in the order of config.eval.settings: method,
                  nfe_requested, nfe (actual), aux_nfe, total_nfe (nfe + aux_nfe), sample_seconds, num_samples,
                  metrics {key: value}, metric_seconds, note ("" or what is special about it),
                  stem (its folder under settings/)
    floor         unconditional: {name, num_images, metrics} of real training images scored like
                  samples (config.eval.floor), else null
    baseline      tasks: {name ("bicubic" | "mean_fill"), num_images, metrics} of the baseline
                  estimates of the same rows, else null
    files         record ("run.json"), plot, grids (one per setting), paired ("paired.npz" | null)

Config fields (``configs/defaults.py``, block ``eval``):

* ``settings``: comma-separated ``sampler:NFE`` entries, e.g. ``"gradient_estimation:10,ddim:20"``.
  ``config.sample.grid`` and ``config.sample.options`` apply to entries whose sampler is
  ``config.sample.method``; other samplers use their default grid and knobs. ``clip_x0`` and
  ``t_max`` of ``config.sample`` apply to all. Every entry must fit the model as
  ``config.sample.method`` would (``spd_jax.run.checks.validate``).
* ``metrics``: comma list from :data:`spd_jax.run.scoring.METRICS`; "" = the task's default
  (:func:`default_metrics`). ``psnr`` and ``ssim`` need a task.
* ``num_samples``: 0 = 50,000 when FID/KID is computed (the protocol), else 1000 for unconditional
  models and 256 held-out images for tasks (at most the test split).
* ``reference_split``: unconditional models only (tasks use the held-out test split);
  ``floor``: unconditional models only (tasks report their baseline).
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import jax
import ml_collections
import numpy as np

from spd_jax import data, tasks
from spd_jax.diffusion import processes, samplers
from spd_jax.metrics.protocol import FID_NUM_SAMPLES
from spd_jax.run import builders, checks, projection, sampling, scoring
from spd_jax.run.checks import ConfigError

#: samples per setting of an unconditional model when no FID/KID is computed (num_samples = 0)
DEFAULT_NUM_SAMPLES = 1000
#: held-out images a task is evaluated on when no FID/KID is computed (num_samples = 0)
TASK_NUM_SAMPLES = 256
#: samples per stored chunk (the resume granularity)
CHUNK_SIZE = 1000
LAST_STEP = "last grid level t = 0: the final step returns x0_hat (GE: the eps-bar update taken to sigma = 0)"


class Plan(NamedTuple):
    """What :func:`check` resolved from a config."""

    task: tasks.Task
    settings: list[tuple[str, int]]
    metrics: list[str]
    num_samples: int  # requested; a task evaluates at most the test split's images


def parse_settings(text: str) -> list[tuple[str, int]]:
    """``"gradient_estimation:10, ddim:5"`` -> [("gradient_estimation", 10), ("ddim", 5)].

    Raises :class:`ConfigError` naming the bad entry (format, unknown sampler, NFE below the
    sampler's minimum, duplicates)."""
    entries = [e.strip() for e in str(text).split(",") if e.strip()]
    if not entries:
        raise ConfigError(f"config.eval.settings = {text!r} is empty: expected entries like 'gradient_estimation:10'")
    out = []
    for entry in entries:
        method, sep, nfe = (part.strip() for part in entry.partition(":"))
        if not sep or not method or not nfe.isdigit() or int(nfe) < 1:
            raise ConfigError(f"config.eval.settings entry {entry!r} is invalid: expected 'sampler:NFE' with an "
                              "integer NFE >= 1, e.g. 'ddim:10'")
        try:
            processes.check_name(method, samplers.METHODS, "sampler")
            samplers.steps_for_nfe(method, int(nfe))
        except ValueError as err:
            raise ConfigError(f"config.eval.settings entry {entry!r}: {err}") from None
        if (method, int(nfe)) in out:
            raise ConfigError(f"config.eval.settings lists {entry!r} twice")
        out.append((method, int(nfe)))
    return out


def default_metrics(config: ml_collections.ConfigDict) -> list[str]:
    """Tasks: PSNR and SSIM, plus SWD for images of 16 px or more. Unconditional models: digits:
    pixel FD, SWD, classifier; other sets: pixel FD, SWD, plus FID for RGB images of 32 px or more
    when ``config.eval.inception_weights`` is given."""
    size, _, channels = builders.image_shape(config)
    if builders.task_of(config).conditional:
        return ["psnr", "ssim"] + (["swd"] if size >= 16 else [])
    if config.data.name == "digits":
        return ["pixel_fd", "swd", "classifier"]
    metrics = ["pixel_fd", "swd"]
    if config.eval.inception_weights and channels == 3 and size >= 32:
        metrics.append("fid")
    return metrics


def resolve_metrics(config: ml_collections.ConfigDict) -> list[str]:
    """The metric names of ``config.eval.metrics`` ("" = :func:`default_metrics`)."""
    if not config.eval.metrics.strip():
        return default_metrics(config)
    out = []
    for name in (m.strip() for m in config.eval.metrics.split(",") if m.strip()):
        try:
            out.append(processes.check_name(name, scoring.METRICS, "metric"))
        except ValueError as err:
            raise ConfigError(f"config.eval.metrics: {err}") from None
    if "classifier" in out and config.data.name != "digits":
        raise ConfigError(f"config.eval.metrics: 'classifier' is for the 8x8 digits, not {config.data.name!r}")
    paired = [m for m in out if m in scoring.PAIRED_METRICS]
    if paired and not builders.task_of(config).conditional:
        raise ConfigError(f"config.eval.metrics: {paired} compare each output with its reference: only for a task "
                          "(config.task.name 'sr' or 'inpaint')")
    return list(dict.fromkeys(out))


def resolve_num_samples(config: ml_collections.ConfigDict, metrics) -> int:
    """Samples per setting (``config.eval.num_samples``, 0 = the default of the task and metrics)."""
    inception = any(m in scoring.INCEPTION_METRICS for m in metrics)
    default = TASK_NUM_SAMPLES if builders.task_of(config).conditional else DEFAULT_NUM_SAMPLES
    num = int(config.eval.num_samples) or (FID_NUM_SAMPLES if inception else default)
    if num < 2:
        raise ConfigError(f"config.eval.num_samples = {config.eval.num_samples} is invalid: expected 0 (default) "
                          "or an integer >= 2")
    if inception and num < FID_NUM_SAMPLES and not config.eval.allow_small_sample:
        raise ConfigError(f"config.eval.num_samples = {num}: FID/KID need {FID_NUM_SAMPLES} samples by protocol; "
                          "set --config.eval.allow_small_sample=True to run anyway (the report is stamped as an "
                          "override)")
    return num


def _check_split(config, field: str) -> str:
    split = config.eval[field]
    if config.data.name in data.EMBEDDED:
        try:
            processes.check_name(split, data.SPLITS, f"config.eval.{field}")
        except ValueError as err:
            raise ConfigError(str(err).replace("unknown config.", "config.", 1)) from None
    return split


def _check_setting(config, method: str, nfe: int, workdir=None) -> None:
    """Raise :class:`ConfigError` unless (``method``, ``nfe``) fits the model as
    ``config.sample.method`` would: the config's checks run on a copy sampling with it."""
    trial = copy.deepcopy(config)
    if method != config.sample.method:  # the grid and knobs of config.sample are the method's own
        trial.sample.grid = ""
        trial.sample.options = ml_collections.ConfigDict()
    trial.sample.method, trial.sample.nfe = method, nfe
    try:
        checks.validate(trial, jax.device_count(), jax.process_count())
        builders.sampler_settings(config, method, nfe, workdir)
    except (ConfigError, ValueError) as err:
        raise ConfigError(f"config.eval.settings entry '{method}:{nfe}' does not fit this model: {err}") from None


def check(config: ml_collections.ConfigDict, workdir=None) -> Plan:
    """Every check of an eval config (raises :class:`ConfigError` before anything is restored or
    written); returns the resolved :class:`Plan`. ``workdir`` locates a tuned grid
    (``config.sample.grid = "tuned:NAME"``)."""
    checks.validate(config, jax.device_count(), jax.process_count())
    if config.data.name in data.POINT_DATASETS:
        raise ConfigError(f"config.data.name = {config.data.name!r}: --mode=eval scores images (8-bit samples, image "
                          "metrics); score the point cloud with spd_jax.metrics.mixture (on-mode fraction, NLL under the true "
                          "mixture), as python -m benchmarks.smd_claim does")
    task = builders.task_of(config)
    settings = parse_settings(config.eval.settings)
    for method, nfe in settings:
        _check_setting(config, method, nfe, workdir)
    metrics = resolve_metrics(config)
    num_samples = resolve_num_samples(config, metrics)
    for field in ("reference_split", "fid_reference_split"):
        _check_split(config, field)
    if task.conditional and config.eval.reference_split != "test":
        raise ConfigError(f"config.eval.reference_split = {config.eval.reference_split!r} is invalid for a task: "
                          "a task is evaluated on held-out images of the 'test' split")
    if config.eval.checkpoint_step < 0:
        raise ConfigError(f"config.eval.checkpoint_step = {config.eval.checkpoint_step} is invalid: expected 0 "
                          "(the latest) or a step")
    if config.eval.batch_size < 0:
        raise ConfigError(f"config.eval.batch_size = {config.eval.batch_size} is invalid: expected 0 "
                          "(= config.sample.batch_size) or an integer >= 1")
    if config.eval.grid_images < 1:
        raise ConfigError(f"config.eval.grid_images = {config.eval.grid_images} is invalid: expected an integer >= 1")
    return Plan(task, settings, metrics, num_samples)


def setting_note(method: str, nfe: int) -> str:
    """Why a (sampler, NFE) setting is special, or ''."""
    if nfe == 1:
        return "1 NFE: one call at t_max, every sampler returns x0_hat(x_T)"
    if method == "gradient_estimation" and nfe == 2:
        return "GE's first step has no cached eps: gamma acts on 1 of 2 steps"
    return ""


def load_images(config, split: str, count: int | None = None, seed: int = 0) -> np.ndarray:
    """All images of ``split`` (N, H, W, C) in model units, or a seeded subset of ``count``
    (sorted rows, the rule the engine's floor uses)."""
    source = builders.build_source(config, split)
    rows = np.arange(len(source))
    if count is not None and count < len(source):
        rows = np.sort(np.random.default_rng(seed).choice(len(source), count, replace=False))
    return data.take(source, rows)


def make_generate(config, restored: builders.Restored, batch: int,
                  degraded: tasks.Degraded | None = None, workdir=None,
                  parts: projection.SamplingParts | None = None, pad_to: int | None = None) -> scoring.Generate:
    """A :data:`spd_jax.run.scoring.Generate` over the restored EMA params: one sampler per
    (method, NFE) from one :class:`spd_jax.run.sampling.SamplerPool` (with ``pad_to``, the largest
    step count of the evaluation, every NFE of a sampler shares one compiled program), batches of
    ``batch`` (the last one padded), per-example seeds; for a task, example i is conditioned on row
    i of ``degraded`` (NumPy arrays). ``parts`` (:func:`spd_jax.run.projection.sampling_parts`;
    default: ``restored`` as it is) carries a projection run's score model and trained T_theta,
    whose N calls are the ``aux_nfe`` of ``predict_project``."""
    task = builders.task_of(config)
    parts = parts or projection.SamplingParts(restored, str(config.model.head), None, None)
    restored = parts.restored
    pool = sampling.SamplerPool(restored.model, restored.process, parts.head, task, restored.shape,
                                config.train.fast_compile, projection_model=parts.projection_model, pad_to=pad_to)
    cache = {}

    def generate(method: str, nfe: int, key, num: int, index_offset: int):
        if (method, nfe) not in cache:
            cache[method, nfe] = pool(builders.sampler_settings(config, method, nfe, workdir))
        rows = None
        if degraded is not None:
            rows = tasks.Degraded(*(a[index_offset : index_offset + num] for a in degraded))
        images, used = sampling.draw(cache[method, nfe], restored.variables, key, num, batch, degraded=rows,
                                     offset=index_offset)
        return images, {"nfe": used, "aux_nfe": cache[method, nfe].aux_nfe}  # latent / projection calls

    return generate


def run(config: ml_collections.ConfigDict, workdir: str, *, verbose: bool = True) -> dict:
    """Evaluate the run in ``workdir`` (see the module docstring); returns the report dict."""
    plan = check(config, workdir)
    workdir = checks.check_workdir(workdir)
    parts = projection.sampling_parts(config, builders.restore_ema(config, workdir, int(config.eval.checkpoint_step)))
    restored = parts.restored
    out_dir = workdir / "eval" / (config.eval.name or f"step_{restored.step}")
    task, seed = plan.task, int(config.eval.seed)
    dataset, ref_split, fid_split = config.data.name, config.eval.reference_split, config.eval.fid_reference_split
    log = print if verbose else (lambda *_: None)
    log(f"eval: checkpoint step {restored.step} (EMA params) of {workdir} -> {out_dir}")

    inception = any(m in scoring.INCEPTION_METRICS for m in plan.metrics)
    paired = degraded = floor = fid_reference = None
    if task.conditional:
        references = sampling.held_out_images(config, plan.num_samples)
        degraded = tasks.Degraded(*map(np.asarray, sampling.degrade_references(task, references, jax.random.key(seed))))
        paired = scoring.Paired(references, degraded.display, degraded.baseline, tasks.BASELINES[task.name])
        num_samples = len(references)
        reference_name = f"{dataset}/{ref_split} ({num_samples} evenly spaced images, paired with the outputs)"
        if num_samples < plan.num_samples:
            log(f"eval: the {ref_split} split holds {num_samples} images: {num_samples} examples per setting")
    else:
        references = load_images(config, ref_split)
        num_samples = plan.num_samples
        reference_name = f"{dataset}/{ref_split}"
        if config.eval.floor and ref_split != "train":
            floor = load_images(config, "train", num_samples, seed)
    if inception and (task.conditional or fid_split != ref_split):
        fid_reference = load_images(config, fid_split)
    batch = min(config.eval.batch_size or config.sample.batch_size, num_samples, CHUNK_SIZE)
    scalar = bool(restored.process.is_scalar)
    projection_note = "none"
    if task.projects:
        projection_note = ("known pixels re-imposed every step, exact for this pixel-diagonal process" if scalar else
                      "known pixels re-imposed every step, approximate for this spectral process")
    description = {
        "workdir": str(workdir),
        "eval_dir": str(out_dir),
        "dataset": dataset,
        "process": config.process.name,
        "model_head": config.model.head,
        "model_kind": config.model.kind,
        "checkpoint_step": int(restored.step),
        "params": "ema",
        "ema_decay": float(config.train.ema),
        "train_num_steps": int(config.train.num_steps),
        "clip_x0": bool(config.sample.clip_x0),
        "t_max": float(config.sample.t_max),
        "sample_batch_size": batch,
        "task": {**(task._asdict() if task.conditional else {"name": ""}), "label": task.label},
        "projection": projection_note,
    }
    if parts.score is not None:
        description["projection_network"] = {
            "score_workdir": parts.score.workdir, "score_checkpoint_step": int(parts.score.restored.step),
            "score_head": parts.head, "num_steps": int(config.projection.num_steps),
            "kappa": float(config.sample.options.get("kappa", samplers.KNOBS["predict_project"]["kappa"])),
        }
    record = {
        "checkpoint_step": int(restored.step),
        "model_config": builders.model_config_json(config),
        "sample": {"clip_x0": bool(config.sample.clip_x0), "t_max": float(config.sample.t_max),
                   "method": config.sample.method, "grid": config.sample.grid,
                   "options": config.sample.options.to_dict()},
        "reference": reference_name if task.conditional else None,
    }
    if parts.score is not None:  # the samples depend on the frozen score model too
        record["score_model"] = {"workdir": parts.score.workdir, "checkpoint_step": int(parts.score.restored.step)}
    settings = {(m, n): builders.sampler_settings(config, m, n, workdir) for m, n in plan.settings}
    knobs = {key: {k: v for k, v in value.items() if k != "num_steps"} for key, value in settings.items()}
    notes = {(m, n): setting_note(m, n) for m, n in plan.settings}
    pad_to = max(value["num_steps"] for value in settings.values())  # every NFE of a sampler: one program
    return scoring.evaluate(
        make_generate(config, restored, batch, degraded, workdir, parts=parts, pad_to=pad_to),
        settings=plan.settings,
        reference_images=references,
        reference_name=reference_name,
        fid_reference_images=fid_reference,
        fid_reference_name=f"{dataset}/{fid_split}" if inception else None,
        floor_images=floor,
        floor_name=f"{dataset}/train",
        task=task,
        paired=paired,
        workdir=out_dir,
        num_samples=num_samples,
        metrics=plan.metrics,
        seed=seed,
        chunk_size=CHUNK_SIZE,
        weights="ema",
        last_step=LAST_STEP,
        description=description,
        record=record,
        knobs=knobs,
        notes=notes,
        allow_small_sample=bool(config.eval.allow_small_sample),
        inception_weights=config.eval.inception_weights or None,
        grid_images=int(config.eval.grid_images),
        upscale=int(config.sample.upscale),
        verbose=verbose,
    )
