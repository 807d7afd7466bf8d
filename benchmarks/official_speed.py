"""Side by side on this machine: the official PyTorch SPD code against spd_jax, step for step.

    python -m venv /work/bench-venv
    /work/bench-venv/bin/pip install torch==2.13.0   # a CPU wheel; never a dependency of spd_jax
    /work/bench-venv/bin/pip install -e .
    /work/bench-venv/bin/python benchmarks/official_speed.py --official_repo=PATH [--rounds=5]

``PATH`` is a checkout of mtkresearch/shortest-path-diffusion (or a bare git directory of it, which is
extracted to a temporary folder). Both networks are built for the SPD CIFAR-10 settings (the official
``configs/cifar10_fourier.yml``; spd_jax's ``configs/cifar10_spd.py``) and their parameter counts are
checked equal (52,542,979). Timed, on batches of ``--batch`` (8) images 32x32x3 with ``--threads`` (2)
threads:

* ``train``: one training step. Official: its ``FourierShortestPathDiffusion.training_losses`` (uniform
  t on the T = 4000 grid, the Fourier-space forward process, eps-MSE), backward, its
  ``MixedPrecisionTrainer`` fp32 step (grad/param norms, AdamW lr 1e-4) and its ``update_ema``
  (0.9999); eager, ``model.train()`` (dropout 0.3). spd_jax: the jitted, mesh-sharded
  ``train_step`` of :mod:`spd_jax.training` (per-example t and noise, the SPD forward process, eps-MSE,
  gradients, AdamW, EMA, non-finite check), state donated.
* ``forward``: one network evaluation in inference mode (official: ``model.eval()`` under
  ``torch.no_grad()``; spd_jax: jitted ``apply(train=False)``).

Each system runs in its own worker process (``--same_process``: all in this one), so neither's
heap or allocator settings affect the other. The spd_jax workers start with the glibc settings
``launch.py`` gives a CPU run (:mod:`spd_jax.host_malloc`); the official worker with glibc's defaults,
as its own scripts run (``--malloc_tuning=both`` gives it the same settings, ``none`` gives them to
no one). Blocks of ``--reps`` timed calls alternate between the systems for ``--rounds`` rounds after a
warm-up. Each block opens with ``--settle`` untimed calls (default 1): the first call after the other
system ran is often 1-3 s slower, for both systems, which a training loop running its steps back to
back never sees. Each block prints its median and ``os.getloadavg()`` at its start. The summary gives, per
quantity, each system's median over all calls and the ratio official / spd_jax (> 1: spd_jax is
faster), then the same for each system's fastest call: other jobs on a shared machine only ever add
time, so the fastest call is the steadier estimate of what a step costs. spd_jax runs twice by
default: as :func:`spd_jax.training.shard_train_step` compiles it (``spd_jax``) and with
:data:`spd_jax.training.compile_cache.CPU_COMPILER_OPTIONS` added (``spd_jax+cpu_opts``;
``--cpu_options=off|only`` drops one). ``--json`` writes everything to a
file; ``--only=spd_jax`` times spd_jax alone (no torch needed); ``--max_load`` waits before each
block for the machine's load to drop. Compilation times of spd_jax are printed separately.

``--threads`` sets torch's threads and XLA's intra-op pool, but XLA:CPU runs some work on threads
of its own: with ``--threads=1`` and no pinning, spd_jax's training step still used both cores of
the 2-core machine (3.4 s against 6.0 s pinned). For a one-core comparison pin the whole process:
``taskset -c 0 python benchmarks/official_speed.py --threads=1 ...``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARAMS = 52_542_979  # the SPD CIFAR-10 U-Net, both implementations


def _set_threads(threads: int, xla_flags: str = "") -> None:
    """Before jax/torch are imported: both systems get the same number of threads."""
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    os.environ.setdefault("MKL_NUM_THREADS", str(threads))
    flags = os.environ.get("XLA_FLAGS", "")
    if "intra_op_parallelism_threads" not in flags:
        flags += f" --xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={threads}"
    flags += " " + xla_flags
    os.environ["XLA_FLAGS"] = flags.strip()


def _load():
    return tuple(round(x, 2) for x in os.getloadavg())


# ---- official (PyTorch) ---------------------------------------------------------------------


def _official_checkout(path: str) -> str:
    """A folder with the official sources: ``path`` itself, or ``git archive`` of a bare repo."""
    if os.path.isdir(os.path.join(path, "guided_diffusion")):
        return path
    out = tempfile.mkdtemp(prefix="spd_official_")
    archive = subprocess.run(["git", "--git-dir", path, "archive", "HEAD"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", out], input=archive, check=True)
    return out


class Official:
    """The official U-Net, diffusion, AdamW trainer and EMA, CIFAR-10 SPD settings, on CPU."""

    def __init__(self, repo: str, batch: int, threads: int, seed: int = 0):
        import numpy as np
        import torch

        torch.set_num_threads(threads)
        torch.manual_seed(seed)
        sys.path.insert(0, _official_checkout(repo))
        sys.modules.setdefault("blobfile", types.ModuleType("blobfile"))  # imported, unused here
        from guided_diffusion import fp16_util, logger
        from guided_diffusion.nn import update_ema
        from guided_diffusion.resample import UniformSampler
        from nonunif_diffusion import fourier_diffusion
        from nonunif_diffusion.script_util import (
            create_model_and_fourier_diffusion,
            model_and_fourier_diffusion_defaults,
        )

        # the official noise draw defaults to device='cuda'; the same draw on the CPU
        cuda_draw = fourier_diffusion.pixel_and_fourier_noise
        fourier_diffusion.pixel_and_fourier_noise = lambda b, s, channels=3, device=None: cuda_draw(
            b, s, channels, device=torch.device("cpu"))
        for name in ("logkv_mean", "logkv", "log"):  # the trainer logs norms; no log directory here
            setattr(logger, name, lambda *a, **k: None)

        args = model_and_fourier_diffusion_defaults()
        args.update(  # configs/cifar10_fourier.yml, "common"
            image_size=32, diffusion_steps=4000, learn_sigma=False, predict_xstart=False,
            attention_resolutions="16,8", dropout=0.3, use_fp16=False, use_scale_shift_norm=True,
            resblock_updown=False, use_new_attention_order=False, num_channels=128, num_head_channels=-1,
            num_heads=4, num_heads_upsample=-1, num_res_blocks=3, rescale_timesteps=True,
        )
        self.model, self.diffusion = create_model_and_fourier_diffusion(**args)
        self.params = sum(p.numel() for p in self.model.parameters())
        self.trainer = fp16_util.MixedPrecisionTrainer(model=self.model, use_fp16=False)
        self.opt = torch.optim.AdamW(self.trainer.master_params, lr=1e-4, weight_decay=0.0)
        self.ema = [p.detach().clone() for p in self.trainer.master_params]
        self.sampler = UniformSampler(self.diffusion)
        self.update_ema = update_ema
        rng = np.random.default_rng(seed)
        self.x = torch.from_numpy(np.clip(rng.normal(0, 0.5, (batch, 3, 32, 32)), -1, 1).astype(np.float32))
        self.t_fwd = torch.full((batch,), 2000.0)
        self.torch = torch

    def train_step(self) -> float:
        """TrainLoop.run_step without logging: forward_backward, optimize, _update_ema."""
        self.model.train()
        self.trainer.zero_grad()
        t, weights = self.sampler.sample(self.x.shape[0], self.torch.device("cpu"))
        losses = self.diffusion.training_losses(self.model, self.x, t)
        loss = (losses["loss"] * weights).mean()
        self.trainer.backward(loss)
        self.trainer.optimize(self.opt)
        self.update_ema(self.ema, self.trainer.master_params, rate=0.9999)
        return float(loss)

    def forward(self):
        self.model.eval()
        with self.torch.no_grad():
            return self.model(self.x, self.diffusion._scale_timesteps(self.t_fwd))


# ---- spd_jax --------------------------------------------------------------------------------


class SpdJax:
    """configs/cifar10_spd.py (preset spectrum, random images: no data set) at batch ``batch``."""

    def __init__(self, batch: int, seed: int = 0, fast_compile: bool = False, what=("train", "forward"),
                 compiler_options: dict | None = None):
        import jax
        import jax.numpy as jnp
        import numpy as np

        sys.path.insert(0, ROOT)
        from configs import cifar10_spd
        from spd_jax import training
        from spd_jax.run import builders

        config = cifar10_spd.get_config()
        config.train.batch_size = batch
        config.process.spectrum = "preset"
        shape = (32, 32, 3)
        process = builders.build_process(config, builders.build_spectrum(config, None, shape), shape)
        self.model = model = builders.build_model(config)
        tx, schedule = builders.build_optimizer(config)
        mesh = training.make_mesh(jax.devices()[:1])
        self.variables = builders.init_variables(model, shape, jax.random.PRNGKey(seed))
        self.params = sum(x.size for x in jax.tree.leaves(self.variables))
        self.state = training.replicate(training.create_train_state(self.variables, tx, jax.random.PRNGKey(1)), mesh)
        loss = builders.build_loss(config, model, process)
        multi_step = training.scan_steps(training.make_train_step(loss, tx, config.train.ema, schedule))
        if compiler_options is None:  # exactly what a run compiles
            step = training.shard_train_step(multi_step, mesh, fast_compile=fast_compile)
        else:  # shard_train_step's jit with extra XLA options
            rep = training.replicated(mesh)
            options = dict(training.FAST_COMPILE if fast_compile else {}, **compiler_options)
            step = jax.jit(multi_step, in_shardings=(rep, training.batch_sharding(mesh, 1)),
                           out_shardings=(rep, rep), donate_argnums=(0,), compiler_options=options)
        images = np.clip(np.random.default_rng(seed).normal(0, 0.5, (batch,) + shape), -1, 1).astype(np.float32)
        self.batches = training.global_batch({"image": images[None]}, mesh)
        self.compile_train_s = self.compile_forward_s = None
        if "train" in what:
            start = time.perf_counter()
            self._step = step.lower(self.state, self.batches).compile()
            self.compile_train_s = time.perf_counter() - start
        self.x = jnp.asarray(images)
        self.t = jnp.full((batch,), 0.5, jnp.float32)
        if "forward" in what:
            start = time.perf_counter()
            self._forward = jax.jit(lambda v, x, t: model.apply(v, x, t, train=False),
                                    compiler_options=compiler_options or None).lower(
                self.variables, self.x, self.t).compile()
            self.compile_forward_s = time.perf_counter() - start
        self.jax = jax

    def train_step(self) -> float:
        self.state, metrics = self._step(self.state, self.batches)
        return float(metrics["loss"])  # waits for the step

    def forward(self):
        return self.jax.block_until_ready(self._forward(self.variables, self.x, self.t))


# ---- timing ---------------------------------------------------------------------------------


def _block(fn, reps: int, settle: int = 0) -> tuple[list[float], tuple]:
    """``settle`` untimed calls, then ``reps`` timed ones; with the 1-min load at the block's start."""
    load = _load()
    for _ in range(settle):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times, load


def _wait_for_load(max_load: float, max_wait_s: float) -> float:
    """Sleep until the 1-minute load average is below ``max_load`` (at most ``max_wait_s``)."""
    start = time.perf_counter()
    while max_load and os.getloadavg()[0] >= max_load and time.perf_counter() - start < max_wait_s:
        time.sleep(5)
    return time.perf_counter() - start


class _Local:
    """A system timed in this process."""

    def __init__(self, kind: str, kwargs: dict):
        self.system = (Official if kind == "official" else SpdJax)(**kwargs)
        self.params = self.system.params
        self.compile_train_s = getattr(self.system, "compile_train_s", None)
        self.compile_forward_s = getattr(self.system, "compile_forward_s", None)

    def block(self, what: str, reps: int, settle: int = 0):
        return _block(getattr(self.system, "train_step" if what == "train" else "forward"), reps, settle)

    def close(self) -> None:
        pass


def _serve(conn, kind: str, kwargs: dict) -> None:
    """A worker process: build one system, report it, then time blocks on request until None."""
    local = _Local(kind, kwargs)
    conn.send({"params": local.params, "compile_train_s": local.compile_train_s,
               "compile_forward_s": local.compile_forward_s})
    while (request := conn.recv()) is not None:
        conn.send(local.block(*request))


class _Remote:
    """A system timed in its own process (its own heap and allocator settings), started with ``env``."""

    def __init__(self, kind: str, kwargs: dict, env: dict):
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        saved = dict(os.environ)
        os.environ.clear()
        os.environ.update(env)  # the child's environment is this process's at start()
        try:
            self.proc = ctx.Process(target=_serve, args=(child, kind, kwargs), daemon=True)
            self.proc.start()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        try:
            self.__dict__.update(self.conn.recv())
        except EOFError:
            self.proc.join()
            raise SystemExit(f"the {kind} worker process failed (exit code {self.proc.exitcode})") from None

    def block(self, what: str, reps: int, settle: int = 0):
        self.conn.send((what, reps, settle))
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send(None)
        self.proc.join(60)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official_repo", default=os.environ.get("SPD_OFFICIAL_REPO", ""),
                        help="checkout (or bare git dir) of mtkresearch/shortest-path-diffusion")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=3, help="timed calls per block")
    parser.add_argument("--settle", type=int, default=1,
                        help="untimed calls opening each block: the first call after the other system "
                             "ran is often slower, for both systems")
    parser.add_argument("--what", default="train,forward")
    parser.add_argument("--only", choices=("both", "spd_jax", "official"), default="both")
    parser.add_argument("--cpu_options", choices=("off", "also", "only"), default="also",
                        help="spd_jax compiled with compile_cache.CPU_COMPILER_OPTIONS too (also), "
                             "instead (only) or not (off)")
    parser.add_argument("--max_load", type=float, default=0.0,
                        help="before each block wait (up to --max_wait s) for the 1-min load to drop below this")
    parser.add_argument("--max_wait", type=float, default=120.0)
    parser.add_argument("--json", default="", help="write the timings to this file")
    parser.add_argument("--xla_flags", default="", help="extra XLA_FLAGS (process-wide, before JAX starts)")
    parser.add_argument("--same_process", action="store_true",
                        help="time every system in this process (default: each in its own worker process)")
    parser.add_argument("--malloc_tuning", choices=("spd_jax", "both", "none"), default="spd_jax",
                        help="which worker processes get spd_jax.host_malloc's glibc settings (spd_jax: as "
                             "launch.py runs; both: the official code too); ignored with --same_process")
    args = parser.parse_args(argv)
    _set_threads(args.threads, args.xla_flags)
    what = [w.strip() for w in args.what.split(",") if w.strip()]
    if not what or set(what) - {"train", "forward"}:
        parser.error(f"--what takes train and/or forward; got {args.what!r}")

    sys.path.insert(0, ROOT)
    from spd_jax import host_malloc

    def start(name, kind, kwargs):
        if args.same_process:
            return _Local(kind, kwargs)
        tuned = args.malloc_tuning == "both" or (args.malloc_tuning == "spd_jax" and kind == "spd_jax")
        plain = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
        env = (host_malloc.tuned_environ(plain, check_platform=False) if tuned else None) or plain
        print(f"{name}: own process, GLIBC_TUNABLES={env.get('GLIBC_TUNABLES', '')!r}", flush=True)
        return _Remote(kind, kwargs, env)

    systems = {}
    if args.only in ("both", "official"):
        if not args.official_repo:
            parser.error("--official_repo (or SPD_OFFICIAL_REPO) is needed unless --only=spd_jax")
        systems["official"] = start("official", "official",
                                    dict(repo=args.official_repo, batch=args.batch, threads=args.threads))
    if args.only in ("both", "spd_jax"):
        from spd_jax.training import compile_cache

        if args.cpu_options != "only":
            systems["spd_jax"] = start("spd_jax", "spd_jax", dict(batch=args.batch, what=what))
        if args.cpu_options != "off":
            systems["spd_jax+cpu_opts"] = start("spd_jax+cpu_opts", "spd_jax", dict(
                batch=args.batch, what=what, compiler_options=compile_cache.cpu_compiler_options("cpu")))
    import jax

    print(f"jax {jax.__version__} backend={jax.default_backend()} batch={args.batch} threads={args.threads} "
          f"cpus={os.cpu_count()} load={_load()}\nXLA_FLAGS={os.environ['XLA_FLAGS']!r}")
    for name, system in systems.items():
        print(f"{name}: {system.params:,} parameters")
        if system.params != PARAMS:
            raise SystemExit(f"{name} has {system.params:,} parameters; expected {PARAMS:,}")
    ours = [n for n in systems if n.startswith("spd_jax")]
    for name in ours:
        s = systems[name]
        print(f"{name} compile: " + ", ".join(f"{w} {t:.1f} s" for w, t in
                                             (("train step", s.compile_train_s), ("forward", s.compile_forward_s)) if t))

    for system in systems.values():  # warm-up (first eager call, allocator, caches)
        for w in what:
            system.block(w, 1)
    record = {"args": vars(args), "blocks": [], "load_start": _load()}
    for r in range(args.rounds):
        for w in what:
            order = list(systems) if r % 2 == 0 else list(reversed(systems))
            for name in order:
                waited = _wait_for_load(args.max_load, args.max_wait)
                times, load = systems[name].block(w, args.reps, args.settle)
                record["blocks"].append({"round": r, "what": w, "system": name, "times": times, "load": load,
                                         "waited_s": waited})
                print(f"round {r} {w:7s} {name:16s} median {statistics.median(times):.3f} s "
                      f"({', '.join(f'{x:.3f}' for x in times)})  load {load}", flush=True)
    summary = {}
    ratio_cols = [n for n in ours if "official" in systems]
    print("\n| | " + " | ".join(systems) + "".join(f" | official / {n}" for n in ratio_cols) + " |")
    print("|---|" + "---|" * (len(systems) + len(ratio_cols)))
    for w in what:
        calls = {n: [x for b in record["blocks"] if b["what"] == w and b["system"] == n for x in b["times"]]
                 for n in systems}
        med = {n: statistics.median(calls[n]) for n in systems}
        best = {n: min(calls[n]) for n in systems}
        summary[w] = dict(med, fastest=best)
        for label, value in (("", med), (" (fastest call)", best)):
            cells = [f"{value[n]:.3f} s" for n in systems]
            for n in ratio_cols:
                ratio = value["official"] / value[n]
                summary[w][f"official/{n}{' fastest' if label else ''}"] = ratio
                cells.append(f"{ratio:.2f}")
            print(f"| {w}{label} | " + " | ".join(cells) + " |")
    loads = [b["load"][0] for b in record["blocks"]]
    print(f"\n1-min load at block starts: min {min(loads):.2f}, median {statistics.median(loads):.2f}, "
          f"max {max(loads):.2f}")
    for system in systems.values():
        system.close()
    record["summary"] = summary
    record["compile_s"] = {n: {"train": systems[n].compile_train_s, "forward": systems[n].compile_forward_s}
                           for n in ours}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
    return record


if __name__ == "__main__":
    main()
