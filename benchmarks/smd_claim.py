"""SMD's claim, trained and scored (docs/math.md §5.3, §6.7, §7.4; not a timed test).

Claim: a Gaussian backward kernel cannot represent a multimodal posterior at few steps; SMD's latent
(eta -> z = g_xi(x_t, eta, t) modulating the denoiser) fixes it. Each dataset is trained three ways
with the same steps and batch through :func:`spd_jax.run.train.train`:

* ``plain``: the single-Gaussian eps model, sampled with ``ancestral``;
* ``single_eta``: SMD with the official single-eta loss, sampled with ``smd``;
* ``mixture``: SMD with the K-sample log-mean-exp loss, sampled with ``smd``.

``--dataset mixture2d`` (configs/toy_smd.py): on-mode fraction and NLL under the true mixture
(:func:`spd_jax.metrics.mixture.mixture_scores`) at 2, 5, 10 and 50 steps, beside two oracle rows on
the same grids (``benchmarks/sampler_quality.py``): the exact-posterior-mean denoiser with the
ancestral sampler (the best any Gaussian kernel of this form can do) and the exact mixture kernel.
Latent use: at fixed x_t (several t) the spread sqrt(E|x0_hat - mean|^2) of x0_hat over 64 eta
draws, against the spread of x_0 under the exact posterior p(x_0 | x_t).

``--dataset digits`` (configs/digits_smd.py): ``launch.py --mode=eval`` metrics (pixel FD, SWD,
classifier score) through :func:`spd_jax.run.evaluate.run` at 2, 5, 10 and 50 NFE.

Writes ``smd_claim_<dataset>.{csv,md}`` to ``--out`` and prints the Markdown tables::

    python -m benchmarks.smd_claim [--dataset mixture2d|digits] [--workdir runs/smd_claim] [--out benchmarks/results]
    python -m benchmarks.smd_claim --smoke --workdir /tmp/smd_smoke --out /tmp/smd_smoke  # pipeline check
"""

from __future__ import annotations

import argparse
import csv
import pathlib
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # configs import configs.defaults

from benchmarks.sampler_quality import exact_mixture_kernel  # noqa: E402
from configs import digits_smd, toy_smd  # noqa: E402
from spd_jax import data  # noqa: E402
from spd_jax.diffusion import analytic, samplers  # noqa: E402
from spd_jax.metrics.mixture import mixture_scores, posterior_x0_moments  # noqa: E402
from spd_jax.models.heads import model_denoiser  # noqa: E402
from spd_jax.run import builders, evaluate, sampling, train  # noqa: E402

VARIANTS = ("plain", "single_eta", "mixture")
STEPS = (2, 5, 10, 50)
SPREAD_TIMES = (0.1, 0.2, 0.4, 0.7)
TOY_SAMPLES = 2000
SPREAD_POINTS, SPREAD_ETAS = 256, 64
#: the smoke run: tiny budget, only checks that the pipeline runs end to end
SMOKE = {"train.num_steps": 20, "train.checkpoint_every": 20, "train.log_every": 10, "optim.warmup_steps": 5,
         "model.mlp_width": 32, "model.mlp_blocks": 1, "model.latent_base_channels": 16, "train.batch_size": 64,
         "train.fast_compile": True}


def _override(config, overrides: dict):
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return config


def make_config(dataset: str, variant: str, overrides: dict | None = None):
    module = toy_smd if dataset == "mixture2d" else digits_smd
    return _override(module.get_config(variant), overrides or {})


def sampler_for(config) -> str:
    """``smd`` for models with a latent network, else ``ancestral`` (the same posterior step)."""
    return "smd" if config.model.kind in ("smd", "smd_mlp") else "ancestral"


# ---- toy ---------------------------------------------------------------------------------------------


def toy_oracles(steps: Sequence[int], num: int, seed: int = 0) -> list[dict]:
    """On-mode / NLL of the exact-mean ancestral sampler and the exact mixture kernel on each grid."""
    config = make_config("mixture2d", "plain")
    process = builders.build_process(config, None, (1, 1, 2))
    means = data.mixture_means()
    den = analytic.gmm_denoiser(process, np.full(len(means), 1.0 / len(means)), means.reshape(-1, 1, 1, 2),
                                np.full(len(means), data.MIXTURE_STD**2))
    key = jax.random.PRNGKey(seed)
    x_init = process.prior_sample(key, (num, 1, 1, 2))
    rows = []
    for n in steps:
        x, _ = samplers.sample(den, process, method="ancestral", num_steps=n, key=key, x_T=x_init, clip_x0=False)
        rows.append({"model": "oracle: exact posterior mean", "sampler": "ancestral", "steps": n,
                     **mixture_scores(np.asarray(x))})
        grid = samplers.plan(process, method="ancestral", num_steps=n).grid
        x = exact_mixture_kernel(process, grid, means, np.asarray(x_init).reshape(-1, 2), seed + n)
        rows.append({"model": "oracle: exact mixture kernel", "sampler": "exact", "steps": n, **mixture_scores(x)})
    return rows


def toy_scores(config, restored: builders.Restored, steps: Sequence[int], num: int, seed: int = 0) -> list[dict]:
    method = sampler_for(config)
    rows = []
    for n in steps:
        settings = builders.sampler_settings(config, method, n)
        run = sampling.make_sampler(restored.model, restored.process, config.model.head, builders.task_of(config),
                                    settings, restored.shape, config.train.fast_compile)
        start = time.time()
        x, nfe = sampling.draw(run, restored.variables, jax.random.PRNGKey(seed), num, num)
        rows.append({"sampler": method, "steps": n, "nfe": nfe, **mixture_scores(x),
                     "seconds": round(time.time() - start, 2)})
    return rows


def latent_spread(config, restored: builders.Restored, times: Sequence[float] = SPREAD_TIMES,
                  points: int = SPREAD_POINTS, etas: int = SPREAD_ETAS, seed: int = 0) -> list[dict]:
    """Per t: the model's spread of x0_hat over ``etas`` latent draws at fixed x_t (mean over
    ``points`` x_t from q(x_t)), the exact posterior's spread of x_0, and E|x0_hat mean - E[x_0|x_t]|."""
    process, smd = restored.process, config.model.kind in ("smd", "smd_mlp")
    den = jax.jit(model_denoiser(restored.model, restored.variables, process, config.model.head))
    x0 = data.load_mixture2d("test")[:points]
    rows = []
    for i, t in enumerate(times):
        key = jax.random.PRNGKey(seed + i)
        tt = jnp.full((points,), t, jnp.float32)
        x_t, _ = process.forward_sample(jnp.asarray(x0), tt, key)
        alpha, sigma = (float(np.asarray(a).ravel()[0]) for a in process.marginal64(np.array([t])))
        exact_mean, exact_spread = posterior_x0_moments(np.asarray(x_t), alpha, sigma)
        tiled = jnp.tile(x_t, (etas, 1, 1, 1))
        pred = den(tiled, jnp.full((points * etas,), t, jnp.float32), key=jax.random.fold_in(key, 1) if smd else None)
        x0_hat = np.asarray(pred.x0, np.float64).reshape(etas, points, 2)
        mean = x0_hat.mean(axis=0)
        spread = np.sqrt(np.mean(np.sum((x0_hat - mean) ** 2, axis=-1), axis=0))
        rows.append({"t": t, "model_spread": float(spread.mean()), "exact_spread": float(exact_spread.mean()),
                     "mean_error": float(np.mean(np.linalg.norm(mean - exact_mean, axis=-1)))})
    return rows


# ---- digits ------------------------------------------------------------------------------------------


def digits_scores(config, workdir: pathlib.Path, steps: Sequence[int], num: int) -> list[dict]:
    config = _override(config, {"eval.settings": ",".join(f"{sampler_for(config)}:{n}" for n in steps),
                                "eval.num_samples": num, "eval.name": f"smd_claim_{num}"})
    report = evaluate.run(config, str(workdir), verbose=False)
    rows = []
    for entry in report["settings"]:
        rows.append({"sampler": entry["method"], "steps": entry["nfe_requested"], "nfe": entry["nfe"],
                     **{k: round(float(v), 4) for k, v in entry["metrics"].items()}})
    return rows


# ---- driver ------------------------------------------------------------------------------------------


def run(dataset: str, workdir: pathlib.Path, *, variants: Sequence[str] = VARIANTS, steps: Sequence[int] = STEPS,
        overrides: dict | None = None, num: int | None = None, spread: tuple = (SPREAD_POINTS, SPREAD_ETAS),
        oracles: bool = True, log=print) -> dict:
    """Train (or resume) and score every variant; returns {"scores", "spread", "train"} row lists."""
    num = num or (TOY_SAMPLES if dataset == "mixture2d" else 1000)
    out = {"scores": [], "spread": [], "train": []}
    for variant in variants:
        config = make_config(dataset, variant, overrides)
        wd = workdir / f"{dataset}_{variant}"
        start = time.time()
        train.train(config, str(wd))
        seconds = time.time() - start
        out["train"].append({"model": variant, "steps": config.train.num_steps, "batch": config.train.batch_size,
                             "seconds": round(seconds, 1)})
        log(f"{variant}: trained {config.train.num_steps} steps in {seconds:.0f} s ({wd})")
        if dataset == "mixture2d":
            restored = builders.restore_ema(config, str(wd))
            out["scores"] += [{"model": variant, **r} for r in toy_scores(config, restored, steps, num)]
            out["spread"] += [{"model": variant, **r}
                              for r in latent_spread(config, restored, points=spread[0], etas=spread[1])]
        else:
            out["scores"] += [{"model": variant, **r} for r in digits_scores(config, wd, steps, num)]
    if dataset == "mixture2d" and oracles:
        out["scores"] += toy_oracles(steps, num)
    return out


def _table(rows: list[dict], keys: Sequence[str], fmt: str = "{:.3f}") -> str:
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        cells = [fmt.format(r[k]) if isinstance(r[k], float) else str(r[k]) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def score_table(rows: list[dict], value: str, steps: Sequence[int]) -> str:
    """One row per (model, sampler), one column per step count."""
    models = list(dict.fromkeys((r["model"], r["sampler"]) for r in rows))
    lines = ["| model | sampler | " + " | ".join(f"{n} steps" for n in steps) + " |", "|---|---|" + "---|" * len(steps)]
    for model, sampler in models:
        cells = {r["steps"]: r for r in rows if r["model"] == model and r["sampler"] == sampler}
        lines.append(f"| {model} | {sampler} | "
                     + " | ".join(f"{cells[n][value]:.3f}" if n in cells else "" for n in steps) + " |")
    return "\n".join(lines)


def markdown(dataset: str, result: dict, steps: Sequence[int]) -> str:
    parts = ["### Training (same steps and batch for every model)\n", _table(result["train"], ["model", "steps",
                                                                                               "batch", "seconds"])]
    metrics = (["on_mode", "nll"] if dataset == "mixture2d"
               else [k for k in result["scores"][0] if k not in ("model", "sampler", "steps", "nfe")])
    for metric in metrics:
        parts += [f"\n### {metric}\n", score_table(result["scores"], metric, steps)]
    if result["spread"]:
        parts += ["\n### Latent use: spread of x0_hat over eta at fixed x_t vs the exact posterior's spread of x_0\n",
                  _table(result["spread"], ["model", "t", "model_spread", "exact_spread", "mean_error"])]
    return "\n".join(parts) + "\n"


def write(result: dict, dataset: str, out: pathlib.Path, steps: Sequence[int]) -> str:
    out.mkdir(parents=True, exist_ok=True)
    for name in ("scores", "spread", "train"):
        rows = result[name]
        if not rows:
            continue
        fields = list(dict.fromkeys(k for r in rows for k in r))
        with (out / f"smd_claim_{dataset}_{name}.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
    text = markdown(dataset, result, steps)
    (out / f"smd_claim_{dataset}.md").write_text(text)
    return text


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=("mixture2d", "digits"), default="mixture2d")
    parser.add_argument("--workdir", default="runs/smd_claim", help="one training workdir per variant under it")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--num_steps", type=int, default=0, help="training steps (0 = the config's)")
    parser.add_argument("--smoke", action="store_true", help="tiny budget: checks the pipeline, numbers meaningless")
    args = parser.parse_args(argv)
    overrides = dict(SMOKE) if args.smoke else {}
    if args.smoke and args.dataset == "digits":
        overrides = {k: v for k, v in SMOKE.items() if not k.startswith("model.")}
    if args.num_steps:
        overrides.update({"train.num_steps": args.num_steps, "train.checkpoint_every": args.num_steps})
    steps = (2, 10) if args.smoke else STEPS
    result = run(args.dataset, pathlib.Path(args.workdir), variants=args.variants.split(","), steps=steps,
                 overrides=overrides, num=200 if args.smoke else None, spread=(32, 8) if args.smoke else
                 (SPREAD_POINTS, SPREAD_ETAS))
    print(write(result, args.dataset, pathlib.Path(args.out), steps))


if __name__ == "__main__":
    main()
