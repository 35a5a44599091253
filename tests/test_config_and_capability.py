import pytest

from symram_vllm import capability
from symram_vllm.config import ConfigError, load_config, parse_bytes


@pytest.mark.parametrize(
    ("text", "expected"),
    [(4096, 4096), ("512MiB", 512 * 1024**2), ("8g", 8 * 10**9), ("1.5GiB", 3 * 1024**3 // 2),
     ("100", 100)],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["lots", "-5", "12XB", True, -1])
def test_parse_bytes_rejects_garbage(bad):
    with pytest.raises(ValueError):
        parse_bytes(bad)


def test_precedence_defaults_file_env_overrides(tmp_path, monkeypatch):
    monkeypatch.delenv("SYMRAM_DRAM_BYTES", raising=False)
    assert load_config().dram_bytes == 4 * 1024**3
    cfg = tmp_path / "symram.yaml"
    cfg.write_text("dram_bytes: 2GiB\nmin_load_blocks: 2\n")
    loaded = load_config(path=cfg)  # the file beats the defaults
    assert loaded.dram_bytes == 2 * 1024**3 and loaded.min_load_blocks == 2
    monkeypatch.setenv("SYMRAM_DRAM_BYTES", "1GiB")
    loaded = load_config(path=cfg)  # the environment beats the file
    assert loaded.dram_bytes == 1024**3 and loaded.min_load_blocks == 2
    # kv_connector_extra_config beats everything
    assert load_config({"dram_bytes": "3GiB"}, path=cfg).dram_bytes == 3 * 1024**3


def test_bad_config_names_the_field(tmp_path):
    with pytest.raises(ConfigError, match="dram_bytes"):
        load_config({"dram_bytes": "plenty"})
    with pytest.raises(ConfigError, match="dram_byts"):
        load_config({"dram_byts": "1GiB"})
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path=bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(path=tmp_path / "missing.yaml")


def test_cpu_host_falls_back_from_every_cuda_path():
    # This suite runs on CPU-only machines: each probe must pick the fallback and say why.
    assert not capability.cuda_capability().available
    assert not capability.pinned_memory_supported()
    kvikio = capability.kvikio_capability()
    assert not kvikio.available and "CUDA" in kvikio.reason
    assert set(capability.describe()) == {"cuda", "pinned_memory", "kvikio", "gpus"}
