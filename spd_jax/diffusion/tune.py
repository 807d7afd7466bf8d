"""Time grids and sampler weights tuned by autodiff on the exact law (docs/math.md §0 "Grids", §7.1).

For a Gaussian process, a data spectrum S (zero-mean Gaussian data N_B(0, S), the exact
denoiser) and a linear sampler, the output law is exact and differentiable in the grid and the
sampler's per-step weights (:func:`spd_jax.diffusion.analytic.propagate_law` run on JAX tables
from :func:`spd_jax.diffusion.samplers.linear_tables`). :func:`tune` minimises the exact KL of
the output law to the data in float64 (``jax.enable_x64`` inside the call only) with
``jax.grad`` and Adam:

* grid: the first level stays at ``t_max`` (the sampler starts from the exact marginal there), the
  last at t = 0; the N - 1 levels in between are parameterised monotonically in the log reference
  level: each keeps a fraction sigmoid(a_i) of the previous level's height above the floor
  l_min = log sigma_ref(1e-10), l_i = l_min + (l_(i-1) - l_min) sigmoid(a_i); each is mapped to t
  by table interpolation and Newton steps in float64, with the implicit-function derivative
  dt/dlog sigma_ref = 1 / (dlog sigma_ref/dt);
* weights (one per step): GE's gamma_i, DDIM's eta_i (sigmoid, in (0, 1)), DPM-Solver++'s
  extrapolation w_i (1 = the 2M update, 0 = first order); ancestral tunes the grid only.

Robustness: every report carries the worst KL over :data:`PERTURBATIONS` sign patterns that move
every interior level by +-2 % in noise level (log sigma_ref +- 0.02); ``objective="robust"``
(the default) minimises that worst case together with the nominal KL, so the optimum cannot be a
knife edge that cancels errors at exact levels.

Pure functions, no config: the command :mod:`spd_jax.run.tune` builds the process and spectrum
from a config and saves the result with :func:`save` (read back by
:func:`spd_jax.diffusion.grids.load_tuned`).
"""

from __future__ import annotations

import json
import math
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from spd_jax.diffusion import analytic, grids, samplers
from spd_jax.diffusion.processes import Process, check_spectrum, schedule

#: method -> the per-step weight it tunes (None: grid only)
TUNABLE = {"gradient_estimation": "gamma", "ddim": "eta", "dpm_solver_pp": "extrapolation", "ancestral": None}
PERTURBATION = 0.02  #: robustness check: every interior level moved by this much in log sigma_ref
NUM_RANDOM_PATTERNS = 6  #: random sign patterns beside all-up, all-down and the two alternating ones
NUM_OBJECTIVE_PATTERNS = 4  #: the robust objective uses the structured patterns; reports use all
OBJECTIVES = ("robust", "nominal")
_NEWTON_STEPS = 2  # after interpolation in a 4097-point table: float64 round-off
_TABLE_SIZE = 4097
_T_FLOOR = 1e-10  # smallest interior level
_ETA_RANGE = (0.02, 0.98)  # DDIM eta start values are clipped into this range (sigmoid parameter)
FORMAT_VERSION = 1


class Tuned(NamedTuple):
    """A tuned sampler setting and its exact-law scores (KL in nats)."""

    method: str
    process: str
    nfe: int
    num_steps: int
    grid: np.ndarray  # (N + 1,) t levels, t_max first, 0 last
    knobs: dict  # method knobs for samplers.sample, per-step weights as lists
    kl: float  # tuned, exact law (NumPy float64 re-evaluation)
    kl_default: float  # the default grid and knobs at the same NFE
    kl_perturbed: float  # worst case over the +-2 % perturbations, tuned
    kl_default_perturbed: float
    objective: str
    seconds: float
    history: list  # objective value every 10 iterations

    def to_json(self) -> dict:
        out = self._asdict()
        out["grid"] = [float(t) for t in self.grid]
        out["format"] = FORMAT_VERSION
        return out


def _check_tunable(process: Process, method: str) -> None:
    samplers.check_process(process)
    if method not in TUNABLE:
        raise ValueError(f"tuning supports methods {sorted(TUNABLE)} (linear in the data); got {method!r}")
    if process.num_levels is not None:
        raise ValueError(
            f"process {process.name!r} is discrete (t snapped to j/T): its law is not differentiable in "
            "the grid; tune its continuous counterpart (e.g. vp_linear())"
        )


def perturbation_signs(num_levels: int, count: int = NUM_RANDOM_PATTERNS, seed: int = 0) -> np.ndarray:
    """(P, num_levels) sign patterns: all +1, all -1, the two alternating ones, ``count`` random."""
    if num_levels == 0:
        return np.zeros((1, 0))
    alt = np.where(np.arange(num_levels) % 2 == 0, 1.0, -1.0)
    rand = np.random.default_rng(seed).choice([-1.0, 1.0], size=(count, num_levels))
    return np.concatenate([np.ones((1, num_levels)), -np.ones((1, num_levels)), alt[None], -alt[None], rand])


class ExactKL:
    """The exact KL as a differentiable function of the interior log reference levels and weights.

    Call inside ``jax.enable_x64(True)``. ``kl(log_levels, weights)``: log_levels (N - 1,) the
    interior log sigma_ref values (decreasing), weights (N,) the method's per-step weight (ignored
    for ancestral).
    """

    def __init__(self, process: Process, spectrum, method: str, num_steps: int, *, t_max: float, knobs: dict):
        _check_tunable(process, method)
        self.spectrum = jnp.asarray(check_spectrum(spectrum, "identity" if process.is_scalar else process.basis))
        process.check_image_shape((1,) + tuple(self.spectrum.shape))
        self.process, self.method, self.num_steps, self.t_max = process, method, int(num_steps), float(t_max)
        self.knobs = dict(knobs)
        self.params = {k: jnp.asarray(v, jnp.float64) for k, v in process.params.items()}
        alpha, sigma = self.marginal(jnp.asarray([self.t_max]))
        self.start_std = jnp.sqrt(alpha[0] ** 2 * self.spectrum + sigma[0] ** 2)
        self.log_top = self.log_ref(jnp.asarray([self.t_max]))[0]
        log_t = np.linspace(np.log(_T_FLOOR), np.log(self.t_max), _TABLE_SIZE)
        ref = np.asarray(self.log_ref(jnp.asarray(np.exp(log_t))), np.float64)
        ref = np.maximum.accumulate(ref)  # flat stretches (e.g. blurring's noise floor) stay monotone
        self._table_ref, self._table_log_t = jnp.asarray(ref), jnp.asarray(log_t)
        self.log_floor = float(ref[0])  # interior levels stay above log sigma_ref(_T_FLOOR)

    def marginal(self, t):
        """(alpha, sigma) at times t (n,), float64 JAX, shaped (n, ...) to broadcast with (H, W, C)."""
        return schedule(self.process.kind, jnp, t.reshape(-1, 1, 1, 1), self.params, self.process.cfg)

    def log_ref(self, t):
        alpha, sigma = self.marginal(t)
        log_ratio = jnp.log(sigma) - jnp.log(alpha)
        log_ratio = jnp.broadcast_to(log_ratio, jnp.broadcast_shapes(log_ratio.shape, (t.shape[0], 1, 1, 1)))
        return log_ratio.reshape(t.shape[0], -1).mean(axis=1)

    def times(self, log_levels):
        """t with log sigma_ref(t) = log_levels, differentiable (implicit function derivative).

        Start: interpolation in a float64 table of (log sigma_ref, log t); then Newton steps.
        """
        if log_levels.shape[0] == 0:
            return log_levels
        target = jax.lax.stop_gradient(log_levels)
        t = jnp.exp(jnp.interp(target, self._table_ref, self._table_log_t))
        for _ in range(_NEWTON_STEPS):
            value, slope = jax.jvp(self.log_ref, (t,), (jnp.ones_like(t),))
            t = jnp.clip(t + (target - value) / slope, 0.5 * t, jnp.minimum(2.0 * t, self.t_max))
        t = jax.lax.stop_gradient(t)
        value, slope = jax.jvp(self.log_ref, (t,), (jnp.ones_like(t),))
        t = t + (log_levels - jax.lax.stop_gradient(value)) / jax.lax.stop_gradient(slope)
        return jnp.clip(t, _T_FLOOR, self.t_max)

    def grid(self, log_levels):
        return jnp.concatenate([jnp.asarray([self.t_max]), self.times(log_levels), jnp.zeros(1)])

    def method_knobs(self, weights) -> dict:
        name = TUNABLE[self.method]
        knobs = dict(self.knobs)
        if name is not None:
            knobs[name] = weights
        return knobs

    def __call__(self, log_levels, weights):
        grid = self.grid(log_levels)
        tables = _level_tables(self.method, *self.marginal(grid[:-1]), self.method_knobs(weights))
        noisy = self.method in ("ancestral", "ddim") or self.knobs.get("mu", 0.0) != 0.0
        _, coefs = analytic.propagate_law(self.method, tables, self.spectrum, 0.0, 0.0, self.start_std, noisy=noisy)
        ratio = jnp.sum(coefs**2, axis=0) / self.spectrum
        return 0.5 * jnp.sum(ratio - 1.0 - jnp.log(ratio))


def _level_tables(method: str, alpha, sigma, knobs: dict) -> dict:
    """JAX coefficient tables of a grid ending at t = 0 from (alpha, sigma) (S, ...) at its first S
    levels (broadcast to (S, H, W, C) or (S, 1, 1, 1)), with the level columns the scan reads."""
    full = jnp.broadcast_shapes(jnp.shape(alpha), jnp.shape(sigma))
    alpha, sigma = jnp.broadcast_to(alpha, full), jnp.broadcast_to(sigma, full)
    alpha = jnp.concatenate([alpha, jnp.ones((1,) + full[1:], alpha.dtype)])  # t = 0: the final step returns x0_hat
    sigma = jnp.concatenate([sigma, jnp.zeros((1,) + full[1:], sigma.dtype)])
    tables = samplers.linear_tables(method, alpha, sigma, knobs, final_zero=True, xp=jnp)
    tables.update(alpha_cur=alpha[:-1], sigma_cur=sigma[:-1], alpha_next=alpha[1:], sigma_next=sigma[1:])
    return tables


def _resample_per_step(values, num_steps: int) -> np.ndarray:
    """Per-step values of another step count resampled onto ``num_steps`` steps (step midpoints)."""
    old = np.asarray(values, np.float64)
    return np.interp((np.arange(num_steps) + 0.5) * old.size / num_steps, np.arange(old.size) + 0.5, old)


def _raw_weights(method: str, weights: np.ndarray) -> np.ndarray:
    if method == "ddim":
        eta = np.clip(weights, *_ETA_RANGE)
        return np.log(eta) - np.log1p(-eta)
    return weights


def _weights(method: str, raw):
    return jax.nn.sigmoid(raw) if method == "ddim" else raw


def tune(
    process: Process,
    spectrum,
    *,
    method: str = "dpm_solver_pp",
    nfe: int = 10,
    grid=None,
    t_max: float = grids.T_MAX,
    objective: str = "robust",
    iterations: int = 200,
    learning_rate: float = 0.05,
    tune_weights: bool = True,
    start: Tuned | None = None,
    **knobs,
) -> Tuned:
    """Tune the grid (and per-step weights) of ``method`` at ``nfe`` for data N_B(0, ``spectrum``).

    Starts from the method's default (or ``grid``, a name) grid and ``knobs`` (defaults of
    :data:`spd_jax.diffusion.samplers.KNOBS`); minimises log KL (``objective="nominal"``) or
    log of the worst KL over the nominal grid and the +-2 % perturbations (``"robust"``) with
    Adam for ``iterations`` steps, keeping the best iterate. Returns a :class:`Tuned` whose KLs
    are re-evaluated with the NumPy law of :func:`spd_jax.diffusion.analytic.sampler_law`.

    ``start``: warm start from another tuning of the same method (a :class:`Tuned`, or a saved one
    read by :func:`spd_jax.diffusion.grids.load_tuned`; any NFE, e.g. the next lower one): its levels, read as a piecewise-linear curve of log sigma_ref over the step index, and
    its per-step weights are resampled onto this NFE's steps. ``kl_default`` still refers to the
    default grid; the result is never worse than the default or the resampled start.
    """
    start_time = time.time()
    _check_tunable(process, method)
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}; got {objective!r}")
    num_steps = samplers.steps_for_nfe(method, nfe, grid=grid)
    method_knobs, grid_kw = samplers.resolve_knobs(method, grid or samplers.DEFAULT_GRIDS[method], knobs)
    grid_kw.setdefault("t_max", t_max)
    default = samplers.plan(process, method=method, num_steps=num_steps, grid=grid, **grid_kw, **method_knobs)
    if default.grid[-1] != 0.0:
        raise ValueError("tuning needs a grid that ends at t = 0")
    weight_name = TUNABLE[method]
    weights0 = np.zeros(num_steps) if weight_name is None else np.broadcast_to(
        np.asarray(method_knobs[weight_name], np.float64), (num_steps,)).copy()
    if start is not None and start.method != method:
        raise ValueError(f"a warm start must come from a tuning of {method!r}; got one of {start.method!r}")
    with jax.enable_x64(True):
        fn = ExactKL(process, spectrum, method, num_steps, t_max=default.grid[0], knobs=method_knobs)
        log_levels0 = np.log(grids.reference_level(process, default.grid[1:-1]))
        init_weights = weights0
        if start is not None:
            log_levels0, init_weights = _resample(start, num_steps, process, float(fn.log_top),
                                                  float(fn.log_floor), weight_name, weights0)
        top = float(fn.log_top)
        heights0 = np.maximum(np.concatenate([[top], log_levels0]) - float(fn.log_floor), 1e-9)
        fractions0 = np.clip(heights0[1:] / heights0[:-1], 1e-6, 1 - 1e-6)
        signs = jnp.asarray(perturbation_signs(num_steps - 1)) * PERTURBATION

        floor = float(fn.log_floor)

        def unpack(params):
            # each level keeps a fraction sigmoid(a_i) of the previous one's height above the floor
            heights = (top - floor) * jnp.cumprod(jax.nn.sigmoid(params["dec"]))
            return floor + heights, _weights(method, params["w"])

        def all_kls(params):
            log_levels, w = unpack(params)
            nominal = fn(log_levels, w)
            perturbed = jax.vmap(lambda s: fn(log_levels + s, w))(signs)
            return nominal, perturbed

        def loss(params):
            log_levels, w = unpack(params)
            nominal = fn(log_levels, w)
            if objective == "nominal":
                return jnp.log(nominal)
            # the structured patterns (all up, all down, alternating) in the objective; all in the report
            perturbed = jax.vmap(lambda s: fn(log_levels + s, w))(signs[:NUM_OBJECTIVE_PATTERNS])
            return jnp.log(jnp.maximum(nominal, jnp.max(perturbed)))

        params = {"dec": jnp.asarray(np.log(fractions0) - np.log1p(-fractions0)),
                  "w": jnp.asarray(_raw_weights(method, init_weights))}
        init_params = params
        opt = optax.adam(optax.cosine_decay_schedule(learning_rate, max(int(iterations), 1), alpha=0.01))
        trainable = {"dec": True, "w": tune_weights and weight_name is not None}
        mask = jax.tree.map(lambda p, keep: jnp.ones_like(p) if keep else jnp.zeros_like(p), params, trainable)

        @jax.jit
        def update(params, state):
            value, grad = jax.value_and_grad(loss)(params)
            grad = jax.tree.map(lambda g, m: jnp.nan_to_num(g) * m, grad, mask)
            steps, state = opt.update(grad, state, params)
            return optax.apply_updates(params, steps), state, value

        state = opt.init(params)
        best, best_value, history = params, math.inf, []
        for i in range(int(iterations)):
            new_params, state, value = update(params, state)
            value = float(value)
            if np.isfinite(value) and value < best_value:
                best, best_value = params, value
            if i % 10 == 0:
                history.append(value)
            params = new_params
        _, _, final = update(params, state)  # the last iterate's objective, without compiling loss alone
        final = float(final)
        if np.isfinite(final) and final < best_value:
            best = params
        kls = jax.jit(all_kls)
        start = {"dec": jnp.asarray(np.log(fractions0) - np.log1p(-fractions0)),
                 "w": jnp.asarray(_raw_weights(method, weights0))}
        _, default_perturbed = kls(start)
        _, tuned_perturbed = kls(best)
        log_levels, w = unpack(best)
        tuned_grid = np.asarray(fn.grid(log_levels), np.float64)
        tuned_w = np.asarray(w, np.float64)
        default_perturbed, tuned_perturbed = np.asarray(default_perturbed), np.asarray(tuned_perturbed)
    tuned_grid = grids.check_grid(tuned_grid)
    tuned_knobs = {k: v for k, v in method_knobs.items() if k != "projection"}
    if weight_name is not None:
        tuned_knobs[weight_name] = [float(x) for x in tuned_w]
    basis = "identity" if process.is_scalar else process.basis
    spec = np.asarray(spectrum, np.float64)

    def numpy_kl(grid_levels, knobs_):
        law = analytic.sampler_law(process, spec, method=method, num_steps=num_steps, basis=basis,
                                   grid=grid_levels, **knobs_)
        return analytic.gaussian_kl(law.mean, law.var, spec, law.data_mean)

    kl_default = numpy_kl(default.grid, method_knobs)
    kl_tuned = numpy_kl(tuned_grid, tuned_knobs)
    if start is not None:  # keep the resampled start when the optimisation did not improve on it
        with jax.enable_x64(True):
            start_levels, start_w = unpack(init_params)
            start_grid = grids.check_grid(np.asarray(fn.grid(start_levels), np.float64))
            start_perturbed = np.asarray(kls(init_params)[1])
        start_knobs = dict(tuned_knobs)
        if weight_name is not None:
            start_knobs[weight_name] = [float(x) for x in np.asarray(start_w, np.float64)]
        kl_start = numpy_kl(start_grid, start_knobs)
        if kl_start < kl_tuned:
            tuned_grid, tuned_knobs, kl_tuned, tuned_perturbed = start_grid, start_knobs, kl_start, start_perturbed
    if kl_tuned > kl_default:  # never report a setting worse than the start
        tuned_grid, tuned_knobs, kl_tuned = default.grid, dict(method_knobs), kl_default
        tuned_perturbed = default_perturbed
        if weight_name is not None:
            tuned_knobs[weight_name] = [float(x) for x in weights0]
    return Tuned(
        method=method,
        process=process.name,
        nfe=int(samplers.count_nfe(method, num_steps)[0]),
        num_steps=num_steps,
        grid=tuned_grid,
        knobs=tuned_knobs,
        kl=float(kl_tuned),
        kl_default=float(kl_default),
        kl_perturbed=float(np.max(tuned_perturbed)),
        kl_default_perturbed=float(np.max(default_perturbed)),
        objective=objective,
        seconds=time.time() - start_time,
        history=history,
    )


def _resample(start: Tuned, num_steps: int, process: Process, log_top: float, log_floor: float,
              weight_name: str | None, weights0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``start``'s interior log reference levels and per-step weights resampled onto ``num_steps``
    steps (levels: piecewise linear over the step index from log_top to log_floor at t = 0)."""
    old_steps = len(start.grid) - 1
    interior = np.log(grids.reference_level(process, np.asarray(start.grid[1:-1], np.float64)))
    curve = np.concatenate([[log_top], interior, [log_floor]])
    position = np.arange(1, num_steps) * old_steps / num_steps
    levels = np.interp(position, np.arange(old_steps + 1), curve)
    weights = weights0
    if weight_name is not None and np.ndim(start.knobs.get(weight_name)) == 1:
        weights = _resample_per_step(start.knobs[weight_name], num_steps)
    return levels, weights


def save(tuned: Tuned, path, **extra) -> dict:
    """Write ``tuned`` (plus ``extra`` fields, e.g. the config and spectrum source) as JSON at
    ``path`` (any ``etils.epath`` path)."""
    from etils import epath

    out = tuned.to_json() | extra
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1, default=_json_default) + "\n")
    return out


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.bool_,)):
        return bool(value)
    raise TypeError(f"cannot write {type(value)} to JSON")


# ---------------------------------------------------------------------------------------------
# tuning on a trained denoiser: match a many-step teacher from the same starting noise
# ---------------------------------------------------------------------------------------------

#: methods whose deterministic run can be tuned against a teacher (with their default knobs)
TEACHER_TUNABLE = {"gradient_estimation": "gamma", "dpm_solver_pp": "extrapolation", "ddim": None}


def grid_tables(process: Process, method: str, grid, knobs: dict) -> dict:
    """The scan inputs of :func:`spd_jax.diffusion.samplers.device_tables` (float32 JAX, one row
    per step) for a JAX grid (S + 1,) that ends at t = 0, computed differentiably in the grid and
    the per-step knobs (``knobs``: the resolved method knobs, per-step ones as (S,) arrays).

    Equal, up to float32 rounding, to ``device_tables(plan(process, method=method, grid=grid,
    ...))`` for the same grid (tested)."""
    if method not in samplers.TABLE_METHODS:
        raise ValueError(f"differentiable tables exist for {samplers.TABLE_METHODS}; got {method!r}")
    grid = jnp.asarray(grid, jnp.float32)
    steps = grid.shape[0] - 1
    alpha, sigma = process.marginal(grid[:-1])
    alpha = jnp.broadcast_to(alpha, jnp.broadcast_shapes(jnp.shape(alpha), (steps, 1, 1, 1)))
    tables = _level_tables(method, alpha, sigma, knobs)
    tables.update(t_cur=samplers.network_times(grid[:-1], knobs.get("time_shift", 0.0), jnp), t_next=grid[1:])
    tables = {k: jnp.asarray(v, jnp.float32) for k, v in tables.items()}
    tables["step"] = jnp.arange(steps, dtype=jnp.int32)
    return tables


class TeacherTuned(NamedTuple):
    """A sampler setting tuned on a trained denoiser against a many-step teacher."""

    method: str
    process: str
    nfe: int
    num_steps: int
    grid: np.ndarray  # (N + 1,) t levels, t_max first, 0 last
    knobs: dict
    loss: float  # held-out mean squared pixel distance to the teacher's samples, tuned setting
    loss_start: float  # the same for the starting setting (default grid, or ``start``)
    loss_default: float  # the same for the method's default grid and knobs
    teacher: str  # e.g. "gradient_estimation:50"
    num_train: int
    num_held_out: int
    seconds: float
    history: list  # held-out loss at every check

    objective = "teacher"

    def to_json(self) -> dict:
        out = self._asdict()
        out["grid"] = [float(t) for t in self.grid]
        out["objective"] = self.objective
        out["format"] = FORMAT_VERSION
        return out


def _start_levels(start, num_steps: int, t_max: float) -> np.ndarray:
    """Interior t levels (num_steps - 1,) from a saved grid of any length: log t resampled over
    the step index (the top stays t_max); the same levels when the step counts agree."""
    grid = np.asarray(start.grid, np.float64)
    if grid.size - 1 == num_steps:
        return grid[1:-1]
    old = grid[:-1]  # t_max .. last interior level (the final 0 has no log)
    position = np.arange(1, num_steps) * (old.size - 1) / max(num_steps - 1, 1)
    levels = np.exp(np.interp(position, np.arange(old.size), np.log(old)))
    return np.minimum.accumulate(np.minimum(levels, t_max * (1 - 1e-6)))


def tune_to_teacher(
    denoiser,
    process: Process,
    x_T,
    teacher,
    *,
    method: str,
    nfe: int,
    clip_x0: bool,
    variables=None,
    start=None,
    t_max: float = grids.T_MAX,
    held_out: float = 0.25,
    batch: int = 64,
    iterations: int = 300,
    learning_rate: float = 0.01,
    teacher_name: str = "",
    tune_time_shift: bool = True,
    check_every: int = 10,
    key=None,
    **knobs,
) -> TeacherTuned:
    """Tune the grid and per-step weights of a deterministic ``method`` at ``nfe`` so that its
    samples from the starting states ``x_T`` (n, H, W, C) match ``teacher`` (n, H, W, C), the
    same denoiser's samples from the same ``x_T`` with many steps.

    Objective: the mean squared pixel distance ``mean((sample(x_T) - teacher)^2)``,
    differentiated through the whole sampler (network calls included, their time inputs too) with
    ``jax.grad``; Adam on minibatches of ``batch`` rows of the first ``1 - held_out`` of the
    examples. Every ``check_every`` iterations the held-out rows are scored and the best setting so
    far is kept, so the result is never worse on the held-out rows than the start. The grid keeps
    its first level (t_max) and its final t = 0; each interior level is a fraction sigmoid(a_i)
    of the previous one (monotone by construction). Tuned with it: the method's per-step weight
    (GE's gamma_i, DPM-Solver++'s extrapolation w_i) and, with ``tune_time_shift``, the per-step
    ``time_shift`` s_i: the network sees t_i exp(s_i) while the step's coefficients keep t_i
    (:func:`spd_jax.diffusion.samplers.network_times`), which lets the tuning correct the trained
    network's own bias at coarse steps.

    ``denoiser``: ``denoiser(x_t, t)`` or, with ``variables``, ``denoiser(variables, x_t, t)``
    (as :func:`spd_jax.diffusion.samplers.sample`). ``start``: a saved setting of the same method
    (e.g. the exact-law tuning, :func:`spd_jax.diffusion.grids.load_tuned`) to start from; default
    the method's default grid and knobs. ``knobs``: the method's fixed knobs (e.g. ``order=3``)
    and grid options of its default grid; they override the start's. The denoiser must be
    deterministic (no SMD latents).
    """
    start_time = time.time()
    samplers.check_process(process, method)
    if method not in TEACHER_TUNABLE:
        raise ValueError(f"teacher tuning supports the deterministic samplers {sorted(TEACHER_TUNABLE)}; "
                         f"got {method!r}")
    if process.num_levels is not None:
        raise ValueError(f"process {process.name!r} is discrete: its time levels are not differentiable")
    x_T, teacher = jnp.asarray(x_T, jnp.float32), jnp.asarray(teacher, jnp.float32)
    if x_T.ndim != 4 or x_T.shape != teacher.shape:
        raise ValueError(f"x_T and teacher must both be (n, H, W, C) of one shape; got {x_T.shape} and {teacher.shape}")
    process.check_image_shape(x_T.shape)
    if not 0 < held_out < 1:
        raise ValueError(f"held_out must be a fraction in (0, 1); got {held_out}")
    n = x_T.shape[0]
    n_val = max(1, int(round(n * held_out)))
    n_train = n - n_val
    if n_train < 1:
        raise ValueError(f"{n} examples leave none to tune on with held_out = {held_out}")
    batch = min(int(batch), n_train)
    num_steps = samplers.steps_for_nfe(method, nfe)
    method_knobs, grid_kw = samplers.resolve_knobs(method, samplers.DEFAULT_GRIDS[method], knobs)
    given = {k: method_knobs[k] for k in knobs if k in method_knobs}  # explicit knobs win over the start's
    grid_kw.setdefault("t_max", t_max)
    default = samplers.plan(process, method=method, num_steps=num_steps, **grid_kw, **method_knobs)
    if default.noisy:
        raise ValueError(f"{method} with knobs {method_knobs} adds noise: teacher tuning needs a deterministic sampler")
    weight_name = TEACHER_TUNABLE[method]
    top = float(default.grid[0])
    if start is not None:
        if start.method != method:
            raise ValueError(f"a start must come from a tuning of {method!r}; got one of {start.method!r}")
        levels0 = _start_levels(start, num_steps, top)
        start_knobs = dict(method_knobs)
        start_knobs.update({k: v for k, v in start.knobs.items() if k in method_knobs})
        start_knobs.update(given)
        for knob in (weight_name, "time_shift"):
            if knob is not None and np.ndim(start_knobs[knob]) == 1 and len(start_knobs[knob]) != num_steps:
                start_knobs[knob] = _resample_per_step(start_knobs[knob], num_steps)
    else:
        levels0, start_knobs = default.grid[1:-1], dict(method_knobs)
    start_plan = samplers.plan(process, method=method, num_steps=num_steps,
                               grid=np.concatenate([[top], np.asarray(levels0, np.float64), [0.0]]), **start_knobs)
    if start_plan.noisy:
        raise ValueError(f"{method} with the start's knobs adds noise: teacher tuning needs a deterministic sampler")
    fixed = {k: v for k, v in start_knobs.items() if k not in (weight_name, "time_shift")}
    shift0 = np.broadcast_to(np.asarray(start_knobs["time_shift"], np.float64), (num_steps,))
    weights0 = np.zeros(num_steps) if weight_name is None else np.broadcast_to(
        np.asarray(start_knobs[weight_name], np.float64), (num_steps,)).copy()

    def params_of(levels, weights, shift) -> dict:  # the parameters of interior t levels and per-step knobs
        heights = np.concatenate([[top], np.asarray(levels, np.float64)])
        fractions = np.clip(heights[1:] / heights[:-1], 1e-6, 1 - 1e-6)
        return {"dec": jnp.asarray(np.log(fractions) - np.log1p(-fractions), jnp.float32),
                "w": jnp.broadcast_to(jnp.asarray(weights, jnp.float32), (num_steps,)),
                "shift": jnp.broadcast_to(jnp.asarray(shift, jnp.float32), (num_steps,))}

    params0 = params_of(levels0, weights0, shift0)

    def setting(params):
        interior = top * jnp.cumprod(jax.nn.sigmoid(params["dec"]))
        grid = jnp.concatenate([jnp.full((1,), top, jnp.float32), interior, jnp.zeros((1,), jnp.float32)])
        knobs = dict(fixed, time_shift=params["shift"])
        if weight_name is not None:
            knobs[weight_name] = params["w"]
        return grid, knobs

    def distance(params, x, target, index):
        grid, knobs = setting(params)
        tables = grid_tables(process, method, grid, knobs)
        out = samplers.run_tables(tables, process, x, denoiser=denoiser, method=method, clip_x0=clip_x0,
                                  variables=variables, index=index, unroll=True)  # rolled: ~3x slower gradients on CPU
        return jnp.mean((out - target) ** 2)

    opt = optax.adam(optax.cosine_decay_schedule(learning_rate, max(int(iterations), 1), alpha=0.05))
    trainable = jax.tree.map(jnp.ones_like, params0)
    if weight_name is None:
        trainable["w"] = jnp.zeros_like(params0["w"])
    if not tune_time_shift:
        trainable["shift"] = jnp.zeros_like(params0["shift"])

    @jax.jit
    def update(params, state, x, target, index):
        value, grad = jax.value_and_grad(distance)(params, x, target, index)
        grad = jax.tree.map(lambda g, m: jnp.nan_to_num(g) * m, grad, trainable)
        steps, state = opt.update(grad, state, params)
        return optax.apply_updates(params, steps), state, value

    score_jit = jax.jit(distance)
    rows_val = np.arange(n_train, n)

    def held_out_loss(params):
        total = 0.0
        for lo in range(0, rows_val.size, batch):
            rows = rows_val[lo:lo + batch]
            total += float(score_jit(params, x_T[rows], teacher[rows], jnp.asarray(rows, jnp.uint32))) * rows.size
        return total / rows_val.size

    loss_default = held_out_loss(params_of(default.grid[1:-1], 0.0 if weight_name is None else
                                           method_knobs[weight_name], method_knobs["time_shift"]))
    params, state = params0, opt.init(params0)
    best, best_loss = params0, held_out_loss(params0)
    loss_start, history = best_loss, [best_loss]
    rng = np.random.default_rng(0 if key is None else int(jax.random.randint(key, (), 0, 2**31 - 1)))
    for i in range(int(iterations)):
        rows = rng.choice(n_train, batch, replace=False)
        params, state, _ = update(params, state, x_T[rows], teacher[rows], jnp.asarray(rows, jnp.uint32))
        if (i + 1) % check_every == 0 or i + 1 == iterations:
            value = held_out_loss(params)
            history.append(value)
            if np.isfinite(value) and value < best_loss:
                best, best_loss = params, value
    grid, knobs = setting(best)
    tuned_grid = grids.check_grid(np.asarray(grid, np.float64))
    tuned_knobs = dict(fixed)
    for knob in (weight_name, "time_shift"):
        if knob is not None:
            tuned_knobs[knob] = [float(x) for x in np.asarray(knobs[knob], np.float64)]
    samplers.plan(process, method=method, num_steps=num_steps, grid=tuned_grid, **tuned_knobs)  # finite tables
    return TeacherTuned(
        method=method, process=process.name, nfe=int(default.nfe), num_steps=num_steps, grid=tuned_grid,
        knobs=tuned_knobs, loss=float(best_loss), loss_start=float(loss_start), loss_default=float(loss_default),
        teacher=teacher_name, num_train=n_train, num_held_out=n_val, seconds=time.time() - start_time,
        history=[float(h) for h in history],
    )
