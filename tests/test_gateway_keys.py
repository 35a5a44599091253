"""The gateway's keys equal vLLM's block hashes and the connector's chain keys for a
real ``vllm.v1.request.Request``."""

from __future__ import annotations

import random

import pytest

from symram_vllm.keys import chain_keys
from symram_vllm.serving.gateway.keys import block_hashes, none_hash, tier_keys

vllm_utils = pytest.importorskip("vllm.v1.core.kv_cache_utils")

SIGNATURE = bytes(range(32)).hex()


@pytest.fixture(scope="module")
def vllm_hasher():
    from vllm.utils.hashing import sha256_cbor

    vllm_utils.init_none_hash(sha256_cbor)
    return sha256_cbor


def vllm_request(tokens: list[int], block_size: int, salt: str | None, hash_fn):
    from vllm import SamplingParams
    from vllm.v1.request import Request

    hasher = vllm_utils.get_request_block_hasher(block_size, hash_fn)
    return Request("req-1", tokens, SamplingParams(max_tokens=4), None, cache_salt=salt,
                   block_hasher=hasher)


@pytest.mark.parametrize("block_size", [16, 128])
@pytest.mark.parametrize("salt", [None, "t-0123456789abcdef"])
def test_block_hashes_equal_vllm(vllm_hasher, block_size, salt):
    rng = random.Random(block_size)
    tokens = [rng.randrange(0, 50_000) for _ in range(block_size * 5 + block_size // 2)]
    request = vllm_request(tokens, block_size, salt, vllm_hasher)
    theirs = [bytes(h) for h in request.block_hashes]
    assert len(theirs) == 5  # full blocks only
    assert block_hashes(tokens, block_size, salt) == theirs
    # The salt changes every block (it is chained through the first).
    other = block_hashes(tokens, block_size, None if salt else "x")
    assert all(a != b for a, b in zip(other, theirs, strict=True))
    assert block_hashes(tokens, block_size, salt, max_blocks=2) == theirs[:2]


def test_none_hash_matches_vllm(vllm_hasher):
    assert none_hash() == bytes(vllm_utils.NONE_HASH)


def test_tier_keys_equal_the_connectors(vllm_hasher):
    from symram_vllm.config import SymramConfig
    from symram_vllm.connectors.scheduler import SchedulerSide

    tokens = list(range(1000, 1000 + 16 * 7 + 3))
    request = vllm_request(tokens, 16, "salt", vllm_hasher)
    scheduler = SchedulerSide(bytes.fromhex(SIGNATURE), 16, SymramConfig())
    connector_keys = scheduler._state(request).keys
    assert len(connector_keys) == 7
    assert tier_keys(tokens, SIGNATURE, 16, "salt") == connector_keys
    assert connector_keys == chain_keys(bytes.fromhex(SIGNATURE),
                                        [bytes(h) for h in request.block_hashes])
