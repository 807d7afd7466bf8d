"""Time grids for samplers (docs/math.md §0 "Grids", §6.3, §6.8).

A grid is a float64 NumPy array of continuous times t_N > ... > t_0 in [0, 1] (t = 0 data), listed
from the noisiest level to the cleanest; step i of a sampler moves t_i -> t_(i-1). Every grid of
``num_steps`` = N steps has N + 1 levels, except ``ddm_public`` (N + 2 levels, N + 1 steps). The
default top level is ``T_MAX`` = 1 - 1e-3 and the last level is t = 0, where samplers return x0_hat.

Level-based grids (log-linear, Karras) are defined through the reference noise level

    sigma_ref(t) = geometric mean over frequencies (and channels) of sigma_t(k) / alpha_t(k),

which is sigma^VE for frequency-independent processes; it is inverted by bisection in float64.
Their clean end is one reference level :data:`SIGMA_END` = 0.002 for every process (EDM's
sigma_min; chosen by the exact-law KL, docs/results), raised to the lowest level a process reaches
(blurring: sigma_ref(0) = 0.0067); ``t_end`` overrides it by a time. The uniform grids end at
t_max / N (no end option); ``adm``, ``ddm_public`` and ``ge_discrete`` reproduce official grids.
A tuned grid (:mod:`spd_jax.diffusion.tune`) is saved as JSON and read back with :func:`load_tuned`.
On discrete processes (``vp_linear(num_steps=T)``) every level is snapped to the process's own
levels j / T (the smallest level whose sigma_ref reaches the target, as in the GE code).
"""

from __future__ import annotations

import json
from typing import NamedTuple

import numpy as np
from etils import epath

from spd_jax.diffusion.processes import Process, check_name

T_MAX = 1.0 - 1e-3  #: default top level of every grid (docs/math.md §1.3 V5: alpha_1 may vanish)
SIGMA_END = 0.002  #: default clean end of the log-linear and Karras grids: a reference level sigma_ref
ADM_T_END = 1e-4  #: ADM-Public's last noisy level (sigma_min^2 of the sqrt(t) variant)
DDM_PUBLIC_SPLIT = 1e-4  #: DDM-Public splits its last step at this time

GRIDS = ("uniform_t", "uniform_tau", "log_linear", "karras", "ge_discrete", "adm", "ddm_public")

_BISECTION_STEPS = 200


def reference_level(process: Process, t) -> np.ndarray:
    """sigma_ref(t) = exp(mean_k log(sigma_t(k) / alpha_t(k))) in float64, for t of shape (n,)."""
    t = np.atleast_1d(np.asarray(t, np.float64))
    alpha, sigma = process.marginal64(t)
    with np.errstate(divide="ignore"):
        log_ratio = np.log(sigma) - np.log(alpha)
    log_ratio = np.broadcast_to(log_ratio, np.broadcast_shapes(np.shape(log_ratio), (t.size, 1, 1, 1)))
    return np.exp(log_ratio.reshape(t.size, -1).mean(axis=1))


def _discrete_levels(process: Process) -> np.ndarray:
    """t of every level j / T of a discrete process, j = 0..T."""
    levels = process.num_levels
    return np.arange(levels + 1, dtype=np.float64) / levels


def time_at_level(process: Process, targets, t_lo: float, t_hi: float) -> np.ndarray:
    """Times t in [t_lo, t_hi] with sigma_ref(t) = target (bisection in float64).

    sigma_ref is non-decreasing in t for every valid process (docs/math.md §1.3 V2). Targets outside
    [sigma_ref(t_lo), sigma_ref(t_hi)] are clamped to the interval's ends. Discrete processes
    return the smallest level j / T in the interval with sigma_ref >= target.
    """
    targets = np.atleast_1d(np.asarray(targets, np.float64))
    if process.num_levels is not None:
        levels = _discrete_levels(process)
        levels = levels[(levels >= t_lo - 1e-12) & (levels <= t_hi + 1e-12)]
        ref = reference_level(process, levels)
        j = np.clip(np.searchsorted(ref, targets * (1.0 - 1e-12)), 0, levels.size - 1)
        return levels[j]
    lo = np.full(targets.shape, float(t_lo))
    hi = np.full(targets.shape, float(t_hi))
    log_target = np.log(targets)
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        below = np.log(reference_level(process, mid)) < log_target
        lo = np.where(below, mid, lo)
        hi = np.where(below, hi, mid)
    return 0.5 * (lo + hi)


def _with_zero(noisy_levels: np.ndarray) -> np.ndarray:
    return np.concatenate([np.asarray(noisy_levels, np.float64), [0.0]])


def _snap(process: Process, grid: np.ndarray) -> np.ndarray:
    """Snap a grid to a discrete process's levels j / T, noisy levels to j >= 1 (no-op if continuous)."""
    if process.num_levels is None:
        return grid
    levels = process.num_levels
    snapped = np.round(grid * levels)
    snapped[:-1] = np.maximum(snapped[:-1], 1.0)
    return snapped / levels


def uniform_t(process: Process, num_steps: int, *, t_max: float = T_MAX) -> np.ndarray:
    """N + 1 levels uniform in t from ``t_max`` down to 0 (docs/math.md §6.8)."""
    return _snap(process, np.linspace(t_max, 0.0, num_steps + 1))


def uniform_tau(process: Process, num_steps: int, *, t_max: float = T_MAX) -> np.ndarray:
    """SPD's official convention (docs/math.md §2.5): N noisy levels uniform in tau = 1 - t over
    [1 - t_max, t_max] (symmetric ends, tau = 0 and 1 never hit), then t = 0.

    With t_max = 1 - 1/T this is the official T-step SPD grid.
    """
    if num_steps == 1:
        return _snap(process, _with_zero([t_max]))
    if not t_max > 0.5:
        raise ValueError(f"grid 'uniform_tau' spans [1 - t_max, t_max]: it needs t_max > 0.5; got {t_max}")
    return _snap(process, _with_zero(np.linspace(t_max, 1.0 - t_max, num_steps)))


def _level_range(process: Process, t_max: float, t_end, sigma_end) -> tuple[float, float, float]:
    """(sigma_ref(t_max), end level, t of the end level) of the level-based grids.

    The end level is ``sigma_end`` (default :data:`SIGMA_END`, the same for every process), or
    sigma_ref(t_end) when ``t_end`` is given; it is raised to the lowest level the process reaches
    (sigma_ref(0), e.g. blurring's sigma_0, or a discrete process's first level j = 1).
    """
    t_min = 0.0 if process.num_levels is None else 1.0 / process.num_levels
    if t_end is not None:
        t_end = max(float(t_end), t_min)
        top, end = reference_level(process, [t_max, t_end])
        return top, end, t_end
    floor = float(reference_level(process, [t_min])[0])
    end = max(float(SIGMA_END if sigma_end is None else sigma_end), floor)
    t_end = float(time_at_level(process, [end], t_min, t_max)[0])
    top = float(reference_level(process, [t_max])[0])
    if process.num_levels is not None:  # snapped: the level actually reached
        end = float(reference_level(process, [t_end])[0])
    return top, min(end, top), t_end


def log_linear(
    process: Process, num_steps: int, *, t_max: float = T_MAX, sigma_end: float | None = None, t_end=None
) -> np.ndarray:
    """N levels log-linear in sigma_ref from sigma_ref(t_max) to the end level, then t = 0.

    The end level is ``sigma_end`` (default :data:`SIGMA_END`, one process-independent reference
    noise level, docs/math.md §0 "Grids") or, when given, sigma_ref(``t_end``). The continuous and
    spectral form of the GE grid; see :func:`ge_discrete` for the paper's discrete table. For a
    frequency-independent process it is uniform in log-SNR (DPM-Solver's "logSNR" spacing).
    """
    top, end, t_end = _level_range(process, t_max, t_end, sigma_end)
    targets = np.geomspace(top, end, num_steps)
    return _with_zero(time_at_level(process, targets, t_end, t_max))


def karras(
    process: Process,
    num_steps: int,
    *,
    t_max: float = T_MAX,
    sigma_end: float | None = None,
    t_end=None,
    rho: float = 7.0,
) -> np.ndarray:
    """EDM's rho-schedule in sigma_ref between sigma_ref(t_max) and the end level (see
    :func:`log_linear`), then t = 0."""
    top, end, t_end = _level_range(process, t_max, t_end, sigma_end)
    if num_steps == 1:
        return _with_zero([t_max])
    frac = np.arange(num_steps, dtype=np.float64) / (num_steps - 1)
    targets = (top ** (1 / rho) + frac * (end ** (1 / rho) - top ** (1 / rho))) ** rho
    return _with_zero(time_at_level(process, targets, t_end, t_max))


def ge_discrete(process: Process, num_steps: int, *, sigma_start: float = 40.0) -> np.ndarray:
    """The GE paper's log-linear table for a discrete VP process (docs/math.md §6.3, official code).

    With DDPM indices d = 0..T-1 (level t = (d + 1)/T) and sigma(d) = sqrt(1/abar_d - 1):
    t_e = int(linspace(T-1, 0, N+1)[N-1]), sigma_end = sqrt(sigma(t_e) sigma(0)), N geometric
    values from ``sigma_start`` to sigma_end, each snapped to the smallest d with sigma(d) >= value,
    then d = 0 appended. The last level is t = 1/T (sigma = 0.01), not 0: GE keeps that iterate.
    """
    if process.kind != "vp_discrete":
        raise ValueError(
            f"grid 'ge_discrete' reproduces the GE paper's table for a discrete VP process "
            f"(vp_linear(num_steps=T)); got {process.name!r} — use grid 'log_linear'"
        )
    levels = process.num_levels
    t_levels = np.arange(1, levels + 1, dtype=np.float64) / levels  # DDPM index d -> t = (d+1)/T
    sigma = reference_level(process, t_levels)
    t_e = int(np.linspace(levels - 1, 0, num_steps + 1)[num_steps - 1])
    sigma_end = np.sqrt(sigma[t_e] * sigma[0])
    values = np.geomspace(sigma_start, sigma_end, num_steps)
    d = np.minimum(np.searchsorted(sigma, values), levels - 1)
    return np.concatenate([t_levels[d], [t_levels[0]]])


def adm(process: Process, num_steps: int, *, t_max: float = T_MAX, t_end: float = ADM_T_END) -> np.ndarray:
    """ADM-Public's grid (docs/math.md §6.4): N levels linear from ``t_max`` to ``t_end``, then t = 0."""
    if num_steps == 1:
        return _snap(process, _with_zero([t_max]))
    return _snap(process, _with_zero(np.linspace(t_max, t_end, num_steps)))


def ddm_public(process: Process, num_steps: int, *, t_max: float = T_MAX) -> np.ndarray:
    """DDM-Public's default (docs/math.md §6.4): uniform steps t_max/N, the last one split at 1e-4.

    N + 2 levels, N + 1 steps (N + 1 NFE for "N steps").
    """
    top = np.linspace(t_max, 0.0, num_steps + 1)[:-1]
    return _snap(process, np.concatenate([top, [DDM_PUBLIC_SPLIT, 0.0]]))


_BUILDERS = {
    "uniform_t": uniform_t,
    "uniform_tau": uniform_tau,
    "log_linear": log_linear,
    "karras": karras,
    "ge_discrete": ge_discrete,
    "adm": adm,
    "ddm_public": ddm_public,
}

#: option names each grid accepts
GRID_OPTIONS = {
    "uniform_t": ("t_max",),
    "uniform_tau": ("t_max",),
    "log_linear": ("t_max", "sigma_end", "t_end"),
    "karras": ("t_max", "sigma_end", "t_end", "rho"),
    "ge_discrete": ("sigma_start",),
    "adm": ("t_max", "t_end"),
    "ddm_public": ("t_max",),
}


def num_grid_steps(name: str, num_steps: int) -> int:
    """Number of sampler steps (network-evaluated levels) a named grid has for ``num_steps``."""
    return num_steps + 1 if name == "ddm_public" else num_steps


def check_grid(grid) -> np.ndarray:
    """Validate an explicit grid: 1-D, at least 2 levels, in [0, 1], strictly decreasing."""
    grid = np.asarray(grid, np.float64)
    if grid.ndim != 1 or grid.size < 2:
        raise ValueError(f"a grid needs at least 2 time levels in a 1-D array; got shape {grid.shape}")
    if not np.all(np.isfinite(grid)) or grid.min() < 0 or grid.max() > 1:
        raise ValueError(f"grid times must lie in [0, 1]; got range [{grid.min()}, {grid.max()}]")
    if np.any(np.diff(grid) >= 0):
        i = int(np.argmax(np.diff(grid) >= 0))
        raise ValueError(
            f"grid times must decrease strictly from noisy to clean; levels {i} and {i + 1} are "
            f"{grid[i]:.6g} and {grid[i + 1]:.6g} (too many steps for a discrete process?)"
        )
    return grid


def make(name: str, process: Process, num_steps: int, **options) -> np.ndarray:
    """Build grid ``name`` (one of :data:`GRIDS`) with ``num_steps`` steps; validated float64."""
    check_name(name, GRIDS, "grid")
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1; got {num_steps!r}")
    for key in options:
        check_name(key, GRID_OPTIONS[name], f"option of grid {name!r}")
    t_max = options.get("t_max", T_MAX)
    if "t_max" in options and not 0 < t_max <= 1:
        raise ValueError(f"t_max must be in (0, 1]; got {t_max}")
    t_end = options.get("t_end")
    if t_end is not None and not 0 < t_end < t_max:
        raise ValueError(f"t_end must be in (0, t_max); got t_end={t_end}, t_max={t_max}")
    sigma_end = options.get("sigma_end")
    if sigma_end is not None and not (np.isfinite(sigma_end) and sigma_end > 0):
        raise ValueError(f"sigma_end must be a reference noise level > 0; got {sigma_end}")
    return check_grid(_BUILDERS[name](process, int(num_steps), **options))


# ---------------------------------------------------------------------------------------------
# tuned grids (written by spd_jax.diffusion.tune.save / python -m spd_jax.run.tune)
# ---------------------------------------------------------------------------------------------

TUNED_DIR = "tuned"  #: tuned grids live in WORKDIR/tuned/<name>.json
TUNED_PREFIX = "tuned:"  #: config.sample.grid = "tuned:NAME" names WORKDIR/tuned/NAME.json


class TunedGrid(NamedTuple):
    """A saved tuned setting: ``sample(..., method=method, num_steps=num_steps, grid=grid, **knobs)``."""

    method: str
    num_steps: int
    grid: np.ndarray
    knobs: dict
    record: dict  # the whole JSON record (KLs, process, spectrum source, ...)


def is_tuned(grid) -> bool:
    """Whether a grid setting names a saved tuned grid (``tuned:NAME`` or a ``.json`` path)."""
    return isinstance(grid, str) and (grid.startswith(TUNED_PREFIX) or grid.endswith(".json"))


def tuned_path(name_or_path: str, workdir: str | None = None) -> str:
    """The JSON file of a tuned grid: an existing path as given, else WORKDIR/tuned/<name>.json
    (any ``etils.epath`` path, e.g. gs://...)."""
    name_or_path = name_or_path.removeprefix(TUNED_PREFIX)
    if epath.Path(name_or_path).is_file():
        return name_or_path
    if workdir is not None:
        stem = name_or_path[:-5] if name_or_path.endswith(".json") else name_or_path
        path = epath.Path(workdir) / TUNED_DIR / (stem + ".json")
        if path.is_file():
            return str(path)
    where = f" or {epath.Path(workdir) / TUNED_DIR}" if workdir else ""
    raise FileNotFoundError(f"no tuned grid {name_or_path!r} (a JSON path{where}); "
                            "make one with python -m spd_jax.run.tune")


def load_tuned(name_or_path: str, workdir: str | None = None) -> TunedGrid:
    """Read a tuned grid saved by :func:`spd_jax.diffusion.tune.save` (a path, or a name under
    WORKDIR/tuned/); the grid is validated and used as given (docs/math.md §0 "Grids")."""
    record = json.loads(epath.Path(tuned_path(name_or_path, workdir)).read_text())
    for key in ("method", "grid", "knobs"):
        if key not in record:
            raise ValueError(f"tuned grid {name_or_path!r} has no field {key!r}")
    grid = check_grid(record["grid"])
    knobs = {k: (np.asarray(v, np.float64) if isinstance(v, list) else v) for k, v in record["knobs"].items()}
    return TunedGrid(str(record["method"]), grid.size - 1, grid, knobs, record)
