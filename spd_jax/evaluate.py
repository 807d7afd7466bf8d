"""Evaluation: sample for a list of (sampler, NFE) settings, score the samples, and report.

:func:`evaluate` is the entry point (``launch.py --mode=eval`` calls it). It only needs a
``generate(method, nfe, key, num, index_offset)`` callable returning images, so any model or
sampler can be evaluated; :func:`sampler_generate` builds one from a denoiser and a process with
:func:`spd_jax.samplers.sample`.

Work directory layout (everything needed to resume)::

    workdir/eval_config.json            sample-defining settings; a rerun must match them
    workdir/settings/<method>_nfe<NNN>/
        samples_<CCCCC>.npz             one chunk of 8-bit samples (+ the sampler's NFE)
        result.json                     the setting's metrics (written when it is finished)
        grid.png                        the first samples as an image grid
    workdir/floor.json                  metrics of the floor set (e.g. train split) vs the reference
    workdir/report.json                 the report (protocol stamp, settings, floor)
    workdir/quality_vs_nfe.png          every metric against the actual NFE, one line per sampler

An interrupted evaluation resumes where it stopped: finished settings (result.json holding every
requested metric) are skipped, stored chunks are reused, and metrics missing from a result are
computed from the stored samples without sampling again.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from spd_jax.metrics.frechet import feature_frechet_distance
from spd_jax.metrics.protocol import format_stamp, protocol_stamp
from spd_jax.metrics.swd import sliced_wasserstein_distance
from spd_jax.processes import check_name

#: Metric names: weights-free ("pixel_fd", "swd", and "classifier" for 8x8x1 digits) and
#: Inception-based ("fid", "kid"; 50,000 samples by protocol).
METRICS = ("pixel_fd", "swd", "classifier", "fid", "kid")
INCEPTION_METRICS = ("fid", "kid")
REPORT_SCHEMA = "spd_jax.evaluate/1"
#: Fields of eval_config.json that define the samples; a resumed run must repeat them.
_SAMPLE_FIELDS = ("num_samples", "seed", "chunk_size", "image_shape")

#: ``generate(method, nfe, key, num, index_offset)`` -> images (num, H, W, C) in model units, or
#: (images, info) with info["nfe"] (and optionally info["aux_nfe"]) the NFE actually used. Row r
#: must be example ``index_offset + r`` of the run keyed by ``key`` (per-example seeds).
Generate = Callable[[str, int, jax.Array, int, int], Any]


def metric_keys(metrics: Sequence[str]) -> list[str]:
    """The scalar keys :class:`MetricSuite` reports for metric names ``metrics``."""
    keys = {"pixel_fd": ["pixel_fd"], "swd": ["swd"], "fid": ["fid"], "kid": ["kid", "kid_std"],
            "classifier": ["classifier_score", "classifier_confidence", "classifier_fd"]}
    return [k for name in metrics for k in keys[name]]


class MetricSuite:
    """Scores image sets against one reference set; reference-side work is done once.

    Args:
      metrics: names from :data:`METRICS`.
      reference_images: (M, H, W, C) in model units, for the weights-free metrics.
      fid_reference_images: reference for FID/KID (default ``reference_images``).
      inception_weights: converted Inception .npz (default: the user cache; see
        :mod:`spd_jax.metrics.convert`).
      classifier_dir: where the digits classifier is cached (default: the user cache).
      stats_dir: where Inception reference statistics are cached (default: the user cache).
      seed: seed of the SWD descriptors/directions and the KID subsets.
    """

    def __init__(self, metrics: Sequence[str], reference_images: np.ndarray, *,
                 fid_reference_images: np.ndarray | None = None, inception_weights: str | os.PathLike | None = None,
                 classifier_dir: str | os.PathLike | None = None, stats_dir: str | os.PathLike | None = None,
                 seed: int = 0):
        self.metrics = [check_name(m, METRICS, "metric") for m in metrics]
        self.reference = np.asarray(reference_images, np.float32)
        self.seed = seed
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
        """Scalar metrics of ``images`` (N, H, W, C), model units; ``only`` restricts the metric names."""
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
        return out


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Model units [-1, 1] -> uint8 [0, 255] (rounded, clipped), as stored in PNG files."""
    return np.clip(np.rint((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def from_uint8(images: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 model units [-1, 1]."""
    return images.astype(np.float32) / 127.5 - 1.0


def save_grid(images: np.ndarray, path: str | os.PathLike, *, min_cell: int = 32) -> None:
    """Write images (N, H, W, C in {1, 3}), model units, as a near-square PNG grid, magnified by
    nearest neighbour so each cell is at least ``min_cell`` pixels high, 1-pixel white gutters."""
    from PIL import Image

    pixels = to_uint8(images)
    n, h, w, c = pixels.shape
    scale = max(1, math.ceil(min_cell / h))
    pixels = pixels.repeat(scale, axis=1).repeat(scale, axis=2)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    ch, cw = h * scale + 1, w * scale + 1
    canvas = np.full((rows * ch + 1, cols * cw + 1, c), 255, np.uint8)
    for i, image in enumerate(pixels):
        r, q = divmod(i, cols)
        canvas[1 + r * ch : (r + 1) * ch, 1 + q * cw : (q + 1) * cw] = image
    Image.fromarray(canvas[..., 0] if c == 1 else canvas).save(path)


def plot_quality_vs_nfe(results: Sequence[Mapping], path: str | os.PathLike, *, floor: Mapping | None = None) -> None:
    """One panel per scalar metric: value against the actual NFE (log axis), one line per
    sampler, the floor (if given) as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    keys = [k for k in results[0]["metrics"] if not k.endswith("_std")]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.2), squeeze=False)
    methods = list(dict.fromkeys(r["method"] for r in results))
    for ax, key in zip(axes[0], keys, strict=True):
        for method in methods:
            rows = sorted((r for r in results if r["method"] == method), key=lambda r: r["nfe"])
            ax.plot([r["nfe"] for r in rows], [r["metrics"][key] for r in rows], marker="o", label=method)
        if floor is not None and key in floor["metrics"]:
            ax.axhline(floor["metrics"][key], color="gray", linestyle="--", label=f"floor ({floor['name']})")
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(sorted({r["nfe"] for r in results})))
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("NFE")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _write_json(path: Path, payload: Mapping) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False, default=_json_default))
    os.replace(tmp, path)


def _json_default(value):
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


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


def _prepare_workdir(workdir: Path, config: dict, resume: bool) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "eval_config.json"
    previous = _read_json(path)
    if previous is not None and resume:
        changed = [f for f in _SAMPLE_FIELDS if previous.get(f) != config[f]]
        if changed:
            raise ValueError(
                f"{workdir} holds an evaluation with different {changed} ({[previous.get(f) for f in changed]} "
                f"vs {[config[f] for f in changed]}); use a fresh workdir or resume=False to discard it"
            )
    if not resume:
        shutil.rmtree(workdir / "settings", ignore_errors=True)
        for name in ("floor.json", "report.json"):
            (workdir / name).unlink(missing_ok=True)
    _write_json(path, config)


def _split_output(output: Any, nfe: int) -> tuple[np.ndarray, dict]:
    images, info = output if isinstance(output, tuple) else (output, {})
    info = {"nfe": int(info.get("nfe", nfe)), "aux_nfe": int(info.get("aux_nfe", 0))}
    return np.asarray(images), info


def _sample_setting(generate: Generate, method: str, nfe: int, directory: Path, *, key: jax.Array,
                    num_samples: int, chunk_size: int, image_shape: tuple[int, ...], log) -> tuple[np.ndarray, dict]:
    """All samples of one setting as uint8, reusing stored chunks; returns (samples, info)."""
    directory.mkdir(parents=True, exist_ok=True)
    chunks, info, seconds = [], {"nfe": nfe, "aux_nfe": 0}, 0.0
    for index, offset in enumerate(range(0, num_samples, chunk_size)):
        path = directory / f"samples_{index:05d}.npz"
        num = min(chunk_size, num_samples - offset)
        if path.exists():
            with np.load(path) as data:
                images = data["images"]
                info = {"nfe": int(data["nfe"]), "aux_nfe": int(data["aux_nfe"])}
                seconds += float(data["seconds"])
        else:
            start = time.perf_counter()
            images, info = _split_output(generate(method, nfe, key, num, offset), nfe)
            elapsed = time.perf_counter() - start
            seconds += elapsed
            if images.shape != (num, *image_shape):
                raise ValueError(f"generate({method!r}, {nfe}) returned shape {images.shape}; "
                                 f"expected {(num, *image_shape)}")
            images = to_uint8(images)
            tmp = path.with_name(path.name + ".tmp.npz")
            np.savez(tmp, images=images, seconds=elapsed, **info)
            os.replace(tmp, path)
            log(f"  {method} NFE {nfe}: chunk {index} ({offset + num}/{num_samples}) in {elapsed:.1f} s")
        if images.shape[0] != num:
            raise ValueError(f"{path} holds {images.shape[0]} samples; expected {num} (corrupt workdir?)")
        chunks.append(images)
    return np.concatenate(chunks), {**info, "sample_seconds": seconds}


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
    seed: int = 0,
    chunk_size: int = 1000,
    weights: str = "ema",
    last_step: str = "final step to t = 0 returns x0_hat",
    description: Mapping[str, Any] | None = None,
    allow_small_sample: bool = False,
    inception_weights: str | os.PathLike | None = None,
    classifier_dir: str | os.PathLike | None = None,
    stats_dir: str | os.PathLike | None = None,
    grid_images: int = 64,
    resume: bool = True,
    verbose: bool = True,
) -> dict:
    """Sample every (sampler, NFE) setting, score it, and write the report, plot and grids.

    Args:
      generate: see :data:`Generate`; called once per missing chunk of ``chunk_size`` samples,
        always with the key ``jax.random.key(seed)`` and the chunk's global example offset.
      settings: (sampler method, requested NFE) pairs.
      reference_images: held-out images (M, H, W, C) in model units (the weights-free metrics'
        reference; the SPEC default is the test split), described by ``reference_name``.
      workdir: output and resume directory (layout in the module docstring).
      num_samples: samples per setting. FID/KID require 50,000 unless ``allow_small_sample``,
        which is then stamped on the report (:class:`~spd_jax.metrics.protocol.SmallSampleError`
        is raised before any sampling otherwise).
      metrics: names from :data:`METRICS`.
      fid_reference_images, fid_reference_name: FID/KID reference (SPEC default: train split);
        default ``reference_images``.
      floor_images, floor_name: another real set (e.g. the train split) scored like samples
        (8-bit quantised, a seeded subset of ``num_samples`` images if larger): the floor.
      weights, last_step, description: stamped on the report (EMA or raw weights, the last
        sampler step, and free-form model details such as process, checkpoint step, clip_x0).
      inception_weights, classifier_dir, stats_dir: see :class:`MetricSuite`.
      grid_images: samples shown in each setting's grid.png.
      resume: reuse the workdir's finished settings and chunks; False discards them first.

    Returns:
      The report dict, also written to ``workdir/report.json``.
    """
    settings = _check_settings(settings)
    metrics = [check_name(m, METRICS, "metric") for m in metrics]
    reference_images = np.asarray(reference_images, np.float32)
    image_shape = tuple(reference_images.shape[1:])
    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2; got {num_samples}")
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
    workdir = Path(workdir)
    _prepare_workdir(workdir, {"num_samples": int(num_samples), "seed": int(seed), "chunk_size": int(chunk_size),
                               "image_shape": list(image_shape), "metrics": metrics}, resume)
    keys = metric_keys(metrics)
    suite = MetricSuite(metrics, reference_images, fid_reference_images=fid_reference_images,
                        inception_weights=inception_weights, classifier_dir=classifier_dir, stats_dir=stats_dir,
                        seed=seed)
    key = jax.random.key(seed)
    results = []
    for method, nfe in settings:
        directory = workdir / "settings" / f"{method}_nfe{nfe:03d}"
        result = _read_json(directory / "result.json")
        if result is not None and all(k in result["metrics"] for k in keys):
            log(f"{method} NFE {nfe}: finished earlier, skipped")
            results.append(result)
            continue
        samples, info = _sample_setting(generate, method, nfe, directory, key=key, num_samples=num_samples,
                                        chunk_size=chunk_size, image_shape=image_shape, log=log)
        start = time.perf_counter()
        known = {} if result is None else result["metrics"]
        missing = [m for m in metrics if any(k not in known for k in metric_keys([m]))]
        scores = {**known, **suite(from_uint8(samples), only=missing)}
        result = {"method": method, "nfe_requested": nfe, **info, "num_samples": num_samples,
                  "metrics": {k: scores[k] for k in keys}, "metric_seconds": time.perf_counter() - start}
        save_grid(from_uint8(samples[:grid_images]), directory / "grid.png")
        _write_json(directory / "result.json", result)
        log(f"{method} NFE {info['nfe']}: " + ", ".join(f"{k} {v:.4g}" for k, v in result["metrics"].items()))
        results.append(result)

    floor = None
    if floor_images is not None:
        floor = _read_json(workdir / "floor.json")
        if floor is None or not all(k in floor["metrics"] for k in keys):
            floor_images = np.asarray(floor_images, np.float32)
            if len(floor_images) > num_samples:
                rows = np.sort(np.random.default_rng(seed).choice(len(floor_images), num_samples, replace=False))
                floor_images = floor_images[rows]
            scores = suite(from_uint8(to_uint8(floor_images)))
            floor = {"name": floor_name, "num_images": len(floor_images), "metrics": {k: scores[k] for k in keys}}
            _write_json(workdir / "floor.json", floor)
        log(f"floor ({floor_name}): " + ", ".join(f"{k} {v:.4g}" for k, v in floor["metrics"].items()))

    report = {
        "schema": REPORT_SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "protocol": stamp,
        "metrics": keys,
        "description": dict(description or {}),
        "settings": results,
        "floor": floor,
        "files": {"plot": "quality_vs_nfe.png",
                  "grids": [f"settings/{r['method']}_nfe{r['nfe_requested']:03d}/grid.png" for r in results]},
    }
    if results:
        plot_quality_vs_nfe(results, workdir / "quality_vs_nfe.png", floor=floor)
    _write_json(workdir / "report.json", report)
    log(f"report: {workdir / 'report.json'}")
    return report


def sampler_generate(denoiser: Callable, process, *, image_shape: tuple[int, int, int], clip_x0: bool,
                     batch_size: int = 256, **knobs) -> Generate:
    """A :data:`Generate` that runs :func:`spd_jax.samplers.sample` with the largest step count
    whose NFE fits the requested NFE (:func:`spd_jax.samplers.steps_for_nfe`), in batches of
    ``batch_size`` (the last one padded, so one compilation serves every chunk). ``knobs`` (grid
    name, t_max, method options) are passed to ``sample``."""
    from spd_jax import samplers

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
    scores = MetricSuite(metrics, test, seed=seed)(from_uint8(to_uint8(train[rows])))
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
