"""Tuning by autodiff on the exact law (docs/math.md §0 "Grids", §7.1): the differentiable KL
equals the implementation's law, its gradient matches finite differences, tuning beats the
default on a fresh spectrum with a monotone grid, and the saved JSON loads back into sample()."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spd_jax.diffusion import analytic, grids, processes, samplers, spectrum, tune

HW = (8, 8, 1)
RNG = np.random.default_rng(11)


def _fresh_spectrum():
    """A random even DFT spectrum: a power law with random exponent times log-normal noise."""
    base = spectrum.power_law(HW, c1=1.0, c2=0.3, m=float(RNG.uniform(1.0, 2.5)))
    noise = np.exp(0.5 * RNG.normal(size=HW))
    from spd_jax.diffusion import bases

    return base * np.sqrt(noise * bases.mirror(noise))


SPECTRUM = _fresh_spectrum()
SPD = processes.spd(SPECTRUM)


@pytest.mark.parametrize("method,process", [("dpm_solver_pp", "spd"), ("gradient_estimation", "spd"),
                                            ("ddim", "vp_cosine"), ("ancestral", "spd")])
def test_exact_kl_matches_the_law_and_its_gradient_matches_finite_differences(method, process):
    proc = SPD if process == "spd" else processes.make(process)
    knobs = dict(samplers.KNOBS[method]) | ({"eta": 0.3} if method == "ddim" else {})
    run = samplers.plan(proc, method=method, num_steps=5, grid="log_linear", **knobs)
    law = analytic.sampler_law(proc, SPECTRUM, method=method, num_steps=5, grid=run.grid, basis="dft", **knobs)
    expected = analytic.gaussian_kl(law.mean, law.var, SPECTRUM)
    weight = tune.TUNABLE[method]
    w0 = np.full(5, float(knobs[weight]) if weight else 0.0) + np.linspace(0, 0.2, 5)
    with jax.enable_x64(True):
        fn = jax.jit(tune.ExactKL(proc, SPECTRUM, method, 5, t_max=run.grid[0], knobs=knobs))
        levels = jnp.asarray(np.log(grids.reference_level(proc, run.grid[1:-1])))
        base_w = jnp.asarray(np.full(5, float(knobs[weight]) if weight else 0.0))
        assert float(fn(levels, base_w)) == pytest.approx(expected, rel=1e-9)
        w = jnp.asarray(w0)
        g_levels, g_w = jax.grad(fn, argnums=(0, 1))(levels, w)
        step = 1e-6
        for i in range(levels.shape[0]):
            e = jnp.zeros_like(levels).at[i].set(step)
            fd = (fn(levels + e, w) - fn(levels - e, w)) / (2 * step)
            assert float(g_levels[i]) == pytest.approx(float(fd), rel=1e-4, abs=1e-7)
        for i in range(5):
            e = jnp.zeros_like(w).at[i].set(step)
            fd = (fn(levels, w + e) - fn(levels, w - e)) / (2 * step)
            assert float(g_w[i]) == pytest.approx(float(fd), rel=1e-4, abs=1e-7)
        assert float(jnp.max(jnp.abs(g_levels))) > 0


def test_tuning_beats_the_default_on_a_fresh_spectrum_with_a_monotone_grid(tmp_path):
    result = tune.tune(SPD, SPECTRUM, method="dpm_solver_pp", nfe=5, iterations=60)
    assert result.kl < 0.5 * result.kl_default
    assert result.grid[0] == pytest.approx(grids.T_MAX) and result.grid[-1] == 0.0
    assert np.all(np.diff(result.grid) < 0) and np.all((result.grid >= 0) & (result.grid <= 1))
    assert np.isfinite(result.kl_perturbed) and result.kl_perturbed >= result.kl * (1 - 1e-9)
    # the record loads back by name and drives sample() and the exact law to the recorded KL
    tune.save(result, tmp_path / grids.TUNED_DIR / "spd_dpm5.json", spectrum_source="test")
    loaded = grids.load_tuned("spd_dpm5", workdir=str(tmp_path))
    assert loaded.method == "dpm_solver_pp" and loaded.num_steps == 5
    law = analytic.sampler_law(SPD, SPECTRUM, method=loaded.method, num_steps=loaded.num_steps, grid=loaded.grid,
                               **loaded.knobs)
    assert analytic.gaussian_kl(law.mean, law.var, SPECTRUM) == pytest.approx(result.kl, rel=1e-9)
    den = analytic.gaussian_denoiser(SPD, SPECTRUM)
    x, info = samplers.sample(den, SPD, method=loaded.method, num_steps=loaded.num_steps, grid=loaded.grid,
                              key=jax.random.PRNGKey(0), shape=(2,) + HW, clip_x0=False, **loaded.knobs)
    assert np.all(np.isfinite(np.asarray(x))) and info["nfe"] == 5
    np.testing.assert_array_equal(info["grid"], loaded.grid)


def test_gamma_tuning_improves_ge():
    result = tune.tune(SPD, SPECTRUM, method="gradient_estimation", nfe=4, iterations=40, objective="nominal")
    assert result.kl < result.kl_default
    assert len(result.knobs["gamma"]) == 4


def test_a_warm_start_from_fewer_steps_keeps_the_tuned_kl_falling_with_nfe():
    """Tuning 8 NFE from the 4-NFE optimum (its levels and gammas resampled) ends below the 4-NFE KL."""
    four = tune.tune(SPD, SPECTRUM, method="gradient_estimation", nfe=4, iterations=40)
    eight = tune.tune(SPD, SPECTRUM, method="gradient_estimation", nfe=8, iterations=20, start=four)
    assert eight.kl < four.kl < four.kl_default
    assert len(eight.knobs["gamma"]) == 8 and np.all(np.diff(eight.grid) < 0)
    levels, gammas = tune._resample(four, 8, SPD, 0.0, -10.0, "gamma", np.full(8, 2.0))
    assert np.all(np.diff(levels) < 0) and levels.shape == (7,)
    np.testing.assert_allclose(gammas[::2], four.knobs["gamma"], rtol=0.5)  # step 2i sits inside old step i
    with pytest.raises(ValueError, match="warm start must come from a tuning of 'dpm_solver_pp'"):
        tune.tune(SPD, SPECTRUM, method="dpm_solver_pp", nfe=8, start=four)


def test_refusals():
    with pytest.raises(ValueError, match="discrete"):
        tune.tune(processes.vp_linear(num_steps=100), SPECTRUM, method="ddim", nfe=4)
    with pytest.raises(ValueError, match="tuning supports"):
        tune.tune(SPD, SPECTRUM, method="heun", nfe=4)
    with pytest.raises(ValueError, match="objective"):
        tune.tune(SPD, SPECTRUM, method="ddim", nfe=4, objective="fast")
    with pytest.raises(FileNotFoundError, match="spd_jax.run.tune"):
        grids.load_tuned("nothing_here", workdir="/nonexistent")


def test_a_tuned_grid_is_saved_in_the_workdir_and_read_back_by_name_from_the_config(tmp_path):
    from spd_jax.run import builders
    from spd_jax.run import tune as tune_run
    from spd_jax.run.checks import ConfigError, validate
    from tests.test_train import tiny

    config = tiny("digits_spd")
    config.sample.update(method="gradient_estimation", nfe=3)
    record = tune_run.run(config, str(tmp_path), iterations=10)
    assert record["path"] == str(tmp_path / "tuned" / "gradient_estimation_nfe3.json")
    assert record["kl"] <= record["kl_default"]
    config.sample.grid = "tuned:gradient_estimation_nfe3"
    validate(config, device_count=1)
    settings = builders.sampler_settings(config, workdir=tmp_path)
    np.testing.assert_allclose(settings["grid"], record["grid"])
    assert settings["num_steps"] == 3 and np.shape(settings["gamma"]) == (3,)
    assert builders.sampler_settings(config, nfe=5, workdir=tmp_path)["grid"] is None  # other NFEs: default grid
    config.sample.options = {"mu": 0.25}  # other fixed knobs: a file of their own, the knob kept
    other = tune_run.run(config, str(tmp_path), iterations=3)
    assert other["path"] == str(tmp_path / "tuned" / "gradient_estimation_nfe3_mu0.25.json")
    assert other["knobs"]["mu"] == 0.25
    config.sample.options = {}
    warm = tune_run.run(config, str(tmp_path), nfe=5, iterations=5, start="gradient_estimation_nfe3")
    assert warm["kl"] < record["kl"]  # the 3-NFE optimum resampled onto 5 steps is already better
    with pytest.raises(ValueError, match="is a tuning of 'gradient_estimation'; expected one of 'ddim'"):
        tune_run.run(config, str(tmp_path), method="ddim", nfe=5, start="gradient_estimation_nfe3")
    config.sample.grid = "tuned:missing"
    with pytest.raises(ConfigError, match="config.sample.grid = 'tuned:missing'"):
        builders.sampler_settings(config, workdir=tmp_path)


# ---- tuning against a many-step teacher on a given denoiser ------------------------------------


@pytest.mark.parametrize("method,process", [("gradient_estimation", "spd"), ("dpm_solver_pp", "vp_cosine"),
                                            ("ddim", "spd")])
def test_differentiable_tables_equal_the_planned_ones(method, process):
    proc = SPD if process == "spd" else processes.make(process)
    run = samplers.plan(proc, method=method, num_steps=5)
    planned = samplers.device_tables(run)
    knobs, _ = samplers.resolve_knobs(method, samplers.DEFAULT_GRIDS[method], {})
    built = tune.grid_tables(proc, method, jnp.asarray(run.grid, jnp.float32), knobs)
    assert set(built) == set(planned)
    for name, table in planned.items():
        np.testing.assert_allclose(np.broadcast_to(built[name], table.shape), table, rtol=2e-4, atol=1e-6,
                                   err_msg=name)


def _teacher_problem(method, count=48):
    """Starting states and the exact Gaussian denoiser's 50-NFE ``method`` outputs from them."""
    denoiser = analytic.gaussian_denoiser(SPD, SPECTRUM)
    key = jax.random.key(3)
    x_T = SPD.prior_sample(key, (count,) + HW)
    steps = samplers.steps_for_nfe(method, 50)
    teacher, _ = samplers.sample(denoiser, SPD, method=method, num_steps=steps, key=key, x_T=x_T, clip_x0=False)
    return denoiser, np.asarray(x_T), np.asarray(teacher)


def test_teacher_tuning_brings_a_three_step_sampler_closer_to_its_teacher_on_held_out_states(tmp_path):
    denoiser, x_T, teacher = _teacher_problem("gradient_estimation")
    result = tune.tune_to_teacher(denoiser, SPD, x_T, teacher, method="gradient_estimation", nfe=3,
                                  clip_x0=False, iterations=40, batch=16, learning_rate=0.1)
    assert result.loss < 0.5 * result.loss_default  # held-out rows, never seen by the optimiser
    grid = result.grid
    assert grid[0] == pytest.approx(grids.T_MAX) and grid[-1] == 0.0
    assert np.all(np.diff(grid) < 0) and np.all((grid >= 0) & (grid <= 1))
    # the saved setting, sampled through the ordinary planned path, reproduces the reported loss
    tune.save(result, tmp_path / "tuned" / "ge3.json")
    loaded = grids.load_tuned("tuned:ge3", str(tmp_path))
    held = slice(result.num_train, None)
    x, info = samplers.sample(denoiser, SPD, method="gradient_estimation", num_steps=loaded.num_steps,
                              grid=loaded.grid, key=jax.random.key(0), x_T=x_T[held], clip_x0=False, **loaded.knobs)
    assert info["nfe"] == 3
    assert np.mean((np.asarray(x) - teacher[held]) ** 2) == pytest.approx(result.loss, rel=1e-3)
    assert loaded.record["objective"] == "teacher"


def test_teacher_tuning_never_returns_a_setting_worse_than_its_start():
    denoiser, x_T, teacher = _teacher_problem("dpm_solver_pp", count=16)
    start = tune.tune(SPD, SPECTRUM, method="dpm_solver_pp", nfe=4, iterations=20)
    # a learning rate far too large: every iterate is worse, so the start is kept
    result = tune.tune_to_teacher(denoiser, SPD, x_T, teacher, method="dpm_solver_pp", nfe=4, clip_x0=False,
                                  start=start, iterations=10, batch=8, learning_rate=5.0, check_every=5)
    assert result.loss <= result.loss_start
    if result.loss == result.loss_start:
        np.testing.assert_allclose(result.grid, start.grid, rtol=1e-5)


def test_teacher_tuning_refusals():
    denoiser, x_T, teacher = _teacher_problem("gradient_estimation", count=8)
    with pytest.raises(ValueError, match="deterministic samplers"):
        tune.tune_to_teacher(denoiser, SPD, x_T, teacher, method="ancestral", nfe=3, clip_x0=False)
    with pytest.raises(ValueError, match="one shape"):
        tune.tune_to_teacher(denoiser, SPD, x_T, teacher[:4], method="ddim", nfe=3, clip_x0=False)
    with pytest.raises(ValueError, match="held_out"):
        tune.tune_to_teacher(denoiser, SPD, x_T, teacher, method="ddim", nfe=3, clip_x0=False, held_out=1.0)
    with pytest.raises(ValueError, match="adds noise"):
        tune.tune_to_teacher(denoiser, SPD, x_T, teacher, method="gradient_estimation", nfe=3, clip_x0=False,
                             start=grids.TunedGrid("gradient_estimation", 3, np.array([0.999, 0.1, 0.01, 0.0]),
                                                   {"mu": 0.5}, {}))


def test_teacher_objective_tunes_on_the_runs_checkpoint_and_is_read_back_by_name(tmp_path):
    from spd_jax.run import builders
    from spd_jax.run import train as experiment
    from spd_jax.run import tune as tune_run
    from tests.test_train import tiny

    config = tiny("digits_spd", num_steps=2)
    config.sample.update(method="gradient_estimation", nfe=3)
    config.tune.update(objective="teacher", teacher="gradient_estimation:8", num_examples=16, batch_size=8)
    with pytest.raises(FileNotFoundError, match="train first"):
        tune_run.run(config, str(tmp_path), iterations=2)
    experiment.train(config, str(tmp_path))
    record = tune_run.run(config, str(tmp_path), iterations=4)
    assert record["path"] == str(tmp_path / "tuned" / "gradient_estimation_nfe3_teacher.json")
    assert record["teacher"] == "gradient_estimation:8" and record["checkpoint_step"] == 2
    assert record["loss"] <= record["loss_start"] and record["num_held_out"] == 4
    assert "matched to gradient_estimation:8" in tune_run.summary(record)
    config.sample.grid = "tuned:gradient_estimation_nfe3_teacher"
    settings = builders.sampler_settings(config, workdir=tmp_path)
    np.testing.assert_allclose(settings["grid"], record["grid"])
    config.tune.teacher = "ancestral:20"
    with pytest.raises(ValueError, match="must be deterministic"):
        tune_run.run(config, str(tmp_path), iterations=2)
    config.tune.teacher = "fast"
    with pytest.raises(ValueError, match="expected 'sampler:NFE'"):
        tune_run.run(config, str(tmp_path), iterations=2)


def test_teacher_tuning_keeps_fixed_knobs_like_the_3m_order_and_its_loss_is_reproduced_by_sample():
    denoiser, x_T, teacher = _teacher_problem("dpm_solver_pp", count=16)
    result = tune.tune_to_teacher(denoiser, SPD, x_T, teacher, method="dpm_solver_pp", nfe=5, clip_x0=False,
                                  iterations=10, batch=8, check_every=5, order=3)
    assert result.knobs["order"] == 3 and len(result.knobs["time_shift"]) == 5
    held = slice(result.num_train, None)
    x, _ = samplers.sample(denoiser, SPD, method="dpm_solver_pp", num_steps=5, grid=result.grid, key=jax.random.key(0),
                           x_T=x_T[held], clip_x0=False, **result.knobs)
    assert np.mean((np.asarray(x) - teacher[held]) ** 2) == pytest.approx(result.loss, rel=1e-3)
    assert "extrap2" in samplers.plan(SPD, method="dpm_solver_pp", num_steps=5, **result.knobs).tables
