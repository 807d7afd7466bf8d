"""Does DPM-Solver++(3M) earn its place beside 2M? Exact KL (nats) of both orders on the Gaussian
testbed of ``benchmarks/sampler_quality.py`` (the bundled patches' spectrum, exact denoiser,
exact start), on the default log-linear grid and after tuning (robust objective, 200 iterations).

    python -m benchmarks.dpm_order [--tuned-processes spd,vp_linear] [--tuned-nfes 10,20]
"""

from __future__ import annotations

import argparse

from benchmarks.sampler_quality import KL_PROCESSES, NFE_TARGETS, build_process, natural_spectra
from spd_jax.diffusion import analytic, tune


def default_kl(proc, spec, basis: str, nfe: int, order: int) -> float:
    law = analytic.sampler_law(proc, spec, method="dpm_solver_pp", num_steps=nfe, basis=basis, order=order)
    return analytic.gaussian_kl(law.mean, law.var, spec, law.data_mean)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tuned-processes", default="spd,vp_linear")
    parser.add_argument("--tuned-nfes", default="10,20")
    args = parser.parse_args()
    spectra, source = natural_spectra()
    print(f"spectrum: {source}\n")
    print("| process | " + " | ".join(f"NFE {n}: 2M / 3M" for n in NFE_TARGETS) + " |")
    print("|---|" + "---|" * len(NFE_TARGETS))
    for name in KL_PROCESSES:
        proc = build_process(name, spectra)
        basis = "dct" if name == "blurring" else "dft"
        cells = [f"{default_kl(proc, spectra[basis], basis, n, 2):.3g} / {default_kl(proc, spectra[basis], basis, n, 3):.3g}"
                 for n in NFE_TARGETS]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    nfes = [int(n) for n in args.tuned_nfes.split(",") if n]
    names = [n for n in args.tuned_processes.split(",") if n]
    if not nfes or not names:
        return
    print("\n| process | NFE | tuned 2M: KL (±2 % worst) | tuned 3M: KL (±2 % worst) | seconds 2M / 3M |")
    print("|---|---|---|---|---|")
    for name in names:
        proc = build_process(name, spectra)
        spec = spectra["dct" if name == "blurring" else "dft"]
        for n in nfes:
            two = tune.tune(proc, spec, method="dpm_solver_pp", nfe=n)
            three = tune.tune(proc, spec, method="dpm_solver_pp", nfe=n, order=3)
            print(f"| {name} | {n} | {two.kl:.3g} ({two.kl_perturbed:.3g}) | {three.kl:.3g} ({three.kl_perturbed:.3g}) "
                  f"| {two.seconds:.0f} / {three.seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
