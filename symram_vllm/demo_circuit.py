"""Weights for a demo model whose greedy tokens are confident *and* read out of the KV
cache: a two-layer induction (copy) circuit, set by construction, deterministic.

Why: the random-weight demo models decide ~12% of their greedy tokens by at most one
bf16 ulp of logit, so any change to the KV (one ulp already) flips tokens, and "tokens
equal to the uncompressed run" cannot measure a codec on them. Trained LLMs decide
most tokens by clear margins. Training the tiny model until it copies was measured to
be out of reach of a CI build: 300 steps (~3 minutes on 2 cores, copy task + stdlib
text) left copy accuracy at 0.3%, before any induction head formed. So the circuit
that training would find is written down directly:

* layer 0, a previous-token head: its query and key come from a constant "bias"
  dimension of every embedding, placed on the fast RoPE pairs so that the score
  peaks at a distance of exactly one token; its value copies the token's content
  vector into a "previous token" subspace of the residual stream;
* layer 1, an induction head: its query is the current token's content, its key the
  previous-token subspace, on the slow RoPE pairs (``rope_theta`` is 1e20, so those
  pairs turn by < 0.2 rad over 1,000 tokens and the match does not depend on
  distance); it attends to the position right after the earlier occurrence of the
  current token, and its value (times ``copy_gain``) writes that position's content
  into the residual;
* tied embeddings read the copied content out as logits; MLPs are zero.

So after a cue that repeats a stretch of earlier context, the model continues the
stretch, and every generated token is read from the value vectors of earlier
positions: the blocks symram stores and loads. On such prompts the top-1 margin is
5-8 logits (``bench_codecs`` reports it); on text without repeats the output is
meaningless, which the accuracy measurements do not use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

# Contract with DemoModelSpec: 4 query heads, 2 KV heads of dim 64, hidden size 256.
HEAD_DIM = 64
PAIRS = HEAD_DIM // 2


@dataclass(frozen=True)
class CircuitSpec:
    """Everything that determines the constructed weights (part of the spec hash)."""

    rope_theta: float = 1e20
    position_pairs: int = 5  # RoPE pairs 0..4 (fastest): the previous-token head
    first_static_pair: int = 6  # pairs 6..31: the content match of the induction head
    prev_token_gain: float = 20.0  # layer-0 query/key size: attention gap ~23 logits
    match_gain: float = 18.0  # layer-1 query/key size: attention gap ~20 logits
    copy_gain: float = 4.0  # copied content vs the current token's own (1.0)
    final_norm: float = 1.0
    seed: int = 1234

    @property
    def content_dims(self) -> int:
        return 2 * (PAIRS - self.first_static_pair)


def rope_parameters(spec: CircuitSpec) -> dict[str, Any]:
    return {"rope_type": "default", "rope_theta": spec.rope_theta}


def set_induction_weights(model: Any, spec: CircuitSpec) -> None:
    """Overwrite every weight of a 2-layer LlamaForCausalLM (tied embeddings) with the
    circuit above. Residual layout: content [0, n), previous token [n, 2n), bias 2n."""
    import torch

    cfg = model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    if (cfg.num_hidden_layers, cfg.head_dim, heads, kv_heads) != (2, HEAD_DIM, 4, 2):
        raise ValueError("the induction circuit is laid out for 2 layers, 4 heads, 2 KV "
                         f"heads of dim {HEAD_DIM}")
    if not cfg.tie_word_embeddings:
        raise ValueError("the induction circuit reads logits through tied embeddings")
    n = spec.content_dims
    content, prev, bias = 0, n, 2 * n
    if bias >= cfg.hidden_size or n // 2 > HEAD_DIM:
        raise ValueError(f"{n} content dims do not fit hidden size {cfg.hidden_size}")
    half = n // 2  # each KV head carries half of the content vector as its value
    inv_freq = spec.rope_theta ** (-torch.arange(PAIRS, dtype=torch.float64) / PAIRS)
    static = [d for p in range(spec.first_static_pair, PAIRS) for d in (p, p + PAIRS)]
    # RMSNorm input scale: embeddings hold |content| = 1 and bias = 1 (layer 0), plus
    # |previous| = 1 in layer 1; weights below are given in units of unit vectors.
    norm0 = math.sqrt(cfg.hidden_size / 2)
    norm1 = math.sqrt(cfg.hidden_size / 3)
    gen = torch.Generator().manual_seed(spec.seed)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        vectors = torch.randn(cfg.vocab_size, n, generator=gen, dtype=torch.float64)
        emb = model.model.embed_tokens.weight
        emb[:, content : content + n] = (vectors / vectors.norm(dim=1, keepdim=True)).float()
        emb[:, bias] = 1.0
        for layer in model.model.layers:
            layer.input_layernorm.weight.fill_(1.0)
            layer.post_attention_layernorm.weight.fill_(1.0)
        model.model.norm.weight.fill_(spec.final_norm)

        # Layer 0: query heads 0 and 2 (KV heads 0 and 1) attend one token back. Score
        # at distance d: sum over fast pairs of g^2 cos((d - 1) theta_i), max at d = 1.
        attn = model.model.layers[0].self_attn
        g = spec.prev_token_gain / norm0
        for kv in range(kv_heads):
            for i in range(spec.position_pairs):
                theta = float(inv_freq[i])
                attn.k_proj.weight[kv * HEAD_DIM + i, bias] = g * math.cos(theta)
                attn.k_proj.weight[kv * HEAD_DIM + i + PAIRS, bias] = g * math.sin(theta)
            for j in range(half):
                attn.v_proj.weight[kv * HEAD_DIM + j, content + kv * half + j] = 1 / norm0
        for kv, head in enumerate((0, 2)):
            for i in range(spec.position_pairs):
                attn.q_proj.weight[head * HEAD_DIM + i, bias] = g
            for j in range(half):
                attn.o_proj.weight[prev + kv * half + j, head * HEAD_DIM + j] = 1.0

        # Layer 1: query = current content, key = previous-token content, on the
        # static pairs; value = content, written back scaled by copy_gain.
        attn = model.model.layers[1].self_attn
        g = spec.match_gain / norm1
        for kv in range(kv_heads):
            for k, d in enumerate(static):
                attn.k_proj.weight[kv * HEAD_DIM + d, prev + k] = g
            for j in range(half):
                attn.v_proj.weight[kv * HEAD_DIM + j, content + kv * half + j] = 1 / norm1
        for kv, head in enumerate((0, 2)):
            for k, d in enumerate(static):
                attn.q_proj.weight[head * HEAD_DIM + d, content + k] = g
            for j in range(half):
                attn.o_proj.weight[content + kv * half + j, head * HEAD_DIM + j] = spec.copy_gain
