"""scripts/setup.sh installs only what running needs; `--test` (make test) adds the
browser. Run for real against a stand-in apt-get on a PATH without those programs."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ("bash", "cat", "sha256sum", "cut", "printf", "id", "dirname")


@pytest.fixture
def sandbox(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in TOOLS:
        found = shutil.which(tool)
        assert found, tool
        (bin_dir / tool).symlink_to(found)
    log = tmp_path / "apt.log"
    apt = bin_dir / "apt-get"
    apt.write_text(f'#!{shutil.which("bash")}\necho "$*" >> {log}\n')
    apt.chmod(0o755)
    # A venv that is up to date, so the script stops after the system packages.
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()
                          + (ROOT / "scripts" / "setup.sh").read_bytes()).hexdigest()[:16]
    (venv / ".symram-setup").write_text(want + "\n")
    env = {"PATH": str(bin_dir), "SYMRAM_VENV": str(venv), "HOME": str(tmp_path)}
    return env, log


def installed(env: dict[str, str], log: Path, *args: str) -> str:
    if os.geteuid() != 0:
        pytest.skip("setup.sh installs system packages only as root")
    out = subprocess.run([shutil.which("bash") or "bash", str(ROOT / "scripts" / "setup.sh"),
                          *args], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "environment up to date" in out.stdout
    return log.read_text() if log.exists() else ""


def test_run_setup_installs_no_browser(sandbox):
    env, log = sandbox
    calls = installed(env, log)
    install = [line for line in calls.splitlines() if " install " in f" {line} "]
    assert install and "redis-server" in install[0]
    assert "chromium" not in calls


def test_test_setup_adds_the_browser(sandbox):
    env, log = sandbox
    calls = installed(env, log, "--test")
    install = next(line for line in calls.splitlines() if " install " in f" {line} ")
    assert {"redis-server", "chromium", "chromium-driver"} <= set(install.split())


def test_make_targets_use_the_right_setup():
    makefile = (ROOT / "Makefile").read_text()
    assert "run: setup\n" in makefile and "test: setup-test\n" in makefile
    assert "setup-test:\n\t@bash scripts/setup.sh --test" in makefile
    assert (ROOT / "scripts" / "test.sh").read_text().index("wheel_check.sh") < \
        (ROOT / "scripts" / "test.sh").read_text().index("pytest")
