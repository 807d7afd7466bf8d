"""Conditional-task table: PSNR / SSIM of x4 super-resolution and inpainting on the embedded photo
patches for the spd, vp_linear and ddm_constant processes at 1, 2, 5 and 10 NFE with the
ddm_bridge and gradient_estimation samplers, beside the bicubic (SR) and mean-fill (inpainting)
baselines.

    python benchmarks/task_table.py --workdir=runs/tasks --out=benchmarks/results/tasks
        [--tasks=sr4,inpaint] [--processes=spd,vp_linear,ddm_constant] [--steps=3000]
        [--batch=64] [--num-samples=256] [--nfe=1,2,5,10] [--methods=ddm_bridge,gradient_estimation]
        [--smoke] [--merge]

Each (task, process) model is trained with the same budget (``--steps`` optimiser steps of
``--batch`` images; configs/patches_sr4.py and configs/patches_inpaint.py, the process chosen as
``configs/patches_<task>.py:<process>``) in WORKDIR/<task>_<process> — skipped when a checkpoint of
that step is there, resumed when a shorter one is — then evaluated on ``--num-samples`` evenly
spaced held-out patches by ``launch.py --mode=eval``'s pipeline (:func:`spd_jax.run.evaluate.run`,
into WORKDIR/<task>_<process>/eval/task_table_n<num-samples>; finished settings are reused). A sampler the model
does not accept (e.g. ddm_bridge beside a non-DDM head, see spd_jax.run.checks) is listed as n/a with
the reason. Every run writes OUT/reports/<task>_<process>.json (the table's flat summary of the
eval report) and OUT/examples/*.npz as soon as it has them, then
re-merges everything in OUT into OUT/task_table.{csv,md} and OUT/<task>_examples.png (input |
spd | vp_linear | ddm_constant | baseline | reference). Runs can therefore be split over parallel
OS processes sharing one OUT (one --tasks/--processes pair each) and merged afterwards with
``--merge`` (reads the finished reports only, no JAX work).

On one GPU, the six models in parallel (default budget: 3000 steps of 64 patches per model, about
0.36 TFLOP per step; estimated 4-6 minutes on an H200 including XLA compiles, not yet measured)::

    export XLA_PYTHON_CLIENT_PREALLOCATE=false; mkdir -p OUT
    for t in sr4 inpaint; do for p in spd vp_linear ddm_constant; do
      python benchmarks/task_table.py --tasks=$t --processes=$p --workdir=runs/tasks --out=OUT \
        > OUT/log_${t}_${p}.txt 2>&1 &
    done; done; wait
    python benchmarks/task_table.py --merge --out=OUT

``--smoke``: a tiny U-Net, 2 steps, 8 samples (a CPU check of the whole pipeline, not a result).
"""

from __future__ import annotations

import argparse
import csv
import glob
import importlib
import io
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TASKS = {"sr4": "patches_sr4", "inpaint": "patches_inpaint"}
PROCESSES = ("spd", "vp_linear", "ddm_constant")
METHODS = ("ddm_bridge", "gradient_estimation")
NFES = (1, 2, 5, 10)
EXAMPLE_ROWS = 16
DEFAULT_STEPS = 3000
DEFAULT_BATCH = 64
DEFAULT_SAMPLES = 256


def _csv_list(text: str, valid=None) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    if valid is not None:
        for item in items:
            if item not in valid:
                raise SystemExit(f"error: {item!r} is not one of {tuple(valid)}")
    return items


def make_config(task: str, process: str, steps: int, batch: int, smoke: bool):
    """The patches config of ``task`` for ``process`` with the table's training budget."""
    config = importlib.import_module(f"configs.{TASKS[task]}").get_config(process)
    import jax

    gpu = jax.default_backend() != "cpu"
    tc = config.train
    tc.num_steps = steps
    tc.batch_size = batch
    tc.steps_per_dispatch = max(1, min(10 if gpu else 1, steps))
    while steps % tc.steps_per_dispatch:
        tc.steps_per_dispatch -= 1
    tc.checkpoint_every = max(steps // 4, tc.steps_per_dispatch)
    tc.log_every = max(min(100, steps // 10), 1)
    tc.sample_every = 0
    config.optim.warmup_steps = min(config.optim.warmup_steps, steps // 10)
    config.sample.grid_images = 0  # no training grid (one compile less): the evaluation writes examples
    config.sample.batch_size = 256
    if smoke:
        m = config.model
        m.base_channels, m.channel_mult, m.num_res_blocks = 8, (1, 2), 1
        m.attention_resolutions, m.mid_attention, m.head_channels, m.num_heads = (), False, 0, 1
        m.norm_groups = 8
        config.process.spectrum_images = 64
        config.data.crops_per_photo = 16
        tc.fast_compile = True
    return config


def _finished_step(run_dir: str) -> int:
    steps = [int(d) for d in os.listdir(os.path.join(run_dir, "checkpoints"))
             if d.isdigit()] if os.path.isdir(os.path.join(run_dir, "checkpoints")) else []
    return max(steps, default=0)


def _write(path: str, text: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _settings(config, methods, nfes) -> tuple[list[str], dict]:
    """The ``sampler:NFE`` entries the model accepts, and a skipped row for each one it refuses."""
    from spd_jax.run import evaluate
    from spd_jax.run.checks import ConfigError

    accepted, skipped = [], {}
    for method in methods:
        for nfe in nfes:
            trial = config.copy_and_resolve_references()
            trial.eval.settings = f"{method}:{nfe}"
            try:
                evaluate.check(trial)
                accepted.append(f"{method}:{nfe}")
            except ConfigError as err:
                skipped[method, nfe] = {"method": method, "requested_nfe": nfe, "skipped": str(err)}
    return accepted, skipped


def table_report(report: dict, skipped: dict, methods, nfes) -> dict:
    """The table's flat summary of an eval report (schema spd_jax.eval/2): metrics beside the
    other fields, a row per (method, NFE) in table order (refused ones with ``skipped``)."""

    def flat(entry: dict) -> dict:
        return {**{k: v for k, v in entry.items() if k != "metrics"}, **entry["metrics"]}

    description = report["description"]
    done = {(s["method"], s["nfe_requested"]): dict(flat(s), requested_nfe=s["nfe_requested"],
                                                     seconds=round(s["sample_seconds"], 3))
            for s in report["settings"]}
    return {"schema": report["schema"], "task": description["task"], "process": description["process"],
            "head": description["model_head"], "data": description["dataset"],
            "checkpoint_step": description["checkpoint_step"], "num_samples": report["protocol"]["num_samples"],
            "projection": description["projection"], "eval_dir": description["eval_dir"],
            "baseline": {"name": report["baseline"]["name"], **report["baseline"]["metrics"]},
            "settings": [done.get((m, n)) or skipped[m, n] for m in methods for n in nfes
                         if (m, n) in done or (m, n) in skipped]}


def _write_examples(report: dict, name: str, out: str) -> None:
    """OUT/examples/<name>_<method>_nfe<N>.npz: the first EXAMPLE_ROWS outputs of every setting
    beside their inputs, baseline and references (from the eval folder)."""
    from spd_jax import images

    eval_dir = report["description"]["eval_dir"]
    with np.load(os.path.join(eval_dir, report["files"]["paired"])) as paired:
        shown = {k: images.from_uint8(paired[k][:EXAMPLE_ROWS]) for k in ("inputs", "references", "baseline")}
    for s in report["settings"]:
        with np.load(os.path.join(eval_dir, "settings", s["stem"], "samples_00000.npz")) as chunk:
            outputs = images.from_uint8(chunk["images"][:EXAMPLE_ROWS])
        target = os.path.join(out, "examples", f"{name}_{s['method']}_nfe{s['nfe']}.npz")
        np.savez(target, outputs=outputs, index=np.arange(len(outputs)), nfe=s["nfe"], method=s["method"], **shown)


def run_one(task: str, process: str, args) -> dict:
    """Train (or skip) and evaluate one model; writes its report and examples into OUT."""
    from spd_jax.run import evaluate
    from spd_jax.run import train as experiment

    name = f"{task}_{process}"
    run_dir = os.path.join(args.workdir, name)
    config = make_config(task, process, args.steps, args.batch, args.smoke)
    accepted, skipped = _settings(config, args.methods, args.nfe)
    if not accepted:
        raise SystemExit(f"[{name}] the model accepts none of the settings: "
                         + "; ".join(s["skipped"] for s in skipped.values()))
    config.eval.update(settings=",".join(accepted), num_samples=args.num_samples, grid_images=EXAMPLE_ROWS,
                       name=f"task_table_n{args.num_samples}")
    train_info_path = os.path.join(run_dir, "task_table_train.json")
    done = _finished_step(run_dir)
    if done >= args.steps and os.path.exists(train_info_path):
        with open(train_info_path) as f:
            train_info = json.load(f)
        print(f"[{name}] finished checkpoint of step {done} found: training skipped", flush=True)
    else:
        print(f"[{name}] training {args.steps} steps (batch {args.batch}"
              + (f", resuming from step {done}" if done else "") + ")", flush=True)
        start = time.perf_counter()
        experiment.train(config, run_dir)
        seconds = time.perf_counter() - start
        train_info = {"steps": args.steps, "batch": args.batch, "seconds": round(seconds, 1),
                      "resumed_from": done, "smoke": bool(args.smoke)}
        _write(train_info_path, json.dumps(train_info, indent=1))
        print(f"[{name}] trained in {seconds:.0f} s", flush=True)
    start = time.perf_counter()
    os.makedirs(os.path.join(args.out, "reports"), exist_ok=True)
    os.makedirs(os.path.join(args.out, "examples"), exist_ok=True)
    evaluated = evaluate.run(config, run_dir)
    _write_examples(evaluated, name, args.out)
    report = table_report(evaluated, skipped, args.methods, args.nfe)
    report["train"] = train_info
    report["eval_seconds"] = round(time.perf_counter() - start, 1)
    report["run"] = name
    report["command"] = (f"python benchmarks/task_table.py --tasks={task} --processes={process} --steps={args.steps} "
                         f"--batch={args.batch} --num-samples={args.num_samples}" + (" --smoke" if args.smoke else ""))
    _write(os.path.join(args.out, "reports", f"{name}.json"), json.dumps(report, indent=1))
    print(f"[{name}] evaluated in {report['eval_seconds']:.0f} s", flush=True)
    return report


# ---- merge ------------------------------------------------------------------------------------------


def load_reports(out: str) -> list[dict]:
    reports = []
    for path in sorted(glob.glob(os.path.join(out, "reports", "*.json"))):
        with open(path) as f:
            reports.append(json.load(f))
    return reports


def _task_of(report) -> str:
    return "sr4" if report["task"]["name"] == "sr" else "inpaint"


def write_csv(reports: list[dict], path: str) -> None:
    buf = io.StringIO()
    fields = ["task", "process", "head", "method", "requested_nfe", "nfe", "psnr", "psnr_sem", "psnr_median",
              "psnr_of_mean_mse", "ssim", "ssim_sem",
              "swd", "seconds", "train_steps", "train_seconds", "num_samples", "note"]
    writer = csv.DictWriter(buf, fields, extrasaction="ignore")
    writer.writeheader()
    for r in reports:
        common = {"task": _task_of(r), "process": r["process"], "head": r["head"], "num_samples": r["num_samples"],
                  "train_steps": r.get("train", {}).get("steps"), "train_seconds": r.get("train", {}).get("seconds")}
        base = r["baseline"]
        writer.writerow(dict(common, method=base["name"], requested_nfe=0, nfe=0, **base))
        for row in r["settings"]:
            writer.writerow(dict(common, **row))
    _write(path, buf.getvalue())


def _psnr(row: dict) -> float:
    """The table's PSNR: the median over images (reports written before it existed: the mean)."""
    return row.get("psnr_median", row["psnr"])


def markdown(reports: list[dict], nfes, methods) -> str:
    lines = ["# Conditional tasks on the embedded 32x32 photo patches", ""]
    for task in TASKS:
        rs = [r for r in reports if _task_of(r) == task]
        if not rs:
            continue
        r0 = rs[0]
        label = "x4 super-resolution (8x8 -> 32x32)" if task == "sr4" else \
            f"inpainting ({r0['task']['mask']} masks, known pixels enforced: {r0['task']['enforce_known']})"
        train = r0.get("train", {})
        lines += [f"## {label}", "",
                  f"median PSNR (dB) / mean SSIM on {r0['num_samples']} held-out patches (the mean PSNR, dominated "
                  f"by near-flat patches, and the PSNR of the mean MSE are in the CSV); each model trained "
                  f"{train.get('steps')} steps of batch {train.get('batch')}"
                  + (" (SMOKE RUN: not a result)" if train.get("smoke") else "") + ".", ""]
        lines.append("| process (head) | sampler | " + " | ".join(f"{n} NFE" for n in nfes) + " |")
        lines.append("|---|---|" + "---|" * len(nfes))
        notes = {}
        for r in sorted(rs, key=lambda r: PROCESSES.index(r["process"]) if r["process"] in PROCESSES else 99):
            rows = {(s["method"], s["requested_nfe"]): s for s in r["settings"]}
            for m in methods:
                cells = []
                for n in nfes:
                    s = rows.get((m, n))
                    if s is None:
                        cells.append("–")
                    elif "skipped" in s:
                        cells.append("n/a")
                        notes.setdefault(f"{m} at {n} NFE: {s['skipped']}", None)
                    else:
                        cells.append(f"{_psnr(s):.2f} / {s['ssim']:.3f}")
                        for note in filter(None, s.get("note", "").split("; ")):
                            notes.setdefault(note, None)
                lines.append(f"| {r['process']} ({r['head']}) | {m} | " + " | ".join(cells) + " |")
        b = r0["baseline"]
        lines.append(f"| {b['name']} baseline | – | " + " | ".join([f"{_psnr(b):.2f} / {b['ssim']:.3f}"] * len(nfes))
                     + " |")
        lines.append("")
        times = ", ".join(f"{r['process']} {r.get('train', {}).get('seconds', '?')} s train + "
                          f"{r.get('eval_seconds', '?')} s eval" for r in rs)
        lines += [f"Wall-clock: {times}.", ""]
        if any(r["task"]["name"] == "inpaint" for r in rs):
            lines += ["Known-pixel projection: exact for the pixel-diagonal processes (vp_linear, ddm_constant), "
                      "an approximation for spectral spd (the mask does not commute with the DFT); the known "
                      "pixels of every output are pasted exactly.", ""]
        if notes:
            lines += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
        lines += ["Commands: " + "; ".join(f"`{r['command']}`" for r in rs if r.get("command")), ""]
    return "\n".join(lines)


def example_grid(out: str, task: str, reports: list[dict]) -> str | None:
    """OUT/<task>_examples.png: input | each process | baseline | reference, at the largest NFE of
    gradient_estimation (else any stored setting)."""
    from spd_jax import images

    rs = sorted([r for r in reports if _task_of(r) == task],
                key=lambda r: PROCESSES.index(r["process"]) if r["process"] in PROCESSES else 99)
    columns, first = [], None
    for r in rs:
        done = [s for s in r["settings"] if "nfe" in s]
        if not done:
            continue
        best = max(done, key=lambda s: (s["method"] == "gradient_estimation", s["nfe"]))
        path = os.path.join(out, "examples", f"{r['run']}_{best['method']}_nfe{best['nfe']}.npz")
        if not os.path.exists(path):
            continue
        data = np.load(path)
        if first is None:
            first = data
        columns.append(data["outputs"][:EXAMPLE_ROWS])
    if first is None:
        return None
    k = min(len(c) for c in columns)
    panels = [first["inputs"][:k]] + [c[:k] for c in columns] + [first["baseline"][:k], first["references"][:k]]
    target = os.path.join(out, f"{task}_examples.png")
    images.write_png(target, panels, upscale=2)
    return target


def merge(out: str, nfes, methods) -> list[dict]:
    reports = load_reports(out)
    if not reports:
        print(f"no finished reports in {out}/reports yet")
        return reports
    write_csv(reports, os.path.join(out, "task_table.csv"))
    _write(os.path.join(out, "task_table.md"), markdown(reports, nfes, methods))
    for task in TASKS:
        example_grid(out, task, reports)
    print(f"merged {len(reports)} report(s) into {out}/task_table.md, .csv and *_examples.png", flush=True)
    return reports


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", "--task", default="sr4,inpaint", help="comma list of sr4, inpaint")
    parser.add_argument("--processes", "--process", default=",".join(PROCESSES), help="comma list of processes")
    parser.add_argument("--workdir", default=os.path.join(ROOT, "runs", "task_table"))
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "tasks"))
    parser.add_argument("--steps", type=int, default=None, help=f"training steps (default {DEFAULT_STEPS}; smoke 2)")
    parser.add_argument("--batch", type=int, default=None, help=f"training batch (default {DEFAULT_BATCH}; smoke 8)")
    parser.add_argument("--num-samples", type=int, default=None,
                        help=f"held-out patches evaluated (default {DEFAULT_SAMPLES}; smoke 8)")
    parser.add_argument("--nfe", default=",".join(map(str, NFES)))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--smoke", action="store_true", help="tiny U-Net and budget (CPU check, not a result)")
    parser.add_argument("--merge", action="store_true", help="only merge the finished reports in --out")
    args = parser.parse_args(argv)
    args.tasks = _csv_list(args.tasks, TASKS)
    args.processes = _csv_list(args.processes, PROCESSES)
    args.nfe = [int(n) for n in _csv_list(args.nfe)]
    args.methods = _csv_list(args.methods, METHODS)
    args.steps = args.steps or (2 if args.smoke else DEFAULT_STEPS)
    args.batch = args.batch or (8 if args.smoke else DEFAULT_BATCH)
    args.num_samples = args.num_samples or (8 if args.smoke else DEFAULT_SAMPLES)
    os.makedirs(args.out, exist_ok=True)
    if args.merge:
        merge(args.out, args.nfe, args.methods)
        return
    import jax

    print(f"task_table on {jax.default_backend()} ({jax.device_count()} device(s)): tasks {args.tasks}, "
          f"processes {args.processes}, {args.steps} steps x batch {args.batch}, {args.num_samples} samples",
          flush=True)
    start = time.perf_counter()
    for task in args.tasks:
        for process in args.processes:
            run_one(task, process, args)
            merge(args.out, args.nfe, args.methods)  # partial results as they come
    print(f"done in {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
