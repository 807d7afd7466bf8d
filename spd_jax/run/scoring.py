"""The evaluation engine, without configs: sample (sampler, NFE) settings in resumable chunks,
score them, and write the report.

:func:`evaluate` only needs a ``generate(method, nfe, key, num, index_offset)`` callable returning
images, so any model or sampler can be evaluated (:func:`sampler_generate` builds one from a
denoiser and a process). ``launch.py --mode=eval`` reaches it through :func:`spd_jax.run.evaluate.run`,
which builds ``generate`` from a checkpoint for unconditional models and tasks alike; the fields of
``report.json`` (schema :data:`REPORT_SCHEMA`) are documented there.

Output folder layout (everything needed to resume)::

    run.json                     what the samples depend on (num_samples, seed, chunk_size,
                                 image_shape, task, the caller's record, knobs per setting)
    report.json                  the report
    quality_vs_nfe.png           every metric against the actual NFE, one line per sampler
    floor.json                   scores of the floor set (real images scored like samples), if any
    baseline.json                tasks: scores of the baseline estimates (bicubic / mean fill)
    paired.npz                   tasks: the evaluated rows' references, inputs and baseline (uint8)
    settings/<stem>/             <stem> = spd_jax.run.sampling.stem(task, method, requested NFE)
        samples_<CCCCC>.npz      one chunk of 8-bit samples (+ the sampler's NFE and seconds)
        result.json              the setting's entry of the report (written when it is finished)
        grid.png                 the first samples (tasks: input | output | reference panels)

The resume rule: run.json must match (its ``knobs`` entry per setting only where both runs list
that setting); finished settings (result.json holding every requested metric) are reused, stored
chunks are reused, and metrics missing from a result are computed from the stored samples without
sampling again.

``python -m spd_jax.run.scoring --floor digits`` prints the train-vs-test floor of an embedded set.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from spd_jax import images as image_io
from spd_jax import tasks
from spd_jax.diffusion.processes import check_name
from spd_jax.metrics.frechet import feature_frechet_distance
from spd_jax.metrics.protocol import format_stamp, protocol_stamp
from spd_jax.metrics.swd import sliced_wasserstein_distance
from spd_jax.run import sampling
from spd_jax.run.checks import ConfigError

#: Metric names: distribution metrics, weights-free ("pixel_fd", "swd", and "classifier" for 8x8x1
#: digits) and Inception-based ("fid", "kid"; 50,000 samples by protocol), and the paired metrics
#: of a task ("psnr", "ssim": output i against reference i).
METRICS = ("pixel_fd", "swd", "classifier", "fid", "kid", "psnr", "ssim")
INCEPTION_METRICS = ("fid", "kid")
PAIRED_METRICS = ("psnr", "ssim")
REPORT_SCHEMA = "spd_jax.eval/2"
UNCONDITIONAL = tasks.Task()
#: metric name -> the scalar keys it reports
METRIC_KEYS = {"pixel_fd": ["pixel_fd"], "swd": ["swd"], "fid": ["fid"], "kid": ["kid", "kid_std"],
               "classifier": ["classifier_score", "classifier_confidence", "classifier_fd"],
               "psnr": ["psnr", "psnr_sem", "psnr_median", "psnr_of_mean_mse"], "ssim": ["ssim", "ssim_sem"]}

#: ``generate(method, nfe, key, num, index_offset)`` -> images (num, H, W, C) in model units, or
#: (images, info) with info["nfe"] (and optionally info["aux_nfe"]) the NFE actually used. Row r
#: must be example ``index_offset + r`` of the run keyed by ``key`` (per-example seeds; for a task,
#: conditioned on row ``index_offset + r`` of the :class:`Paired` sets).
Generate = Callable[[str, int, jax.Array, int, int], Any]


class Paired(NamedTuple):
    """The row-aligned sets of a task evaluation: example i is conditioned on the degradation of
    ``references[i]`` and scored against it (PSNR, SSIM). All (N, H, W, C) in model units."""

    references: np.ndarray  # the clean held-out images
    inputs: np.ndarray  # what an input panel shows (nearest up-sampled low-res / masked image)
    baseline: np.ndarray  # the baseline estimate of each row (bicubic / mean fill)
    baseline_name: str


def metric_keys(metrics: Sequence[str]) -> list[str]:
    """The scalar keys :class:`MetricSuite` reports for metric names ``metrics``."""
    return [k for name in metrics for k in METRIC_KEYS[name]]


class MetricSuite:
    """Scores image sets against one reference set; reference-side work is done once.

    Args:
      metrics: names from :data:`METRICS`.
      reference_images: (M, H, W, C) in model units, for the weights-free distribution metrics.
      fid_reference_images: reference for FID/KID (default ``reference_images``).
      paired_references: row i is the reference of image i (the paired metrics PSNR / SSIM).
      inception_weights: converted Inception .npz (default: the user cache; see
        :mod:`spd_jax.metrics.convert`).
      classifier_dir: where the digits classifier is cached (default: the user cache).
      stats_dir: where Inception reference statistics are cached (default: the user cache).
      seed: seed of the SWD descriptors/directions and the KID subsets.
    """

    def __init__(self, metrics: Sequence[str], reference_images: np.ndarray, *,
                 fid_reference_images: np.ndarray | None = None, paired_references: np.ndarray | None = None,
                 inception_weights: str | os.PathLike | None = None, classifier_dir: str | os.PathLike | None = None,
                 stats_dir: str | os.PathLike | None = None, seed: int = 0):
        self.metrics = [check_name(m, METRICS, "metric") for m in metrics]
        self.reference = np.asarray(reference_images, np.float32)
        self.paired = None if paired_references is None else np.asarray(paired_references, np.float32)
        self.seed = seed
        if any(m in PAIRED_METRICS for m in self.metrics) and self.paired is None:
            raise ValueError(f"the metrics {list(PAIRED_METRICS)} compare image i with reference i: pass "
                             "paired_references")
        if "classifier" in self.metrics and self.reference.shape[1:] != (8, 8, 1):
            raise ValueError(f"the 'classifier' metric is for 8x8x1 digits; images are {self.reference.shape[1:]}")
        if "classifier" in self.metrics:
            from spd_jax.metrics.classifier import load_digits_classifier

            self.classifier = load_digits_classifier(classifier_dir)
        self.inception = None
        if any(m in INCEPTION_METRICS for m in self.metrics):
            from spd_jax.metrics.fid import array_fingerprint, reference_statistics
            from spd_jax.metrics.inception import InceptionFeatures, cache_dir

            self.inception = InceptionFeatures(inception_weights)
            fid_reference = self.reference if fid_reference_images is None else np.asarray(fid_reference_images,
                                                                                            np.float32)
            directory = Path(stats_dir) if stats_dir is not None else cache_dir() / "reference_stats"
            cache = directory / f"{array_fingerprint(fid_reference)[:24]}.npz"
            self._inception_stats = reference_statistics(fid_reference, self.inception, cache)

    def __call__(self, images: np.ndarray, only: Sequence[str] | None = None) -> dict[str, float]:
        """Scalar metrics of ``images`` (N, H, W, C), model units; ``only`` restricts the metric
        names. Paired metrics compare row i with paired reference i."""
        images = np.asarray(images, np.float32)
        if images.shape[1:] != self.reference.shape[1:]:
            raise ValueError(f"images {images.shape[1:]} do not match the reference {self.reference.shape[1:]}")
        names = [m for m in self.metrics if only is None or m in only]
        out: dict[str, float] = {}
        if "pixel_fd" in names:
            out["pixel_fd"] = feature_frechet_distance(self.reference.reshape(len(self.reference), -1),
                                                       images.reshape(len(images), -1))
        if "swd" in names:
            out["swd"] = sliced_wasserstein_distance(self.reference, images, seed=self.seed)["swd"]
        if "classifier" in names:
            from spd_jax.metrics.classifier import classifier_metrics

            out.update(classifier_metrics(self.classifier, images, self.reference))
        if any(m in INCEPTION_METRICS for m in names):
            from spd_jax.metrics.fid import inception_metrics

            out.update(inception_metrics(self.inception(images), self._inception_stats, fid="fid" in names,
                                         kid="kid" in names, seed=self.seed))
        if any(m in PAIRED_METRICS for m in names):
            if len(images) > len(self.paired):
                raise ValueError(f"{len(images)} images but only {len(self.paired)} paired references")
            scores = tasks.paired_metrics(self.paired[: len(images)], images)
            out.update({k: scores[k] for k in metric_keys([m for m in PAIRED_METRICS if m in names])})
        return out


def plot_quality_vs_nfe(results: Sequence[Mapping], path: str | os.PathLike, *, line: Mapping | None = None) -> None:
    """One panel per scalar metric (standard errors left out): value against the actual NFE (log
    axis), one line per sampler; ``line`` (a floor or baseline entry of the report) dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    keys = [k for k in results[0]["metrics"] if not k.endswith(("_std", "_sem"))]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.2), squeeze=False)
    methods = list(dict.fromkeys(r["method"] for r in results))
    for ax, key in zip(axes[0], keys, strict=True):
        for method in methods:
            rows = sorted((r for r in results if r["method"] == method), key=lambda r: r["nfe"])
            ax.plot([r["nfe"] for r in rows], [r["metrics"][key] for r in rows], marker="o", label=method)
        if line is not None and key in line["metrics"]:
            ax.axhline(line["metrics"][key], color="gray", linestyle="--", label=line["name"])
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(sorted({r["nfe"] for r in results})))
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("NFE")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    epath.Path(path).write_bytes(buffer.getvalue())


# ---- files (any etils.epath path: local folders or gs://) ----------------------------------------


def _json_default(value):
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def to_json(payload: Any) -> Any:
    """``payload`` as plain JSON values (tuples -> lists, NumPy -> Python), as read back from a file."""
    return json.loads(json.dumps(payload, default=_json_default))


def _writer() -> bool:
    """Whether this process writes the evaluation's files (process 0; every process computes)."""
    return jax.process_index() == 0


def write_json(path: str | epath.PathLike, payload: Any) -> None:
    """Write ``payload`` as indented JSON to ``path`` (written beside it, then renamed; process 0
    only)."""
    if not _writer():
        return
    path = epath.Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=_json_default))
    tmp.replace(path)


def read_json(path: str | epath.PathLike) -> Any:
    """The JSON at ``path``, or None when there is no such file."""
    path = epath.Path(path)
    return json.loads(path.read_text()) if path.exists() else None


def _write_npz(path: epath.Path, **arrays) -> None:
    if not _writer():
        return
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(buffer.getvalue())
    tmp.replace(path)


def _read_npz(path: epath.Path) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(path.read_bytes())) as data:
        return {k: data[k] for k in data.files}


# ---- the engine ----------------------------------------------------------------------------------


def _check_settings(settings: Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
    out = []
    for entry in settings:
        method, nfe = entry
        if not isinstance(method, str) or int(nfe) != nfe or nfe < 1:
            raise ValueError(f"settings must be (sampler name, NFE >= 1) pairs; got {entry!r}")
        out.append((method, int(nfe)))
    if len(set(out)) != len(out):
        raise ValueError(f"duplicate settings in {settings!r}")
    return out


def _setting_label(method: str, nfe: int) -> str:
    return f"{method}:{nfe}"


def _prepare_workdir(workdir: epath.Path, record: dict, resume: bool) -> None:
    """The one resume rule: run.json must match ``record``; its ``knobs`` (per setting) only for
    the settings both list. Writes the merged record."""
    if _writer():
        workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "run.json"
    previous = read_json(path)
    if previous is not None and resume:
        changed = [k for k in record if k != "knobs" and previous.get(k) != record[k]]
        old_knobs, new_knobs = previous.get("knobs", {}), record.get("knobs", {})
        changed += [s for s in new_knobs if s in old_knobs and old_knobs[s] != new_knobs[s]]
        if changed:
            there = [previous.get(k, old_knobs.get(k)) for k in changed]
            now = [record.get(k, new_knobs.get(k)) for k in changed]
            raise ConfigError(
                f"{workdir} holds an evaluation with different {changed} ({there} there vs {now} now); evaluate "
                "into a new folder (launch.py: --config.eval.name=NEW) or delete that one"
            )
        record = {**record, "knobs": {**old_knobs, **new_knobs}}
    if not resume and _writer():
        (workdir / "settings").rmtree(missing_ok=True)
        for name in ("floor.json", "baseline.json", "report.json", "paired.npz"):
            (workdir / name).unlink(missing_ok=True)
    write_json(path, record)


def _split_output(output: Any, nfe: int) -> tuple[np.ndarray, dict]:
    images, info = output if isinstance(output, tuple) else (output, {})
    info = {"nfe": int(info.get("nfe", nfe)), "aux_nfe": int(info.get("aux_nfe", 0))}
    return np.asarray(images), info


def _sample_setting(generate: Generate, method: str, nfe: int, directory: epath.Path, *, key: jax.Array,
                    num_samples: int, chunk_size: int, image_shape: tuple[int, ...], log) -> tuple[np.ndarray, dict]:
    """All samples of one setting as uint8, reusing stored chunks; returns (samples, info). Every
    process runs ``generate`` (each draws its share); chunks are stored by process 0."""
    if _writer():
        directory.mkdir(parents=True, exist_ok=True)
    chunks, info, seconds = [], {"nfe": nfe, "aux_nfe": 0}, 0.0
    for index, offset in enumerate(range(0, num_samples, chunk_size)):
        path = directory / f"samples_{index:05d}.npz"
        num = min(chunk_size, num_samples - offset)
        if path.exists():
            stored = _read_npz(path)
            images = stored["images"]
            info = {"nfe": int(stored["nfe"]), "aux_nfe": int(stored["aux_nfe"])}
            seconds += float(stored["seconds"])
        else:
            start = time.perf_counter()
            images, info = _split_output(generate(method, nfe, key, num, offset), nfe)
            elapsed = time.perf_counter() - start
            seconds += elapsed
            if images.shape != (num, *image_shape):
                raise ValueError(f"generate({method!r}, {nfe}) returned shape {images.shape}; "
                                 f"expected {(num, *image_shape)}")
            images = image_io.to_uint8(images)
            _write_npz(path, images=images, seconds=elapsed, **info)
            log(f"  {method} NFE {nfe}: chunk {index} ({offset + num}/{num_samples}) in {elapsed:.1f} s")
        if images.shape[0] != num:
            raise ValueError(f"{path} holds {images.shape[0]} samples; expected {num} (corrupt workdir?)")
        chunks.append(images)
    return np.concatenate(chunks), {**info, "sample_seconds": seconds}


def _score_set(suite: MetricSuite, path: epath.Path, name: str, images: np.ndarray, keys: list[str], log) -> dict:
    """Scores of a real or baseline set (8-bit quantised like the samples), cached in ``path``."""
    found = read_json(path)
    if found is None or found.get("name") != name or not all(k in found["metrics"] for k in keys):
        scores = suite(image_io.from_uint8(image_io.to_uint8(images)))
        found = {"name": name, "num_images": len(images), "metrics": {k: scores[k] for k in keys}}
        write_json(path, found)
    log(f"{name}: " + ", ".join(f"{k} {v:.4g}" for k, v in found["metrics"].items()))
    return found


def evaluate(
    generate: Generate,
    *,
    settings: Sequence[tuple[str, int]],
    reference_images: np.ndarray,
    workdir: str | os.PathLike,
    num_samples: int,
    metrics: Sequence[str] = ("pixel_fd", "swd"),
    reference_name: str = "reference",
    fid_reference_images: np.ndarray | None = None,
    fid_reference_name: str | None = None,
    floor_images: np.ndarray | None = None,
    floor_name: str = "floor",
    task: tasks.Task = UNCONDITIONAL,
    paired: Paired | None = None,
    seed: int = 0,
    chunk_size: int = 1000,
    weights: str = "ema",
    last_step: str = "final step to t = 0 returns x0_hat",
    description: Mapping[str, Any] | None = None,
    record: Mapping[str, Any] | None = None,
    knobs: Mapping[tuple[str, int], Mapping] | None = None,
    notes: Mapping[tuple[str, int], str] | None = None,
    allow_small_sample: bool = False,
    inception_weights: str | os.PathLike | None = None,
    classifier_dir: str | os.PathLike | None = None,
    stats_dir: str | os.PathLike | None = None,
    grid_images: int = 64,
    upscale: int = 1,
    resume: bool = True,
    verbose: bool = True,
) -> dict:
    """Sample every (sampler, NFE) setting, score it, and write the report, plot and grids.

    Args:
      generate: see :data:`Generate`; called once per missing chunk of ``chunk_size`` samples,
        always with the key ``jax.random.key(seed)`` and the chunk's global example offset.
      settings: (sampler method, requested NFE) pairs.
      reference_images: real images (M, H, W, C) in model units, the distribution metrics'
        reference (unconditional: the test split; a task: its paired references), described by
        ``reference_name``.
      workdir: output and resume folder (layout in the module docstring), any ``etils.epath`` path.
      num_samples: samples per setting. FID/KID require 50,000 unless ``allow_small_sample``,
        which is then stamped on the report (:class:`~spd_jax.metrics.protocol.SmallSampleError`
        is raised before any sampling otherwise).
      metrics: names from :data:`METRICS`; the paired ones need ``paired``.
      fid_reference_images, fid_reference_name: FID/KID reference (default ``reference_images``).
      floor_images, floor_name: another real set (e.g. the train split) scored like samples
        (8-bit quantised, a seeded subset of ``num_samples`` images if larger): the floor.
      task: what was generated (:class:`~spd_jax.tasks.Task`; the default is unconditional
        generation); names the settings' folders and the report's ``task``.
      paired: a task's row-aligned references, inputs and baseline (at least ``num_samples``
        rows); the baseline is scored like the samples and reported as ``baseline``.
      weights, last_step, description: stamped on the report (EMA or raw weights, the last
        sampler step, and free-form model details such as process, checkpoint step, clip_x0).
      record: JSON fields the samples depend on besides the engine's own (checkpoint, model,
        sampler knobs common to all settings), checked by the resume rule.
      knobs: per setting, what its samples depend on (e.g. its sampler's knobs); a resumed run
        must repeat them for the settings it shares with the stored one.
      notes: per setting, a remark stored in its result (e.g. what is special about 1 NFE).
      inception_weights, classifier_dir, stats_dir: see :class:`MetricSuite`.
      grid_images, upscale: examples shown in each setting's grid.png, and their magnification.
      resume: reuse the folder's finished settings and chunks; False discards them first.

    Returns:
      The report dict, also written to ``workdir/report.json``.
    """
    settings = _check_settings(settings)
    metrics = [check_name(m, METRICS, "metric") for m in metrics]
    reference_images = np.asarray(reference_images, np.float32)
    image_shape = tuple(reference_images.shape[1:])
    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2; got {num_samples}")
    if paired is not None and len(paired.references) < num_samples:
        raise ValueError(f"{len(paired.references)} paired references for {num_samples} samples")
    inception = any(m in INCEPTION_METRICS for m in metrics)
    reference = {"name": reference_name, "num_images": len(reference_images)}
    fid_reference = None
    if inception:
        fid_images = reference_images if fid_reference_images is None else fid_reference_images
        fid_reference = {"name": fid_reference_name or reference_name, "num_images": len(fid_images)}
    stamp = protocol_stamp(num_samples=num_samples, inception=inception, allow_small_sample=allow_small_sample,
                           seed=seed, weights=weights, last_step=last_step, reference=reference,
                           fid_reference=fid_reference)
    log = print if verbose else (lambda *_: None)
    log(format_stamp(stamp))
    keys = metric_keys(metrics)
    suite = MetricSuite(metrics, reference_images, fid_reference_images=fid_reference_images,
                        paired_references=None if paired is None else paired.references[:num_samples],
                        inception_weights=inception_weights, classifier_dir=classifier_dir, stats_dir=stats_dir,
                        seed=seed)
    workdir = epath.Path(workdir)
    own = {"num_samples": int(num_samples), "seed": int(seed), "chunk_size": int(chunk_size),
           "image_shape": list(image_shape), "task": task._asdict() if task.conditional else {"name": ""}}
    per_setting = {_setting_label(m, n): v for (m, n), v in (knobs or {}).items()}
    _prepare_workdir(workdir, to_json({**own, **(record or {}), "knobs": per_setting}), resume)
    shown = None
    if paired is not None:
        rows = slice(0, num_samples)
        shown = [np.asarray(paired.inputs[rows]), np.asarray(paired.references[rows])]
        if not (workdir / "paired.npz").exists():
            _write_npz(workdir / "paired.npz", **{k: image_io.to_uint8(np.asarray(v)[rows])
                                                  for k, v in paired._asdict().items() if k != "baseline_name"})

    key = jax.random.key(seed)
    results, grids = [], []
    for method, nfe in settings:
        stem = sampling.stem(task, method, nfe)
        directory = workdir / "settings" / stem
        grids.append(f"settings/{stem}/grid.png")
        result = read_json(directory / "result.json")
        if result is not None and all(k in result["metrics"] for k in keys):
            log(f"{method} NFE {nfe}: finished earlier, skipped")
            results.append(result)
            continue
        samples, info = _sample_setting(generate, method, nfe, directory, key=key, num_samples=num_samples,
                                        chunk_size=chunk_size, image_shape=image_shape, log=log)
        start = time.perf_counter()
        known = {} if result is None else result["metrics"]
        missing = [m for m in metrics if any(k not in known for k in metric_keys([m]))]
        scores = {**known, **suite(image_io.from_uint8(samples), only=missing)}
        result = {"method": method, "nfe_requested": nfe, **info, "total_nfe": info["nfe"] + info["aux_nfe"],
                  "num_samples": num_samples,
                  "metrics": {k: scores[k] for k in keys}, "metric_seconds": time.perf_counter() - start,
                  "note": (notes or {}).get((method, nfe), ""), "stem": stem}
        outputs = image_io.from_uint8(samples[:grid_images])
        columns = outputs if shown is None else [shown[0][:grid_images], outputs, shown[1][:grid_images]]
        if _writer():
            image_io.write_png(directory / "grid.png", columns, upscale=upscale, min_cell=32)
        write_json(directory / "result.json", result)
        aux = f" + {info['aux_nfe']} aux" if info["aux_nfe"] else ""
        log(f"{method} NFE {info['nfe']}{aux}: " + ", ".join(f"{k} {v:.4g}" for k, v in result["metrics"].items()))
        results.append(result)

    floor = baseline = None
    if floor_images is not None:
        floor_images = np.asarray(floor_images, np.float32)
        if len(floor_images) > num_samples:
            rows = np.sort(np.random.default_rng(seed).choice(len(floor_images), num_samples, replace=False))
            floor_images = floor_images[rows]
        floor = _score_set(suite, workdir / "floor.json", floor_name, floor_images, keys, log)
    if paired is not None:
        baseline = _score_set(suite, workdir / "baseline.json", paired.baseline_name,
                              np.asarray(paired.baseline[:num_samples], np.float32), keys, log)

    report = {
        "schema": REPORT_SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "task": task.name,
        "protocol": stamp,
        "metrics": keys,
        "description": dict(description or {}),
        "settings": results,
        "floor": floor,
        "baseline": baseline,
        "files": {"record": "run.json", "plot": "quality_vs_nfe.png", "grids": grids,
                  "paired": "paired.npz" if paired is not None else None},
    }
    if results and _writer():
        plot_quality_vs_nfe(results, workdir / "quality_vs_nfe.png", line=floor or baseline)
    report = to_json(report)
    write_json(workdir / "report.json", report)
    log(f"report: {workdir / 'report.json'}")
    return report


def sampler_generate(denoiser: Callable, process, *, image_shape: tuple[int, int, int], clip_x0: bool,
                     batch_size: int = 256, **knobs) -> Generate:
    """A :data:`Generate` that runs :func:`spd_jax.diffusion.samplers.sample` with the largest step count
    whose NFE fits the requested NFE (:func:`spd_jax.diffusion.samplers.steps_for_nfe`), in batches of
    ``batch_size`` (the last one padded, so one compilation serves every chunk). ``knobs`` (grid
    name, t_max, method options) are passed to ``sample``."""
    from spd_jax.diffusion import samplers

    def generate(method: str, nfe: int, key: jax.Array, num: int, index_offset: int):
        steps = samplers.steps_for_nfe(method, nfe, grid=knobs.get("grid"))
        batches, info = [], {}
        for start in range(0, num, batch_size):
            index = jnp.arange(index_offset + start, index_offset + start + batch_size)
            x, info = samplers.sample(denoiser, process, method=method, num_steps=steps, key=key,
                                      shape=(batch_size, *image_shape), index=index, clip_x0=clip_x0, **knobs)
            batches.append(np.asarray(x)[: num - start])
        return np.concatenate(batches), {"nfe": info["nfe"], "aux_nfe": info["aux_nfe"]}

    return generate


def floor_metrics(dataset: str, *, metrics: Sequence[str] | None = None, num_samples: int | None = None,
                  seed: int = 0) -> dict:
    """Metrics of an embedded dataset's train split against its test split (the floor), with the
    train split scored like samples (8-bit quantised; a seeded subset of ``num_samples`` images,
    default: as many as the test split)."""
    from spd_jax.data import load_embedded

    test = load_embedded(dataset, "test")
    train = load_embedded(dataset, "train")
    metrics = list(metrics or (("pixel_fd", "swd", "classifier") if dataset == "digits" else ("pixel_fd", "swd")))
    count = min(len(train), num_samples or len(test))
    rows = np.sort(np.random.default_rng(seed).choice(len(train), count, replace=False))
    scores = MetricSuite(metrics, test, seed=seed)(image_io.from_uint8(image_io.to_uint8(train[rows])))
    return {"dataset": dataset, "reference": f"{dataset}/test ({len(test)} images)",
            "images": f"{dataset}/train ({count} of {len(train)} images)", "metrics": scores}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train-vs-test floor of the weights-free metrics.")
    parser.add_argument("--floor", choices=("digits", "patches"), required=True)
    parser.add_argument("--num_samples", type=int, default=None, help="train images scored (default: test size)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(json.dumps(floor_metrics(args.floor, num_samples=args.num_samples, seed=args.seed), indent=2))


if __name__ == "__main__":
    main()
