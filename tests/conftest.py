"""Shared test settings: float64 reference maths stays in NumPy; JAX runs in float32 on CPU. Every
process of the suite (xdist workers and the runs they start) shares one persistent XLA cache
outside the user's own cache, so a program compiled by one test is loaded by the next."""

import getpass
import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("SPD_JAX_COMPILATION_CACHE",
                      os.path.join(tempfile.gettempdir(), f"spd_jax_test_xla_cache_{getpass.getuser()}"))

import hypothesis  # noqa: E402

hypothesis.settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)
hypothesis.settings.load_profile("ci")
