"""symram_vllm.connectors.families: every refusal message, on vLLM's own KV-cache specs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum
from vllm.v1.kv_cache_interface import (
    CrossAttentionSpec,
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    MambaSpec,
    MLAAttentionSpec,
    SlidingWindowSpec,
)

from symram_vllm.connectors.families import (
    check_model_family,
    codec_refusal,
    layer_kinds,
    layers_refusal,
    prefix_caching_refusal,
)

BF16 = torch.bfloat16
FULL = FullAttentionSpec(block_size=128, num_kv_heads=2, head_size=64, dtype=BF16)
SLIDING = SlidingWindowSpec(block_size=128, num_kv_heads=2, head_size=64, dtype=BF16,
                            sliding_window=64)
MLA = MLAAttentionSpec(block_size=16, num_kv_heads=1, head_size=576, dtype=BF16)
CROSS = CrossAttentionSpec(block_size=128, num_kv_heads=2, head_size=64, dtype=BF16)


def mamba(kind: MambaAttentionBackendEnum) -> MambaSpec:
    return MambaSpec(block_size=128, shapes=((3, 64), (8, 64, 64)),
                     dtypes=(BF16, torch.float32), mamba_type=kind)


def kv_config(*groups: tuple[object, int]) -> KVCacheConfig:
    return KVCacheConfig(num_blocks=64, kv_cache_tensors=[], kv_cache_groups=[
        KVCacheGroupSpec([f"g{i}.l{j}" for j in range(n)], spec)
        for i, (spec, n) in enumerate(groups)])


def vllm_config(*, prefix_caching: bool = True, mla: bool = False, device: str = "cpu",
                cache_dtype: str = "auto") -> SimpleNamespace:
    return SimpleNamespace(
        model_config=SimpleNamespace(model="/models/demo", use_mla=mla),
        cache_config=SimpleNamespace(enable_prefix_caching=prefix_caching,
                                     cache_dtype=cache_dtype),
        device_config=SimpleNamespace(device_type=device),
    )


@pytest.mark.parametrize("groups", [
    [(FULL, 2)],
    [(MLA, 2)],
    [(SLIDING, 4), (FULL, 2)],
])
def test_attention_families_are_served_with_hma(groups):
    assert check_model_family(vllm_config(), kv_config(*groups), "none", hma=True) is None


def test_layer_kinds_count_layers_per_kind():
    gdn = mamba(MambaAttentionBackendEnum.GDN_ATTN)
    kinds = layer_kinds(kv_config((SLIDING, 4), (FULL, 2), (gdn, 3)))
    assert kinds == {"sliding_window": 4, "full_attention": 2, "mamba_gdn_attn": 3}


@pytest.mark.parametrize(("kind", "label"), [
    (MambaAttentionBackendEnum.MAMBA2, "mamba_mamba2"),
    (MambaAttentionBackendEnum.MAMBA1, "mamba_mamba1"),
    (MambaAttentionBackendEnum.GDN_ATTN, "mamba_gdn_attn"),
    (MambaAttentionBackendEnum.LINEAR, "mamba_linear"),
    (MambaAttentionBackendEnum.SHORT_CONV, "mamba_short_conv"),
])
def test_state_space_and_linear_attention_hybrids_are_refused(kind, label):
    message = layers_refusal("/models/granite4", kv_config((FULL, 1), (mamba(kind), 2)), hma=True)
    assert message is not None
    assert "/models/granite4" in message
    assert f"1 full_attention, 2 {label} layers" in message
    assert "recurrent state" in message and "wrong state" in message
    assert "without --kv-transfer-config" in message and "OffloadingConnector" in message


def test_pure_mamba_model_is_refused_too():
    message = layers_refusal("m", kv_config((mamba(MambaAttentionBackendEnum.MAMBA1), 4)),
                             hma=False)
    assert message is not None and "4 mamba_mamba1 layers" in message


def test_other_layer_kinds_are_refused_by_name():
    message = layers_refusal("/models/whisper", kv_config((FULL, 2), (CROSS, 2)), hma=True)
    assert message is not None
    assert "2 cross_attention, 2 full_attention layers" in message
    assert "(not cross_attention)" in message
    assert "without --kv-transfer-config" in message


def test_several_groups_need_hma():
    groups = kv_config((SLIDING, 4), (FULL, 2))
    message = layers_refusal("/models/gemma3", groups, hma=False)
    assert message is not None
    assert "2 KV-cache groups" in message and "SupportsHMA" in message
    assert "2 full_attention, 4 sliding_window layers" in message
    assert layers_refusal("/models/gemma3", groups, hma=True) is None


def test_mla_on_vllm_cpu_names_what_vllm_did_not_a_flag():
    message = prefix_caching_refusal(vllm_config(prefix_caching=False, mla=True))
    assert message is not None
    assert "MLA model" in message
    assert "MLA is enabled on a non-GPU platform" in message
    assert "--enable-prefix-caching does not change this" in message
    assert "AMX" in message and "GPU" in message
    assert "remove --no-enable-prefix-caching" not in message.lower()
    full = check_model_family(vllm_config(prefix_caching=False, mla=True), kv_config((MLA, 2)),
                              "none", hma=True)
    assert full == message


def test_mla_with_prefix_caching_is_served():
    assert prefix_caching_refusal(vllm_config(mla=True, device="cuda")) is None
    assert check_model_family(vllm_config(mla=True), kv_config((MLA, 2)), "int8",
                              hma=False) is None


def test_prefix_caching_turned_off_for_another_model():
    message = prefix_caching_refusal(vllm_config(prefix_caching=False))
    assert message is not None
    assert "Remove --no-enable-prefix-caching" in message
    assert "vLLM switched prefix caching off" in message
    assert prefix_caching_refusal(vllm_config(prefix_caching=False, mla=True, device="cuda")) \
        == message


@pytest.mark.parametrize("codec", ["int8", "fp8"])
@pytest.mark.parametrize("cache_dtype", ["fp8", "fp8_e4m3", "fp8_e5m2"])
def test_lossy_codec_over_fp8_cache_is_refused(codec, cache_dtype):
    message = codec_refusal(codec, cache_dtype)
    assert message is not None
    assert f"codec {codec!r}" in message and f"--kv-cache-dtype {cache_dtype}" in message
    assert "SYMRAM_CODEC=none" in message
    full = check_model_family(vllm_config(cache_dtype=cache_dtype), kv_config((FULL, 2)),
                              codec, hma=True)
    assert full == message


@pytest.mark.parametrize(("codec", "cache_dtype"), [
    ("none", "fp8"), ("none", "fp8_e5m2"), ("int8", "auto"), ("fp8", "bfloat16"),
    ("int8", "float16"),
])
def test_fp8_cache_pages_and_float_caches_are_accepted(codec, cache_dtype):
    assert codec_refusal(codec, cache_dtype) is None


def test_codec_refusal_comes_first_then_layers_then_prefix_caching():
    config = vllm_config(prefix_caching=False, cache_dtype="fp8")
    hybrid = kv_config((FULL, 1), (mamba(MambaAttentionBackendEnum.MAMBA2), 2))
    assert "codec 'int8'" in check_model_family(config, hybrid, "int8", hma=True)
    assert "recurrent state" in check_model_family(config, hybrid, "none", hma=True)
    assert "prefix caching off" in check_model_family(config, kv_config((FULL, 1)), "none",
                                                      hma=True)


def test_hybrid_groups_of_different_block_shapes_are_refused_naming_each():
    """One symram page holds a token block of every layer in one shape: groups with
    another head size (or dtype, heads, block size) cannot share it."""
    wide = SlidingWindowSpec(block_size=128, num_kv_heads=2, head_size=128, dtype=BF16,
                             sliding_window=64)
    message = check_model_family(vllm_config(), kv_config((FULL, 2), (wide, 2)), "none",
                                 hma=True)
    assert message is not None and "differ in block shape" in message
    assert "group 0 (full_attention): 128 tokens per block, 2 KV heads, head size 64+64" \
        in message
    assert "group 1 (sliding_window): 128 tokens per block, 2 KV heads, head size 128+128" \
        in message
    assert "without --kv-transfer-config" in message


def test_windowed_groups_are_the_ones_that_free_blocks_under_a_running_request():
    from symram_vllm.connectors.families import windowed_groups

    assert windowed_groups(kv_config((FULL, 2), (SLIDING, 2), (SLIDING, 2))) == {1, 2}
    assert windowed_groups(kv_config((MLA, 2))) == frozenset()
