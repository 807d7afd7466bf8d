"""JAX's persistent compilation cache, on by default for every spd_jax run.

A compiled executable is written to a directory keyed by the program, its compile options, the XLA
flags, the JAX/jaxlib version and the devices; a later process that compiles the same program (a
resumed or re-launched run with the same config) loads it instead of compiling again, so its first
train step starts in seconds instead of minutes.

    from spd_jax.training import compile_cache
    compile_cache.enable()                 # before the first jax.jit compile of the run
    compile_cache.enable("/scratch/xla")   # or an explicit directory

Directory, first match wins: the ``directory`` argument; ``$SPD_JAX_COMPILATION_CACHE``; a
directory the user already gave JAX (``JAX_COMPILATION_CACHE_DIR`` / ``jax_compilation_cache_dir``);
``$XDG_CACHE_HOME/spd_jax/xla`` (default ``~/.cache/spd_jax/xla``). The value ``"off"`` (argument
or environment) leaves the cache disabled.

Only compilations slower than :data:`MIN_COMPILE_TIME_SECS` are written: the many tiny jits of
eager array operations compile faster than they load. The cache directory is trusted input (JAX
runs what it loads): do not point it at a directory other users can write to.
"""

from __future__ import annotations

import functools
import logging
import os

import jax

ENV_VAR = "SPD_JAX_COMPILATION_CACHE"
OFF = ("off", "none", "0", "false", "disable", "disabled")
#: compilations faster than this are not cached (reading an entry costs ~10-50 ms)
MIN_COMPILE_TIME_SECS = 0.5
#: entries of any size are cached (a train step's executable is a few MB)
MIN_ENTRY_SIZE_BYTES = 0

_log = logging.getLogger(__name__)


def default_directory() -> str:
    """``$XDG_CACHE_HOME/spd_jax/xla``, or ``~/.cache/spd_jax/xla`` without XDG_CACHE_HOME."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "spd_jax", "xla")


def resolve_directory(directory: str | os.PathLike | None = None) -> str | None:
    """The cache directory ``enable(directory)`` would use; None when the cache is switched off."""
    for candidate in (directory, os.environ.get(ENV_VAR), jax.config.jax_compilation_cache_dir):
        if candidate is None or str(candidate) == "":
            continue
        if str(candidate).strip().lower() in OFF:
            return None
        return os.path.abspath(os.path.expanduser(os.fspath(candidate)))
    return default_directory()


def _reset_if_initialized_elsewhere(path: str) -> None:
    """JAX opens its cache once, at the first compile; re-point an already opened cache."""
    try:
        from jax._src import compilation_cache as cc  # private: reset is not a public API
    except ImportError:  # pragma: no cover - a JAX without the module
        return
    if cc.is_initialized():
        current = getattr(getattr(cc, "_cache", None), "_path", None)
        if current is None or os.path.abspath(str(current)) != path:
            cc.reset_cache()


def enable(directory: str | os.PathLike | None = None, *,
           min_compile_time_secs: float = MIN_COMPILE_TIME_SECS,
           min_entry_size_bytes: int = MIN_ENTRY_SIZE_BYTES) -> str | None:
    """Switch JAX's persistent compilation cache on at ``directory`` (see the module docstring for
    the default); returns the directory, or None when switched off (``"off"``).

    Call it before the first compilation of the run (at start-up, before building the train step).
    Called later, executables already compiled in this process stay uncached, and a cache JAX
    already opened at another directory is re-pointed. Safe to call more than once.
    """
    path = resolve_directory(directory)
    if path is None:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:  # a read-only home: run uncached rather than fail
        _log.warning("compilation cache disabled: cannot create %s (%s)", path, err)
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    _reset_if_initialized_elsewhere(path)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_secs))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", int(min_entry_size_bytes))
    return path


def disable() -> None:
    """Switch the persistent cache off for the rest of the process."""
    jax.config.update("jax_enable_compilation_cache", False)


def entries(directory: str | os.PathLike | None = None) -> list[str]:
    """Names of the executables stored in the cache directory (JAX's ``*-cache`` files)."""
    path = resolve_directory(directory)
    if path is None or not os.path.isdir(path):
        return []
    return sorted(name for name in os.listdir(path) if name.endswith("-cache"))


# ---- XLA:CPU compile options ------------------------------------------------------------------

#: XLA:CPU (jaxlib 0.10) hands convolutions, reductions and dots to YNNPACK by default. Its
#: convolutions are 1.5-3.5x slower than XLA's own (Eigen) path on the U-Net's weight gradients,
#: while its reductions are far faster than XLA's loop emitter (bias and GroupNorm gradients), so
#: keep YNNPACK for reductions and dots only. Same numerics up to float32 summation order.
CPU_COMPILER_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
}


@functools.lru_cache(maxsize=None)
def _cpu_options_supported() -> bool:
    """Whether this jaxlib's XLA:CPU knows :data:`CPU_COMPILER_OPTIONS` (flag names change between
    releases; an unknown one would fail the compile)."""
    try:
        jax.jit(lambda x: x + 1, compiler_options=CPU_COMPILER_OPTIONS).lower(1.0).compile()
    except Exception as err:  # noqa: BLE001 - any refusal means: compile with XLA's defaults
        _log.info("XLA:CPU options not applied (%s)", err)
        return False
    return True


def cpu_compiler_options(backend: str | None = None) -> dict:
    """:data:`CPU_COMPILER_OPTIONS` for ``jax.jit(compiler_options=...)`` when compiling for the CPU
    (``backend`` default: JAX's default backend) with a jaxlib that knows them, else ``{}``."""
    backend = backend or jax.default_backend()
    return dict(CPU_COMPILER_OPTIONS) if backend == "cpu" and _cpu_options_supported() else {}
