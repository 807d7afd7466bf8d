"""Check the Flax FID InceptionV3 (:mod:`spd_jax.metrics.inception`) against pytorch-fid itself.

    pip install torch torchvision pytorch-fid     # only for this check, not project dependencies
    python benchmarks/inception_parity.py --out benchmarks/results/inception_parity \
        [--weights /path/to/pt_inception-2015-12-05-6726825d.pth] [--dataset patches,digits] [--num-images 500]

For each embedded dataset the same two image sets (the first ``--num-images`` of the test split
and of the training split) go through both pipelines:

* pytorch-fid: the images written as 8-bit PNG files, read back by ``pytorch_fid.fid_score``
  (``get_activations``: PIL, ``ToTensor``, bilinear resize to 299, pool3 of
  ``pytorch_fid.inception.InceptionV3``), statistics as ``calculate_activation_statistics`` forms
  them, FID by ``calculate_frechet_distance``;
* spd_jax: the arrays in model units through :class:`spd_jax.metrics.inception.InceptionFeatures`
  (quantisation, resize matrix, Flax network) after converting the ``.pth`` with
  :mod:`spd_jax.metrics.convert` **without torch** (both the zip and the legacy ``.pth`` format
  are written and converted; the two ``.npz`` must agree bit for bit), FID by
  :func:`spd_jax.metrics.frechet.frechet_distance`.

Printed and written (``parity.json``, ``parity.md``): the relative feature error per image
(||f_jax - f_torch|| / ||f_torch||, median and max), the largest absolute feature difference
against the feature scale, the float32 noise level (pytorch-fid's network and spd_jax's features,
each against the same network run in float64, on 50 test images), and the FID of test vs train
from pytorch-fid, from spd_jax, and from spd_jax's Fréchet distance on pytorch-fid's features
(which separates the network from the matrix square root).

Weights: ``--weights`` takes the pytorch-fid release file. Without it (the file cannot be
downloaded on machines without internet) a stand-in state dict is used: pytorch-fid's own network
with torchvision's random initialisation, random batch-norm scales and offsets, and batch-norm
running statistics re-estimated on training images, so that activations keep a useful scale
through all 94 convolutions. Every layer, name and shape of the release file is exercised; only
the values differ.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _need_torch():
    try:
        import pytorch_fid.fid_score  # noqa: F401
        import torch  # noqa: F401
    except ImportError as err:
        raise SystemExit(f"this check needs torch, torchvision and pytorch-fid ({err}); "
                         "pip install torch torchvision pytorch-fid") from err


def build_torch_model(weights: str | None, calibration: np.ndarray, seed: int):
    """pytorch-fid's pool3 InceptionV3 and the underlying state dict (the release file's values,
    or the calibrated random stand-in); ``calibration`` are images in [0, 1], NCHW."""
    import torch
    from pytorch_fid import inception as fid_inception

    torch.manual_seed(seed)
    built = []
    original = fid_inception._inception_v3

    def capture(*args, **kwargs):
        built.append(original(*args, **kwargs))
        return built[-1]

    if weights is not None:
        state = torch.load(weights, map_location="cpu")
        loader = lambda *args, **kwargs: state  # noqa: E731
    else:
        loader = lambda *args, **kwargs: built[-1].state_dict()  # noqa: E731
    original_loader = fid_inception.load_state_dict_from_url
    fid_inception._inception_v3, fid_inception.load_state_dict_from_url = capture, loader
    try:
        model = fid_inception.InceptionV3([fid_inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
    finally:
        fid_inception._inception_v3, fid_inception.load_state_dict_from_url = original, original_loader
    network = built[-1]
    if weights is None:
        norms = [m for m in network.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        with torch.no_grad():
            for bn in norms:
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.normal_(0.0, 0.2)
                bn.reset_running_stats()
                bn.momentum = None  # cumulative average over the calibration batches
            model.train()
            for start in range(0, len(calibration), 64):
                model(torch.from_numpy(calibration[start : start + 64]))
    model.eval()
    state = {k: v for k, v in network.state_dict().items() if not k.startswith("fc.")}
    return model, state


def write_pngs(images: np.ndarray, folder: Path) -> list[str]:
    """Images in model units -> 8-bit PNG files (greyscale for one channel); their paths."""
    from PIL import Image

    from spd_jax.metrics.inception import quantize

    folder.mkdir(parents=True, exist_ok=True)
    pixels = np.asarray(quantize(images)).astype(np.uint8)
    paths = []
    for i, image in enumerate(pixels):
        path = folder / f"{i:05d}.png"
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path)
        paths.append(str(path))
    return paths


def torch_features(model, files: list[str], batch_size: int) -> np.ndarray:
    from pytorch_fid.fid_score import get_activations

    return get_activations(files, model, batch_size=batch_size, dims=2048, device="cpu", num_workers=0)


def torch_statistics(features: np.ndarray):
    """As ``pytorch_fid.fid_score.calculate_activation_statistics`` forms them."""
    return np.mean(features, axis=0), np.cov(features, rowvar=False)


NOISE_IMAGES = 50


def float32_noise(torch_model, images: np.ndarray, f_jax: np.ndarray) -> dict:
    """How far float32 features are from the same network in float64 (median relative error per
    image): pytorch-fid's float32 model, and spd_jax's features, both against the float64 copy."""
    import copy

    import torch

    from spd_jax.metrics.inception import quantize

    x = torch.from_numpy((np.asarray(quantize(images)) / 255.0).transpose(0, 3, 1, 2).copy())  # = ToTensor of the PNG
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)  # PIL's convert("RGB")
    model64 = copy.deepcopy(torch_model).double().eval()
    with torch.no_grad():
        f64 = model64(x.double())[0].squeeze(-1).squeeze(-1).numpy()
        f32 = torch_model(x.float())[0].squeeze(-1).squeeze(-1).double().numpy()

    def rel(f):
        return float(np.median(np.linalg.norm(f - f64, axis=1) / np.linalg.norm(f64, axis=1)))

    return {"images": len(images), "torch_float32_vs_float64": rel(f32), "spd_jax_float32_vs_float64": rel(f_jax)}


def compare_dataset(name: str, num_images: int, jax_features, torch_model, work: Path, batch_size: int) -> dict:
    from pytorch_fid.fid_score import calculate_frechet_distance

    from spd_jax import data
    from spd_jax.metrics.frechet import frechet_distance, gaussian_statistics

    sets = {"test": data.load_embedded(name, "test")[:num_images],
            "train": data.load_embedded(name, "train")[:num_images]}
    out: dict = {"dataset": name, "num_images": {k: len(v) for k, v in sets.items()},
                 "image_shape": list(sets["test"].shape[1:])}
    feats = {}
    for split, images in sets.items():
        files = write_pngs(images, work / name / split)
        start = time.perf_counter()
        f_torch = torch_features(torch_model, files, batch_size)
        t_torch = time.perf_counter() - start
        start = time.perf_counter()
        f_jax = jax_features(images)
        t_jax = time.perf_counter() - start
        rel = np.linalg.norm(f_jax - f_torch, axis=1) / np.maximum(np.linalg.norm(f_torch, axis=1), 1e-12)
        out[split] = {"relative_error_median": float(np.median(rel)), "relative_error_max": float(rel.max()),
                      "max_abs_difference": float(np.abs(f_jax - f_torch).max()),
                      "feature_scale": float(np.abs(f_torch).max()),
                      "mean_feature_value": float(f_torch.mean()),
                      "torch_seconds": round(t_torch, 1), "jax_seconds": round(t_jax, 1)}
        feats[split] = (f_torch, f_jax)
    out["float32_noise"] = float32_noise(torch_model, sets["test"][:NOISE_IMAGES], feats["test"][1][:NOISE_IMAGES])
    stats_torch = [torch_statistics(feats[s][0]) for s in ("test", "train")]
    stats_jax = [gaussian_statistics(feats[s][1]) for s in ("test", "train")]
    out["fid_pytorch_fid"] = float(calculate_frechet_distance(*stats_torch[0], *stats_torch[1]))
    out["fid_spd_jax"] = frechet_distance(*stats_jax[0], *stats_jax[1])
    out["fid_spd_jax_on_torch_features"] = frechet_distance(*stats_torch[0], *stats_torch[1])
    return out


def markdown(report: dict) -> str:
    lines = [f"weights: {report['weights']}; {report['note']}", "",
             "| dataset | images (test / train) | rel. feature error median / max | max abs diff / feature scale "
             "| float32 vs float64 (pytorch-fid / spd_jax) | FID pytorch-fid | FID spd_jax "
             "| FID spd_jax on torch features |",
             "|---|---|---|---|---|---|---|---|"]
    for row in report["datasets"]:
        err = max(row["test"]["relative_error_median"], row["train"]["relative_error_median"])
        err_max = max(row["test"]["relative_error_max"], row["train"]["relative_error_max"])
        diff = max(row["test"]["max_abs_difference"], row["train"]["max_abs_difference"])
        scale = max(row["test"]["feature_scale"], row["train"]["feature_scale"])
        noise = row["float32_noise"]
        lines.append(f"| {row['dataset']} {'x'.join(map(str, row['image_shape']))} "
                     f"| {row['num_images']['test']} / {row['num_images']['train']} "
                     f"| {err:.1e} / {err_max:.1e} | {diff:.1e} / {scale:.3g} "
                     f"| {noise['torch_float32_vs_float64']:.1e} / {noise['spd_jax_float32_vs_float64']:.1e} "
                     f"| {row['fid_pytorch_fid']:.7g} "
                     f"| {row['fid_spd_jax']:.7g} | {row['fid_spd_jax_on_torch_features']:.7g} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results/inception_parity")
    parser.add_argument("--weights", default=None, help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth "
                        "(default: a calibrated random stand-in)")
    parser.add_argument("--dataset", default="patches,digits", help="comma list of embedded datasets")
    parser.add_argument("--num-images", type=int, default=500, help="images per set (test and train)")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    datasets = [d for d in args.dataset.split(",") if d]
    from spd_jax import data

    for name in datasets:
        data.check_name(name, data.EMBEDDED, "embedded dataset")
    if args.num_images < 2:
        raise SystemExit(f"--num-images must be >= 2; got {args.num_images}")
    if args.weights is not None and not Path(args.weights).is_file():
        raise SystemExit(f"--weights {args.weights}: no such file")
    _need_torch()
    import torch

    from spd_jax.metrics import convert
    from spd_jax.metrics.inception import InceptionFeatures, quantize

    torch.set_num_threads(os.cpu_count() or 1)
    # calibration images (stand-in only): training crops not used in the comparison, in [0, 1]
    calib = data.load_embedded("patches", "train", seed=args.seed + 1)[:256]
    calib = (np.asarray(quantize(calib)) / 255.0).astype(np.float32).transpose(0, 3, 1, 2)
    model, state = build_torch_model(args.weights, calib, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        npz = []
        for fmt, zipped in (("zip", True), ("legacy", False)):
            pth = work / f"inception_{fmt}.pth"
            torch.save(state, pth, _use_new_zipfile_serialization=zipped)
            npz.append(convert.convert(pth, work / f"inception_{fmt}.npz", reader="pickle"))
        with np.load(npz[0]) as a, np.load(npz[1]) as b:
            same = all(np.array_equal(a[k], b[k]) for k in a.files if not k.startswith("meta/"))
        if not same:
            raise SystemExit("the zip and legacy .pth files converted to different weights")
        extractor = InceptionFeatures(npz[0], batch_size=args.batch_size)
        rows = []
        for name in datasets:
            row = compare_dataset(name, args.num_images, extractor, model, work, args.batch_size)
            print(json.dumps(row), flush=True)
            rows.append(row)
    report = {"weights": args.weights or "stand-in (calibrated random, seed %d)" % args.seed,
              "note": "both .pth formats converted without torch to identical weights",
              "torch": torch.__version__, "datasets": rows,
              "command": "python benchmarks/inception_parity.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    (out / "parity.json").write_text(json.dumps(report, indent=2))
    (out / "parity.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
