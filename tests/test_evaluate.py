"""The evaluation engine (spd_jax.run.scoring.evaluate): report schema, resume after an interruption,
the FID small-sample protocol, paired task metrics beside a baseline, and the sampler adapter's
per-example seeds."""

import json

import numpy as np
import pytest

from spd_jax import images, tasks
from spd_jax.data import load_digits
from spd_jax.metrics import inception, protocol
from spd_jax.run import scoring as ev

SETTINGS = [("ddim", 5), ("ddim", 10), ("gradient_estimation", 5)]
TRAIN, TEST = load_digits("train"), load_digits("test")


class CountingGenerate:
    """Noisy training digits: example i depends only on (nfe, i); fails after ``fail_after`` calls."""

    def __init__(self, fail_after=None):
        self.calls, self.fail_after = [], fail_after

    def __call__(self, method, nfe, key, num, index_offset):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt("simulated preemption")
        self.calls.append((method, nfe, num, index_offset))
        index = np.arange(index_offset, index_offset + num)
        noise = np.stack([np.random.default_rng([nfe, i]).standard_normal((8, 8, 1)) for i in index])
        images = np.clip(TRAIN[index % len(TRAIN)] + noise / nfe, -1, 1)
        return images, {"nfe": nfe, "aux_nfe": 0}


def _run(workdir, generate, **kwargs):
    args = dict(settings=SETTINGS, reference_images=TEST, reference_name="digits/test", workdir=workdir,
                num_samples=50, chunk_size=20, metrics=["pixel_fd", "swd"], verbose=False)
    return ev.evaluate(generate, **{**args, **kwargs})


def test_report_schema_and_files(tmp_path):
    report = _run(tmp_path, CountingGenerate(), floor_images=TRAIN, floor_name="digits/train",
                  description={"process": "vp_linear", "clip_x0": True})
    assert report == json.loads((tmp_path / "report.json").read_text())
    assert report["schema"] == ev.REPORT_SCHEMA
    assert set(report) == {"schema", "created", "task", "protocol", "metrics", "description", "settings", "floor",
                           "baseline", "files"}
    assert report["task"] == "" and report["baseline"] is None and report["files"]["paired"] is None
    stamp = report["protocol"]
    assert stamp["protocol"] == protocol.PROTOCOL and stamp["num_samples"] == 50 and stamp["weights"] == "ema"
    assert stamp["reference"] == {"name": "digits/test", "num_images": len(TEST)}
    assert report["metrics"] == ["pixel_fd", "swd"]
    assert [(s["method"], s["nfe_requested"]) for s in report["settings"]] == SETTINGS
    for setting in report["settings"]:
        assert {"method", "nfe_requested", "nfe", "aux_nfe", "num_samples", "metrics", "sample_seconds",
                "metric_seconds", "note", "stem"} <= set(setting)
        assert all(np.isfinite(v) for v in setting["metrics"].values())
    assert report["floor"]["name"] == "digits/train" and report["floor"]["num_images"] == 50
    by_nfe = {s["nfe"]: s["metrics"]["pixel_fd"] for s in report["settings"] if s["method"] == "ddim"}
    assert by_nfe[10] < by_nfe[5]  # less noise, closer to the data
    assert report["files"]["grids"][0] == "settings/ddim_nfe5/grid.png"
    for name in [report["files"]["record"], report["files"]["plot"], *report["files"]["grids"]]:
        assert (tmp_path / name).stat().st_size > 0
    assert json.loads((tmp_path / "run.json").read_text())["num_samples"] == 50


def test_paired_metrics_beside_the_baseline(tmp_path):
    # a task: example i is scored against reference i; the baseline is scored like the samples
    refs = TEST[:50]
    paired = ev.Paired(refs, inputs=np.zeros_like(refs), baseline=np.clip(refs + 0.3, -1, 1), baseline_name="mean_fill")
    report = _run(tmp_path, CountingGenerate(), reference_images=refs, paired=paired, metrics=["psnr", "ssim", "swd"],
                  task=tasks.Task("inpaint"), notes={("ddim", 5): "a note"})
    assert report["task"] == "inpaint" and report["floor"] is None
    assert report["metrics"] == ["psnr", "psnr_sem", "psnr_median", "psnr_of_mean_mse", "ssim", "ssim_sem", "swd"]
    assert report["baseline"]["name"] == "mean_fill" and report["baseline"]["num_images"] == 50
    rows = {(s["method"], s["nfe"]): s for s in report["settings"]}
    assert rows[("ddim", 5)]["note"] == "a note" and rows[("ddim", 5)]["stem"] == "inpaint_box_ddim_nfe5"
    assert rows[("ddim", 10)]["metrics"]["psnr"] != rows[("ddim", 5)]["metrics"]["psnr"]
    assert np.isfinite(report["baseline"]["metrics"]["psnr"]) and -1 <= report["baseline"]["metrics"]["ssim"] <= 1
    stored = np.load(tmp_path / report["files"]["paired"])
    assert stored["references"].shape == (50, 8, 8, 1) and stored["references"].dtype == np.uint8
    grid = np.asarray(images.grid([refs[:64], refs[:64], refs[:64]], min_cell=32))
    from PIL import Image

    assert np.asarray(Image.open(tmp_path / report["files"]["grids"][0])).shape[:2] == grid.shape[:2]  # 3 panels
    with pytest.raises(ValueError, match="paired_references"):
        _run(tmp_path / "unpaired", CountingGenerate(), metrics=["psnr"])


def test_interrupted_evaluation_resumes_where_it_stopped(tmp_path):
    reference = _run(tmp_path / "reference", CountingGenerate())
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "run", CountingGenerate(fail_after=4))  # setting 1 done, setting 2 has 1 chunk
    resumed = CountingGenerate()
    report = _run(tmp_path / "run", resumed)
    assert resumed.calls == [("ddim", 10, 20, 20), ("ddim", 10, 10, 40), ("gradient_estimation", 5, 20, 0),
                             ("gradient_estimation", 5, 20, 20), ("gradient_estimation", 5, 10, 40)]
    for ours, theirs in zip(report["settings"], reference["settings"], strict=True):
        assert ours["metrics"] == theirs["metrics"]
    again = CountingGenerate()
    _run(tmp_path / "run", again, settings=[*SETTINGS, ("ddim", 20)])
    assert again.calls == [("ddim", 20, 20, 0), ("ddim", 20, 20, 20), ("ddim", 20, 10, 40)]


def test_new_metrics_reuse_stored_samples(tmp_path):
    _run(tmp_path, CountingGenerate(), metrics=["pixel_fd"])
    rerun = CountingGenerate()
    report = _run(tmp_path, rerun, metrics=["pixel_fd", "swd"])
    assert rerun.calls == [] and all("swd" in s["metrics"] for s in report["settings"])


def test_resume_refuses_a_workdir_with_other_samples(tmp_path):
    _run(tmp_path, CountingGenerate(), settings=SETTINGS[:1])
    with pytest.raises(ValueError, match="num_samples"):
        _run(tmp_path, CountingGenerate(), settings=SETTINGS[:1], num_samples=60)
    fresh = CountingGenerate()
    _run(tmp_path, fresh, settings=SETTINGS[:1], num_samples=60, resume=False, knobs={SETTINGS[0]: {"eta": 0.0}})
    assert len(fresh.calls) == 3
    # per-setting knobs must match for the settings both runs hold; another setting may differ
    with pytest.raises(ValueError, match=r"holds an evaluation with different \['ddim:5'\]"):
        _run(tmp_path, CountingGenerate(), settings=SETTINGS[:1], num_samples=60, knobs={SETTINGS[0]: {"eta": 1.0}})
    _run(tmp_path, CountingGenerate(), settings=SETTINGS[:2], num_samples=60, knobs={SETTINGS[1]: {"eta": 1.0}})


class FakeInception:
    """Stands in for the Inception network: a fixed random projection of the pixels."""

    def __init__(self, weights=None):
        self.identity = "fake inception"
        self.projection = np.random.default_rng(0).standard_normal((64, 16))

    def __call__(self, images):
        return np.asarray(images).reshape(len(images), -1) @ self.projection


def test_fid_small_sample_protection(tmp_path, monkeypatch):
    generate = CountingGenerate()
    with pytest.raises(protocol.SmallSampleError):
        _run(tmp_path, generate, metrics=["pixel_fd", "fid"])
    assert generate.calls == [] and not (tmp_path / "report.json").exists()

    monkeypatch.setattr(inception, "InceptionFeatures", FakeInception)
    report = _run(tmp_path, generate, metrics=["fid", "kid"], allow_small_sample=True, fid_reference_images=TRAIN,
                  fid_reference_name="digits/train", stats_dir=tmp_path / "stats")
    stamp = report["protocol"]
    assert stamp["small_sample_override"] and stamp["fid_status"].startswith("OVERRIDE")
    assert stamp["fid_reference"] == {"name": "digits/train", "num_images": len(TRAIN)}
    assert report["metrics"] == ["fid", "kid", "kid_std"]
    assert all(s["metrics"]["fid"] > 0 for s in report["settings"])
    assert len(list((tmp_path / "stats").glob("*.npz"))) == 1


def test_sampler_generate_uses_per_example_seeds():
    from spd_jax.diffusion.analytic import gaussian_denoiser
    from spd_jax.diffusion.processes import vp_linear

    process = vp_linear()
    denoiser = gaussian_denoiser(process, np.full((8, 8, 1), 0.3))
    key = ev.jax.random.key(3)
    whole, info = ev.sampler_generate(denoiser, process, image_shape=(8, 8, 1), clip_x0=False, batch_size=8)(
        "ddim", 4, key, 12, 0)
    assert whole.shape == (12, 8, 8, 1) and info["nfe"] == 4
    part, _ = ev.sampler_generate(denoiser, process, image_shape=(8, 8, 1), clip_x0=False, batch_size=8)(
        "ddim", 4, key, 5, 7)
    np.testing.assert_allclose(part, whole[7:], rtol=1e-5, atol=1e-6)
