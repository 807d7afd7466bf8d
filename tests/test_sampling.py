"""The one sampling path: the batch is split over every device and process with per-example keys,
so the samples equal a one-device run; the network's variables are traced, so one compilation
serves every parameter set."""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np

from tests.multiprocess import run_processes
from tests.test_train import ROOT

_SETUP = """
import sys
sys.path.insert(0, {root!r})
import jax, numpy as np
from tests.test_train import tiny
from spd_jax import tasks, training
from spd_jax.run import builders, sampling

config = tiny("digits_spd")
source = builders.build_source(config)
shape = tuple(source[0].shape)
process = builders.build_process(config, builders.build_spectrum(config, source, shape), shape)
model = builders.build_model(config)
settings = builders.sampler_settings(config, "ddim", 3)


def draw(devices, variables, count=8, batch=8):
    sampler = sampling.make_sampler(model, process, config.model.head, tasks.Task(), settings, shape,
                                    fast_compile=True, mesh=training.make_mesh(devices))
    images, _ = sampling.draw(sampler, variables, jax.random.PRNGKey(3), count, batch)
    return images, sampler
"""


def _run(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", **(env or {}))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=full_env, timeout=300, cwd=ROOT)


def test_two_parameter_sets_share_one_compilation_and_give_different_samples():
    namespace: dict = {}
    exec(_SETUP.format(root=ROOT), namespace)
    model, shape, builders = namespace["model"], namespace["shape"], namespace["builders"]
    first = builders.init_variables(model, shape, jax.random.PRNGKey(0))
    second = jax.tree.map(lambda w: w + 0.05, first)  # (the output layer starts at zero)
    a, sampler = namespace["draw"](jax.devices()[:1], first)
    b = namespace["sampling"].draw(sampler, second, jax.random.PRNGKey(3), 8, 8)[0]
    a_again = namespace["sampling"].draw(sampler, first, jax.random.PRNGKey(3), 8, 8)[0]
    assert sampler.jitted._cache_size() == 1
    np.testing.assert_array_equal(a, a_again)
    assert not np.allclose(a, b)  # the parameters are an input, not constants baked into the program


def test_every_nfe_of_a_sampler_in_a_pool_shares_one_program_and_keeps_its_own_samples():
    namespace: dict = {}
    exec(_SETUP.format(root=ROOT), namespace)
    model, shape, builders, sampling = namespace["model"], namespace["shape"], namespace["builders"], namespace["sampling"]
    config, process, tasks = namespace["config"], namespace["process"], namespace["tasks"]
    variables = jax.tree.map(lambda w: w + 0.05, builders.init_variables(model, shape, jax.random.PRNGKey(0)))
    pool = sampling.SamplerPool(model, process, config.model.head, tasks.Task(), shape, fast_compile=True, pad_to=5)
    settings = {nfe: builders.sampler_settings(config, "gradient_estimation", nfe) for nfe in (2, 3, 5)}
    runs = {nfe: pool(s) for nfe, s in settings.items()}
    drawn = {nfe: sampling.draw(run, variables, jax.random.PRNGKey(3), 8, 8) for nfe, run in runs.items()}
    assert runs[2].jitted is runs[3].jitted is runs[5].jitted and runs[5].jitted._cache_size() == 1
    assert pool(builders.sampler_settings(config, "ddim", 3)).jitted is not runs[3].jitted
    for nfe, (images, used) in drawn.items():
        alone = sampling.make_sampler(model, process, config.model.head, tasks.Task(), settings[nfe], shape,
                                      fast_compile=True)
        np.testing.assert_allclose(images, sampling.draw(alone, variables, jax.random.PRNGKey(3), 8, 8)[0],
                                   rtol=1e-5, atol=1e-5)
        assert used == nfe
    assert not np.allclose(drawn[2][0], drawn[5][0], atol=1e-3)


def test_four_devices_draw_the_same_samples_as_one_device():
    code = _SETUP.format(root=ROOT) + textwrap.dedent("""
    assert jax.device_count() == 4
    variables = jax.tree.map(lambda w: w + 0.05, builders.init_variables(model, shape, jax.random.PRNGKey(0)))
    one, _ = draw(jax.devices()[:1], variables, count=10, batch=10)
    four, sampler = draw(jax.devices(), variables, count=10, batch=6)  # chunks of 8, split 2 per device
    np.testing.assert_allclose(four, one, rtol=1e-4, atol=1e-4)  # XLA convolutions round differently per batch size
    assert sampler.devices == 4 and np.std(one) > 0.05
    print("OK")
    """)
    out = _run(code, {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


def test_two_processes_draw_their_shares_and_both_get_the_one_process_sample_set(tmp_path):
    reference = _SETUP.format(root=ROOT) + textwrap.dedent(f"""
    variables = builders.init_variables(model, shape, jax.random.PRNGKey(0))
    np.save({str(tmp_path / "one.npy")!r}, draw(jax.devices(), variables)[0])
    """)
    out = _run(reference)
    assert out.returncode == 0, out.stderr[-3000:]
    run_processes(_SETUP.format(root=ROOT) + textwrap.dedent(f"""
        assert jax.process_count() == 2 and jax.device_count() == 2
        variables = training.replicate(builders.init_variables(model, shape, jax.random.PRNGKey(0)),
                                       training.make_mesh())
        images, sampler = draw(jax.devices(), variables)
        assert sampler.devices == 2
        np.save({str(tmp_path)!r} + f"/p{{jax.process_index()}}.npy", images)
        """))
    one = np.load(tmp_path / "one.npy")
    for i in range(2):
        np.testing.assert_allclose(np.load(tmp_path / f"p{i}.npy"), one, rtol=1e-4, atol=1e-4)
