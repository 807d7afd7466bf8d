"""Both bases are orthonormal per channel: Parseval, exact inverses, real round trips."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from hypothesis import given
from hypothesis import strategies as st

from spd_jax.diffusion import bases


class BasisTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters("dft", "dct", "identity")
    def test_parseval_and_inverse(self, basis):
        x = jax.random.normal(jax.random.key(0), (3, 8, 6, 2))
        forward = self.variant(lambda a: bases.to_spectral(a, basis))
        inverse = self.variant(lambda u: bases.from_spectral(u, basis))
        u = forward(x)
        np.testing.assert_allclose(
            jnp.sum(jnp.abs(u) ** 2, axis=(1, 2)), jnp.sum(x**2, axis=(1, 2)), rtol=1e-5
        )
        back = inverse(u)
        self.assertFalse(jnp.iscomplexobj(back))
        np.testing.assert_allclose(back, x, atol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters("dft", "dct")
    def test_channels_are_transformed_independently(self, basis):
        x = jax.random.normal(jax.random.key(1), (2, 4, 4, 3))
        u = self.variant(lambda a: bases.to_spectral(a, basis))(x)
        single = bases.to_spectral(x[..., 1:2], basis)
        np.testing.assert_allclose(u[..., 1:2], single, atol=1e-5)


@given(h=st.integers(1, 9), w=st.integers(1, 9), basis=st.sampled_from(["dft", "dct"]))
def test_matrix_of_basis_is_orthonormal(h, w, basis):
    """Transforming the standard basis gives an orthonormal (unitary) matrix."""
    eye = np.eye(h * w).reshape(h * w, h, w, 1)
    mat = bases.to_spectral_np(eye, basis).reshape(h * w, h * w)
    np.testing.assert_allclose(mat.conj() @ mat.T, np.eye(h * w), atol=1e-10)


def test_numpy_and_jax_paths_agree():
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3))
    for basis in ("dft", "dct"):
        np.testing.assert_allclose(
            bases.to_spectral(jnp.asarray(x, jnp.float32), basis),
            bases.to_spectral_np(x, basis), atol=1e-4,
        )


def test_even_gain_gives_real_output_with_tiny_imaginary_part():
    """docs/math.md §1.4: a gain even in k applied through the DFT returns a real image."""
    gain = 1.0 / (1.0 + bases.frequency_magnitude(8, 8))[:, :, None]
    x = np.random.default_rng(1).normal(size=(1, 8, 8, 1))
    full = np.fft.ifft2(gain * np.fft.fft2(x, axes=(1, 2), norm="ortho"), axes=(1, 2), norm="ortho")
    assert np.max(np.abs(full.imag)) <= 1e-12 * np.max(np.abs(full.real))
    np.testing.assert_allclose(bases.apply_diagonal(jnp.asarray(x), gain, "dft"), full.real, atol=1e-5)


def test_frequency_grids():
    mag = bases.frequency_magnitude(4, 4, "dft")
    assert mag[0, 0] == 0 and mag[0, 2] == 2 and mag[3, 0] == 1  # fftfreq: index 3 is -1
    np.testing.assert_allclose(bases.mirror(mag), mag)
    lam = bases.heat_eigenvalues(4, 4)
    assert lam[0, 0] == 0 and np.isclose(lam[1, 2], (np.pi / 4) ** 2 + (np.pi * 2 / 4) ** 2)
    mask = bases.self_conjugate_mask(4, 4)
    assert mask.sum() == 4 and mask[0, 0] and mask[2, 2] and not mask[1, 0]


def test_unknown_basis_is_rejected():
    with pytest.raises(ValueError, match="unknown spectral basis 'fft'"):
        bases.to_spectral(jnp.zeros((1, 2, 2, 1)), "fft")
