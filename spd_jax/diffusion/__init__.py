"""The mathematics of spd_jax: no Flax, no configs, only arrays in and arrays out.

* :mod:`~spd_jax.diffusion.bases` — orthonormal spectral bases (unitary DFT, DCT-II) per channel.
* :mod:`~spd_jax.diffusion.spectrum` — power spectra of image sets, power-law presets and fits.
* :mod:`~spd_jax.diffusion.rng` — per-example keys: results never depend on batch or device count.
* :mod:`~spd_jax.diffusion.processes` — corruption processes u_t(k) = alpha_t(k) u_0(k) + sigma_t(k) eps(k).
* :mod:`~spd_jax.diffusion.parameterization` — eps / x0 / v / flow / score / DDM conversions.
* :mod:`~spd_jax.diffusion.fisher` — Fisher-metric path lengths and the SPD geodesic.
* :mod:`~spd_jax.diffusion.grids` — time grids, built in float64.
* :mod:`~spd_jax.diffusion.samplers` — every sampler as one ``jax.lax.scan``.
* :mod:`~spd_jax.diffusion.analytic` — exact denoisers and the exact law of linear samplers.

The formulas are derived in docs/math.md.
"""
