"""The config loader: precedence, deep merge, sources named in errors, unknown variables,
URL schemes, budgets, byte units, the generated reference, and the compose deployment's
resolved config."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from symram_vllm import config as config_module
from symram_vllm.config import ConfigError, SymramConfig, load_config, parse_bytes

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for key in list(os.environ):
        if key.upper().startswith("SYMRAM_"):
            monkeypatch.delenv(key)
    config_module._WARNED.clear()


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_env_beats_the_file_as_documented(tmp_path, monkeypatch):
    # The reproduction: the file had won over the environment.
    cfg = write(tmp_path / "a.yaml",
                "dram_bytes: 1GiB\ndirectory_url: redis://127.0.0.1:6379/0\n")
    monkeypatch.setenv("SYMRAM_CONFIG", str(cfg))
    monkeypatch.setenv("SYMRAM_DRAM_BYTES", "2GiB")
    monkeypatch.setenv("SYMRAM_DIRECTORY_URL", "redis://redis:6379/0")
    loaded = load_config()
    assert loaded.dram_bytes == 2 * 1024**3
    assert loaded.directory_url == "redis://redis:6379/0"
    # ... and the extra config beats the environment.
    assert load_config({"dram_bytes": "3GiB"}).dram_bytes == 3 * 1024**3


def test_layers_merge_deep(tmp_path, monkeypatch):
    cfg = write(tmp_path / "p.yaml", "policy:\n  write_policy: write_through_selective\n"
                "  write_through_hits: 3\ndisk:\n  write_workers: 4\n")
    monkeypatch.setenv("SYMRAM_POLICY__WRITE_THROUGH_HITS", "5")
    loaded = load_config({"policy": {"prefetch_workers": 7}, "config_file": str(cfg)})
    assert loaded.policy.write_policy == "write_through_selective"  # file
    assert loaded.policy.write_through_hits == 5  # env over file
    assert loaded.policy.prefetch_workers == 7  # extra config
    assert loaded.disk.write_workers == 4


def test_config_file_in_extra_config_is_honoured_over_symram_config(tmp_path, monkeypatch):
    env_file = write(tmp_path / "env.yaml", "dram_bytes: 1GiB\nmin_load_blocks: 3\n")
    extra_file = write(tmp_path / "extra.yaml", "dram_bytes: 2GiB\n")
    monkeypatch.setenv("SYMRAM_CONFIG", str(env_file))
    loaded = load_config({"config_file": str(extra_file)})
    assert loaded.dram_bytes == 2 * 1024**3
    assert loaded.min_load_blocks == 1  # env.yaml was replaced, not merged


def test_errors_name_the_source(tmp_path, monkeypatch):
    monkeypatch.setenv("SYMRAM_DRAM_BYTES", "plenty")
    with pytest.raises(ConfigError, match=r"SYMRAM_DRAM_BYTES: cannot parse byte size"):
        load_config()
    monkeypatch.delenv("SYMRAM_DRAM_BYTES")
    profile = write(tmp_path / "profile.yaml", "policy:\n  write_policy: sometimes\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path=profile)
    assert f"{profile}: policy.write_policy: Input should be" in str(caught.value)
    with pytest.raises(ConfigError, match=r"kv_connector_extra_config: transfer_threads: "):
        load_config({"transfer_threads": 99})
    monkeypatch.setenv("SYMRAM_POLICY__PREFETCH_WORKERS", "0")
    with pytest.raises(ConfigError, match=r"SYMRAM_POLICY__PREFETCH_WORKERS: "):
        load_config()
    monkeypatch.delenv("SYMRAM_POLICY__PREFETCH_WORKERS")
    with pytest.raises(ConfigError, match=r"dram_byts: unknown setting \(did you mean "
                                          r"'dram_bytes'\?\)"):
        load_config({"dram_byts": "1GiB"})


def test_unknown_symram_variables_warn_with_a_suggestion(monkeypatch, caplog):
    monkeypatch.setenv("SYMRAM_DRAM_BYTE", "1GiB")
    monkeypatch.setenv("SYMRAM_DIRECTORY", "redis://h:6379/0")
    monkeypatch.setenv("SYMRAM_GATEWAY_PORT", "9000")  # the gateway's: not ours to judge
    monkeypatch.setenv("SYMRAM_SNAPSHOT_KEY", "k")  # read by the snapshot tools
    monkeypatch.setenv("SYMRAM_ENCRYPTION_KEY", "k")  # read by the page sealing
    with caplog.at_level(logging.WARNING, logger="symram.config"):
        load_config()
    text = caplog.text
    assert "SYMRAM_DRAM_BYTE is not a symram setting" in text
    assert "did you mean SYMRAM_DRAM_BYTES?" in text
    assert "did you mean SYMRAM_DIRECTORY_URL?" in text
    assert "SYMRAM_GATEWAY_PORT" not in text and "SYMRAM_SNAPSHOT_KEY" not in text
    assert "SYMRAM_ENCRYPTION_KEY" not in text


def test_unknown_name_inside_a_section_is_an_error_naming_the_variable(monkeypatch):
    monkeypatch.setenv("SYMRAM_POLICY__WRITE_POLCY", "write_back")
    with pytest.raises(ConfigError, match=r"SYMRAM_POLICY__WRITE_POLCY: unknown setting "
                                          r"\(did you mean SYMRAM_POLICY__WRITE_POLICY\?\)"):
        load_config()


@pytest.mark.parametrize("url", ["redis://h:6379/0", "rediss://h:6380/0",
                                 "unix:///run/redis.sock", "redis+cluster://h:7000",
                                 "redis://:secret@h:6379/0"])
def test_redis_url_schemes_accepted(url):
    assert load_config({"directory_url": url}).directory_url == url


@pytest.mark.parametrize("url", ["http://h:6379", "h:6379", "redis://", "unix://",
                                 "memcached://h:11211"])
def test_bad_directory_url_rejected_at_start(url):
    with pytest.raises(ConfigError, match="directory_url"):
        load_config({"directory_url": url})


def test_bad_url_error_does_not_echo_a_password():
    with pytest.raises(ConfigError) as caught:
        load_config({"directory_url": "http://user:hunter2@h:6379/0"})
    assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize("name", ["dram_bytes", "disk_bytes"])
def test_zero_budget_rejected(name):
    with pytest.raises(ConfigError, match=f"{name}: Input should be greater than 0"):
        load_config({name: 0})
    with pytest.raises(ConfigError, match=name):
        load_config({name: "0GiB"})


def test_redis_pages_zero_still_means_off():
    assert load_config({"redis_pages_bytes": 0}).redis_pages_bytes == 0


@pytest.mark.parametrize(("text", "expected"), [
    ("4G", 4 * 1024**3), ("4g", 4 * 10**9), ("512M", 512 * 1024**2), ("2k", 2000),
    ("2K", 2048), ("1T", 1024**4), ("3GiB", 3 * 1024**3), ("3gib", 3 * 1024**3),
    ("3Gi", 3 * 1024**3), ("1.5G", 3 * 1024**3 // 2), ("7B", 7), (8 * 1024, 8192),
])
def test_byte_units_follow_vllm(text, expected):
    assert parse_bytes(text) == expected


def test_byte_units_agree_with_vllms_parser():
    argparse_utils = pytest.importorskip("vllm.utils.argparse_utils")
    for text in ("4G", "4g", "512M", "2k", "2K", "1T", "25.6k"):
        assert parse_bytes(text) == argparse_utils.human_readable_int(text), text


@pytest.mark.parametrize("text", ["8GB", "8gb", "512MB", "1TB", "2kB"])
def test_ambiguous_byte_units_rejected_with_both_spellings(text):
    with pytest.raises(ValueError, match="ambiguous") as caught:
        parse_bytes(text)
    number = text.rstrip("BbGgMmTtKk")
    assert f"{number}{text[len(number)].upper()}iB" in str(caught.value)


def test_removed_disk_victim_window_names_the_one_setting(tmp_path, monkeypatch):
    # One eviction sample size: policy.victim_window, handed to both tiers by the stack.
    cfg = write(tmp_path / "old.yaml", "disk:\n  victim_window: 8\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path=cfg)
    assert "old.yaml: disk: disk.victim_window is not a setting" in str(caught.value)
    assert "policy.victim_window" in str(caught.value)
    monkeypatch.setenv("SYMRAM_DISK__VICTIM_WINDOW", "8")
    with pytest.raises(ConfigError, match="SYMRAM_POLICY__VICTIM_WINDOW"):
        load_config()
    monkeypatch.delenv("SYMRAM_DISK__VICTIM_WINDOW")
    assert load_config({"policy": {"victim_window": 4}}).policy.victim_window == 4


def test_disk_codec_is_refused_naming_the_top_level_codec(monkeypatch):
    # It used to be silently replaced by `codec`; now the conflict is an error.
    with pytest.raises(ConfigError) as caught:
        load_config({"codec": "none", "disk": {"codec": "int8"}})
    message = str(caught.value)
    assert "extra_config: disk: disk.codec is not a setting: set codec (SYMRAM_CODEC)" in message
    monkeypatch.setenv("SYMRAM_DISK__CODEC", "fp8")
    refused = r"SYMRAM_DISK\w*: disk.codec is not a setting: set codec"
    with pytest.raises(ConfigError, match=refused):
        load_config()
    monkeypatch.delenv("SYMRAM_DISK__CODEC")
    # Not a setting: not in the reference, not in `symram doctor --config`'s dump.
    loaded = load_config({"codec": "int8"})
    assert "codec" not in loaded.model_dump()["disk"]
    reference = (ROOT / "docs" / "config.md").read_text()
    assert "| `disk.codec` | `SYMRAM_DISK__CODEC` | set codec" in reference  # removed list
    assert "`disk.codec` | `SYMRAM_DISK__CODEC` | `none`" not in reference  # not a setting


def test_generated_reference_is_in_sync():
    from symram_vllm.config_docs import render

    committed = (ROOT / "docs" / "config.md").read_text()
    assert committed == render(), (
        "docs/config.md is stale: python -m symram_vllm.config_docs > docs/config.md")
    for path in config_module._fields(SymramConfig):
        assert f"`{'.'.join(path)}`" in committed
        assert config_module.env_name(path) in committed


def test_compose_engines_resolve_to_the_redis_service_all_interfaces_and_the_volume(
        tmp_path):
    """`symram doctor --config`, run with a compose engine's environment and files."""
    compose = yaml.safe_load((ROOT / "deploy" / "docker" / "docker-compose.yml").read_text())
    engine = compose["services"]["engine-0"]
    env = {k: str(v) for k, v in engine["environment"].items()}
    # The entrypoint adds the directory URL with the Redis password from its secret.
    script = " ".join(engine.get("entrypoint") or [])
    exported = re.search(r'export SYMRAM_DIRECTORY_URL=\\?"([^"\\]+)', script)
    if exported:
        env["SYMRAM_DIRECTORY_URL"] = re.sub(r"\$\$\(cat [^)]+\)", "s3cret",
                                             exported.group(1))
    mounts = dict(reversed(v.split(":")[:2]) for v in engine["volumes"])
    profile = (ROOT / "deploy" / "docker" / mounts[env["SYMRAM_CONFIG"]]).resolve()
    env["SYMRAM_CONFIG"] = str(profile)
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("SYMRAM_")}
    out = subprocess.run([sys.executable, "-m", "symram_vllm.cli", "doctor", "--config"],
                         env={**clean, **env}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    resolved = json.loads(out.stdout)
    assert resolved["directory_url"] in ("redis://redis:6379/0", "redis://:***@redis:6379/0")
    assert "s3cret" not in out.stdout
    assert resolved["control_host"] == "0.0.0.0"
    assert resolved["disk_path"] == "/var/lib/symram/disk"
    volume = next(v.split(":")[1] for v in engine["volumes"] if "disk" in v.split(":")[0])
    assert resolved["disk_path"].startswith(volume + "/")
    assert resolved["instance_id"] == "engine-0"
    # what the profile sets and the environment does not, still comes from the profile
    assert resolved["policy"]["write_policy"] == "write_through_selective"
    assert resolved["config_file"] == str(profile)
