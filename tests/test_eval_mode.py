"""launch.py --mode=eval (spd_jax.run.evaluate) on a tiny digits checkpoint: report schema and files,
checkpoint step and EMA stamped, bad settings rejected before anything is written, resume after an
interruption, one pipeline and file layout for an unconditional model and a task; and
benchmarks/nfe_table.py's table merge (fake reports) and CPU smoke run."""

import csv
import json
import os
import subprocess
import sys

import pytest

from benchmarks import nfe_table
from spd_jax.run import evaluate as eval_run
from spd_jax.run import train as experiment
from spd_jax.run.checks import ConfigError
from spd_jax.run.scoring import REPORT_SCHEMA
from tests.test_train import ROOT, tiny

SETTINGS = "gradient_estimation:3,ddim:2"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("digits_run")
    experiment.train(tiny("digits_spd", num_steps=2), str(workdir))
    return workdir


def _config(**eval_fields):
    config = tiny("digits_spd", num_steps=2)
    config.eval.update(settings=SETTINGS, num_samples=24, batch_size=12, grid_images=8, metrics="pixel_fd,swd")
    config.eval.update(eval_fields)
    return config


def test_report_schema_files_and_stamps(run_dir):
    report = eval_run.run(_config(metrics="", name="schema"), str(run_dir), verbose=False)
    out = run_dir / "eval" / "schema"
    assert report == json.loads((out / "report.json").read_text())
    assert report["schema"] == REPORT_SCHEMA == "spd_jax.eval/2" and report["task"] == ""
    assert report["metrics"] == ["pixel_fd", "swd", "classifier_score", "classifier_confidence", "classifier_fd"]
    assert report["protocol"]["weights"] == "ema" and report["protocol"]["num_samples"] == 24
    assert report["protocol"]["reference"] == {"name": "digits/test", "num_images": 359}
    described = report["description"]
    assert described["checkpoint_step"] == 2 and described["params"] == "ema" and described["dataset"] == "digits"
    assert described["process"] == "spd" and described["clip_x0"] is True
    assert [(s["method"], s["nfe_requested"], s["nfe"]) for s in report["settings"]] == [
        ("gradient_estimation", 3, 3), ("ddim", 2, 2)]
    assert report["floor"]["name"] == "digits/train" and report["floor"]["num_images"] == 24
    assert report["baseline"] is None
    assert json.loads((out / "run.json").read_text())["checkpoint_step"] == 2
    assert report["files"]["grids"] == ["settings/gradient_estimation_nfe3/grid.png", "settings/ddim_nfe2/grid.png"]
    for name in [report["files"]["record"], report["files"]["plot"], *report["files"]["grids"]]:
        assert (out / name).stat().st_size > 0


def test_default_folder_is_named_after_the_checkpoint_step(run_dir):
    latest = eval_run.run(_config(settings="ddim:2", floor=False), str(run_dir), verbose=False)
    earlier = eval_run.run(_config(settings="ddim:2", floor=False, checkpoint_step=1), str(run_dir), verbose=False)
    assert latest["description"]["checkpoint_step"] == 2 and earlier["description"]["checkpoint_step"] == 1
    assert latest["floor"] is None
    assert (run_dir / "eval" / "step_2" / "report.json").exists() and (run_dir / "eval" / "step_1" / "report.json").exists()
    assert latest["settings"][0]["metrics"] != earlier["settings"][0]["metrics"]  # other EMA params


@pytest.mark.parametrize(
    "settings, message",
    [
        ("ddim", "entry 'ddim' is invalid: expected 'sampler:NFE'"),
        ("ddim:0", "entry 'ddim:0' is invalid"),
        ("ddim:5,dimm:5", "unknown sampler 'dimm' (did you mean 'ddim'?)"),
        ("ddim:5, ddim:5", "lists 'ddim:5' twice"),
        ("predict_project:1", "needs at least 2 NFE"),
        ("smd:5", "expected a method other than 'smd' for a model without latent network"),
        (" , ", "is empty"),
    ],
)
def test_bad_settings_entry_stops_before_anything_is_written(run_dir, settings, message):
    with pytest.raises(ConfigError) as err:
        eval_run.run(_config(settings=settings, name="bad"), str(run_dir), verbose=False)
    assert message in str(err.value)
    assert not (run_dir / "eval" / "bad").exists()


def test_launch_eval_reports_a_bad_entry_without_traceback(run_dir):
    cmd = [sys.executable, "launch.py", "--config=configs/digits_spd.py", f"--workdir={run_dir}", "--mode=eval",
           "--config.eval.settings=gradient_estimation:10,ddim:x", "--config.eval.name=launch_bad"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode != 0
    assert "config.eval.settings entry 'ddim:x' is invalid" in out.stderr and "Traceback" not in out.stderr
    assert not (run_dir / "eval" / "launch_bad").exists()


def test_interrupted_evaluation_resumes_without_recomputing(run_dir, monkeypatch):
    real = eval_run.make_generate
    calls = []

    def counting(stop_at=None):
        def make(*args, **kwargs):
            generate = real(*args, **kwargs)

            def wrapped(method, nfe, key, num, offset):
                if (method, nfe) == stop_at:
                    raise KeyboardInterrupt("simulated preemption")
                calls.append((method, nfe, offset))
                return generate(method, nfe, key, num, offset)

            return wrapped

        return make

    monkeypatch.setattr(eval_run, "make_generate", counting(stop_at=("ddim", 2)))
    with pytest.raises(KeyboardInterrupt):
        eval_run.run(_config(name="resume"), str(run_dir), verbose=False)
    assert calls == [("gradient_estimation", 3, 0)]
    first = json.loads((run_dir / "eval" / "resume" / "settings" / "gradient_estimation_nfe3" / "result.json")
                       .read_text())
    calls.clear()
    monkeypatch.setattr(eval_run, "make_generate", counting())
    report = eval_run.run(_config(name="resume"), str(run_dir), verbose=False)
    assert calls == [("ddim", 2, 0)]
    assert report["settings"][0]["metrics"] == first["metrics"]
    with pytest.raises(ConfigError, match="holds an evaluation with different"):
        changed = _config(name="resume")
        changed.sample.clip_x0 = False
        eval_run.run(changed, str(run_dir), verbose=False)


def _files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_one_pipeline_and_layout_for_an_unconditional_model_and_a_task(run_dir, tmp_path):
    # the same run() evaluates a task model: example i conditioned on held-out image i, PSNR / SSIM
    # against it beside the bicubic baseline, in the same files as the unconditional evaluation
    task_config = tiny("patches_sr4")
    task_config.sample.grid_images = 0
    experiment.train(task_config, str(tmp_path))
    task_config.eval.update(settings="ddim:2", num_samples=6, grid_images=4, name="layout")
    task = eval_run.run(task_config, str(tmp_path), verbose=False)
    plain = eval_run.run(_config(settings="ddim:2", name="layout"), str(run_dir), verbose=False)
    assert (plain["task"], task["task"]) == ("", "sr")
    assert set(plain) == set(task) and set(plain["settings"][0]) == set(task["settings"][0])
    assert plain["schema"] == task["schema"] and set(plain["description"]) == set(task["description"])
    assert task["metrics"] == ["psnr", "psnr_sem", "psnr_median", "psnr_of_mean_mse", "ssim", "ssim_sem"]  # 8 px
    assert task["baseline"]["name"] == "bicubic" and task["floor"] is None
    assert plain["floor"]["name"] == "digits/train" and plain["baseline"] is None
    common = ["quality_vs_nfe.png", "report.json", "run.json", "settings/{}ddim_nfe2/grid.png",
              "settings/{}ddim_nfe2/result.json", "settings/{}ddim_nfe2/samples_00000.npz"]
    assert _files(run_dir / "eval" / "layout") == sorted([n.format("") for n in common] + ["floor.json"])
    assert _files(tmp_path / "eval" / "layout") == sorted([n.format("sr4_") for n in common]
                                                          + ["baseline.json", "paired.npz"])


def test_missing_checkpoint_step_is_named(run_dir):
    with pytest.raises(FileNotFoundError, match=r"no checkpoint of step 7 .* available: \[1, 2\]"):
        eval_run.run(_config(checkpoint_step=7, name="missing"), str(run_dir), verbose=False)


def test_fid_needs_the_protocol_sample_count():
    config = _config(metrics="fid")
    with pytest.raises(ConfigError, match="FID/KID need 50000 samples by protocol"):
        eval_run.check(config)


def _fake_result(directory, method, nfe, value):
    directory.mkdir(parents=True)
    result = {"method": method, "nfe_requested": nfe, "nfe": nfe, "aux_nfe": 0, "sample_seconds": 0.5,
              "num_samples": 100, "metrics": {"pixel_fd": value, "swd": 2 * value}}
    (directory / "result.json").write_text(json.dumps(result))


def test_nfe_table_merges_finished_settings(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    name = nfe_table.eval_name(100)
    for process, offset in (("spd", 0.0), ("vp_linear", 1.0)):
        base = work / f"digits_{process}" / "eval" / name
        for method in ("gradient_estimation", "ddim"):
            for nfe in (5, 10):
                _fake_result(base / "settings" / f"{method}_nfe{nfe:03d}", method, nfe, offset + 10.0 / nfe)
        (base / "run.json").write_text(json.dumps({"checkpoint_step": 300}))
    (work / "digits_blurring" / "eval" / name / "settings").mkdir(parents=True)  # started, nothing finished
    nfe_table.floor_path(work, "digits", 100).write_text(json.dumps({"metrics": {"pixel_fd": 0.5, "swd": 1.0},
                                                                     "images": "digits/train (100 of 1438)"}))
    rows = nfe_table.merge(work, out, ["digits"], 100, nfes=(5, 10), verbose=False)
    assert [(r["process"], r["sampler"], r["nfe"]) for r in rows][:4] == [
        ("spd", "gradient_estimation", 5), ("spd", "gradient_estimation", 10), ("spd", "ddim", 5), ("spd", "ddim", 10)]
    assert len(rows) == 8
    with open(out / "nfe_table.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 9 and table[-1]["process"] == "floor (train vs test)" and table[0]["train_steps"] == "300"
    text = (out / "nfe_table.md").read_text()
    assert "**pixel_fd** (lower is better; floor (train vs test) 0.500)" in text
    assert "| process | sampler | NFE 5 | NFE 10 |" in text
    assert "| spd | gradient_estimation | **2.00** | **1.00** |" in text
    assert "| vp_linear | ddim | 3.00 | 2.00 |" in text
    assert (out / "nfe_table_digits.png").stat().st_size > 0


def test_nfe_table_smoke_run_on_cpu(tmp_path, capsys):
    argv = ["--dataset=digits", "--processes=spd", "--samplers=ddim", "--nfes=5", "--smoke", "--jobs=1",
            f"--workdir={tmp_path / 'work'}", f"--out={tmp_path / 'out'}"]
    assert nfe_table.main(argv) == 0
    table = list(csv.DictReader(open(tmp_path / "out" / "nfe_table.csv")))
    assert [(r["process"], r["sampler"], r["nfe"]) for r in table[:1]] == [("spd", "ddim", "5")]
    assert "floor" in table[-1]["process"]
    assert json.loads((tmp_path / "work" / "digits_spd" / nfe_table.WORKER_FILE).read_text())["trained_now"]
    assert nfe_table.main(argv) == 0  # finished: training and evaluation are skipped
    assert "training finished earlier (4 steps), skipped" in capsys.readouterr().out


_FAKE_WORKER = """
import os, sys, time
log, fail_dir, tag = sys.argv[1], sys.argv[2], sys.argv[3]
fraction = os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"]
with open(log, "a") as f:
    f.write(f"start {tag} {fraction} {os.environ['XLA_PYTHON_CLIENT_PREALLOCATE']}\\n")
time.sleep(0.3)
flag = os.path.join(fail_dir, tag.replace("/", "_"))
failing = os.path.exists(flag + ".always") or os.path.exists(flag + ".once")
if os.path.exists(flag + ".once"):
    os.remove(flag + ".once")
with open(log, "a") as f:
    f.write(f"end {tag}\\n")
sys.exit(3 if failing else 0)
"""


@pytest.mark.parametrize("mode", ["once", "always"])
def test_nfe_table_reruns_a_failed_worker_alone_with_the_whole_memory_share(tmp_path, monkeypatch, mode):
    # the GPU path (worker processes sharing one device) with fake workers: the one that fails (as
    # an out-of-memory run would) is started again after the others ended, alone, with the larger
    # memory cap; a worker that fails twice is reported, the others are not
    log, fail_dir = tmp_path / "log.txt", tmp_path / "fail"
    fail_dir.mkdir()
    (fail_dir / f"digits_vp_linear.{mode}").write_text("")
    monkeypatch.setattr(nfe_table, "_worker_command", lambda dataset, process, argv: [
        sys.executable, "-c", _FAKE_WORKER, str(log), str(fail_dir), f"{dataset}/{process}"])
    monkeypatch.setattr(nfe_table, "_floor", lambda args, dataset: None)
    argv = ["--dataset=digits", "--processes=spd,vp_linear", "--smoke", "--jobs=0",
            f"--workdir={tmp_path / 'work'}", f"--out={tmp_path / 'out'}"]
    args = nfe_table.parse_args(argv)
    args.worker_platforms = None
    failed = nfe_table.run_parallel([("digits", "spd"), ("digits", "vp_linear")], args, argv)
    lines = log.read_text().splitlines()
    starts = [line.split() for line in lines if line.startswith("start")]
    assert sorted(s[1] for s in starts[:2]) == ["digits/spd", "digits/vp_linear"]
    assert all(s[2] == "0.450" and s[3] == "false" for s in starts[:2])  # 0.9 / 2 workers, no preallocation
    assert starts[2][1:] == ["digits/vp_linear", "0.750", "false"] and len(starts) == 3
    assert lines.index("start digits/vp_linear 0.750 false") > lines.index("end digits/spd")  # alone
    assert failed == ([] if mode == "once" else ["digits/vp_linear"])
    assert (tmp_path / "out" / "nfe_table.md").read_text() == "(no finished settings yet)\n"


def test_two_processes_evaluate_together_and_match_one_process(run_dir):
    """Each process draws its share of every chunk, every process gets the whole sample set and
    scores it, process 0 writes: the report equals a one-process evaluation's."""
    from tests.multiprocess import run_processes

    one = eval_run.run(_config(settings="ddim:2", name="one_process", floor=False), str(run_dir), verbose=False)
    outs = run_processes(f"""
        import json
        from tests.test_eval_mode import _config
        from spd_jax.run import evaluate
        report = evaluate.run(_config(settings="ddim:2", name="two_processes", floor=False), {str(run_dir)!r},
                              verbose=False)
        print(json.dumps(report["settings"][0]["metrics"]))
        """)
    written = json.loads((run_dir / "eval" / "two_processes" / "report.json").read_text())
    for metrics in [json.loads(outs[0][0].strip().splitlines()[-1]), json.loads(outs[1][0].strip().splitlines()[-1]),
                    written["settings"][0]["metrics"]]:
        assert metrics.keys() == one["settings"][0]["metrics"].keys()
        for name, value in one["settings"][0]["metrics"].items():
            assert abs(metrics[name] - value) <= 1e-3 * abs(value) + 1e-4, (name, metrics[name], value)
