"""Test code run in several ``jax.distributed`` processes on localhost."""

import os
import socket
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_processes(body: str, count: int = 2, timeout: int = 300, args=lambda index: ()) -> list[tuple[str, str]]:
    """Run ``body`` (Python, dedented) in ``count`` new processes joined by
    ``jax.distributed.initialize`` on a free localhost port, with the repository on ``sys.path``
    and ``args(index)`` as ``sys.argv[2:]``. Asserts every process exits 0; returns their
    (stdout, stderr)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = (f"import sys, jax\njax.distributed.initialize('127.0.0.1:{port}', num_processes={count}, "
            f"process_id=int(sys.argv[1]))\nsys.path.insert(0, {ROOT!r})\n" + textwrap.dedent(body))
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(i), *map(str, args(i))], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(count)]
    outs = [p.communicate(timeout=timeout) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    return outs
