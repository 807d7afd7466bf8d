"""The path report: Fisher lengths of every process and the SPD "sharpening + noise deblurring" picture.

``run(config, workdir)`` estimates the spectrum of the embedded photo patches, computes the Fisher
length (per channel) of every corruption process under that spectrum and under the official
CIFAR-10 preset, and writes ``fisher_lengths.{json,md}``, ``spectrum.png`` and ``spd_gains.png``.

DFT-basis and frequency-independent processes are measured against the DFT surrogate N_B(0, S);
the DCT processes (blurring, IHDM) against the DCT surrogate of the same data, with their own
shortest length, since a process's surrogate must be diagonal in the process's basis.
"""

from __future__ import annotations

import json
import time

import numpy as np
from etils import epath

from spd_jax import data
from spd_jax.diffusion import bases, fisher, processes, spectrum


def _processes(spec_dft: np.ndarray, shape: tuple, deviations) -> list:
    procs = [
        processes.spd(spec_dft),
        processes.ddm_constant(),
        processes.rectified_flow(),
        processes.vp_linear(),
        processes.vp_linear(num_steps=1000),
        processes.vp_cosine(),
    ]
    procs += [processes.spd(spec_dft, deviation=d) for d in deviations]
    procs += [processes.blurring(shape), processes.ihdm(shape)]
    return procs


def fisher_table(spec_dft: np.ndarray, spec_dct: np.ndarray, deviations=(0.05, 0.1, 0.2),
                 num_points: int = 2**16) -> list[dict]:
    """Rows {process, basis, length, ratio, start_gap, end_gap} (per-channel lists)."""
    rows = []
    shortest = {"dft": fisher.shortest_length(spec_dft), "dct": fisher.shortest_length(spec_dct)}
    for proc in _processes(spec_dft, spec_dft.shape, deviations):
        basis = "dct" if proc.basis == "dct" else "dft"
        spec = spec_dct if basis == "dct" else spec_dft
        length = fisher.path_length(proc, spec, num_points=num_points)
        start, end = fisher.endpoint_gaps(proc, spec)
        rows.append(
            {
                "process": proc.name,
                "basis": basis,
                "length": length.tolist(),
                "ratio": (length / shortest[basis]).tolist(),
                "start_gap": start.tolist(),
                "end_gap": end.tolist(),
            }
        )
    for basis in ("dft", "dct"):
        rows.append(
            {
                "process": f"geodesic L* ({basis.upper()} surrogate)",
                "basis": basis,
                "length": shortest[basis].tolist(),
                "ratio": [1.0] * len(shortest[basis]),
                "start_gap": [0.0] * len(shortest[basis]),
                "end_gap": [0.0] * len(shortest[basis]),
            }
        )
    return rows


def _fmt(values) -> str:
    values = np.asarray(values)
    if np.allclose(values, values[0], rtol=1e-9, atol=0):
        return f"{values[0]:.2f}"
    return " / ".join(f"{v:.2f}" for v in values)


def markdown(rows: list[dict], title: str) -> str:
    lines = [
        f"**{title}** (per channel; R / G / B where they differ)",
        "",
        "| process | basis | Fisher length | L / L* | gap at t=0 | gap at t=1 |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = " / ".join(f"{v:.3f}" for v in np.unique(np.round(r["ratio"], 3)))
        lines.append(
            f"| {r['process']} | {r['basis']} | {_fmt(r['length'])} | {ratio} | "
            f"{_fmt(r['start_gap'])} | {_fmt(r['end_gap'])} |"
        )
    return "\n".join(lines)


def _save_figure(fig, path: epath.Path) -> None:
    with path.open("wb") as f:
        fig.savefig(f, dpi=110, format="png")


def _plot_spectrum(path: epath.Path, spec: np.ndarray, preset: np.ndarray, fit) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for s, label in ((spec, "embedded patches (estimated)"), (preset, "CIFAR-10 preset")):
        r, p = spectrum.radial_profile(s)
        ax.loglog(np.maximum(r, 0.5), p, "o-", ms=3, label=label)
    r = np.linspace(0.5, 23, 200)
    ax.loglog(r, fit.c1 / (fit.c2 + r) ** fit.m, "k--", lw=1,
              label=f"fit {fit.c1:.3g}/({fit.c2:.2g}+|k|)^{fit.m:.2f}")
    ax.set_xlabel("|k| (cycles per image; DC drawn at 0.5)")
    ax.set_ylabel("S(k), model units")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)


def _plot_gains(path: epath.Path, spec: np.ndarray) -> None:
    """SPD signal gain alpha_t(k) and noise gain sigma_t(k) against |k| for several t."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    proc, vp = processes.spd(spec), processes.vp_cosine()
    times = np.array([0.05, 0.2, 0.4, 0.6, 0.8, 0.95])
    alpha, sigma = proc.marginal64(times)
    rings = np.round(bases.frequency_magnitude(spec.shape[0], spec.shape[1])).astype(int)
    radii = np.unique(rings)

    def ring_mean(gain):  # average the red channel's gain over rings round(|k|)
        return np.array([gain[..., 0][rings == r].mean() for r in radii])

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(times)))
    for i, t in enumerate(times):
        a_vp, s_vp = vp.marginal64(t)
        axes[0].plot(radii, ring_mean(alpha[i]), "o-", ms=2, color=colors[i], label=f"t={t:g}")
        axes[0].axhline(float(a_vp), color=colors[i], ls=":", lw=0.8)
        axes[1].plot(radii, ring_mean(sigma[i]), "o-", ms=2, color=colors[i], label=f"t={t:g}")
        axes[1].axhline(float(s_vp), color=colors[i], ls=":", lw=0.8)
    axes[0].set_title("SPD signal gain alpha_t(k): sharpening", fontsize=10)
    axes[1].set_title("SPD noise gain sigma_t(k): noise deblurring", fontsize=10)
    for ax in axes:
        ax.set_xlabel("|k| (cycles per image, ring average)")
        ax.set_ylim(-0.02, 1.02)
    axes[0].set_ylabel("gain (solid: SPD, red; dotted: cosine VP)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)


def run(config, workdir: str) -> dict:
    """Compute and write the report; returns the JSON-able result."""
    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    images = data.load_patches("train", crops_per_photo=int(config.crops_per_photo), seed=int(config.seed))
    shape = images.shape[1:]
    spec_dft = spectrum.estimate(images, "dft")
    spec_dct = spectrum.estimate(images, "dct")
    fit = spectrum.fit_power_law(spec_dft)
    preset_dft = spectrum.power_law(shape, *spectrum.CIFAR10_PRESET, basis="dft")
    preset_dct = spectrum.power_law(shape, *spectrum.CIFAR10_PRESET, basis="dct")
    deviations = tuple(float(d) for d in config.deviations)
    n = int(config.num_points)
    result = {
        "num_images": int(images.shape[0]),
        "image_shape": list(shape),
        "power_law_fit": fit._asdict(),
        "preset": {"params": spectrum.CIFAR10_PRESET._asdict(),
                   "rows": fisher_table(preset_dft, preset_dct, deviations, n)},
        "patches": {"rows": fisher_table(spec_dft, spec_dct, deviations, n)},
    }
    text = "\n\n".join(
        [
            markdown(result["preset"]["rows"], "CIFAR-10 preset spectrum 1.59/(0.0086+|k|)^2, 32x32"),
            markdown(result["patches"]["rows"],
                     f"Estimated spectrum of {images.shape[0]} embedded 32x32x3 photo patches"),
        ]
    )
    (workdir / "fisher_lengths.json").write_text(json.dumps(result, indent=1))
    (workdir / "fisher_lengths.md").write_text(text + "\n")
    with (workdir / "spectrum.npz").open("wb") as f:
        np.savez(f, dft=spec_dft, dct=spec_dct)
    _plot_spectrum(workdir / "spectrum.png", spec_dft, preset_dft, fit)
    _plot_gains(workdir / "spd_gains.png", spec_dft)
    print(text)
    print(f"\npower-law fit of the patch spectrum: c1={fit.c1:.4g} c2={fit.c2:.4g} m={fit.m:.4g}")
    print(f"wrote {workdir}/fisher_lengths.{{json,md}}, spectrum.png, spd_gains.png "
          f"in {time.time() - start:.1f} s")
    return result
