"""spd_jax.host_malloc: the glibc settings that keep XLA:CPU's per-call scratch memory mapped, when
they are applied and how a run restarts with them. The page faults they remove are counted by
``benchmarks/train_throughput.py`` (``page_faults_per_step``), not here: inside the parallel test
suite the count of a small probe program varied from run to run."""

import os
import sys

from spd_jax import host_malloc


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
    if host_malloc.glibc_linux():
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
