"""SPD's claim: its marginal path is the Fisher geodesic, and every other path is longer."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from spd_jax.diffusion import fisher, processes, spectrum

SHAPE = (8, 8, 2)
SPECTRUM = spectrum.power_law(SHAPE)
POINTS = 2**13


def test_shortest_length_closed_form_and_preset_value():
    np.testing.assert_allclose(fisher.shortest_length(SPECTRUM), np.sqrt(0.5 * np.sum(np.log(SPECTRUM[..., 0]) ** 2)))
    # docs/math.md §3.2: the CIFAR-10 preset at 32x32 has L* = 101.30 per channel
    np.testing.assert_allclose(fisher.shortest_length(spectrum.power_law((32, 32, 1))), 101.30, atol=0.005)


def test_spd_path_length_equals_the_shortest_length():
    length = fisher.path_length(processes.spd(SPECTRUM), SPECTRUM, num_points=POINTS)
    np.testing.assert_allclose(length, fisher.shortest_length(SPECTRUM), rtol=5e-3)
    # and the numerical integral has converged (polyline lengths converge from below)
    finer = fisher.path_length(processes.spd(SPECTRUM), SPECTRUM, num_points=2 * POINTS)
    assert np.all(finer >= length - 1e-9) and np.all(finer - length < 1e-6 * length)


def test_geodesic_variance_is_the_spd_marginal_variance():
    t = np.linspace(0, 1, 7)
    alpha, sigma = processes.spd(SPECTRUM).marginal64(t)
    np.testing.assert_allclose(fisher.geodesic_variance(SPECTRUM, t), alpha**2 * SPECTRUM + sigma**2, rtol=1e-12)


@pytest.mark.parametrize(
    "proc",
    [processes.ddm_constant(), processes.rectified_flow(), processes.vp_cosine(), processes.vp_linear()],
    ids=lambda p: p.name,
)
def test_every_other_process_ending_at_white_noise_is_longer(proc):
    start, end = fisher.endpoint_gaps(proc, SPECTRUM)
    assert np.all(start < 1e-9)
    length = fisher.path_length(proc, SPECTRUM, num_points=POINTS)
    shortest = fisher.shortest_length(SPECTRUM)
    # with an endpoint gap the fair comparison is the geodesic from S to the process's own end
    assert np.all(length > shortest + end + 1e-3 * shortest) or np.all(length > shortest * 1.01)


def test_reference_lengths_of_spec_table():
    """docs/math.md §3.4 (preset spectrum, 32x32): DDM 104.98, RF 105.44, cosine 106.63 per channel."""
    spec = spectrum.power_law((32, 32, 1))
    for proc, expected in ((processes.ddm_constant(), 104.98), (processes.vp_cosine(), 106.63)):
        np.testing.assert_allclose(fisher.path_length(proc, spec, num_points=2**12), expected, atol=0.01)


@given(eps=st.floats(0.01, 0.24))
def test_deviations_from_the_geodesic_are_longer(eps):
    dev = fisher.deviation_length(SPECTRUM, eps, num_points=2**10)
    assert np.all(dev > fisher.path_length(processes.spd(SPECTRUM), SPECTRUM, num_points=2**10))


def test_constant_direction_is_only_a_retiming():
    """h constant: the same path at non-constant speed, so the same length (docs/math.md §3.5)."""
    same = fisher.deviation_length(SPECTRUM, 0.2, direction=1.0, num_points=POINTS)
    np.testing.assert_allclose(same, fisher.shortest_length(SPECTRUM), rtol=1e-6)


def test_deviation_ratios_match_spec_on_the_preset():
    spec = spectrum.power_law((32, 32, 1))
    ratios = [fisher.deviation_length(spec, e, num_points=2**12)[0] / fisher.shortest_length(spec)[0]
              for e in (0.05, 0.1, 0.2)]
    np.testing.assert_allclose(ratios, [1.006, 1.024, 1.093], atol=0.001)


def test_spectrum_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match="does not match the process grid"):
        fisher.path_length(processes.spd(SPECTRUM), spectrum.power_law((4, 4, 2)))
