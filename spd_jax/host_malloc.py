"""glibc malloc settings that let XLA:CPU reuse a step's scratch memory instead of mapping it anew.

XLA:CPU allocates each execution's temporary buffer (1.29 GB for the CIFAR-10 U-Net's training step
at batch 8) with ``malloc`` and frees it when the call returns. glibc serves a request that large
with a fresh ``mmap`` and returns it with ``munmap``, so every step page-faults on all of it again,
and the kernel zeroes each page: 314,000 minor faults and about 0.5 s of system time per step, 10%
of the step on one core. Three glibc tunables keep the memory mapped between calls:

* ``glibc.malloc.mmap_threshold`` (4 GiB): requests below it come from the heap, not from ``mmap``;
* ``glibc.malloc.trim_threshold`` (8 GiB): freed heap memory is kept, not handed back to the kernel;
* ``glibc.malloc.arena_max=1``: XLA's worker threads allocate from the main heap, which can grow
  that far (a thread's own arena is capped at 64 MiB and falls back to ``mmap`` above it).

With them the training step makes no page faults after its first two steps, on one XLA thread or
two (``docs/results.md``). The price: the process keeps its peak heap instead of shrinking after a
free, and all threads share one arena. glibc reads tunables only when a process starts, so
:func:`reexec_if_needed` starts the program again with them set; ``launch.py`` does this first
thing. It applies only where it helps: Linux with glibc, and a JAX that can only run on the CPU (no
GPU or TPU plugin installed) or is told to (``JAX_PLATFORMS=cpu``). ``SPD_JAX_MALLOC_TUNING=0`` switches it off; values already present in
``GLIBC_TUNABLES`` are kept.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
from collections.abc import Mapping, Sequence

ENV_VAR = "SPD_JAX_MALLOC_TUNING"
OFF = ("0", "off", "false", "no")
#: the settings, in GLIBC_TUNABLES' ``name=value`` form
TUNABLES = {
    "glibc.malloc.mmap_threshold": str(4 << 30),
    "glibc.malloc.trim_threshold": str(8 << 30),
    "glibc.malloc.arena_max": "1",
}
#: JAX plugins that give it an accelerator; with one installed the tuning is left to the user
ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin", "libtpu")


def parse_tunables(value: str) -> dict[str, str]:
    """``GLIBC_TUNABLES``' ``a=1:b=2`` form as a dict (entries without ``=`` are dropped)."""
    pairs = (item.split("=", 1) for item in value.split(":") if "=" in item)
    return {name: setting for name, setting in pairs}


def glibc_linux() -> bool:
    """True on Linux with glibc as the C library (where these tunables exist)."""
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def cpu_only(environ: Mapping[str, str]) -> bool:
    """True when JAX in this environment can only use (or is told to use only) the CPU."""
    platforms = environ.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return platforms == "cpu"
    return not any(importlib.util.find_spec(name) is not None for name in ACCELERATOR_PLUGINS)


def tuned_environ(environ: Mapping[str, str], *, check_platform: bool = True) -> dict[str, str] | None:
    """A copy of ``environ`` with :data:`TUNABLES` added to ``GLIBC_TUNABLES``, or None when nothing
    should change: switched off by ``SPD_JAX_MALLOC_TUNING``, every setting already present (the
    user's own values win), or (with ``check_platform``) not Linux + glibc or not a CPU-only JAX."""
    if environ.get(ENV_VAR, "").strip().lower() in OFF:
        return None
    if check_platform and not (glibc_linux() and cpu_only(environ)):
        return None
    current = environ.get("GLIBC_TUNABLES", "")
    present = parse_tunables(current)
    missing = [f"{name}={value}" for name, value in TUNABLES.items() if name not in present]
    if not missing:
        return None
    env = dict(environ)
    env["GLIBC_TUNABLES"] = ":".join(([current] if current else []) + missing)
    return env


def reexec_if_needed(argv: Sequence[str] | None = None) -> None:
    """Replace this process by ``python argv...`` with :func:`tuned_environ`'s environment, when it
    gives one (so at most once: the new process finds the settings present). Call it before any
    work: nothing of the current process survives."""
    env = tuned_environ(os.environ)
    if env is None:
        return
    argv = list(sys.argv if argv is None else argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *argv], env)
