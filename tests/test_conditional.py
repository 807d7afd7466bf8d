"""Image-conditioned tasks: a conditioned oracle reproduces the reference with the samplers, every
head takes a conditioning image, the known-pixel projection keeps known pixels bit-identical, one
training step per task, sample mode's three-panel grid, evaluation and clear config errors."""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from spd_jax import tasks
from spd_jax.diffusion import bases, processes, samplers, spectrum
from spd_jax.diffusion import parameterization as param
from spd_jax.models.heads import DDM_HEADS, HEAD_DECODERS, HEADS, model_denoiser
from spd_jax.models.unet import UNet
from spd_jax.run import builders, checks, evaluate, sampling
from spd_jax.run import train as experiment
from spd_jax.training import FAST_COMPILE
from tests.test_train import ROOT, tiny

SHAPE = (8, 8, 3)
SR = tasks.Task("sr", factor=2)
INPAINT = tasks.Task("inpaint", mask="box")


def _fast(sample_fn, *args, **kwargs):
    """``sample_fn(*args, **kwargs)`` -> (x, info) inside one jit compiled without backend
    optimisation (the sampler's own jit is inlined; about 3x faster to compile on CPU)."""
    info = {}

    def run():
        x, i = sample_fn(*args, **kwargs)
        info.update(i)
        return x

    return jax.jit(run, compiler_options=FAST_COMPILE)(), info


def _process(name):
    return processes.spd(spectrum.power_law(SHAPE)) if name == "spd" else processes.make(name)


def _oracle(process, points, consistent):
    """E[x0 | x_t, cond] for data uniform on ``points`` (M, H, W, C): the finite-set posterior
    (docs/math.md §7.3) restricted, for example b, to the points with consistent[b, m] (those whose
    degradation matches b's conditioning image)."""
    basis = "identity" if process.is_scalar else process.basis
    u_points = bases.to_spectral(points, basis)[None]

    def denoiser(x_t, t, *, key=None):
        alpha, sigma = process.marginal(t)
        u = bases.to_spectral(x_t, basis)[:, None]
        d2 = jnp.sum(jnp.abs(u - alpha[:, None] * u_points) ** 2 / sigma[:, None] ** 2, axis=(2, 3, 4))
        w = jax.nn.softmax(jnp.where(consistent, -0.5 * d2, -jnp.inf), axis=1)
        return param.prediction_from_output(process, x_t, t, jnp.einsum("bm,mhwc->bhwc", w, points), "x0")

    return denoiser


def _consistent(task, points, d):
    """(B, M): which points agree with each example's conditioning image ``d.cond``."""
    if task.name == "sr":
        cond_points = tasks.degrade(task, points, None).cond
        return jnp.all(jnp.abs(cond_points[None] - d.cond[:, None]) < 1e-5, axis=(2, 3, 4))
    known, mask = d.cond[..., :-1], d.cond[..., -1:]
    return jnp.all(jnp.abs(mask[:, None] * points[None] - known[:, None]) < 1e-6, axis=(2, 3, 4))


@pytest.mark.parametrize("task, name, method", [
    (SR, "ddm_constant", "ddm_bridge"),
    (INPAINT, "spd", "ddm_bridge"),
    (SR, "vp_linear", "gradient_estimation"),
    (INPAINT, "ddm_constant", "heun"),
    (SR, "spd", "ancestral"),
], ids=["sr-ddm_constant-ddm_bridge", "inpaint-spd-ddm_bridge", "sr-vp_linear-ge", "inpaint-ddm_constant-heun",
        "sr-spd-ancestral"])
def test_conditioned_oracle_reproduces_the_reference(task, name, method):
    process = _process(name)
    points = jax.random.uniform(jax.random.key(0), (6,) + SHAPE, minval=-1, maxval=1)
    refs = points[jnp.array([3, 0, 5, 1])]
    d = tasks.degrade(task, refs, jax.random.key(7))
    consistent = _consistent(task, points, d)
    assert consistent.sum(axis=1).tolist() == [1, 1, 1, 1]  # the conditioning identifies the reference
    x, info = _fast(
        tasks.sample_with_known_pixels, _oracle(process, points, consistent), process, known=d.known, mask=d.mask, enforce_known=task.projects,
        method=method, num_steps=4, key=jax.random.key(1), shape=refs.shape, clip_x0=False)
    assert info["nfe"] >= 4
    np.testing.assert_allclose(np.asarray(x), np.asarray(refs), atol=1e-4)
    if method != "ddm_bridge" or task.name != "sr":
        return
    # without the conditioning the same sampler lands on arbitrary points of the set
    free, _ = _fast(samplers.sample, _oracle(process, points, jnp.ones_like(consistent)), process, method=method,
                              num_steps=4, key=jax.random.key(1), shape=refs.shape, clip_x0=False)
    assert not np.allclose(np.asarray(free), np.asarray(refs), atol=1e-2)


@pytest.mark.parametrize("name", ["ddm_constant", "spd"])
def test_known_pixel_projection_keeps_known_pixels_bit_identical(name):
    process = _process(name)
    refs = jax.random.uniform(jax.random.key(2), (3,) + SHAPE, minval=-1, maxval=1)
    d = tasks.degrade(INPAINT, refs, jax.random.key(3))

    def wrong(x_t, t, *, key=None):  # a poor denoiser: every pixel predicted from the image mean
        x0 = jnp.broadcast_to(jnp.tanh(jnp.mean(x_t, axis=(1, 2), keepdims=True)), x_t.shape)
        return param.prediction_from_output(process, x_t, t, x0, "x0")

    kwargs = dict(method="gradient_estimation", num_steps=5, key=jax.random.key(4), shape=refs.shape, clip_x0=True)
    x, _ = _fast(tasks.sample_with_known_pixels, wrong, process, known=d.known, mask=d.mask, **kwargs)
    known = np.broadcast_to(np.asarray(d.mask) > 0.5, refs.shape)
    np.testing.assert_array_equal(np.asarray(x)[known], np.asarray(refs)[known])
    # the sampler hook alone (no final paste): exact for a pixel-diagonal process, round-off through the DFT
    project = tasks.known_pixel_projection(process, d.known, d.mask)
    hooked, _ = _fast(samplers.sample, wrong, process, project=project, **kwargs)
    if not process.is_scalar:
        np.testing.assert_allclose(np.asarray(hooked)[known], np.asarray(refs)[known], atol=1e-5)
        return
    np.testing.assert_array_equal(np.asarray(hooked)[known], np.asarray(refs)[known])
    # the projection acts at every step: the unknown pixels differ from an unprojected run
    plain, _ = _fast(samplers.sample, wrong, process, **kwargs)
    assert np.abs(np.asarray(hooked) - np.asarray(plain))[~known].max() > 1e-3
    off, _ = _fast(tasks.sample_with_known_pixels, wrong, process, known=d.known, mask=d.mask, enforce_known=False,
                                                  **kwargs)
    np.testing.assert_array_equal(np.asarray(off), np.asarray(plain))


def test_degradation_is_per_example():
    x = jax.random.uniform(jax.random.key(5), (4,) + SHAPE, minval=-1, maxval=1)
    degrade = jax.jit(tasks.degrade, static_argnums=0, compiler_options=FAST_COMPILE)
    for task in (INPAINT, SR):
        full = degrade(task, x, jax.random.key(6))
        tail = degrade(task, x[2:], jax.random.key(6), index=jnp.arange(2, 4))
        for a, b in zip(full, tail, strict=True):
            np.testing.assert_array_equal(np.asarray(a)[2:], np.asarray(b))
    d = tasks.degrade(SR, x, None)
    assert d.cond.shape == x.shape and float(jnp.min(d.mask)) == 1.0
    np.testing.assert_array_equal(d.baseline, d.cond)  # the bicubic baseline is the conditioning image
    d = tasks.degrade(INPAINT, x, jax.random.key(6))
    assert d.cond.shape == x.shape[:3] + (4,)
    np.testing.assert_array_equal(d.cond[..., 3:], d.mask)


@pytest.mark.parametrize("two_decoder_head", [None, "ddm_dual", "ddm_linear"])
def test_every_head_works_with_a_conditioning_image(two_decoder_head):
    heads = (two_decoder_head,) if two_decoder_head else tuple(h for h in HEADS if h not in HEAD_DECODERS)
    mults = HEAD_DECODERS.get(two_decoder_head, (1,))
    model = UNet(base_channels=8, channel_mult=(1,), num_res_blocks=1, attention_resolutions=(), num_heads=1,
                 mid_attention=False, cond_channels=4, zero_output_init=False, num_decoders=len(mults),
                 first_output_mult=mults[0])
    x = jax.random.normal(jax.random.key(0), (2,) + SHAPE)
    t = jnp.array([0.3, 0.7])
    cond = tasks.degrade(INPAINT, jnp.tanh(x), jax.random.key(1)).cond
    fast = {"compiler_options": FAST_COMPILE}
    variables = jax.jit(model.init, **fast)(jax.random.key(2), x, t, cond)

    @functools.partial(jax.jit, **fast)
    def predict(c):
        process = {"ddm_linear": "ddm_linear"}.get(heads[0], "ddm_constant" if heads[0] in DDM_HEADS else "vp_linear")
        return {h: model_denoiser(model, variables, processes.make(process), h, cond=c)(x, t) for h in heads}

    preds, others = predict(cond), predict(-cond)
    for head in heads:
        pred = preds[head]
        assert pred.x0.shape == pred.eps.shape == x.shape, head
        assert np.all(np.isfinite(pred.x0)) and np.all(np.isfinite(pred.eps)), head
        assert float(jnp.max(jnp.abs(pred.x0 - others[head].x0))) > 1e-4, head  # depends on the condition
    with pytest.raises(ValueError, match="needs cond"):
        jax.eval_shape(lambda: model.apply(variables, x, t))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One training step of each task at tiny size (digits 8x8: x4 SR conditions on 2x2 images)."""
    runs = {}
    for name in ("patches_sr4", "patches_inpaint"):
        config = tiny(name)
        config.sample.grid_images = 4 if name == "patches_inpaint" else 0  # one grid compile is enough
        workdir = str(tmp_path_factory.mktemp(name))
        state = experiment.train(config, workdir)
        runs[name] = (config, workdir, state)
    return runs


@pytest.mark.parametrize("name", ["patches_sr4", "patches_inpaint"])
def test_one_training_step_per_task(trained, name):
    config, workdir, state = trained[name]
    assert int(state.step) == 1 and int(state.skipped) == 0
    row = json.loads(open(os.path.join(workdir, "metrics.jsonl")).read().splitlines()[-1])
    assert np.isfinite(row["loss"])
    if config.sample.grid_images:
        grid = np.asarray(Image.open(os.path.join(workdir, "samples", "step_0000001.png")))
        side = 8 * config.sample.upscale + 1  # 4 examples x (input | output | reference), 2 groups of 2 rows
        assert grid.shape[:2] == (2 * side + 1, 2 * (3 * side + 1) + 4)
    params = state.params["params"]["encoder"]
    first = next(v["kernel"] for k, v in params.items() if "conv" in k.lower() and "kernel" in v)
    assert first.shape[2] == 1 + builders.task_of(config).cond_channels(1)  # x_t and the conditioning image


def test_sample_mode_writes_input_output_reference_panels(trained, tmp_path):
    config, workdir, _ = trained["patches_inpaint"]
    path = sampling.sample(config, workdir)
    out = np.load(path)
    known = np.broadcast_to(out["mask"] > 0.5, out["references"].shape)
    np.testing.assert_array_equal(out["outputs"][known], out["references"][known])
    assert out["outputs"].shape == (4, 8, 8, 1) and 0 <= float(out["psnr"]) < 100
    side = 8 * config.sample.upscale + 1
    assert np.asarray(Image.open(path.replace(".npz", ".png"))).shape[:2] == (2 * side + 1, 2 * (3 * side + 1) + 4)
    # super-resolution from image files: an 8x8 reference and a 2x2 low-resolution input
    config, workdir, _ = trained["patches_sr4"]
    config = config.copy_and_resolve_references()
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4).save(tmp_path / "ref.png")
    Image.fromarray(np.array([[0, 255], [128, 64]], np.uint8)).save(tmp_path / "low.png")
    config.task.inputs = f"{tmp_path / 'ref.png'},{tmp_path / 'low.png'}"
    out = np.load(sampling.sample(config, workdir))
    assert out["has_reference"].tolist() == [True, False] and out["outputs"].shape == (2, 8, 8, 1)
    np.testing.assert_allclose(out["inputs"][1, :4, :4, 0], -1.0)  # nearest-up-sampled low-res pixel 0


def test_task_evaluation_reports_psnr_ssim_beside_the_baseline(trained):
    config, workdir, _ = trained["patches_sr4"]
    config = config.copy_and_resolve_references()
    config.eval.update(settings="ddim:1,gradient_estimation:2", num_samples=6, grid_images=4, name="psnr")
    report = evaluate.run(config, workdir, verbose=False)
    assert report["task"] == "sr" and report["floor"] is None
    assert report["baseline"]["name"] == "bicubic" and report["baseline"]["num_images"] == 6
    assert report["protocol"]["num_samples"] == 6 and report["protocol"]["reference"]["num_images"] == 6
    rows = {(r["method"], r["nfe"]): r for r in report["settings"]}
    assert set(rows) == {("ddim", 1), ("gradient_estimation", 2)}
    for row in [*rows.values(), report["baseline"]]:
        assert np.isfinite(row["metrics"]["psnr"]) and -1 <= row["metrics"]["ssim"] <= 1
    assert "1 NFE" in rows[("ddim", 1)]["note"]
    out = os.path.join(workdir, "eval", "psnr")
    saved = json.load(open(os.path.join(out, "report.json")))
    assert saved["settings"] == report["settings"]
    assert os.path.exists(os.path.join(out, "settings", "sr4_gradient_estimation_nfe2", "grid.png"))
    paired = np.load(os.path.join(out, "paired.npz"))
    assert paired["references"].shape == paired["inputs"].shape == paired["baseline"].shape == (6, 8, 8, 1)


@pytest.mark.parametrize("field, value, message", [
    ("name", "superres", "config.task.name = 'superres' is invalid: expected one of ('', 'sr', 'inpaint')"),
    ("factor", 3, "config.task.factor = 3 is invalid: expected one of (2, 4)"),
    ("mask", "circle", "config.task.mask = 'circle' is invalid: expected one of ('box', 'free_form')"),
    ("inputs", "missing.png", "'missing.png' does not exist"),
])
def test_bad_task_value_is_a_clear_config_error(field, value, message):
    config = tiny("patches_sr4" if field != "mask" else "patches_inpaint")
    config.task[field] = value
    with pytest.raises(checks.ConfigError) as err:
        checks.validate(config, device_count=1)
    assert message in str(err.value)


def test_launch_stops_on_a_bad_task_value_before_writing(tmp_path):
    workdir = tmp_path / "run"
    cmd = [sys.executable, "launch.py", "--config=configs/patches_sr4.py:ddm_constant", f"--workdir={workdir}",
           "--config.task.factor=8"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert result.returncode != 0
    assert "config.task.factor = 8 is invalid: expected one of (2, 4)" in result.stderr
    assert not workdir.exists()


@pytest.mark.parametrize("settings, message", [("ddm_bridge", "expected 'sampler:NFE'"),
                                               ("ddm_bridge:0", "entry 'ddm_bridge:0' is invalid"),
                                               ("ddm_brige:5", "did you mean 'ddm_bridge'")])
def test_task_eval_mode_stops_on_a_bad_setting_before_restoring(tmp_path, settings, message):
    """--mode=eval of a task config checks its settings first (the workdir has no checkpoint at all)."""
    workdir = tmp_path / "run"
    cmd = [sys.executable, "launch.py", "--config=configs/patches_sr4.py", f"--workdir={workdir}", "--mode=eval",
           f"--config.eval.settings={settings}"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (workdir / "eval").exists()


def test_task_table_smoke_run_writes_reports_and_merges(tmp_path):
    sys.path.insert(0, ROOT)
    from benchmarks import task_table

    out = tmp_path / "out"
    task_table.main(["--smoke", "--tasks=sr4", "--processes=ddm_constant", "--nfe=1,2", "--methods=ddm_bridge",
                     f"--workdir={tmp_path / 'work'}", f"--out={out}", "--num-samples=4"])
    report = json.load(open(out / "reports" / "sr4_ddm_constant.json"))
    assert [s["nfe"] for s in report["settings"]] == [1, 2] and report["train"]["steps"] == 2
    table = (out / "task_table.md").read_text()
    assert "| ddm_constant (ddm_dual) | ddm_bridge |" in table and "bicubic baseline" in table
    assert (out / "sr4_examples.png").exists() and (out / "task_table.csv").exists()
    # a rerun skips the finished model and reuses the finished settings
    task_table.main(["--smoke", "--tasks=sr4", "--processes=ddm_constant", "--nfe=1,2", "--methods=ddm_bridge",
                     f"--workdir={tmp_path / 'work'}", f"--out={out}", "--num-samples=4"])
    again = json.load(open(out / "reports" / "sr4_ddm_constant.json"))
    assert again["settings"] == report["settings"] and again["train"] == report["train"]


def test_a_checkpoint_of_another_task_is_refused(trained):
    _, workdir, _ = trained["patches_sr4"]
    with pytest.raises(checks.ConfigError, match="config.task.name = 'inpaint' differs from the checkpoint's 'sr'"):
        sampling.sample(tiny("patches_inpaint"), workdir)


def test_psnr_summaries_are_not_dominated_by_near_flat_images():
    """One almost perfectly restored image (PSNR ~ 100 dB) drags the mean far up; the median and
    the PSNR of the mean squared error stay near the typical image."""
    rng = np.random.default_rng(0)
    refs = rng.uniform(-0.5, 0.5, (5, 8, 8, 1))
    est = refs + 0.1 * rng.standard_normal(refs.shape)
    est[0] = refs[0] + 1e-5
    m = tasks.paired_metrics(refs, est)
    typical = -10 * np.log10(np.mean((est[1:] - refs[1:]) ** 2) / 4.0)
    assert m["psnr"] > typical + 10
    assert abs(m["psnr_median"] - typical) < 2
    assert abs(m["psnr_of_mean_mse"] - (typical + 10 * np.log10(5 / 4))) < 0.5


def test_an_smd_model_trains_and_samples_a_task_with_its_conditioning(tmp_path):
    # SMD (latent + hypernetworks) with inpainting: the backbone takes the conditioning channels,
    # the smd sampler keeps the known pixels exactly, and the task evaluation runs it
    config = tiny("patches_inpaint")
    config.model.kind, config.sample.method, config.sample.grid_images = "smd", "smd", 0
    state = experiment.train(config, str(tmp_path))
    assert int(state.step) == 1 and int(state.skipped) == 0
    kernels = [np.shape(leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(state.params)[0]
               if path[-1].key == "kernel" and np.ndim(leaf) == 4]
    assert any(k[2] == 1 + builders.task_of(config).cond_channels(1) for k in kernels), kernels
    out = np.load(sampling.sample(config, str(tmp_path)))
    known = np.broadcast_to(out["mask"] > 0.5, out["references"].shape)
    np.testing.assert_array_equal(out["outputs"][known], out["references"][known])
    assert not np.array_equal(out["outputs"], out["references"])  # the holes were generated
    config.eval.update(settings="smd:2", num_samples=6, grid_images=4)
    report = evaluate.run(config, str(tmp_path), verbose=False)
    assert [(r["method"], r["nfe"]) for r in report["settings"]] == [("smd", 2)]
    assert np.isfinite(report["settings"][0]["metrics"]["psnr"]) and report["settings"][0]["aux_nfe"] == report["settings"][0]["nfe"]
