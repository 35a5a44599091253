"""The GPU proof kit runs end to end on CPU (``scripts/gpu_check.sh --dry-run``), so a
GPU host only ever meets a kit that has already run here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_kit_dry_run_writes_every_result(tmp_path):
    # The interpreter running the tests (a worktree may have no .venv of its own).
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=os.environ.get("PYTHON", sys.executable))
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


def test_gpu_kit_step_timeouts_fit_in_eight_minutes():
    # A GPU session gets one run of under 8 minutes; every step is bounded, and the
    # bounds of the steps that run in sequence (pip's zipfile fallback included) add up
    # to less than that.
    import re

    script = (ROOT / "scripts" / "gpu_check.sh").read_text()
    limits = [int(s) for s in re.findall(r"timeout (?:-s INT )?-k \d+ (\d+) ", script)]
    # pip, its zipfile fallback, nvidia-smi, machine.json, pytest, bench_transfer
    assert len(limits) == 6, limits
    assert sum(limits) <= 480
    assert "--time-budget 100" in script


def test_gpu_kit_never_installs_the_hosts_cuda_stack():
    # A numpy/torch/triton/cupy wheel first on PYTHONPATH would not match the host's
    # builds: the filter drops them whatever .whl/ holds.
    import re

    script = (ROOT / "scripts" / "gpu_check.sh").read_text()
    pattern = re.search(r"grep -Eiv '([^']+)'", script).group(1)  # type: ignore[union-attr]
    wheels = [".whl/numpy-2.3.5-cp312-cp312-manylinux_2_28_x86_64.whl",
              ".whl/torch-2.11.0-cp312-cp312-manylinux_2_28_x86_64.whl",
              ".whl/triton-3.6.0-cp312-cp312-manylinux_2_28_x86_64.whl",
              ".whl/cupy_cuda13x-14.0.1-cp312-cp312-manylinux_2_28_x86_64.whl",
              ".whl/nvidia_cufile-1.15.1.6-py3-none-manylinux_2_27_x86_64.whl",
              ".whl/pydantic-2.14.4-py3-none-any.whl",
              ".whl/typing_extensions-4.16.0-py3-none-any.whl",
              ".whl/kvikio_cu13-26.10.0-cp311-abi3-manylinux_2_28_x86_64.whl"]
    kept = [w for w in wheels if not re.search(pattern, w, re.IGNORECASE)]
    assert kept == wheels[5:]


def test_bench_runs_the_headline_cases_first_and_compares_codecs():
    from loadtest import bench_transfer as bt

    cases = bt.plan_cases("cuda", ["llama3-8b", "llama3-70b-tp8"], ["none", "int8", "fp8"],
                          [1, 32, 512])
    assert cases[0] == ("llama3-8b", "LBHNC", "none", 512, "auto")
    assert set(cases[1:3]) == {("llama3-8b", "LBHNC", "int8", 512, "auto"),
                               ("llama3-8b", "LBHNC", "fp8", 512, "auto")}
    assert cases[3] == ("llama3-8b", "LBHNC", "none", 512, "triton")  # then the other backends
    assert len(cases) == len(set(cases)) == 2 * 2 * 3 * 3 + 2 * 2
    cpu = bt.plan_cases("cpu", ["mid"], ["none"], [1, 512])
    assert {c[4] for c in cpu} == {"auto"}  # no backend to compare on CPU
    row = {"geometry": "llama3-8b", "layout": "LBHNC", "blocks": 512, "save_gbps": 10.0,
           "load_gbps": 20.0, "load_over_limit": 0.9, "save_over_limit": 0.8,
           "save_ops_per_job": 2, "load_ops_per_job": 3}
    rows = [dict(row, codec="none"), dict(row, codec="int8", save_gbps=17.0, load_gbps=40.0)]
    summary = bt.summarize(rows, "cuda", 512)
    assert summary["ops_per_job_512"] == 3
    assert summary["int8_save_over_none_512"] == 1.7
    assert summary["int8_load_over_none_512"] == 2.0
    assert "fp8_save_over_none_512" not in summary


def test_bench_keeps_its_results_when_the_time_budget_runs_out(tmp_path):
    from loadtest import bench_transfer as bt

    out = tmp_path / "transfer_cpu.json"
    assert bt.main(["--device", "cpu", "--codecs", "none", "--jobs", "1,2", "--geometries",
                    "mid", "--repeats", "1", "--time-budget", "0", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert len(data["cases"]) == 1 and data["cases_planned"] == 4
    assert data["cases"][0]["blocks"] == 2  # the largest job ran first
