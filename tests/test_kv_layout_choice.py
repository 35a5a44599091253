"""The layout symram asks vLLM for: BLHNC on CUDA with auto, LBHNC on CPU always."""

from types import SimpleNamespace

import pytest

from symram_vllm.connectors.kv_layout_choice import choose_kv_layout


@pytest.mark.parametrize(
    ("setting", "device", "expected"),
    [("auto", "cuda", "BLHNC"), ("auto", "cpu", "LBHNC"), ("LBHNC", "cuda", "LBHNC"),
     ("BLHNC", "cuda", "BLHNC"), ("LBHNC", "cpu", "LBHNC")],
)
def test_choice(setting, device, expected):
    assert choose_kv_layout(setting, device) == expected


def test_blhnc_on_cpu_falls_back_with_a_warning(caplog):
    assert choose_kv_layout("BLHNC", "cpu") == "LBHNC"
    assert "accepts only LBHNC" in caplog.text


def test_unknown_setting_is_refused():
    with pytest.raises(ValueError, match="kv_layout must be"):
        choose_kv_layout("LBNHC", "cuda")


def test_connector_reads_the_setting_from_the_extra_config():
    from symram_vllm.connectors.symram_connector import SymramConnector

    def config(extra, device):
        return SimpleNamespace(
            kv_transfer_config=SimpleNamespace(kv_connector_extra_config=extra),
            device_config=SimpleNamespace(device_type=device),
        )

    assert SymramConnector.get_required_kvcache_layout(config({}, "cuda")) == "BLHNC"
    assert SymramConnector.get_required_kvcache_layout(
        config({"kv_layout": "LBHNC"}, "cuda")) == "LBHNC"
    assert SymramConnector.get_required_kvcache_layout(config({}, "cpu")) == "LBHNC"
    # A bad config is reported by the connector's constructor, not here.
    assert SymramConnector.get_required_kvcache_layout(
        config({"kv_layout": "sideways"}, "cuda")) is None
