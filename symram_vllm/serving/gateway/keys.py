"""The connector's tier keys for a prompt, computed without importing vLLM.

vLLM (``vllm.v1.core.kv_cache_utils``, hash algorithm ``sha256_cbor``, which symram
requires) hashes each *full* block of ``block_size`` tokens as

    sha256(cbor_canonical((parent_hash, tuple(block_tokens), extra_keys)))

where the parent of block 0 is ``NONE_HASH = sha256_cbor(seed)`` (seed
``"vllm-none-hash"`` unless the engine sets PYTHONHASHSEED) and ``extra_keys`` is
``(("cache_salt", salt),)`` for the first block of a salted request and None
otherwise (LoRA adapters and multimodal inputs add more; such requests get keys that
match nothing, so they are routed by affinity or load). symram's tier key of block i
is ``symram_vllm.keys.chain_keys(signature_digest, hashes)[i]``.

``tests/test_gateway_keys.py`` checks this against vLLM's own block hasher on a real
``vllm.v1.request.Request``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import cbor2

from symram_vllm.keys import chain_keys
from symram_vllm.serving.gateway.config import DEFAULT_NONE_HASH_SEED


def sha256_cbor(value: Any) -> bytes:
    return hashlib.sha256(cbor2.dumps(value, canonical=True)).digest()


@lru_cache(maxsize=8)
def none_hash(seed: str = DEFAULT_NONE_HASH_SEED) -> bytes:
    return sha256_cbor(seed)


def block_hashes(
    tokens: Sequence[int],
    block_size: int,
    cache_salt: str | None = None,
    *,
    seed: str = DEFAULT_NONE_HASH_SEED,
    max_blocks: int | None = None,
) -> list[bytes]:
    """vLLM's block hashes of the full blocks of `tokens` (at most `max_blocks`)."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    count = len(tokens) // block_size
    if max_blocks is not None:
        count = min(count, max_blocks)
    parent = none_hash(seed)
    out: list[bytes] = []
    for i in range(count):
        extra = (("cache_salt", cache_salt),) if i == 0 and cache_salt else None
        block = tuple(tokens[i * block_size : (i + 1) * block_size])
        parent = sha256_cbor((parent, block, extra))
        out.append(parent)
    return out


def tier_keys(
    tokens: Sequence[int],
    signature_digest: str,
    block_size: int,
    cache_salt: str | None = None,
    *,
    seed: str = DEFAULT_NONE_HASH_SEED,
    max_blocks: int | None = None,
) -> list[bytes]:
    """symram's chain keys of the full blocks of `tokens` for one engine namespace."""
    hashes = block_hashes(tokens, block_size, cache_salt, seed=seed, max_blocks=max_blocks)
    return chain_keys(bytes.fromhex(signature_digest), hashes)
