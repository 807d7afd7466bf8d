"""DPM-Solver++(2M, 3M) against diffusers' DPMSolverMultistepScheduler (docs/math.md §6.7b; a benchmark,
not a test: torch and diffusers are not dependencies of spd_jax).

Same process (the 1000-step DDPM table, betas linspace(1e-4, 0.02)), same timesteps (diffusers'
``set_timesteps(N)``, "linspace" spacing, final sigma 0), same starting noise and the same exact
Gaussian denoiser (data N(0, diag S) per pixel, eps from
:func:`spd_jax.diffusion.analytic.gaussian_denoiser`); diffusers runs its own float32 update,
spd_jax ``samplers.sample(method="dpm_solver_pp")`` on the grid t = (timestep + 1)/1000 then 0.
Prints the largest absolute and relative differences of the outputs, then the exact KL of
DPM-Solver++ at 10 NFE on the same process for diffusers' default "linspace" timesteps and for
spd_jax's grids (power-law CIFAR-10 spectrum, 32x32x1). Install torch and
diffusers in a separate virtual environment::

    python3 -m venv /tmp/bench-venv
    /tmp/bench-venv/bin/pip install torch diffusers -e .
    /tmp/bench-venv/bin/python -m benchmarks.dpm_solver_diffusers            # 2M
    /tmp/bench-venv/bin/python -m benchmarks.dpm_solver_diffusers --order=3  # 3M

With ``--order=3`` diffusers lowers the order of the last two steps only below 15 steps
(``lower_order_final``), spd_jax at every step count: the comparison uses fewer than 15 steps.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler

from spd_jax.diffusion import analytic, processes, samplers, spectrum

SHAPE = (16, 8, 8, 3)


def diffusers_run(den, x_T: np.ndarray, num_steps: int, lower_order_final: bool, order: int = 2):
    sched = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                        beta_schedule="linear", algorithm_type="dpmsolver++", solver_order=order,
                                        prediction_type="epsilon", final_sigmas_type="zero",
                                        lower_order_final=lower_order_final)
    sched.set_timesteps(num_steps)
    x = torch.from_numpy(x_T.copy())
    for step in sched.timesteps:
        t = jnp.full((x.shape[0],), (int(step) + 1) / 1000.0, jnp.float32)
        eps = np.asarray(den(jnp.asarray(x.numpy()), t).eps)
        x = sched.step(torch.from_numpy(eps), step, x).prev_sample
    return x.numpy(), np.asarray(sched.timesteps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default="3,5,10,20,25")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--order", type=int, default=2, choices=(2, 3))
    args = parser.parse_args()
    if args.order == 3 and any(int(s) >= 15 for s in args.steps.split(",")):
        parser.error("--order=3 compares step counts below 15 (see the module docstring)")
    rng = np.random.default_rng(args.seed)
    proc = processes.vp_linear(num_steps=1000)
    spec = np.exp(rng.uniform(np.log(1e-3), 0.0, SHAPE[1:]))  # per-pixel data variances
    den = analytic.gaussian_denoiser(proc, spec)
    x_T = rng.normal(size=SHAPE).astype(np.float32)
    print("| steps | timesteps | max abs diff | max rel diff (to max abs output) | output scale |")
    print("|---|---|---|---|---|")
    for n in (int(s) for s in args.steps.split(",")):
        ref, timesteps = diffusers_run(den, x_T, n, lower_order_final=True, order=args.order)
        grid = np.append((timesteps.astype(np.float64) + 1.0) / 1000.0, 0.0)
        ours, info = samplers.sample(den, proc, method="dpm_solver_pp", num_steps=n, grid=grid,
                                     key=jax.random.PRNGKey(0), x_T=x_T, clip_x0=False, order=args.order)
        ours = np.asarray(ours)
        diff = np.max(np.abs(ours - ref))
        scale = np.max(np.abs(ref))
        shown = ",".join(str(int(s)) for s in timesteps) if n <= 10 else f"{int(timesteps[0])}..{int(timesteps[-1])}"
        print(f"| {n} | {shown} | {diff:.3g} | {diff / scale:.3g} | {scale:.3g} |")
        assert info["nfe"] == n
    if args.order == 2:
        kl_by_timesteps()


def kl_by_timesteps() -> None:
    sched = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                        beta_schedule="linear", algorithm_type="dpmsolver++")
    sched.set_timesteps(10)
    timesteps = np.asarray(sched.timesteps, np.float64)
    proc = processes.vp_linear(num_steps=1000)
    spec = spectrum.power_law((32, 32, 1))
    settings = {"diffusers linspace timesteps": np.append((timesteps + 1.0) / 1000.0, 0.0),
                "spd_jax log_linear": "log_linear", "spd_jax karras": "karras"}
    print("\n| DPM-Solver++(2M), 10 NFE, vp_linear T=1000, power-law 32x32x1 | exact KL (nats) |")
    print("|---|---|")
    for name, grid in settings.items():
        law = analytic.sampler_law(proc, spec, method="dpm_solver_pp", num_steps=10, grid=grid, basis="dft")
        print(f"| {name} | {analytic.gaussian_kl(law.mean, law.var, spec):.4g} |")


if __name__ == "__main__":
    main()
