"""Fisher-metric geometry of marginal paths under the Gaussian surrogate (docs/math.md §3).

For u_0 ~ N_B(0, S) a process has marginal variances v_t(k) = alpha_t(k)^2 S_k + sigma_t(k)^2 and
Fisher speed^2 = 1/2 sum_k (d log v_k / dt)^2. In the coordinates log(v)/sqrt(2) the metric is
Euclidean, so lengths are polyline lengths in log-variance space (converging from below) and the
geodesic to N(0, I) is v_k(t) = S_k^(1-t), of length sqrt(1/2 sum_k log^2 S_k).

All lengths are per channel (arrays of shape (C,)); sum of squares over channels gives the length
of the full (H, W, C) path.
"""

from __future__ import annotations

import numpy as np

from spd_jax.diffusion.processes import Process, check_spectrum, spd


def shortest_length(spectrum) -> np.ndarray:
    """L* = sqrt(1/2 sum_k (log S_k)^2) per channel: the geodesic length from N_B(0, S) to N(0, I)."""
    log_s = np.log(check_spectrum(spectrum, basis="identity"))
    return np.sqrt(0.5 * np.sum(log_s**2, axis=(0, 1)))


def geodesic_variance(spectrum, t) -> np.ndarray:
    """Marginal variance on the geodesic, v_k(t) = S_k^(1-t); t scalar or (T,) -> (..., H, W, C)."""
    s = check_spectrum(spectrum, basis="identity")
    t = np.asarray(t, np.float64)
    return np.exp((1.0 - t.reshape(t.shape + (1, 1, 1))) * np.log(s))


def _variance(proc: Process, spectrum: np.ndarray, times: np.ndarray) -> np.ndarray:
    alpha, sigma = proc.marginal64(times)
    return alpha**2 * spectrum + sigma**2  # (T, H, W, C)


def path_times(num_points: int) -> np.ndarray:
    """t_j = sin^2(pi j / (2M)), j = 0..M: dense at both ends where log-variances move fastest."""
    j = np.arange(num_points + 1, dtype=np.float64)
    return np.sin(np.pi * j / (2 * num_points)) ** 2


def path_length(proc: Process, spectrum, num_points: int = 2**16, chunk: int = 1024) -> np.ndarray:
    """Fisher length of the marginal path t in [0, 1] of ``proc`` under N_B(0, spectrum), per channel.

    Discrete processes (``proc.num_levels``) use their own levels; continuous ones a polyline on
    :func:`path_times` (a lower bound converging from below; 2^16 points give < 1e-6 relative error
    on the built-in processes, see tests).
    """
    s = check_spectrum(spectrum, basis="identity")
    if proc.grid_shape is not None and proc.grid_shape[:2] != s.shape[:2]:
        raise ValueError(f"spectrum shape {s.shape} does not match the process grid {proc.grid_shape}")
    levels = proc.num_levels
    times = np.arange(levels + 1) / levels if levels is not None else path_times(num_points)
    total = np.zeros(s.shape[-1])
    prev = None
    for start in range(0, len(times), chunk):
        log_v = np.log(_variance(proc, s, times[start : start + chunk]))
        if prev is not None:
            log_v = np.concatenate([prev[None], log_v], axis=0)
        steps = np.diff(log_v, axis=0)  # (T-1, H, W, C)
        total += np.sum(np.sqrt(0.5 * np.sum(steps**2, axis=(1, 2))), axis=0)
        prev = log_v[-1]
    return total


def endpoint_gaps(proc: Process, spectrum) -> tuple[np.ndarray, np.ndarray]:
    """Fisher distances (per channel) of the path's ends from N_B(0, S) at t = 0 and N(0, I) at t = 1.

    Lengths are comparable only between processes whose gaps are both ~0 (docs/math.md §3.4).
    """
    s = check_spectrum(spectrum, basis="identity")
    log_v = np.log(_variance(proc, s, np.array([0.0, 1.0])))
    start = np.sqrt(0.5 * np.sum((log_v[0] - np.log(s)) ** 2, axis=(0, 1)))
    end = np.sqrt(0.5 * np.sum(log_v[1] ** 2, axis=(0, 1)))
    return start, end


def deviation_length(spectrum, deviation: float, direction=None, basis: str = "dft",
                     num_points: int = 2**16) -> np.ndarray:
    """Fisher length (per channel) of the docs/math.md §3.5 deviation family at ``deviation`` (epsilon).

    The path is v_k(t) = S_k^(e_k(t)), e_k(t) = 1 - t + epsilon 4 t (1 - t) h(k), realised by
    ``processes.spd(spectrum, deviation=epsilon, direction=h)``; epsilon = 0 is the geodesic.
    """
    proc = spd(spectrum, basis=basis, deviation=deviation, direction=direction)
    return path_length(proc, spectrum, num_points=num_points)
