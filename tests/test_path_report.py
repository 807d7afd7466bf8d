"""The main job before training: ``launch.py --config=configs/path_report.py`` end to end."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_path_report_job_writes_table_and_pictures(tmp_path):
    cmd = [
        sys.executable, "launch.py", "--config=configs/path_report.py", f"--workdir={tmp_path}",
        "--config.crops_per_photo=4", "--config.num_points=512", "--config.deviations=(0.1,)",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| spd | dft |" in proc.stdout
    for name in ("fisher_lengths.json", "fisher_lengths.md", "spectrum.png", "spd_gains.png"):
        assert os.path.getsize(tmp_path / name) > 0
    result = json.loads((tmp_path / "fisher_lengths.json").read_text())
    for table in ("preset", "patches"):
        rows = {r["process"]: r for r in result[table]["rows"]}
        assert max(abs(r - 1) for r in rows["spd"]["ratio"]) < 0.005
        for name in ("ddm_constant", "rectified_flow", "vp_cosine", "spd_dev0.1"):
            assert min(rows[name]["ratio"]) > 1.0, name


def test_unknown_job_is_refused_before_writing(tmp_path):
    workdir = tmp_path / "out"
    cmd = [sys.executable, "launch.py", "--config=configs/path_report.py", f"--workdir={workdir}",
           "--config.job=trian"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "trian" in proc.stderr
    assert not workdir.exists()
