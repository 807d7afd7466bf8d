"""Does a trained predict-project projection improve samples at equal total NFE?

    python benchmarks/projection_claim.py --workdir runs --out benchmarks/results
    python benchmarks/projection_claim.py --dataset mixture2d --workdir runs --out benchmarks/results

``--dataset mixture2d`` runs the same comparison on the 2-D 7x7 Gaussian-mixture toy: the score
model is ``configs/toy_smd.py:plain`` in WORKDIR/toy_plain, T_theta ``configs/toy_projection.py``
in WORKDIR/toy_proj<N>, and each variant's samples get the on-mode fraction and NLL under the true
mixture (:func:`spd_jax.metrics.mixture.mixture_scores`) instead of the image metrics; outputs
``projection_claim_mixture2d.{csv,md}``. The digits steps:

1. The score model: ``WORKDIR/digits`` (``configs/digits_spd.py``), trained unless it already holds
   its final checkpoint (``python launch.py --config=configs/digits_spd.py --workdir=runs/digits``).
2. For each total NFE T in ``--totals`` (default 10, 20) a projection network T_theta for N = T/2
   steps: ``WORKDIR/digits_proj<N>`` (``configs/digits_projection.py`` with projection.num_steps = N,
   score_workdir = WORKDIR/digits), trained unless finished.
3. Every variant sampled at the same total NFE T (score calls + projection calls) and scored by
   :func:`spd_jax.run.scoring.evaluate` (pixel FD, SWD, classifier; ``--num-samples`` samples against
   the digits test split, beside the train-split floor):

   * ``pp_trained_k<kappa>``: predict_project, N = T/2 steps, projection = T_theta (N score + N aux calls);
   * ``pp_tweedie_k<kappa>``: predict_project, N = T/2, the training-free Tweedie surrogate (2N score calls);
   * ``em``: predict_project with kappa = 0 (Euler-Maruyama, no projection), N = T;
   * ``ddim``, ``gradient_estimation``: N = T (reference).

Outputs in ``--out``: ``projection_claim.csv`` (one row per total NFE x variant x seed, plus the
floor) and ``projection_claim.md`` (the tables). Evaluations resume from ``WORKDIR/projection_claim``.
``--smoke`` trains tiny networks for a few steps and scores few samples (a pipeline check, not a
result); its outputs go to WORKDIR/results.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402

from spd_jax import data  # noqa: E402
from spd_jax.metrics.mixture import mixture_scores  # noqa: E402
from spd_jax.run import builders, checks, evaluate, projection, sampling, scoring  # noqa: E402
from spd_jax.tasks import Task  # noqa: E402
from spd_jax.training import checkpoint, compile_cache  # noqa: E402

TOTALS = (10, 20)
TRAINED_KAPPAS = (1.0, 0.5)
TWEEDIE_KAPPAS = (0.5, 1.0)
METRICS = ("pixel_fd", "swd", "classifier")
REFERENCES = ("em", "ddim", "gradient_estimation")


#: dataset -> (score config, its argument, projection config, score workdir name, projection workdir prefix)
DATASETS = {"digits": ("digits_spd", None, "digits_projection", "digits", "digits_proj"),
            "mixture2d": ("toy_smd", "plain", "toy_projection", "toy_plain", "toy_proj")}
TOY_SAMPLES = 2000


def _config(name: str, arg: str | None = None):
    module = importlib.import_module(f"configs.{name}")
    return module.get_config() if arg is None else module.get_config(arg)


def _shrink(config, steps: int) -> None:
    """Tiny network and run (--smoke)."""
    m = config.model
    if m.kind == "mlp":
        m.mlp_width, m.mlp_blocks = 32, 1
    else:
        m.base_channels, m.channel_mult, m.num_res_blocks, m.norm_groups = 8, (1,), 1, 8
        config.process.spectrum_images = 64
        config.sample.grid_images = 4
    config.optim.warmup_steps = 0
    config.train.update(batch_size=16, num_steps=steps, log_every=steps, checkpoint_every=steps, fast_compile=True)
    config.sample.batch_size = 16


def score_config(workdir: Path, smoke: bool, dataset: str = "digits"):
    name, arg, *_ = DATASETS[dataset]
    config = _config(name, arg)
    if smoke:
        _shrink(config, 20)
    return config


def projection_config(workdir: Path, score_dir: Path, steps: int, smoke: bool, train_steps: int,
                      dataset: str = "digits"):
    config = _config(DATASETS[dataset][2])
    if smoke:
        _shrink(config, 20)
    else:
        config.train.num_steps = train_steps
        config.train.checkpoint_every = train_steps
    config.projection.score_workdir = str(score_dir)
    config.projection.num_steps = steps
    config.sample.nfe = 2 * steps
    if dataset == "digits":
        config.eval.settings = f"predict_project:{2 * steps}"
    return config


def _finished(config, workdir: Path) -> bool:
    ckpt_dir = workdir / "checkpoints"
    if not ckpt_dir.is_dir():
        return False
    ckpt = checkpoint.Checkpointer(ckpt_dir, config.train.keep_checkpoints)
    try:
        return ckpt.latest_step() == config.train.num_steps
    finally:
        ckpt.close()


def ensure_trained(config, workdir: Path, log=print) -> None:
    """Train (or resume) the run of ``config`` in ``workdir`` unless it holds its final checkpoint."""
    from spd_jax.run import train

    checks.validate(config, jax.device_count(), jax.process_count())
    if _finished(config, workdir):
        log(f"{workdir}: finished earlier ({config.train.num_steps} steps), reused")
        return
    log(f"{workdir}: training {config.train.num_steps} steps")
    train.train(config, str(workdir))


def variants(total: int) -> list[tuple[str, dict]]:
    """(label, sampler settings without the projection) of every variant at ``total`` NFE."""
    if total % 2:
        raise ValueError(f"total NFE {total} must be even (predict-project makes 2 calls per step)")
    half = total // 2
    out = [(f"pp_trained_k{k:g}", dict(method="predict_project", num_steps=half, kappa=k, trained=True))
           for k in TRAINED_KAPPAS]
    out += [(f"pp_tweedie_k{k:g}", dict(method="predict_project", num_steps=half, kappa=k)) for k in TWEEDIE_KAPPAS]
    out += [("em", dict(method="predict_project", num_steps=total, kappa=0.0))]
    out += [(m, dict(method=m, num_steps=total)) for m in ("ddim", "gradient_estimation")]
    return out


def make_generate(score_cfg, score: projection.Score, trained: dict, batch: int):
    """A :data:`spd_jax.run.scoring.Generate` for ``(label, total)`` settings of :func:`variants`;
    ``trained`` maps N to a restored projection run. info carries the library's NFE counts."""
    s = score.restored
    cache: dict = {}

    def settings_of(label: str, total: int) -> tuple[dict, bool]:
        spec = dict(dict(variants(total))[label])
        use_trained = spec.pop("trained", False)
        base = builders.sampler_settings(score_cfg, spec["method"], total)
        base.update(spec)
        if spec["method"] != "predict_project":
            base.pop("kappa", None)
        return base, use_trained

    def generate(label: str, total: int, key, num: int, offset: int):
        if (label, total) not in cache:
            settings, use_trained = settings_of(label, total)
            model = trained[settings["num_steps"]].model if use_trained else None
            sampler = sampling.make_sampler(s.model, s.process, score.head, Task(), settings, s.shape,
                                            projection_model=model)
            variables = ({"score": s.variables, "projection": trained[settings["num_steps"]].variables}
                         if use_trained else s.variables)
            cache[label, total] = (sampler, variables)
        sampler, variables = cache[label, total]
        images, nfe = sampling.draw(sampler, variables, key, num, batch, offset=offset)
        return images, {"nfe": nfe, "aux_nfe": sampler.aux_nfe}  # the library's own counts (its plan)

    return generate


def compare(score_cfg, score_dir: Path, projection_dirs: dict, *, totals, num_samples: int, metrics,
            out_dir: Path, seeds=(0,), batch: int = 250, log=print) -> list[dict]:
    """Score every variant of :func:`variants` at each total NFE; returns the CSV rows."""
    score = projection.Score(builders.restore_ema(score_cfg, str(score_dir)), str(score_cfg.model.head),
                             str(score_dir), None)
    trained = {}
    for steps, (cfg, workdir) in projection_dirs.items():
        trained[steps] = builders.restore_ema(cfg, str(workdir))
    references = evaluate.load_images(score_cfg, "test")
    floor = evaluate.load_images(score_cfg, "train", num_samples, 0)
    settings = [(label, total) for total in totals for label, _ in variants(total)]
    rows = []
    for seed in seeds:
        report = scoring.evaluate(
            make_generate(score_cfg, score, trained, min(batch, num_samples)), settings=settings,
            reference_images=references, reference_name="digits/test", floor_images=floor, floor_name="digits/train",
            workdir=out_dir / f"seed{seed}", num_samples=num_samples, metrics=list(metrics), seed=seed,
            description={"score_workdir": str(score_dir), "score_checkpoint_step": int(score.restored.step),
                         "projection_workdirs": {str(n): str(w) for n, (_, w) in projection_dirs.items()},
                         "projection_steps": {str(n): int(r.step) for n, r in trained.items()}},
            record={"score_step": int(score.restored.step),
                    "projection_steps": {str(n): int(r.step) for n, r in trained.items()}},
            knobs={(label, total): dict(variants(total))[label] for label, total in settings},
            verbose=False)
        for result in report["settings"]:
            label, total = result["method"], result["nfe_requested"]
            spec = dict(variants(total))[label]
            rows.append({"seed": seed, "total_nfe_target": total, "variant": label, "steps": spec["num_steps"],
                         "kappa": spec.get("kappa", ""), "nfe": result["nfe"], "aux_nfe": result["aux_nfe"],
                         "total_nfe": result["nfe"] + result["aux_nfe"], **result["metrics"]})
        rows.append({"seed": seed, "total_nfe_target": "", "variant": "floor (train vs test)", "steps": "",
                     "kappa": "", "nfe": "", "aux_nfe": "", "total_nfe": "", **report["floor"]["metrics"]})
        log(f"seed {seed}: {len(report['settings'])} settings scored")
    return rows


def compare_points(score_cfg, score_dir: Path, projection_dirs: dict, *, totals, num_samples: int,
                   seeds=(0,), log=print) -> list[dict]:
    """The point-cloud comparison: every variant of :func:`variants` at each total NFE, scored by
    the on-mode fraction and NLL under the true mixture; returns the CSV rows."""
    score = projection.Score(builders.restore_ema(score_cfg, str(score_dir)), str(score_cfg.model.head),
                             str(score_dir), None)
    trained = {steps: builders.restore_ema(cfg, str(workdir)) for steps, (cfg, workdir) in projection_dirs.items()}
    generate = make_generate(score_cfg, score, trained, num_samples)
    rows = []
    for seed in seeds:
        for total in totals:
            for label, spec in variants(total):
                points, info = generate(label, total, jax.random.key(seed), num_samples, 0)
                rows.append({"seed": seed, "total_nfe_target": total, "variant": label, "steps": spec["num_steps"],
                             "kappa": spec.get("kappa", ""), "nfe": info["nfe"], "aux_nfe": info["aux_nfe"],
                             "total_nfe": info["nfe"] + info["aux_nfe"], **mixture_scores(points)})
        truth = data.load_mixture2d("test")[:num_samples]
        rows.append({"seed": seed, "total_nfe_target": "", "variant": "true samples (test split)", "steps": "",
                     "kappa": "", "nfe": "", "aux_nfe": "", "total_nfe": "", **mixture_scores(truth)})
        log(f"seed {seed}: {len(rows)} rows")
    return rows


def markdown(rows: list[dict], metric_keys: list[str], dataset: str = "digits") -> str:
    """Per total NFE: variants x metrics (mean over seeds, and the spread when there are several)."""
    seeds = sorted({r["seed"] for r in rows})
    if dataset == "digits":
        intro = (f"Samples per setting scored against the digits test split; seeds {seeds}; lower is better for "
                 "pixel FD, SWD and classifier FD, higher for the classifier score.")
    else:
        intro = (f"{TOY_SAMPLES} samples per setting; on-mode fraction (within 3 std of a component, higher is "
                 f"better) and NLL under the true mixture (lower is better); seeds {seeds}.")
    lines = [intro, ""]
    header = "| total NFE | variant | steps N | kappa | nfe + aux | " + " | ".join(metric_keys) + " |"
    lines += [header, "|" + "---|" * (5 + len(metric_keys))]
    keys = list(dict.fromkeys((r["total_nfe_target"], r["variant"]) for r in rows))
    for total, variant in sorted(keys, key=lambda k: (k[0] == "", k[0] or 0)):
        group = [r for r in rows if (r["total_nfe_target"], r["variant"]) == (total, variant)]
        first = group[0]
        cells = []
        for key in metric_keys:
            values = [float(r[key]) for r in group]
            mean = sum(values) / len(values)
            spread = f" ± {(max(values) - min(values)) / 2:.3g}" if len(values) > 1 else ""
            cells.append(f"{mean:.4g}{spread}")
        calls = f"{first['nfe']} + {first['aux_nfe']}" if first["nfe"] != "" else ""
        lines.append(f"| {total} | {variant} | {first['steps']} | {first['kappa']} | {calls} | " + " | ".join(cells)
                     + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="digits")
    parser.add_argument("--workdir", default="runs", help="training runs (score model, projection runs) and evaluations")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the CSV and markdown")
    parser.add_argument("--totals", default=",".join(map(str, TOTALS)), help="comma list of even total NFEs")
    parser.add_argument("--num-samples", type=int, default=0, help=f"samples per setting (0: 1000 digits, "
                        f"{TOY_SAMPLES} toy points)")
    parser.add_argument("--seeds", default="0", help="comma list of sampling seeds")
    parser.add_argument("--projection-train-steps", type=int, default=0,
                        help="T_theta's training steps (0: the projection config's)")
    parser.add_argument("--smoke", action="store_true", help="tiny networks, few steps and samples (pipeline check)")
    args = parser.parse_args(argv)
    compile_cache.enable(None)
    workdir = Path(args.workdir).absolute()
    totals = [int(t) for t in args.totals.split(",")]
    points = args.dataset in data.POINT_DATASETS
    num_samples = 32 if args.smoke else args.num_samples or (TOY_SAMPLES if points else 1000)
    metrics = ("pixel_fd", "swd") if args.smoke else METRICS
    out = workdir / "results" if args.smoke else Path(args.out)
    _, _, proj_name, score_name, proj_prefix = DATASETS[args.dataset]
    score_dir = workdir / score_name
    score_cfg = score_config(score_dir, args.smoke, args.dataset)
    ensure_trained(score_cfg, score_dir)
    train_steps = args.projection_train_steps or int(_config(proj_name).train.num_steps)
    projection_dirs = {}
    for total in totals:
        steps = total // 2
        proj_dir = workdir / f"{proj_prefix}{steps}"
        cfg = projection_config(proj_dir, score_dir, steps, args.smoke, train_steps, args.dataset)
        ensure_trained(cfg, proj_dir)
        projection_dirs[steps] = (cfg, proj_dir)
    seeds = [int(s) for s in args.seeds.split(",")]
    if points:
        rows = compare_points(score_cfg, score_dir, projection_dirs, totals=totals, num_samples=num_samples,
                              seeds=seeds)
        keys = ["on_mode", "nll"]
    else:
        rows = compare(score_cfg, score_dir, projection_dirs, totals=totals, num_samples=num_samples,
                       metrics=metrics, out_dir=workdir / "projection_claim" / f"n{num_samples}", seeds=seeds)
        keys = scoring.metric_keys(list(metrics))
    stem = "projection_claim" + ("_" + args.dataset if points else "")
    out.mkdir(parents=True, exist_ok=True)
    fields = ["seed", "total_nfe_target", "variant", "steps", "kappa", "nfe", "aux_nfe", "total_nfe"] + keys
    with open(out / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows({k: (f"{v:.6g}" if isinstance(v, float) and math.isfinite(v) else v)
                          for k, v in r.items()} for r in rows)
    table = markdown(rows, keys, args.dataset)
    (out / f"{stem}.md").write_text(table)
    print(table)
    print(f"wrote {out / (stem + '.csv')} and {out / (stem + '.md')}")
    return rows


if __name__ == "__main__":
    main()
