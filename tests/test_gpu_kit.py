"""The GPU proof kit runs end to end on CPU (``scripts/gpu_check.sh --dry-run``), so a
GPU host only ever meets a kit that has already run here."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_kit_dry_run_writes_every_result(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path))
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    names = {p.name for p in tmp_path.iterdir()}
    assert {"machine.json", "kit.log", "junit.xml", "summary.json", "transfer_cpu.json"} <= names
    assert len(names) <= 8  # what the device tool brings back
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["tests_rc"] == 0 and summary["bench_rc"] == 0
    assert summary["ops_per_job_512"] <= 8  # the mid geometry has 8 layers
    bench = json.loads((tmp_path / "transfer_cpu.json").read_text())
    assert bench["headline_geometry"] == "mid" and bench["load_over_limit_512"] > 0
    assert {c["layout"] for c in bench["cases"]} == {"LBHNC", "BLHNC"}


def test_gpu_kit_rejects_unknown_arguments():
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--wet-run"], cwd=ROOT,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "usage" in proc.stderr
