"""spd_jax: diffusion models whose corruption is a Gaussian process diagonal in a spectral basis."""

__version__ = "0.1.0"
