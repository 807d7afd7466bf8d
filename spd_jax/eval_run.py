"""``launch.py --mode=eval``: score a trained run's EMA samples for a list of (sampler, NFE) settings.

:func:`run` restores a checkpoint of the run in WORKDIR (``config.eval.checkpoint_step``, 0 = the
latest), samples every ``config.eval.settings`` entry with the EMA parameters, scores the samples
against the held-out split with :func:`spd_jax.evaluate.evaluate`, and writes under
``WORKDIR/eval/<name>`` (``<name>`` = ``config.eval.name`` or ``step_<checkpoint step>``)::

    run.json              what the samples depend on (checkpoint, model, sampler knobs); a rerun
                          must match it, so an interrupted evaluation resumes where it stopped
    report.json           the report (protocol stamp, one entry per setting, the floor)
    quality_vs_nfe.png    every metric against the actual NFE, one line per sampler
    settings/<method>_nfe<NNN>/grid.png, result.json, samples_*.npz

Config fields (``configs/defaults.py``, block ``eval``):

* ``settings``: comma-separated ``sampler:NFE`` entries, e.g. ``"gradient_estimation:10,ddim:20"``.
  ``config.sample.grid`` and ``config.sample.options`` apply to entries whose sampler is
  ``config.sample.method``; other samplers use their default grid and knobs. ``clip_x0`` and
  ``t_max`` of ``config.sample`` apply to all.
* ``metrics``: comma list from :data:`spd_jax.evaluate.METRICS`; "" = per-dataset default
  (:func:`default_metrics`).
* ``num_samples``: 0 = 50,000 when FID/KID is computed (the protocol), else 1000.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from spd_jax import config_utils, data, evaluate, experiment, processes, samplers
from spd_jax.config_utils import ConfigError
from spd_jax.metrics.protocol import FID_NUM_SAMPLES

#: samples per setting when no FID/KID is computed and config.eval.num_samples = 0
DEFAULT_NUM_SAMPLES = 1000
#: samples per stored chunk (the resume granularity)
CHUNK_SIZE = 1000
LAST_STEP = "last grid level t = 0: the final step returns x0_hat (GE: the eps-bar update taken to sigma = 0)"


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


def sampling_config(config: ml_collections.ConfigDict, method: str, nfe: int) -> ml_collections.ConfigDict:
    """A copy of ``config`` whose ``sample`` block describes (``method``, ``nfe``): the grid and
    options of ``config.sample`` are kept only when ``method`` is ``config.sample.method``."""
    out = copy.deepcopy(config)
    if method != config.sample.method:
        out.sample.grid = ""
        out.sample.options = ml_collections.ConfigDict()
    out.sample.method = method
    out.sample.nfe = nfe
    return out


def default_metrics(config: ml_collections.ConfigDict) -> list[str]:
    """digits: pixel FD, SWD, classifier; other sets: pixel FD, SWD, plus FID for RGB images of
    32 px or more when ``config.eval.inception_weights`` is given."""
    if config.data.name == "digits":
        return ["pixel_fd", "swd", "classifier"]
    metrics = ["pixel_fd", "swd"]
    rgb = config.data.name not in ("mnist", "fashion_mnist")
    if config.eval.inception_weights and rgb and config_utils.image_size(config) >= 32:
        metrics.append("fid")
    return metrics


def resolve_metrics(config: ml_collections.ConfigDict) -> list[str]:
    if not config.eval.metrics.strip():
        return default_metrics(config)
    out = []
    for name in (m.strip() for m in config.eval.metrics.split(",") if m.strip()):
        try:
            out.append(processes.check_name(name, evaluate.METRICS, "metric"))
        except ValueError as err:
            raise ConfigError(f"config.eval.metrics: {err}") from None
    if "classifier" in out and config.data.name != "digits":
        raise ConfigError(f"config.eval.metrics: 'classifier' is for the 8x8 digits, not {config.data.name!r}")
    return list(dict.fromkeys(out))


def resolve_num_samples(config: ml_collections.ConfigDict, metrics) -> int:
    inception = any(m in evaluate.INCEPTION_METRICS for m in metrics)
    num = int(config.eval.num_samples) or (FID_NUM_SAMPLES if inception else DEFAULT_NUM_SAMPLES)
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


def load_images(config, split: str, count: int | None = None, seed: int = 0) -> np.ndarray:
    """All images of ``split`` (N, H, W, C) in model units, or a seeded subset of ``count``
    (sorted rows, the rule :func:`spd_jax.evaluate.evaluate` uses for its floor)."""
    source = experiment.build_source(config, split)
    rows = np.arange(len(source))
    if count is not None and count < len(source):
        rows = np.sort(np.random.default_rng(seed).choice(len(source), count, replace=False))
    if isinstance(source, np.ndarray):
        return source[rows]
    return np.stack([np.asarray(source[int(i)], np.float32) for i in rows])


def check(config: ml_collections.ConfigDict) -> dict:
    """Every check of an eval config (raises :class:`ConfigError` before anything is written);
    returns the resolved plan: settings, metrics, num_samples."""
    config_utils.validate(config, jax.device_count(), jax.process_count())
    if jax.process_count() > 1:
        raise ConfigError("--mode=eval runs in a single process; start it without jax.distributed")
    task = config.get("task", None)
    name = task.get("name", "") if task is not None else ""
    if name:
        raise ConfigError(f"config.task.name = {name!r}: --mode=eval scores unconditional generation only "
                          "(task.name = '')")
    settings = parse_settings(config.eval.settings)
    for method, nfe in settings:
        try:
            config_utils.validate(sampling_config(config, method, nfe), jax.device_count(), jax.process_count())
        except ConfigError as err:
            raise ConfigError(f"config.eval.settings entry '{method}:{nfe}' does not fit this model: {err}") from None
    metrics = resolve_metrics(config)
    num_samples = resolve_num_samples(config, metrics)
    for field in ("reference_split", "fid_reference_split"):
        _check_split(config, field)
    if config.eval.checkpoint_step < 0:
        raise ConfigError(f"config.eval.checkpoint_step = {config.eval.checkpoint_step} is invalid: expected 0 "
                          "(the latest) or a step")
    if config.eval.batch_size < 0:
        raise ConfigError(f"config.eval.batch_size = {config.eval.batch_size} is invalid: expected 0 "
                          "(= config.sample.batch_size) or an integer >= 1")
    if config.eval.grid_images < 1:
        raise ConfigError(f"config.eval.grid_images = {config.eval.grid_images} is invalid: expected an integer >= 1")
    return {"settings": settings, "metrics": metrics, "num_samples": num_samples}


def _run_record(config, restored, settings, num_samples: int) -> dict:
    """What the stored samples depend on besides evaluate's own eval_config.json fields."""
    knobs = {f"{m}:{n}": {k: v for k, v in experiment.sampler_settings(sampling_config(config, m, n)).items()
                          if k != "num_steps"} for m, n in settings}
    return {
        "checkpoint_step": int(restored.step),
        "num_samples": int(num_samples),
        "seed": int(config.eval.seed),
        "model_config": experiment._model_config_json(config),
        "sample": {"clip_x0": bool(config.sample.clip_x0), "t_max": float(config.sample.t_max),
                   "method": config.sample.method, "grid": config.sample.grid,
                   "options": json.loads(config.sample.options.to_json())},
        "knobs": knobs,
    }


def _check_run_record(path: Path, record: dict) -> None:
    if path.exists():
        previous = json.loads(path.read_text())
        same = ("checkpoint_step", "num_samples", "seed", "model_config", "sample")
        changed = [k for k in same if previous.get(k) != record[k]]
        changed += [s for s, k in record["knobs"].items() if s in previous.get("knobs", {})
                    and previous["knobs"][s] != k]
        if changed:
            raise ConfigError(
                f"{path.parent} holds an evaluation with different {changed} "
                f"({[previous.get(k, previous.get('knobs', {}).get(k)) for k in changed]} there vs "
                f"{[record.get(k, record['knobs'].get(k)) for k in changed]} now); set --config.eval.name to a new "
                "name or delete that folder"
            )
        record = {**record, "knobs": {**previous.get("knobs", {}), **record["knobs"]}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, path)


def make_generate(config, restored, batch: int) -> evaluate.Generate:
    """A :data:`spd_jax.evaluate.Generate` over the restored EMA params: one compiled sampler per
    (method, NFE), batches of ``batch`` (the last one padded), per-example seeds."""
    cache = {}

    def generate(method: str, nfe: int, key, num: int, index_offset: int):
        if (method, nfe) not in cache:
            settings = experiment.sampler_settings(sampling_config(config, method, nfe))
            cache[method, nfe] = experiment.make_sampler(restored.model, restored.process, config.model.head,
                                                         settings, batch, restored.shape,
                                                         config.train.fast_compile)
        sampler = cache[method, nfe]
        out, used = [], nfe
        for start in range(0, num, batch):
            index = jnp.arange(index_offset + start, index_offset + start + batch, dtype=jnp.uint32)
            x, used = sampler(restored.variables, key, index)
            out.append(x[: num - start])
        return np.concatenate(out), {"nfe": used, "aux_nfe": 0 if method != "smd" else used}

    return generate


def run(config: ml_collections.ConfigDict, workdir: str, *, verbose: bool = True) -> dict:
    """Evaluate the run in ``workdir`` (see the module docstring); returns the report dict."""
    plan = check(config)
    workdir = config_utils.check_workdir(workdir)
    restored = experiment.restore_ema(config, workdir, int(config.eval.checkpoint_step))
    name = config.eval.name or f"step_{restored.step}"
    out_dir = Path(workdir) / "eval" / name
    settings, metrics, num_samples = plan["settings"], plan["metrics"], plan["num_samples"]
    log = print if verbose else (lambda *_: None)
    log(f"eval: checkpoint step {restored.step} (EMA params) of {workdir} -> {out_dir}")
    _check_run_record(out_dir / "run.json", _run_record(config, restored, settings, num_samples))

    dataset, seed = config.data.name, int(config.eval.seed)
    ref_split, fid_split = config.eval.reference_split, config.eval.fid_reference_split
    reference = load_images(config, ref_split)
    inception = any(m in evaluate.INCEPTION_METRICS for m in metrics)
    fid_reference = None
    if inception and fid_split != ref_split:
        fid_reference = load_images(config, fid_split)
    floor = None
    if config.eval.floor and ref_split != "train":
        floor = load_images(config, "train", num_samples, seed)
    batch = min(config.eval.batch_size or config.sample.batch_size, num_samples, CHUNK_SIZE)
    description = {
        "workdir": workdir,
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
    }
    return evaluate.evaluate(
        make_generate(config, restored, batch),
        settings=settings,
        reference_images=reference,
        reference_name=f"{dataset}/{ref_split}",
        fid_reference_images=fid_reference,
        fid_reference_name=f"{dataset}/{fid_split}" if inception else None,
        floor_images=floor,
        floor_name=f"{dataset}/train",
        workdir=out_dir,
        num_samples=num_samples,
        metrics=metrics,
        seed=seed,
        chunk_size=CHUNK_SIZE,
        weights="ema",
        last_step=LAST_STEP,
        description=description,
        allow_small_sample=bool(config.eval.allow_small_sample),
        inception_weights=config.eval.inception_weights or None,
        grid_images=int(config.eval.grid_images),
        verbose=verbose,
    )
