"""Projection runs (docs/math.md §5.4, §6.6): T_theta trains from a config against a frozen score
model, its checkpoints hold T_theta alone, sampling counts its calls, and bad configs fail clearly."""

import importlib
import json
import os
import sys

import jax
import numpy as np
import optax
import pytest

from spd_jax import data
from spd_jax.run import builders, checks, projection
from spd_jax.run import evaluate as eval_run
from spd_jax.run import train as experiment
from spd_jax.run.checks import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tests.test_train import tiny  # noqa: E402


def _leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _projection_config(score_dir, **train):
    config = tiny("digits_projection", **train)
    config.model.base_channels, config.model.norm_groups = 4, 4  # T_theta smaller than the score model
    config.projection.score_workdir = str(score_dir)
    config.projection.num_steps = 2
    config.sample.update(nfe=4, grid_images=0)
    return config


@pytest.fixture(scope="module")
def score_dir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("score")
    experiment.train(tiny("digits_spd", num_steps=2), str(workdir))
    return workdir


@pytest.fixture(scope="module")
def projection_dir(score_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("projection")
    config = _projection_config(score_dir, num_steps=3, checkpoint_every=3)
    before = builders.restore_ema(tiny("digits_spd", num_steps=2), str(score_dir))
    experiment.train(config, str(workdir))
    return workdir, config, before


def test_training_keeps_the_score_model_bitwise_and_checkpoints_only_t_theta(score_dir, projection_dir):
    workdir, config, before = projection_dir
    after = builders.restore_ema(tiny("digits_spd", num_steps=2), str(score_dir))
    for a, b in zip(_leaves(before.variables), _leaves(after.variables), strict=True):
        np.testing.assert_array_equal(a, b)
    mine = builders.restore_ema(config, str(workdir))
    init = builders.init_variables(builders.build_model(config), mine.shape, jax.random.PRNGKey(0))
    assert jax.tree.structure(mine.variables) == jax.tree.structure(init)
    sizes = sum(x.size for x in _leaves(mine.variables))
    assert sizes == sum(x.size for x in _leaves(init)) < sum(x.size for x in _leaves(before.variables))
    out = [x for x in _leaves(mine.variables) if x.ndim == 4 and x.shape[-1] == 1]  # conv_out kernel
    assert any(np.abs(x).max() > 0 for x in out)  # trained away from the zero (Euler-Maruyama) start


def test_projection_loss_decreases(score_dir):
    config = _projection_config(score_dir)
    score = projection.restore_score(config)
    model = builders.build_model(config)
    loss_fn = jax.jit(projection.build_loss(config, model, score))
    batch = {"image": data.take(builders.build_source(config), np.arange(32))}
    key = jax.random.key(0)
    variables = builders.init_variables(model, score.restored.shape, jax.random.PRNGKey(1))
    tx = optax.adam(3e-3)
    opt = tx.init(variables)

    @jax.jit
    def step(variables, opt, k):
        grads = jax.grad(lambda v: loss_fn(v, batch, k)[0])(variables)
        updates, opt = tx.update(grads, opt, variables)
        return optax.apply_updates(variables, updates), opt

    start = float(loss_fn(variables, batch, key)[0])
    for i in range(40):
        variables, opt = step(variables, opt, jax.random.fold_in(key, i))
    assert float(loss_fn(variables, batch, key)[0]) < 0.9 * start


def test_eval_reports_the_projection_calls(projection_dir):
    workdir, config, _ = projection_dir
    config = config.copy_and_resolve_references()
    config.eval.update(settings="predict_project:4,ddim:4", metrics="pixel_fd", num_samples=8, name="pp",
                       floor=False, grid_images=4)
    report = eval_run.run(config, str(workdir), verbose=False)
    by_method = {s["method"]: s for s in report["settings"]}
    assert (by_method["predict_project"]["nfe"], by_method["predict_project"]["aux_nfe"]) == (2, 2)
    assert by_method["predict_project"]["total_nfe"] == 4
    assert (by_method["ddim"]["nfe"], by_method["ddim"]["aux_nfe"]) == (4, 0)
    net = report["description"]["projection_network"]
    assert net["num_steps"] == 2 and net["kappa"] == 1.0 and net["score_workdir"] == config.projection.score_workdir
    stored = json.loads((workdir / "eval" / "pp" / "run.json").read_text())
    assert stored["score_model"]["checkpoint_step"] == 2


def test_config_errors_name_the_bad_value(score_dir, tmp_path):
    missing = _projection_config(tmp_path / "nowhere")
    checks.validate(missing, 1)  # config-only checks pass; the path is checked when training starts
    with pytest.raises(FileNotFoundError, match="nowhere"):
        experiment.train(missing, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()
    other = _projection_config(score_dir)
    other.process.name = "vp_linear"
    with pytest.raises(ConfigError, match="config.process.name = 'vp_linear' differs from the score model's 'spd'"):
        projection.score_config(other)
    wrong_nfe = _projection_config(score_dir)
    wrong_nfe.sample.nfe = 10
    with pytest.raises(ConfigError, match="config.sample.nfe = 10 .*expected 4"):
        checks.validate(wrong_nfe, 1)


def test_benchmark_counts_calls_and_the_trained_projection_changes_samples(score_dir, projection_dir, tmp_path):
    workdir, config, _ = projection_dir
    claim = importlib.import_module("benchmarks.projection_claim")
    score_cfg = tiny("digits_spd", num_steps=2)
    rows = claim.compare(score_cfg, score_dir, {2: (config, workdir)}, totals=[4], num_samples=8,
                         metrics=["pixel_fd"], out_dir=tmp_path / "claim", batch=8, log=lambda *_: None)
    by = {r["variant"]: r for r in rows}
    assert (by["pp_trained_k1"]["nfe"], by["pp_trained_k1"]["aux_nfe"]) == (2, 2)
    assert (by["pp_tweedie_k0.5"]["nfe"], by["pp_tweedie_k0.5"]["aux_nfe"]) == (4, 0)
    assert (by["em"]["nfe"], by["em"]["aux_nfe"], by["em"]["steps"]) == (4, 0, 4)
    samples = {}
    for label in ("pp_trained_k1", "pp_trained_k0.5"):
        stored = np.load(tmp_path / "claim" / "seed0" / "settings" / f"{label}_nfe4" / "samples_00000.npz")
        samples[label] = stored["images"].astype(int)
    assert np.abs(samples["pp_trained_k1"] - samples["pp_trained_k0.5"]).max() > 0  # kappa T_theta acts
    assert "| 4 | pp_trained_k1 | 2 | 1.0 | 2 + 2 |" in claim.markdown(rows, ["pixel_fd"])


def test_toy_projection_trains_an_mlp_and_is_scored_on_the_true_mixture(tmp_path):
    """The point-cloud path: an MLP T_theta against the toy's plain MLP score model, every variant
    scored by on-mode fraction and NLL; the call counts are the library's and T_theta acts."""
    claim = importlib.import_module("benchmarks.projection_claim")
    score_dir, proj_dir = tmp_path / "toy_plain", tmp_path / "toy_proj2"
    score_cfg = claim.score_config(score_dir, True, "mixture2d")
    score_cfg.train.update(num_steps=3, checkpoint_every=3)
    claim.ensure_trained(score_cfg, score_dir, log=lambda *_: None)
    config = claim.projection_config(proj_dir, score_dir, 2, True, 0, "mixture2d")
    config.train.update(num_steps=3, checkpoint_every=3)
    assert config.model.kind == "mlp"
    claim.ensure_trained(config, proj_dir, log=lambda *_: None)
    rows = claim.compare_points(score_cfg, score_dir, {2: (config, proj_dir)}, totals=[4], num_samples=64,
                                log=lambda *_: None)
    by = {r["variant"]: r for r in rows}
    assert (by["pp_trained_k1"]["nfe"], by["pp_trained_k1"]["aux_nfe"]) == (2, 2)
    assert (by["em"]["nfe"], by["em"]["aux_nfe"]) == (4, 0)
    assert by["true samples (test split)"]["on_mode"] > 0.95
    assert by["pp_trained_k1"]["nll"] != by["pp_trained_k0.5"]["nll"]  # kappa scales a non-zero T_theta
    assert all(0.0 <= r["on_mode"] <= 1.0 and np.isfinite(r["nll"]) for r in rows)
    assert "| 4 | pp_trained_k1 | 2 | 1.0 | 2 + 2 |" in claim.markdown(rows, ["on_mode", "nll"], "mixture2d")
