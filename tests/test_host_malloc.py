"""spd_jax.host_malloc: the glibc settings that keep XLA:CPU's per-call scratch memory mapped, and the
claim behind them (a repeated call stops page-faulting on its buffers)."""

import os
import platform
import statistics
import subprocess
import sys
import textwrap

import pytest

from spd_jax import host_malloc

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def test_the_settings_are_added_and_the_users_own_values_are_kept():
    env = host_malloc.tuned_environ(
        {"GLIBC_TUNABLES": "glibc.malloc.arena_max=4:glibc.rtld.nns=2", "HOME": "/h"}, check_platform=False
    )
    assert env["HOME"] == "/h"
    settings = host_malloc.parse_tunables(env["GLIBC_TUNABLES"])
    assert settings["glibc.malloc.arena_max"] == "4"  # the user's, not ours
    assert settings["glibc.rtld.nns"] == "2"
    assert settings["glibc.malloc.mmap_threshold"] == host_malloc.TUNABLES["glibc.malloc.mmap_threshold"]
    assert settings["glibc.malloc.trim_threshold"] == host_malloc.TUNABLES["glibc.malloc.trim_threshold"]


def test_nothing_changes_when_switched_off_already_set_or_not_cpu_only():
    assert host_malloc.tuned_environ({host_malloc.ENV_VAR: "0"}, check_platform=False) is None
    full = ":".join(f"{k}={v}" for k, v in host_malloc.TUNABLES.items())
    assert host_malloc.tuned_environ({"GLIBC_TUNABLES": full}, check_platform=False) is None
    assert not host_malloc.cpu_only({"JAX_PLATFORMS": "cuda"})
    assert host_malloc.cpu_only({"JAX_PLATFORMS": "cpu"})
    if GLIBC:
        assert host_malloc.tuned_environ({"JAX_PLATFORMS": "tpu"}) is None
        assert host_malloc.tuned_environ({"JAX_PLATFORMS": "cpu"}) is not None


def test_reexec_runs_the_same_program_once_with_the_settings(monkeypatch):
    calls = []

    def fake_execve(path, args, env):
        calls.append((path, args, env))

    monkeypatch.setattr(os, "execve", fake_execve)
    monkeypatch.setattr(host_malloc, "tuned_environ", lambda environ: dict(environ, GLIBC_TUNABLES="glibc.malloc.arena_max=1"))
    host_malloc.reexec_if_needed(["launch.py", "--config=c.py"])
    assert calls == [(sys.executable, [sys.executable, "launch.py", "--config=c.py"], calls[0][2])]
    assert calls[0][2]["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=1"
    monkeypatch.setattr(host_malloc, "tuned_environ", lambda environ: None)
    host_malloc.reexec_if_needed(["launch.py"])
    assert len(calls) == 1  # None: the process goes on unchanged


_CHILD = textwrap.dedent("""
    import os
    # one XLA thread and synchronous dispatch: each call has freed its scratch before the next one
    # allocates, however busy the machine (the claim is about where memory comes from, not threads)
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
    import resource, jax, jax.numpy as jnp
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    f = jax.jit(lambda x, w1, w2: jnp.tanh(x @ w1) @ w2)   # x @ w1: a 96 MiB scratch buffer per call
    x, w1, w2 = jax.random.normal(jax.random.key(0), (2048, 256)), jnp.full((256, 12288), 1e-3), jnp.ones((12288, 4))
    faults = []
    for _ in range(11):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        f(x, w1, w2).block_until_ready()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(float(f(x, w1, w2).sum()), *faults[3:])           # the result, then the calls after warm-up
""")

SCRATCH_PAGES = 2048 * 12288 * 4 // 4096


def _run(env) -> tuple[float, list[int]]:
    out = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    result, *faults = out.stdout.split()
    return float(result), [int(v) for v in faults]


@pytest.mark.skipif(not GLIBC, reason="glibc tunables exist only where glibc is the C library")
def test_with_the_settings_repeated_calls_touch_no_fresh_pages():
    plain = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    tuned = host_malloc.tuned_environ(plain, check_platform=False)
    (default_result, default_faults), (tuned_result, tuned_faults) = _run(plain), _run(tuned)
    assert tuned_result == default_result  # where memory comes from changes no arithmetic
    # glibc's default: a fresh mmap for the scratch on every call, and a fault on each of its pages
    assert min(default_faults) > 0.9 * SCRATCH_PAGES, default_faults
    # tuned: the freed scratch is reused and its pages stay mapped (a typical call faults on none of
    # them; the heap may still grow once when other allocations interleave)
    assert statistics.median(tuned_faults) < SCRATCH_PAGES / 20, (tuned_faults, default_faults)
    assert sum(tuned_faults) < sum(default_faults) / 3, (tuned_faults, default_faults)
