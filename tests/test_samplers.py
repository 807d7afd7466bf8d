"""Samplers (docs/math.md §6): exactness on one-point data, sampler identities, per-example randomness,
NFE counts, the exact Gaussian law of the implementation, and input validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spd_jax.diffusion import analytic, bases, grids, processes, samplers, spectrum
from spd_jax.diffusion.parameterization import Prediction
from spd_jax.diffusion.rng import per_example_normal

SHAPE = (3, 4, 4, 1)
KEY = jax.random.PRNGKey(7)
SPECTRUM_DFT = spectrum.power_law(SHAPE[1:], c1=1.0, c2=0.5, m=1.5)
SPECTRUM_DCT = spectrum.power_law(SHAPE[1:], c1=1.0, c2=0.5, m=1.5, basis="dct")
POINT = np.linspace(-0.9, 0.8, 16).reshape(1, 4, 4, 1)

PROCESSES = {
    "vp_cosine": processes.vp_cosine(),
    "spd": processes.spd(SPECTRUM_DFT),
    "blurring": processes.blurring(SHAPE[1:]),
}
# one denoiser object per (process, data set): compiled samplers are cached per denoiser
ONE_POINT = {name: analytic.finite_set_denoiser(p, POINT) for name, p in PROCESSES.items()}
SPD = PROCESSES["spd"]
SPD_GAUSS = analytic.gaussian_denoiser(SPD, SPECTRUM_DFT)

DETERMINISTIC = [
    ("ddim", {"eta": 0.0}),
    ("gradient_estimation", {"gamma": 2.0, "mu": 0.0}),
    ("heun", {}),
    ("ddm_bridge", {"stochastic": False}),
]
X_T = np.asarray(jax.random.normal(jax.random.PRNGKey(1), SHAPE))


def _run(denoiser, process, method, num_steps=4, x_T=X_T, **knobs):
    return samplers.sample(
        denoiser, process, method=method, num_steps=num_steps, key=KEY, x_T=x_T, clip_x0=False, **knobs
    )


@pytest.mark.parametrize("name", ["vp_cosine", "blurring"])  # SPD: see the exact-law test below
@pytest.mark.parametrize("method,knobs", DETERMINISTIC)
def test_one_point_data_set_makes_deterministic_samplers_exact(name, method, knobs):
    if name == "blurring" and method == "gradient_estimation":
        # GE's extrapolation multiplies a perturbation of u by about alpha_s/alpha_t per step (up
        # to ~600 at blurring's high frequencies), so float32 round-off grows to ~1e-2 here; the
        # float64 law below shows the update itself is exact.
        knobs = {"gamma": 1.0, "mu": 0.0}
    x, _ = _run(ONE_POINT[name], PROCESSES[name], method, **knobs)
    np.testing.assert_allclose(np.asarray(x), np.broadcast_to(POINT, SHAPE), atol=2e-4)


@pytest.mark.parametrize("name", list(PROCESSES))
@pytest.mark.parametrize("method,knobs", DETERMINISTIC + [("ancestral", {}), ("ddm_bridge", {})])
def test_one_point_law_is_exact_in_float64(name, method, knobs):
    """A data set {x0} is the Gaussian testbed with S -> 0: every sampler ends exactly at x0."""
    proc = PROCESSES[name]
    basis = "identity" if proc.is_scalar else proc.basis
    law = analytic.sampler_law(proc, np.full(SHAPE[1:], 1e-20), mean=POINT[0], basis=basis, method=method,
                               num_steps=4, **knobs)
    np.testing.assert_allclose(bases.from_spectral_np(law.mean[None], basis)[0], POINT[0], atol=1e-12)
    assert np.max(law.var) < 1e-12


def test_ge_with_gamma_one_mu_zero_is_ddim():
    ge, _ = _run(SPD_GAUSS, SPD, "gradient_estimation", gamma=1.0, mu=0.0, grid="log_linear")
    ddim, _ = _run(SPD_GAUSS, SPD, "ddim", eta=0.0, grid="log_linear")
    np.testing.assert_allclose(np.asarray(ge), np.asarray(ddim), rtol=1e-5, atol=1e-5)
    ge2, _ = _run(SPD_GAUSS, SPD, "gradient_estimation", gamma=2.0, mu=0.0, grid="log_linear")
    assert np.max(np.abs(np.asarray(ge2) - np.asarray(ddim))) > 1e-3  # gamma matters


def test_ge_with_mu_half_is_ancestral_sample_by_sample():
    ge, _ = _run(SPD_GAUSS, SPD, "gradient_estimation", gamma=1.0, mu=0.5, grid="log_linear")
    anc, _ = _run(SPD_GAUSS, SPD, "ancestral", grid="log_linear")
    np.testing.assert_allclose(np.asarray(ge), np.asarray(anc), rtol=1e-4, atol=1e-4)


def test_ddim_eta_one_is_ancestral_and_eta_zero_is_not():
    anc, _ = _run(SPD_GAUSS, SPD, "ancestral")
    ddim1, _ = _run(SPD_GAUSS, SPD, "ddim", eta=1.0)
    ddim0, _ = _run(SPD_GAUSS, SPD, "ddim", eta=0.0)
    np.testing.assert_allclose(np.asarray(ddim1), np.asarray(anc), rtol=1e-5, atol=1e-5)
    assert np.max(np.abs(np.asarray(ddim0) - np.asarray(anc))) > 1e-2


def _oracle(process):
    return analytic.finite_set_denoiser(process, POINT)


BRIDGE_ORACLE = {"ddm_constant": processes.ddm_constant(), "spd": SPD}
BRIDGE_DENOISERS = {name: _oracle(p) for name, p in BRIDGE_ORACLE.items()}


@settings(max_examples=8)
@given(
    cuts=st.lists(st.floats(0.01, 0.98), min_size=4, max_size=4, unique=True),
    name=st.sampled_from(sorted(BRIDGE_ORACLE)),
)
def test_stochastic_ddm_bridge_with_oracle_is_exact_on_any_grid_and_returns_x0(cuts, name):
    grid = np.concatenate([[0.999], np.sort(cuts)[::-1], [0.0]])
    if np.min(-np.diff(grid)) < 1e-3:
        return
    x, info = _run(BRIDGE_DENOISERS[name], BRIDGE_ORACLE[name], "ddm_bridge", num_steps=5, grid=grid)
    np.testing.assert_allclose(np.asarray(x), np.broadcast_to(POINT, SHAPE), atol=1e-5)
    np.testing.assert_array_equal(info["grid"], grid)


@pytest.mark.parametrize(
    "c_correction,clip,expected",
    [
        (False, False, lambda x0, c, e, t: x0 + t * c + np.sqrt(t) * e),  # ADM-Public: raw c
        (True, False, lambda x0, c, e, t: (1 - t) * x0 + np.sqrt(t) * e),  # c := -x0_hat
        (True, True, lambda x0, c, e, t: (1 - t) * np.clip(x0, -1, 1) + np.sqrt(t) * e),
    ],
)
def test_deterministic_ddm_bridge_follows_the_official_step(c_correction, clip, expected):
    """x_next = x0_hat + c_hat t_next + sqrt(t_next) eps_hat (docs/math.md §6.4) with inconsistent heads."""
    x0, c, e = 1.5, -0.3, 0.7

    def heads(x_t, t, *, key=None):
        return Prediction(x0 + 0 * x_t, e + 0 * x_t, c + 0 * x_t)

    with jax.disable_jit():
        x, _ = samplers.sample(heads, processes.ddm_constant(), method="ddm_bridge", num_steps=2,
                               grid=np.array([0.8, 0.4, 0.1]), key=KEY, shape=(1, 1, 1, 1), clip_x0=clip,
                               stochastic=False, c_correction=c_correction)
    assert float(x.ravel()[0]) == pytest.approx(expected(x0, c, e, 0.1), rel=1e-6)


def test_ddm_bridge_intermediate_states_have_the_forward_marginal():
    """The stochastic bridge keeps u_s = alpha_s x0 + sigma_s eps_s: check the law of one step."""
    proc = processes.ddm_constant()
    law = analytic.sampler_law(proc, np.full((4, 4, 1), 1e-12), method="ddm_bridge", num_steps=4,
                               grid=np.array([0.9, 0.6, 0.3, 0.1, 0.02]), start="exact")
    _, sigma = proc.marginal64(np.array([0.02]))
    np.testing.assert_allclose(law.var, sigma[0] ** 2 * np.ones((4, 4, 1)), rtol=1e-6)


@pytest.mark.parametrize("method", ["ancestral", "ddim", "gradient_estimation", "ddm_bridge", "heun",
                                    "predict_project", "smd"])
def test_exact_law_reproduces_the_implementation_sample_by_sample(method):
    """sampler_law's affine form, fed the actual noises, gives the JAX samples (SPD, DFT basis)."""
    knobs = {"ddim": {"eta": 0.5}, "gradient_estimation": {"gamma": 1.7, "mu": 0.3}}.get(method, {})
    x, _ = _run(SPD_GAUSS, SPD, method, **knobs)
    law = analytic.sampler_law(SPD, SPECTRUM_DFT, method=method, num_steps=4, start=(0.0, 1.0), **knobs)
    u_out = law.mean + law.gains["start"] * bases.to_spectral_np(X_T, "dft")
    for j in range(4):
        if j in law.gains:
            z = np.asarray(per_example_normal(KEY, SHAPE, step=j))
            u_out = u_out + law.gains[j] * bases.to_spectral_np(z, "dft")
    expected = bases.from_spectral_np(u_out, "dft")
    np.testing.assert_allclose(np.asarray(x), expected, rtol=2e-4, atol=2e-4 * np.abs(expected).max())


def test_predict_project_with_a_zero_projection_is_kappa_zero():
    def zero_projection(x, t):
        return jnp.zeros_like(x)

    x, info = _run(SPD_GAUSS, SPD, "predict_project", projection=zero_projection)
    law = analytic.sampler_law(SPD, SPECTRUM_DFT, method="predict_project", num_steps=4, start=(0.0, 1.0),
                               kappa=0.0)
    u_out = law.gains["start"] * bases.to_spectral_np(X_T, "dft")
    for j in range(4):
        z = np.asarray(per_example_normal(KEY, SHAPE, step=j))
        u_out = u_out + law.gains[j] * bases.to_spectral_np(z, "dft")
    np.testing.assert_allclose(np.asarray(x), bases.from_spectral_np(u_out, "dft"), rtol=1e-4, atol=1e-4)
    assert (info["nfe"], info["aux_nfe"]) == (4, 4)


def _key_denoiser(x_t, t, *, key=None):
    """A stochastic 'SMD' denoiser: the Gaussian denoiser plus a latent drawn from per-example keys."""
    pred = SPD_GAUSS(x_t, t)
    latent = jax.vmap(lambda k: jax.random.normal(k, x_t.shape[1:]))(key)
    return Prediction(pred.x0 + 0.1 * latent, pred.eps)


def test_batch_split_gives_bitwise_identical_samples():
    """Prior, step noise and SMD latents depend only on (key, global index): chunks match bitwise."""
    shape = (4,) + SHAPE[1:]
    full, _ = samplers.sample(_key_denoiser, SPD, method="smd", num_steps=3, key=KEY, shape=shape,
                              clip_x0=False)
    parts = [
        samplers.sample(_key_denoiser, SPD, method="smd", num_steps=3, key=KEY, shape=(2,) + SHAPE[1:],
                        index=np.array(idx), clip_x0=False)[0]
        for idx in ([2, 3], [0, 1])
    ]
    np.testing.assert_array_equal(np.asarray(full), np.concatenate([parts[1], parts[0]]))
    assert len({np.asarray(full)[i].tobytes() for i in range(4)}) == 4


def test_smd_latent_changes_samples():
    smd, info = _run(_key_denoiser, SPD, "smd")
    anc, _ = _run(SPD_GAUSS, SPD, "ancestral")
    assert np.max(np.abs(np.asarray(smd) - np.asarray(anc))) > 1e-2
    assert (info["nfe"], info["aux_nfe"]) == (4, 4)


def test_sample_works_inside_an_outer_jit():
    """Callers may jit a function that builds a denoiser and samples (key and index traced)."""
    def draw(key, index):
        return samplers.sample(SPD_GAUSS, SPD, method="ancestral", num_steps=4, key=key, x_T=X_T, index=index,
                               clip_x0=False)[0]

    np.testing.assert_allclose(np.asarray(jax.jit(draw)(KEY, jnp.arange(3))),
                               np.asarray(_run(SPD_GAUSS, SPD, "ancestral")[0]), rtol=1e-5, atol=1e-5)


def test_jit_and_eager_agree():
    jitted, _ = _run(SPD_GAUSS, SPD, "gradient_estimation", gamma=2.0)
    with jax.disable_jit():
        eager, _ = _run(SPD_GAUSS, SPD, "gradient_estimation", gamma=2.0)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "method,knobs,expected",
    [
        ("ancestral", {}, (3, 0)),
        ("ddim", {}, (3, 0)),
        ("gradient_estimation", {}, (3, 0)),
        ("ddm_bridge", {}, (3, 0)),
        ("heun", {}, (5, 0)),
        ("predict_project", {}, (6, 0)),
        ("predict_project", {"kappa": 0.0}, (3, 0)),  # Euler-Maruyama: the surrogate is not evaluated
        ("smd", {}, (3, 3)),
        ("ddim", {"grid": "ddm_public"}, (4, 0)),
        ("heun", {"grid": np.array([0.9, 0.5, 0.2, 0.05])}, (6, 0)),
    ],
)
def test_nfe_counts_are_the_real_number_of_calls(method, knobs, expected):
    calls = {"nfe": 0, "aux": 0}
    proc = processes.vp_linear()
    base = analytic.gaussian_denoiser(proc, np.full((2, 2, 1), 0.5))

    def counting(x_t, t, *, key=None):
        calls["nfe"] += 1
        calls["aux"] += key is not None
        return base(x_t, t)

    with jax.disable_jit():
        _, info = samplers.sample(counting, proc, method=method, num_steps=3, key=KEY, shape=(1, 2, 2, 1),
                                  clip_x0=False, **knobs)
    assert (info["nfe"], info["aux_nfe"]) == expected
    assert (calls["nfe"], calls["aux"]) == expected


def test_steps_for_nfe_picks_the_largest_affordable_n():
    assert samplers.steps_for_nfe("ddim", 10) == 10
    assert samplers.steps_for_nfe("heun", 10) == 5  # 2N - 1 = 9
    assert samplers.steps_for_nfe("heun", 5) == 3
    assert samplers.steps_for_nfe("predict_project", 10) == 5
    assert samplers.steps_for_nfe("ddm_bridge", 10, grid="ddm_public") == 9
    assert samplers.steps_for_nfe("heun", 10, grid="ge_discrete") == 5  # 2N, no final Euler
    with pytest.raises(ValueError, match="at least 2"):
        samplers.steps_for_nfe("predict_project", 1)


def test_clipping_keeps_x0_in_range_and_is_explicit():
    proc = processes.vp_linear()

    def wild(x_t, t, *, key=None):
        return Prediction(3.0 + 0 * x_t, jnp.zeros_like(x_t))

    x, _ = samplers.sample(wild, proc, method="ddim", num_steps=3, key=KEY, shape=(2, 2, 2, 1), clip_x0=True)
    np.testing.assert_allclose(np.asarray(x), 1.0, atol=1e-6)
    with pytest.raises(TypeError):
        samplers.sample(wild, proc, method="ddim", num_steps=3, key=KEY, shape=(2, 2, 2, 1))


def test_analytic_kl_falls_towards_zero_with_nfe():
    proc = processes.vp_linear()
    kls = [
        analytic.gaussian_kl(*analytic.sampler_law(proc, SPECTRUM_DFT, method="ancestral", num_steps=n,
                                                   basis="dft")[:2], SPECTRUM_DFT)
        for n in (5, 20, 100, 400)
    ]
    assert np.all(np.diff(kls) < 0)
    assert kls[-1] < 0.02 * kls[0] and kls[-1] < 1e-2


@pytest.mark.parametrize("method", ["ddim", "heun", "gradient_estimation"])
def test_deterministic_kl_converges_on_every_spectral_process(method):
    for proc, spec in ((SPD, SPECTRUM_DFT), (PROCESSES["blurring"], SPECTRUM_DCT)):
        kl = analytic.gaussian_kl(*analytic.sampler_law(proc, spec, method=method, num_steps=400)[:2], spec)
        assert kl < 0.05, (proc.name, kl)


# ---- refusals and bad input --------------------------------------------------------------------


def test_refuses_ihdm_and_ddm_linear():
    with pytest.raises(ValueError, match="data-dependent prior"):
        samplers.sample(SPD_GAUSS, processes.ihdm(SHAPE[1:]), method="ddim", num_steps=2, key=KEY,
                        shape=SHAPE, clip_x0=False)
    with pytest.raises(ValueError, match="ddm_linear"):
        samplers.sample(SPD_GAUSS, processes.ddm_linear(), method="ddim", num_steps=2, key=KEY,
                        shape=SHAPE, clip_x0=False)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"method": "ddmi"}, "did you mean 'ddim'"),
        ({"num_steps": 0}, "num_steps"),
        ({"num_steps": 2.5}, "num_steps"),
        ({"etaa": 0.5}, "did you mean 'eta'"),
        ({"eta": 1.5}, "eta"),
        ({"x_T": np.zeros((3, 8, 8, 1)), "shape": None}, "spectral grid"),
        ({"x_T": np.zeros((2, 4, 4, 1))}, "shape"),
        ({"index": np.arange(5)}, "index"),
        ({"grid": "log_lineer"}, "did you mean 'log_linear'"),
        ({"grid": np.array([0.9, 0.95, 0.0])}, "decrease"),
        ({"grid": np.array([0.9, 0.5, 0.0])}, "num_steps"),
        ({"clip_x0": 1}, "clip_x0"),
    ],
)
def test_bad_input_raises_before_compiling(kwargs, match):
    args = {"method": "ddim", "num_steps": 3, "key": KEY, "shape": SHAPE, "clip_x0": False} | kwargs
    if args.get("shape") is None:
        args.pop("shape")

    def never(x_t, t, *, key=None):
        raise AssertionError("the denoiser must not be traced")

    with pytest.raises(ValueError, match=match):
        samplers.sample(never, SPD, **args)


def test_refuses_meaningless_pairs():
    with pytest.raises(ValueError, match="discrete"):
        samplers.plan(processes.vp_linear(num_steps=100), method="predict_project", num_steps=4)
    with pytest.raises(ValueError, match="not finite"):  # alpha_1 = 0: VE levels undefined
        samplers.plan(processes.ddm_constant(), method="heun", num_steps=4, grid="uniform_t", t_max=1.0)
    with pytest.raises(ValueError, match="ge_discrete"):
        samplers.plan(processes.vp_linear(), method="gradient_estimation", num_steps=4, grid="ge_discrete")


def test_every_process_method_pair_of_the_matrix_runs():
    """Plans (tables and NFE) exist for every Gaussian-prior process x method and are finite."""
    procs = [processes.vp_linear(), processes.vp_cosine(), processes.blurring((4, 4, 1)), SPD,
             processes.ddm_constant(), processes.rectified_flow(), processes.vp_linear(num_steps=50)]
    for proc in procs:
        for method in samplers.METHODS:
            if method == "predict_project" and proc.num_levels is not None:
                continue
            run = samplers.plan(proc, method=method, num_steps=5)
            assert run.grid[0] == pytest.approx(grids.T_MAX, abs=0.02) and run.grid[-1] == 0.0
            assert all(np.all(np.isfinite(np.asarray(v, float))) for v in run.tables.values())


def _scaled_gaussian(variables, x_t, t, *, key=None):
    """The exact Gaussian denoiser of SPD with its x0 estimate scaled by a traced parameter."""
    pred = SPD_GAUSS(x_t, t)
    return Prediction(variables["scale"] * pred.x0, pred.eps)


def test_parameters_passed_as_variables_share_one_compilation():
    before = samplers._run_jit._cache_size()
    outs = []
    for scale in (1.0, 0.5, 0.25):
        x, _ = samplers.sample(_scaled_gaussian, SPD, method="ddim", num_steps=3, key=jax.random.key(0),
                               clip_x0=False, shape=SHAPE, variables={"scale": jnp.float32(scale)})
        outs.append(np.asarray(x))
    assert samplers._run_jit._cache_size() == before + 1  # one program for three parameter values
    assert not np.allclose(outs[0], outs[1]) and not np.allclose(outs[1], outs[2])
    same, _ = samplers.sample(SPD_GAUSS, SPD, method="ddim", num_steps=3, key=jax.random.key(0), clip_x0=False,
                              shape=SHAPE)
    np.testing.assert_allclose(outs[0], np.asarray(same), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", samplers.METHODS)
def test_padded_scans_give_the_unpadded_samples_and_one_program_serves_every_step_count(method):
    """A scan padded to 6 steps (inactive steps first) reproduces the 2-, 3- and 5-step samplers,
    and the three step counts share one compiled program."""
    run = dict(method=method, key=jax.random.key(4), clip_x0=False, shape=SHAPE)
    before = samplers._run_jit._cache_size()
    padded = {n: np.asarray(samplers.sample(SPD_GAUSS, SPD, num_steps=n, pad_to=6, **run)[0]) for n in (2, 3, 5)}
    assert samplers._run_jit._cache_size() == before + 1
    for n, x in padded.items():
        plain, info = samplers.sample(SPD_GAUSS, SPD, num_steps=n, **run)
        np.testing.assert_allclose(x, np.asarray(plain), rtol=1e-5, atol=1e-5)
    assert not np.allclose(padded[2], padded[5], atol=1e-3)
    with pytest.raises(ValueError, match="pad_to must be an integer >= the plan's 5 steps; got 4"):
        samplers.sample(SPD_GAUSS, SPD, num_steps=5, pad_to=4, **run)


@pytest.mark.parametrize("method", ["gradient_estimation", "dpm_solver_pp", "ddim"])
def test_a_time_shift_changes_only_the_time_the_network_sees(method):
    shift = 0.3
    plain = samplers.plan(SPD, method=method, num_steps=4)
    shifted = samplers.plan(SPD, method=method, num_steps=4, time_shift=[shift, -shift, shift, 0.0])
    np.testing.assert_allclose(shifted.tables["t_cur"],
                               np.minimum(plain.grid[:-1] * np.exp([shift, -shift, shift, 0.0]), 1.0))
    for name, table in plain.tables.items():
        if name != "t_cur":
            np.testing.assert_array_equal(shifted.tables[name], table, err_msg=name)
    zero = samplers.plan(SPD, method=method, num_steps=4, time_shift=0.0)
    np.testing.assert_array_equal(zero.tables["t_cur"], plain.grid[:-1])
    # sampling with a shift = sampling with a denoiser told the shifted time
    told = jax.jit(lambda x, t, key=None: SPD_GAUSS(x, jnp.minimum(t * np.exp(shift), 1.0)))
    x_shift, _ = samplers.sample(SPD_GAUSS, SPD, method=method, num_steps=4, key=KEY, x_T=X_T, clip_x0=False,
                                 time_shift=shift)
    x_told, _ = samplers.sample(told, SPD, method=method, num_steps=4, key=KEY, x_T=X_T, clip_x0=False)
    x_plain, _ = samplers.sample(SPD_GAUSS, SPD, method=method, num_steps=4, key=KEY, x_T=X_T, clip_x0=False)
    np.testing.assert_allclose(x_shift, x_told, rtol=1e-5, atol=1e-5)
    assert np.max(np.abs(np.asarray(x_shift) - np.asarray(x_plain))) > 1e-3
    with pytest.raises(ValueError, match="time_shift"):
        analytic.sampler_law(SPD, SPECTRUM_DFT, method=method, num_steps=4, time_shift=shift)
