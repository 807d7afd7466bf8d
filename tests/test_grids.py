"""Time grids (docs/math.md §0 "Grids", §6.3, §6.8): monotone, hitting their endpoints, and reproducing the
published GE, EDM, SPD and ADM grids."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from spd_jax.diffusion import grids, processes, spectrum

SPECTRUM = spectrum.power_law((4, 4, 1), c1=1.0, c2=0.5, m=1.5)
PROCESSES = {
    "vp_linear": processes.vp_linear(),
    "vp_cosine": processes.vp_cosine(),
    "blurring": processes.blurring((4, 4, 1)),
    "spd": processes.spd(SPECTRUM),
    "ddm_constant": processes.ddm_constant(),
    "rectified_flow": processes.rectified_flow(),
}


@given(
    name=st.sampled_from(sorted(PROCESSES)),
    grid=st.sampled_from(["uniform_t", "uniform_tau", "log_linear", "karras", "adm", "ddm_public"]),
    num_steps=st.integers(1, 30),
    t_max=st.floats(0.55, 0.999),
)
def test_grids_decrease_strictly_from_t_max_to_zero(name, grid, num_steps, t_max):
    levels = grids.make(grid, PROCESSES[name], num_steps, t_max=t_max)
    assert levels.size == grids.num_grid_steps(grid, num_steps) + 1
    assert levels[0] == pytest.approx(t_max, abs=1e-9)
    assert levels[-1] == 0.0
    assert np.all(np.diff(levels) < 0)


@pytest.mark.parametrize("name", ["vp_linear", "spd", "blurring"])
def test_log_linear_grid_is_geometric_in_the_reference_level(name):
    proc = PROCESSES[name]
    levels = grids.log_linear(proc, 12)
    ref = grids.reference_level(proc, levels[:-1])
    np.testing.assert_allclose(np.diff(np.log(ref)), np.log(ref[1] / ref[0]), rtol=1e-7)
    top, floor = grids.reference_level(proc, [grids.T_MAX, 0.0])  # blurring's floor: sigma_0 = 0.0067
    np.testing.assert_allclose(ref[[0, -1]], [top, max(grids.SIGMA_END, floor)], rtol=1e-9)


@pytest.mark.parametrize("grid", ["log_linear", "karras"])
def test_level_grids_end_at_the_same_reference_level_for_every_process(grid):
    """docs/math.md §0 "Grids": the clean end is one process-independent reference level, not a t."""
    for name, proc in PROCESSES.items():
        floor = grids.reference_level(proc, [0.0])[0]  # blurring never reaches zero noise
        levels = grids.make(grid, proc, 8)
        end = grids.reference_level(proc, levels[-2:-1])[0]
        assert end == pytest.approx(max(grids.SIGMA_END, floor), rel=1e-9), name
        levels = grids.make(grid, proc, 8, sigma_end=0.05)
        assert grids.reference_level(proc, levels[-2:-1])[0] == pytest.approx(0.05, rel=1e-9), name
    # an explicit t_end still overrides the level; discrete processes end at their first level or above
    levels = grids.make(grid, PROCESSES["vp_linear"], 8, t_end=1e-3)
    assert levels[-2] == pytest.approx(1e-3, rel=1e-9)
    disc = processes.vp_linear(num_steps=1000)
    levels = grids.make(grid, disc, 8)
    assert grids.reference_level(disc, levels[-2:-1])[0] >= grids.SIGMA_END


def test_reference_level_is_the_geometric_mean_of_sigma_over_alpha():
    t = np.array([0.2, 0.7])
    alpha, sigma = PROCESSES["vp_linear"].marginal64(t)
    np.testing.assert_allclose(grids.reference_level(PROCESSES["vp_linear"], t), (sigma / alpha).ravel())
    alpha, sigma = PROCESSES["spd"].marginal64(t)
    expected = np.exp(np.log(sigma / alpha).reshape(2, -1).mean(axis=1))
    np.testing.assert_allclose(grids.reference_level(PROCESSES["spd"], t), expected)


@given(targets=st.lists(st.floats(0.05, 100.0), min_size=1, max_size=5))
def test_time_at_level_inverts_the_reference_level(targets):
    proc = PROCESSES["spd"]
    times = grids.time_at_level(proc, targets, 1e-3, grids.T_MAX)
    lo, hi = grids.reference_level(proc, [1e-3, grids.T_MAX])
    np.testing.assert_allclose(grids.reference_level(proc, times), np.clip(targets, lo, hi), rtol=1e-9)


@pytest.mark.parametrize(
    "num_steps,table,sigmas",
    [
        (5, [853, 652, 380, 116, 22, 0], [40.09, 8.634, 1.847, 0.3979, 0.0858, 0.0100]),
        (10, [853, 765, 665, 549, 415, 270, 148, 73, 33, 14, 0],
         [40.09, 19.50, 9.425, 4.541, 2.202, 1.064, 0.5144, 0.2513, 0.1212, 0.0600, 0.0100]),
    ],
)
def test_ge_discrete_grid_reproduces_the_papers_table(num_steps, table, sigmas):
    proc = processes.vp_linear(num_steps=1000)
    levels = grids.make("ge_discrete", proc, num_steps)
    np.testing.assert_array_equal(np.round(levels * 1000 - 1).astype(int), table)
    np.testing.assert_allclose(grids.reference_level(proc, levels), sigmas, rtol=2e-3)


def test_karras_grid_reproduces_edm_defaults():
    proc = PROCESSES["vp_linear"]
    t_max, t_end = grids.time_at_level(proc, [80.0, 0.002], 1e-9, 1.0)
    levels = grids.make("karras", proc, 10, t_max=t_max, t_end=t_end, rho=7.0)
    edm = [80, 42.42, 21.11, 9.72, 4.07, 1.50, 0.470, 0.117, 0.0204, 0.002]
    # the SPECTRUM lists these rounded to 3-4 digits
    np.testing.assert_allclose(grids.reference_level(proc, levels[:-1]), edm, rtol=5e-3)


def test_uniform_tau_reproduces_the_official_spd_grid():
    steps = 40
    t_prime = 1 + np.arange(steps) * (steps - 2) / (steps - 1)
    tau = (steps - t_prime) / steps
    levels = grids.uniform_tau(PROCESSES["spd"], steps, t_max=1 - 1 / steps)
    np.testing.assert_allclose(np.sort(levels[:-1]), np.sort(1 - tau), atol=1e-12)


def test_adm_grid_reproduces_const2_and_ddm_public_splits_the_last_step():
    adm = grids.make("adm", PROCESSES["rectified_flow"], 10, t_max=1.0, t_end=0.1)
    np.testing.assert_allclose(adm, np.append(np.linspace(1.0, 0.1, 10), 0.0), atol=1e-12)
    ddm = grids.make("ddm_public", PROCESSES["ddm_constant"], 10, t_max=1.0)
    np.testing.assert_allclose(ddm[:-2], np.linspace(1.0, 0.1, 10), atol=1e-12)
    np.testing.assert_array_equal(ddm[-2:], [1e-4, 0.0])


def test_discrete_processes_snap_to_their_levels_and_refuse_too_many_steps():
    proc = processes.vp_linear(num_steps=30)
    for name in ("uniform_t", "log_linear", "karras", "adm"):
        levels = grids.make(name, proc, 6)
        np.testing.assert_allclose(levels * 30, np.round(levels * 30), atol=1e-9)
        assert levels[-2] >= 1 / 30 - 1e-12 and levels[-1] == 0.0
    with pytest.raises(ValueError, match="decrease strictly"):
        grids.make("uniform_t", proc, 40)


def test_bad_grid_requests_raise():
    proc = PROCESSES["vp_linear"]
    with pytest.raises(ValueError, match="did you mean 'karras'"):
        grids.make("karas", proc, 5)
    with pytest.raises(ValueError, match="did you mean 'rho'"):
        grids.make("karras", proc, 5, rh0=7)
    with pytest.raises(ValueError, match="t_end"):
        grids.make("log_linear", proc, 5, t_end=0.9999)
    with pytest.raises(ValueError, match="sigma_end"):
        grids.make("log_linear", proc, 5, sigma_end=-1.0)
    with pytest.raises(ValueError, match="num_steps"):
        grids.make("uniform_t", proc, 0)
    with pytest.raises(ValueError, match="discrete VP"):
        grids.make("ge_discrete", proc, 5)
    with pytest.raises(ValueError, match="decrease strictly"):
        grids.check_grid([0.5, 0.5, 0.0])
