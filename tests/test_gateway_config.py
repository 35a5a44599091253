"""GatewayConfig sources and validation, and the command line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from symram_vllm.serving.gateway.__main__ import build_parser, config_from_args, main
from symram_vllm.serving.gateway.config import ConfigError, GatewayConfig, load_gateway_config


def test_backend_specs_and_control_defaults():
    config = GatewayConfig(backends=[
        "http://10.0.0.5:8000",
        "http://10.0.0.6:8000/v1/,control=http://10.0.0.6:7000,name=six,max_inflight=3",
        {"url": "http://h:8002", "control_url": "none"},
    ])
    a, b, c = config.backends
    assert (a.name, a.control_url) == ("10.0.0.5:8000", "http://10.0.0.5:9100")
    assert (b.url, b.control_url, b.name, b.max_inflight) == (
        "http://10.0.0.6:8000", "http://10.0.0.6:7000", "six", 3)
    assert c.control_url is None  # explicitly none, offset or not
    no_offset = GatewayConfig(backends=["http://x:1"], control_port_offset=None)
    assert no_offset.backends[0].control_url is None


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"backends": ["ftp://x:1"]}, "not an http(s)://host[:port] URL"),
        ({"backends": ["http://x:1,colour=red"]}, "backend option 'colour=red'"),
        ({"backends": ["http://x:1", "http://x:1"]}, "two backends are named 'x:1'"),
        ({"api_keys": [{"key": "short"}]}, "at least 8 characters"),
        ({"api_keys": [{"key": "sk-12345678"}, {"key": "sk-12345678", "tenant": "b"}]},
         "listed twice"),
        ({"routing": {"disk_weight": 2}}, "routing.disk_weight"),
        ({"limits": {"max_body_bytes": "lots"}}, "limits.max_body_bytes"),
        ({"limits": {"max_inflight": 3}}, "limits.max_inflight"),
        ({"log_level": "loud"}, "log_level must be one of"),
    ],
)
def test_invalid_config_names_the_field(overrides, needle):
    with pytest.raises(ConfigError) as info:
        load_gateway_config(None, overrides)
    assert needle in str(info.value)


def test_yaml_then_env_then_overrides(tmp_path, monkeypatch):
    path = tmp_path / "gateway.yaml"
    path.write_text(
        "port: 9001\n"
        "backends: ['http://127.0.0.1:8001']\n"
        "limits: {max_body_bytes: 1MiB, retry_after_s: 7}\n"
        "api_keys: [{key: sk-yaml-key-1, tenant: acme, requests_per_minute: 30}]\n"
        "tenants: {acme: {salt: acme-salt}}\n"
    )
    monkeypatch.setenv("SYMRAM_GATEWAY_LIMITS__RETRY_AFTER_S", "9")
    monkeypatch.setenv("SYMRAM_GATEWAY_ROUTING__LOAD_PENALTY_TOKENS", "64")
    config = load_gateway_config(path, {"port": 9002})
    assert config.port == 9002  # override > file
    assert config.limits.max_body_bytes == 1 << 20  # file
    assert config.limits.retry_after_s == 9  # env > file
    assert config.routing.load_penalty_tokens == 64
    assert config.api_keys[0].tenant == "acme" and config.auth_enabled
    assert config.tenants["acme"].salt is not None
    assert "acme-salt" not in repr(config)  # secrets stay secret
    # The file is not sticky: the next load without it does not see it.
    monkeypatch.delenv("SYMRAM_GATEWAY_LIMITS__RETRY_AFTER_S")
    assert load_gateway_config(None).port == 8000


def test_bad_yaml_is_a_config_error(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text("port: [\n")
    with pytest.raises(ConfigError, match="cannot read gateway config"):
        load_gateway_config(path)
    path.write_text("- just a list\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_gateway_config(path)
    path.write_text("port: 1\nbogus: 2\n")
    with pytest.raises(ConfigError, match="bogus"):
        load_gateway_config(path)


def test_cli_pairs_control_with_the_preceding_backend():
    args = build_parser().parse_args([
        "--port", "8123", "--backend", "http://127.0.0.1:8001", "--control",
        "http://127.0.0.1:9101", "--backend", "http://127.0.0.1:8002",
        "--backend", "http://127.0.0.1:8003,control=http://127.0.0.1:7003",
        "--control-port-offset", "50"])
    config = config_from_args(args)
    assert config.port == 8123
    assert [b.control_url for b in config.backends] == [
        "http://127.0.0.1:9101", "http://127.0.0.1:8052", "http://127.0.0.1:7003"]
    no_control = config_from_args(build_parser().parse_args(
        ["--backend", "http://127.0.0.1:8001", "--no-control"]))
    assert no_control.backends[0].control_url is None


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--control", "http://x:1"], "comes before any --backend"),
        (["--backend", "http://x:1,control=http://x:2", "--control", "http://x:3"],
         "already has a control URL"),
        (["--backend", "nonsense"], "not an http(s)"),
        ([], "no backends"),
    ],
)
def test_cli_errors_exit_2_with_a_message(argv, needle, capsys):
    assert main(argv) == 2
    assert needle in capsys.readouterr().err


def test_cli_check_prints_the_config_without_secrets(capsys, monkeypatch):
    monkeypatch.setenv("SYMRAM_GATEWAY_API_KEYS", '[{"key": "sk-env-secret-1"}]')
    assert main(["--check", "--backend", "http://127.0.0.1:8001"]) == 0
    out = capsys.readouterr().out
    printed = json.loads(out)
    assert printed["backends"][0]["control_url"] == "http://127.0.0.1:9101"
    assert "sk-env-secret-1" not in out


def test_help_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "symram_vllm.serving.gateway", "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert "--backend URL[,control=URL]" in result.stdout
    assert "--control-port-offset" in result.stdout
