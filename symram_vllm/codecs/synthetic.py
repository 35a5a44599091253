"""KV-like random caches for codec tests, benchmarks and the granularity study.

No trained model can be downloaded here, so "realistic" means the published shape of
real LLM KV statistics (KIVI, KVQuant, "Massive activations"):

* keys have per-channel structure: channel scales spread log-normally with a few
  outlier channels ~8x larger and non-zero channel means, then RoPE rotates channel
  pairs by position, so the outliers move between pair partners along the sequence;
* values have no strong channel outliers but token norms vary widely (log-normal).

``profile="gaussian"`` gives i.i.d. N(0, 1) for both halves as a baseline.
"""

from __future__ import annotations

import math

import torch

PROFILES = ("llm", "gaussian")


def _rope(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Neox-style rotary embedding over the last dim of x [..., P, D]."""
    half = x.shape[-1] // 2
    inv_freq = base ** (-torch.arange(half, dtype=torch.float64) * 2 / x.shape[-1])
    angle = (positions.double()[:, None] * inv_freq[None, :]).float()
    cos, sin = angle.cos(), angle.sin()
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def synthetic_kv(
    num_blocks: int,
    heads: int,
    tokens: int,
    head_dim: int,
    dtype: torch.dtype = torch.bfloat16,
    *,
    seed: int = 0,
    profile: str = "llm",
) -> torch.Tensor:
    """A [num_blocks, heads, tokens, 2 * head_dim] cache whose blocks hold one sequence
    in order (block b, token n is position b * tokens + n)."""
    if profile not in PROFILES:
        raise ValueError(f"unknown KV profile {profile!r}; valid: {', '.join(PROFILES)}")
    g = torch.Generator().manual_seed(seed)
    length = num_blocks * tokens

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    if profile == "gaussian":
        k = randn(heads, length, head_dim)
        v = randn(heads, length, head_dim)
    else:
        chan_std = (0.6 * randn(heads, 1, head_dim)).exp()
        outliers = torch.rand(heads, 1, head_dim, generator=g) < 0.04
        chan_std = torch.where(outliers, chan_std * 8.0, chan_std)
        chan_mean = 0.5 * randn(heads, 1, head_dim) * chan_std
        k_tok = (0.25 * randn(heads, length, 1)).exp()
        k = (chan_mean + chan_std * randn(heads, length, head_dim)) * k_tok
        k = _rope(k, torch.arange(length))
        v_std = (0.3 * randn(heads, 1, head_dim)).exp()
        v_tok = (0.5 * randn(heads, length, 1)).exp()
        v = randn(heads, length, head_dim) * v_std * v_tok
    kv = torch.cat([k, v], dim=-1) / math.sqrt(2.0)
    return kv.view(heads, num_blocks, tokens, 2 * head_dim).transpose(0, 1).contiguous().to(dtype)


def attention_output(kv: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """softmax(q K^T / sqrt(D)) V per head over the whole sequence held in `kv`.

    kv: [B, H, N, 2D]; queries: [H, Q, D]. Returns [H, Q, D] float32."""
    blocks, heads, tokens, content = kv.shape
    d = content // 2
    seq = kv.float().transpose(0, 1).reshape(heads, blocks * tokens, content)
    k, v = seq[..., :d], seq[..., d:]
    weights = torch.softmax(queries @ k.transpose(1, 2) / math.sqrt(d), dim=-1)
    return weights @ v


def key_like_queries(kv: torch.Tensor, count: int, *, seed: int = 1) -> torch.Tensor:
    """Queries that see the keys' channel structure: random mixes of real key rows, so
    attention is peaked the way trained models' is rather than uniform."""
    blocks, heads, tokens, content = kv.shape
    d = content // 2
    g = torch.Generator().manual_seed(seed)
    k = kv.float().transpose(0, 1).reshape(heads, blocks * tokens, content)[..., :d]
    pick = torch.randint(0, blocks * tokens, (heads, count), generator=g)
    rows = torch.gather(k, 1, pick[..., None].expand(heads, count, d))
    # 0.5x: mean top weight ~0.5 over ~8-30 effective tokens, peaked but not one-hot.
    return 0.5 * rows + 0.5 * torch.randn(heads, count, d, generator=g)
