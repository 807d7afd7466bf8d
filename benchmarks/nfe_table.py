"""The README's quality-vs-NFE table: train several processes with one budget, evaluate each with
the gradient-estimation and DDIM samplers at NFE 5, 10, 20 and 50, and tabulate beside the floor.

    python benchmarks/nfe_table.py --dataset digits,patches --workdir /tmp/nfe --out benchmarks/results

For every dataset (``digits`` | ``patches``, the embedded sets) and process (``--processes``,
default spd, vp_linear, blurring, ddm_constant) a worker trains ``WORKDIR/<dataset>_<process>``
with :func:`spd_jax.run.train.train` (the dataset's config, only ``config.process.name``
changed; the same steps, batch, learning-rate schedule and EMA for every process; eps head) —
skipped when the run already holds its final checkpoint, resumed when it holds an earlier one —
then evaluates its EMA parameters with :func:`spd_jax.run.evaluate.run` (samples against the test
split; an interrupted evaluation resumes). The floor is the same metrics between real training
images and the test split (:func:`spd_jax.run.scoring.floor_metrics`).

Every config is checked before anything starts. Workers run as separate OS processes, ``--jobs``
at a time (0 = all at once; each allocates accelerator memory on demand, capped at
``--mem-fraction``, default 0.9 / workers at a time), or one after another inside this process
(``--jobs 1``). A worker that fails (e.g. out of memory beside the others) is rerun once at the
end, alone: its finished training and settings are kept. Progress lines carry the elapsed time and
the worker's tag; every worker writes its timings to WORKDIR/<dataset>_<process>/nfe_table_worker.json.
After every finished worker, and at the end, the table is rebuilt from every finished setting
under WORKDIR (so runs split over several invocations, e.g. ``--processes spd,vp_linear`` on one
machine and ``--processes blurring,ddm_constant`` on another with the same WORKDIR, merge; or
``--merge`` only rebuilds it). Outputs in ``--out``:

    nfe_table.csv               one row per dataset x process x sampler x NFE (+ floor rows)
    nfe_table.md                per dataset and metric: rows process x sampler, columns NFE
    nfe_table_<dataset>.png     every metric against NFE (colour = process, style = sampler)

``--smoke`` runs a tiny network for a few steps on few samples (a CPU check of the pipeline, not
a result). Default budget (one H200, both datasets, 8 workers at once): digits 4000 and patches
2000 steps at batch 128, 1000 samples per setting. Measured there with 8 workers, digits 4000 and
patches 3000 steps: 409 s in all; patches compiled for 105-175 s beside the others, then trained
at ~23 steps/s and evaluated in ~90 s; digits compiled for ~70 s, trained at ~57 steps/s and
evaluated in ~55 s.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DATASETS = ("digits", "patches")
PROCESSES = ("spd", "vp_linear", "blurring", "ddm_constant")
SAMPLERS = ("gradient_estimation", "ddim")
#: processes with their own head and sampler (trained and evaluated with these whatever --samplers says)
OWN_HEAD_AND_SAMPLER = {"ddm_linear": ("ddm_linear", ("ddm_bridge",))}
NFES = (5, 10, 20, 50)
#: per dataset: training config and default budget (steps at batch 128)
PRESETS = {
    "digits": {"config": "digits_spd", "steps": 4000},
    "patches": {"config": "patches_spd", "steps": 2000},
}
BATCH = 128
NUM_SAMPLES = 1000
SMOKE = {"steps": 4, "num_samples": 48, "batch": 16, "nfes": (5, 10)}
#: metric -> True when higher is better
HIGHER_IS_BETTER = {"classifier_score": True, "classifier_confidence": True}
WORKER_FILE = "nfe_table_worker.json"


# ---- configs ----------------------------------------------------------------------------------


def make_config(dataset: str, process: str, *, steps: int, num_samples: int, samplers, nfes, batch: int = BATCH,
                smoke: bool = False, steps_per_dispatch: int = 1, eval_batch: int = 250):
    """The training + eval config of one table entry: the dataset's config with ``process``, a
    cosine schedule over ``steps`` (5 % at the end), EMA 0.995, eps head (a process of
    :data:`OWN_HEAD_AND_SAMPLER`: its own head, and its own sampler in place of ``samplers``); eval
    of every (sampler, NFE) pair on ``num_samples`` samples against the test split."""
    config = importlib.import_module(f"configs.{PRESETS[dataset]['config']}").get_config()
    config.process.name = process
    config.process.num_levels = 0
    config.model.head, samplers = OWN_HEAD_AND_SAMPLER.get(process, ("eps", samplers))
    config.sample.method = samplers[0]
    if smoke:
        m = config.model
        m.base_channels, m.channel_mult, m.num_res_blocks = 8, (1,), 1
        m.attention_resolutions, m.mid_attention, m.head_channels, m.num_heads = (), False, 0, 1
        config.process.spectrum_images = 64
        config.data.crops_per_photo = 16
        config.train.fast_compile = True
    config.optim.schedule = "cosine"
    config.optim.end_factor = 0.05
    config.optim.warmup_steps = min(100, steps // 10)
    config.train.update(batch_size=batch, num_steps=steps, steps_per_dispatch=steps_per_dispatch, ema=0.995,
                        log_every=max(1, steps // 20), checkpoint_every=max(1, steps // 2), keep_checkpoints=1,
                        sample_every=0)
    config.sample.grid_images = 0  # the evaluation writes the grids
    config.eval.settings = ",".join(f"{s}:{n}" for s in samplers for n in nfes)
    config.eval.num_samples = num_samples
    config.eval.batch_size = min(num_samples, eval_batch)
    config.eval.floor = False  # computed once per dataset by the driver
    config.eval.name = eval_name(num_samples)
    config.eval.grid_images = 64
    return config


def eval_name(num_samples: int) -> str:
    return f"nfe_table_n{num_samples}"


def trained_steps(run_dir: Path) -> int | None:
    """The newest checkpoint step of the run in ``run_dir`` (None: no checkpoint)."""
    if not (run_dir / "checkpoints").is_dir():
        return None
    from spd_jax.training import checkpoint

    ckpt = checkpoint.Checkpointer(str(run_dir / "checkpoints"), 1)
    try:
        return ckpt.latest_step()
    finally:
        ckpt.close()


# ---- one worker: train + evaluate ---------------------------------------------------------------


def run_worker(dataset: str, process: str, args) -> dict:
    """Train (unless finished) and evaluate ``WORKDIR/<dataset>_<process>``; returns its timings."""
    import jax
    from absl import logging

    from spd_jax.run import evaluate as eval_run
    from spd_jax.run import train as experiment

    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint at INFO
    tag = f"{dataset}/{process}"
    say = (lambda text: print(text, flush=True)) if args.worker else (lambda text: print(f"[{tag}] {text}", flush=True))
    steps = args.steps_for[dataset]
    dispatch = args.steps_per_dispatch or (1 if jax.default_backend() == "cpu" else 10)
    config = make_config(dataset, process, steps=steps, num_samples=args.num_samples, samplers=args.samplers,
                         nfes=args.nfes, batch=args.batch, smoke=args.smoke, steps_per_dispatch=dispatch,
                         eval_batch=args.eval_batch)
    eval_run.check(config)  # a bad sampler/NFE/metric stops here, before any training
    run_dir = Path(args.workdir) / f"{dataset}_{process}"
    done = trained_steps(run_dir)
    if done is not None and done > steps:
        raise SystemExit(f"{run_dir} holds a checkpoint of step {done} > --steps {steps}; use another --workdir "
                         "or the same --steps")
    start = time.perf_counter()
    if done == steps:
        say(f"training finished earlier ({steps} steps), skipped")
    else:
        memory = {k: v for k, v in os.environ.items() if k.startswith("XLA_PYTHON_CLIENT_")}
        say(f"training {steps} steps (batch {config.train.batch_size}, {dispatch} per dispatch, "
            f"{jax.default_backend()}, {memory}){'' if done is None else f', resuming at step {done}'}")
        experiment.train(config, str(run_dir))
    train_seconds = time.perf_counter() - start
    if done != steps:
        rate = (steps - (done or 0)) / max(train_seconds, 1e-9)
        say(f"trained in {train_seconds:.1f} s ({rate:.1f} steps/s incl. compile)")
    start = time.perf_counter()
    report = eval_run.run(config, str(run_dir))
    eval_seconds = time.perf_counter() - start
    say(f"evaluated {len(report['settings'])} settings in {eval_seconds:.1f} s")
    timings = {"dataset": dataset, "process": process, "steps": steps, "trained_now": done != steps,
               "train_seconds": train_seconds, "eval_seconds": eval_seconds, "backend": jax.default_backend()}
    (run_dir / WORKER_FILE).write_text(json.dumps(timings, indent=2))
    return timings


# ---- merging ------------------------------------------------------------------------------------


def collect(workdir: str | os.PathLike, dataset: str, num_samples: int) -> list[dict]:
    """Rows of every finished (process, sampler, NFE) setting of ``dataset`` under ``workdir``."""
    rows = []
    name = eval_name(num_samples)
    for result_path in sorted(Path(workdir).glob(f"{dataset}_*/eval/{name}/settings/*/result.json")):
        run_dir = result_path.parents[4]
        process = run_dir.name[len(dataset) + 1 :]
        result = json.loads(result_path.read_text())
        record_path = result_path.parents[2] / "run.json"
        record = json.loads(record_path.read_text()) if record_path.exists() else {}
        worker_path = run_dir / WORKER_FILE
        worker = json.loads(worker_path.read_text()) if worker_path.exists() else {}
        rows.append({"dataset": dataset, "process": process, "sampler": result["method"],
                     "nfe_requested": result["nfe_requested"], "nfe": result["nfe"],
                     "train_steps": record.get("checkpoint_step", ""), "num_samples": result["num_samples"],
                     "sample_seconds": round(float(result.get("sample_seconds", 0.0)), 3),
                     "train_seconds": round(float(worker["train_seconds"]), 1) if "train_seconds" in worker else "",
                     **result["metrics"]})
    order = {name: i for i, name in enumerate(PROCESSES + SAMPLERS)}
    rows.sort(key=lambda r: (order.get(r["process"], len(order)), r["process"], order.get(r["sampler"], len(order)),
                             r["sampler"], r["nfe_requested"]))
    return rows


def floor_path(workdir, dataset: str, num_samples: int) -> Path:
    return Path(workdir) / f"floor_{dataset}_n{num_samples}.json"


def compute_floor(workdir, dataset: str, num_samples: int) -> dict:
    """Train-vs-test metrics of ``dataset`` (cached in WORKDIR)."""
    path = floor_path(workdir, dataset, num_samples)
    if path.exists():
        return json.loads(path.read_text())
    from spd_jax.run.scoring import floor_metrics

    floor = floor_metrics(dataset, num_samples=num_samples, seed=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(floor, indent=2))
    return floor


def _metric_keys(rows: list[dict]) -> list[str]:
    fixed = {"dataset", "process", "sampler", "nfe_requested", "nfe", "train_steps", "num_samples",
             "sample_seconds", "train_seconds"}
    keys = []
    for row in rows:
        keys += [k for k in row if k not in fixed and not k.endswith("_std") and k not in keys]
    return keys


def _fmt(value) -> str:
    if value is None or value == "":
        return "–"
    value = float(value)
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    digits = max(0, 3 - int(math.floor(math.log10(abs(value)))) - 1)
    return f"{value:.{min(digits, 4)}f}"


def markdown(rows: list[dict], floors: dict[str, dict], nfes) -> str:
    """Per dataset and metric, a table of rows process x sampler and columns NFE (best in bold)."""
    lines = []
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        subset = [r for r in rows if r["dataset"] == dataset]
        floor = floors.get(dataset)
        steps = sorted({r["train_steps"] for r in subset if r["train_steps"] != ""})
        lines.append(f"### {dataset}: {subset[0]['num_samples']} samples per setting, "
                     f"{'/'.join(map(str, steps)) or '?'} training steps, EMA params\n")
        columns = sorted({r["nfe_requested"] for r in subset} | set(nfes))
        for key in _metric_keys(subset):
            higher = HIGHER_IS_BETTER.get(key, False)
            floor_text = f"; floor (train vs test) {_fmt(floor['metrics'][key])}" if floor and key in floor.get(
                "metrics", {}) else ""
            lines.append(f"**{key}** ({'higher' if higher else 'lower'} is better{floor_text})\n")
            lines.append("| process | sampler | " + " | ".join(f"NFE {n}" for n in columns) + " |")
            lines.append("|---|---|" + "---|" * len(columns))
            best = {}
            for n in columns:
                values = [r[key] for r in subset if r["nfe_requested"] == n and key in r]
                if values:
                    best[n] = max(values) if higher else min(values)
            for process, sampler in dict.fromkeys((r["process"], r["sampler"]) for r in subset):
                cells = []
                for n in columns:
                    found = [r for r in subset if (r["process"], r["sampler"], r["nfe_requested"]) == (process, sampler, n)]
                    if not found or key not in found[0]:
                        cells.append("–")
                        continue
                    text = _fmt(found[0][key])
                    if found[0]["nfe"] != n:
                        text += f" ({found[0]['nfe']} NFE)"
                    cells.append(f"**{text}**" if found[0][key] == best.get(n) else text)
                lines.append(f"| {process} | {sampler} | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)


def write_csv(rows: list[dict], floors: dict[str, dict], path: Path) -> None:
    table = list(rows)
    for dataset, floor in floors.items():
        table.append({"dataset": dataset, "process": "floor (train vs test)", "sampler": "", "nfe_requested": "",
                      "nfe": "", "num_samples": floor.get("images", ""), **floor["metrics"]})
    header = ["dataset", "process", "sampler", "nfe_requested", "nfe", "train_steps", "num_samples",
              "sample_seconds", "train_seconds"]
    header += [k for k in _metric_keys(table) if k not in header]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(table)
    os.replace(tmp, path)


def plot(rows: list[dict], floor: dict | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = _metric_keys(rows)
    fig, axes = plt.subplots(1, len(keys), figsize=(3.8 * len(keys), 3.4), squeeze=False)
    processes = list(dict.fromkeys(r["process"] for r in rows))
    styles = {"gradient_estimation": "-", "ddim": "--"}
    colors = {p: f"C{i}" for i, p in enumerate(processes)}
    for ax, key in zip(axes[0], keys, strict=True):
        for process in processes:
            for sampler in dict.fromkeys(r["sampler"] for r in rows):
                line = sorted((r for r in rows if (r["process"], r["sampler"]) == (process, sampler) and key in r),
                              key=lambda r: r["nfe"])
                if line:
                    ax.plot([r["nfe"] for r in line], [r[key] for r in line], styles.get(sampler, ":"), marker="o",
                            color=colors[process], label=f"{process} / {sampler}")
        if floor and key in floor.get("metrics", {}):
            ax.axhline(floor["metrics"][key], color="gray", linestyle=":", label="floor (train vs test)")
        ax.set_xscale("log")
        values = [r[key] for r in rows if key in r]
        if not HIGHER_IS_BETTER.get(key, False) and values and min(values) > 0:
            ax.set_yscale("log")  # distances: samples far above the floor
        ticks = sorted({r["nfe"] for r in rows})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("NFE")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize="x-small")
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def merge(workdir, out, datasets, num_samples: int, nfes=NFES, verbose: bool = True) -> list[dict]:
    """Rebuild the CSV, markdown and plots in ``out`` from every finished setting under
    ``workdir`` (floors from WORKDIR/floor_<dataset>_n<num_samples>.json where present)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows, floors = [], {}
    for dataset in datasets:
        subset = collect(workdir, dataset, num_samples)
        rows += subset
        path = floor_path(workdir, dataset, num_samples)
        if path.exists():
            floors[dataset] = json.loads(path.read_text())
        if subset:
            plot(subset, floors.get(dataset), out / f"nfe_table_{dataset}.png")
    write_csv(rows, floors, out / "nfe_table.csv")
    text = markdown(rows, floors, nfes) if rows else "(no finished settings yet)\n"
    (out / "nfe_table.md").write_text(text)
    if verbose:
        print(f"table: {len(rows)} settings -> {out / 'nfe_table.md'}, nfe_table.csv, nfe_table_<dataset>.png",
              flush=True)
    return rows


# ---- driver -------------------------------------------------------------------------------------


def _stream(proc: subprocess.Popen, tag: str, start: float) -> None:
    """Print a worker's output with its tag and the elapsed time (progress bars: one line per
    refresh)."""
    buffer = b""
    while True:
        chunk = proc.stdout.read1(4096) if hasattr(proc.stdout, "read1") else proc.stdout.read(4096)
        if not chunk:
            break
        buffer += chunk
        *parts, buffer = buffer.replace(b"\r", b"\n").split(b"\n")
        for part in parts:
            text = part.decode(errors="replace").rstrip()
            if text:
                print(f"[{time.perf_counter() - start:6.0f}s {tag}] {text}", flush=True)
    if buffer.strip():
        print(f"[{time.perf_counter() - start:6.0f}s {tag}] {buffer.decode(errors='replace').rstrip()}", flush=True)


def _worker_command(dataset: str, process: str, argv: list[str]) -> list[str]:
    return [sys.executable, "-u", str(Path(__file__).resolve()), *argv, "--worker", f"--dataset={dataset}",
            f"--processes={process}"]


def _strip(argv: list[str], names: tuple[str, ...]) -> list[str]:
    """``argv`` without the options ``names`` (``--x=v`` and ``--x v`` forms)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in names:
            skip = "=" not in arg
            continue
        out.append(arg)
    return out


def _worker_env(args, concurrent: int) -> dict:
    """The workers' environment: on-demand accelerator memory capped at a share of the device
    each (XLA's allocator keeps what it once took, autotuning scratch included, so uncapped
    workers on one GPU starve each other), CPU threads shared out, progress bars every 10 s."""
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", PYTHONUNBUFFERED="1", TQDM_MININTERVAL="10")
    env.pop("JAX_PLATFORMS", None)
    if args.worker_platforms is not None:
        env["JAX_PLATFORMS"] = args.worker_platforms
    fraction = args.mem_fraction or max(0.05, min(0.75, 0.9 / concurrent))
    env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{fraction:.3f}"
    threads = str(max(1, (os.cpu_count() or 1) // concurrent))
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, threads)
    return env


def run_parallel(jobs: list[tuple[str, str]], args, argv: list[str]) -> list[str]:
    """Run the workers as OS processes, ``args.jobs`` at a time; rebuild the table after each.
    A worker that fails is run once more at the end, alone on the machine (finished training and
    finished settings are kept, so only what is missing is redone)."""
    start = time.perf_counter()
    child_argv = _strip(argv, ("--dataset", "--processes", "--jobs", "--worker", "--merge"))

    def launch(dataset: str, process: str, env: dict):
        proc = subprocess.Popen(_worker_command(dataset, process, child_argv), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        reader = threading.Thread(target=_stream, args=(proc, f"{dataset}/{process}", start), daemon=True)
        reader.start()
        print(f"[{time.perf_counter() - start:6.0f}s] started {dataset}/{process} (pid {proc.pid}, memory fraction "
              f"{env['XLA_PYTHON_CLIENT_MEM_FRACTION']})", flush=True)
        return proc, reader

    def finish(tag: str, proc, reader) -> bool:
        reader.join()
        status = "finished" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
        print(f"[{time.perf_counter() - start:6.0f}s] {tag} {status}", flush=True)
        merge(args.workdir, args.out, args.datasets, args.num_samples, args.nfes)
        return proc.returncode == 0

    limit = args.jobs or len(jobs)
    env = _worker_env(args, min(limit, len(jobs)))
    pending, running, failed = list(jobs), {}, []
    floors_done = False
    while pending or running:
        while pending and len(running) < limit:
            key = pending.pop(0)
            running[key] = launch(*key, env)
        if not floors_done:  # the driver's own work while the workers compile and train
            for dataset in args.datasets:
                _floor(args, dataset)
            floors_done = True
        time.sleep(1.0)
        for key, (proc, reader) in list(running.items()):
            if proc.poll() is not None:
                del running[key]
                if not finish("/".join(key), proc, reader):
                    failed.append(key)
    still_failed = []
    for key in failed:
        print(f"[{time.perf_counter() - start:6.0f}s] retrying {'/'.join(key)} alone", flush=True)
        proc, reader = launch(*key, _worker_env(args, 1))
        proc.wait()
        if not finish("/".join(key), proc, reader):
            still_failed.append("/".join(key))
    return still_failed


def _floor(args, dataset: str) -> None:
    began = time.perf_counter()
    floor = compute_floor(args.workdir, dataset, args.num_samples)
    text = ", ".join(f"{k} {v:.4g}" for k, v in floor["metrics"].items())
    print(f"floor {dataset} (train vs test, {time.perf_counter() - began:.1f} s): {text}", flush=True)


def _parse_steps(text: str | None, datasets, smoke: bool) -> dict[str, int]:
    steps = {d: (SMOKE["steps"] if smoke else PRESETS[d]["steps"]) for d in datasets}
    if not text:
        return steps
    if "=" not in text:
        return {d: int(text) for d in datasets}
    for item in text.split(","):
        name, _, value = item.partition("=")
        if name.strip() not in DATASETS:
            raise SystemExit(f"--steps: unknown dataset {name!r}; expected one of {DATASETS}")
        steps[name.strip()] = int(value)
    return steps


def _names(text: str, valid, what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in valid]
    if bad or not names:
        raise SystemExit(f"{what}: unknown {bad or text!r}; expected a comma list from {list(valid)}")
    return names


def parse_args(argv: list[str]):
    from spd_jax.diffusion.samplers import METHODS
    from spd_jax.run.checks import TRAINABLE_PROCESSES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--dataset", default="digits", help="digits, patches or digits,patches")
    parser.add_argument("--workdir", required=True, help="training runs and evaluations (resumable)")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the CSV, markdown and PNG")
    parser.add_argument("--processes", default=",".join(PROCESSES), help="comma list of processes")
    parser.add_argument("--samplers", default=",".join(SAMPLERS), help="comma list of samplers")
    parser.add_argument("--nfes", default=None, help=f"comma list of NFE targets (default {NFES})")
    budgets = ", ".join(f"{name} {preset['steps']}" for name, preset in PRESETS.items())
    parser.add_argument("--steps", default=None, help=f"training steps: N, or digits=N,patches=M (default {budgets})")
    parser.add_argument("--batch", type=int, default=None, help=f"training batch (default {BATCH})")
    parser.add_argument("--num-samples", type=int, default=None, help=f"samples per setting (default {NUM_SAMPLES})")
    parser.add_argument("--steps-per-dispatch", type=int, default=0, help="0 = 1 on CPU, 10 on accelerators")
    parser.add_argument("--eval-batch", type=int, default=250, help="images per sampler call in the evaluation")
    parser.add_argument("--mem-fraction", type=float, default=0.0,
                        help="accelerator memory share of each worker (0 = 0.9 / workers at a time)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="workers at a time as OS processes (0 = all); 1 = one after another in this process "
                             "(default: 0, or 1 with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="tiny network, few steps and samples (CPU check)")
    parser.add_argument("--merge", action="store_true", help="only rebuild the table from finished settings")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.datasets = _names(args.dataset, DATASETS, "--dataset")
    args.processes = _names(args.processes, TRAINABLE_PROCESSES, "--processes")
    args.samplers = _names(args.samplers, METHODS, "--samplers")
    args.nfes = tuple(int(n) for n in args.nfes.split(",")) if args.nfes else (SMOKE["nfes"] if args.smoke else NFES)
    args.steps_for = _parse_steps(args.steps, args.datasets, args.smoke)
    args.batch = args.batch or (SMOKE["batch"] if args.smoke else BATCH)
    args.num_samples = args.num_samples or (SMOKE["num_samples"] if args.smoke else NUM_SAMPLES)
    if args.jobs is None:
        args.jobs = 1 if args.smoke else 0
    args.workdir, args.out = os.path.abspath(args.workdir), os.path.abspath(args.out)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        run_worker(args.datasets[0], args.processes[0], args)
        return 0
    if args.merge:
        merge(args.workdir, args.out, args.datasets, args.num_samples, args.nfes)
        print((Path(args.out) / "nfe_table.md").read_text())
        return 0
    start = time.perf_counter()
    jobs = [(d, p) for d in args.datasets for p in args.processes]
    args.worker_platforms = os.environ.get("JAX_PLATFORMS")
    if args.jobs != 1:
        os.environ["JAX_PLATFORMS"] = "cpu"  # the driver only checks and computes floors: off the accelerator
    from spd_jax.run import evaluate as eval_run

    for dataset, process in jobs:  # every config check before anything trains
        try:
            eval_run.check(make_config(dataset, process, steps=args.steps_for[dataset], num_samples=args.num_samples,
                                       samplers=args.samplers, nfes=args.nfes, batch=args.batch, smoke=args.smoke))
        except ValueError as err:
            raise SystemExit(f"error: {dataset}/{process}: {err}") from None
    print(f"nfe_table: {len(jobs)} runs ({', '.join('/'.join(j) for j in jobs)}), steps {args.steps_for}, "
          f"batch {args.batch}, {args.num_samples} samples per setting, samplers {args.samplers}, NFE {args.nfes}, "
          f"{'in this process' if args.jobs == 1 else f'{args.jobs or len(jobs)} worker processes at a time'}",
          flush=True)
    failed = []
    if args.jobs == 1:
        for dataset in args.datasets:
            _floor(args, dataset)
        for dataset, process in jobs:
            try:
                run_worker(dataset, process, args)
            except Exception as err:  # noqa: BLE001 - report, keep the other runs going
                print(f"[{dataset}/{process}] FAILED: {type(err).__name__}: {err}", flush=True)
                failed.append(f"{dataset}/{process}")
            merge(args.workdir, args.out, args.datasets, args.num_samples, args.nfes)
    else:
        failed = run_parallel(jobs, args, argv)
    merge(args.workdir, args.out, args.datasets, args.num_samples, args.nfes, verbose=False)
    print((Path(args.out) / "nfe_table.md").read_text())
    print(f"nfe_table: done in {time.perf_counter() - start:.0f} s; outputs in {args.out}"
          + (f"; FAILED: {failed}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
