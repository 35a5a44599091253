from types import SimpleNamespace

import pytest

from symram_vllm.connectors.symram_connector import SymramStartupError, ensure_reproducible_hashes


def cfg(algo):
    return SimpleNamespace(cache_config=SimpleNamespace(prefix_caching_hash_algo=algo))


def test_default_sha256_is_switched_to_cbor():
    config = cfg("sha256")
    assert ensure_reproducible_hashes(config) == "sha256_cbor"
    assert config.cache_config.prefix_caching_hash_algo == "sha256_cbor"
    assert ensure_reproducible_hashes(cfg("sha256_cbor")) == "sha256_cbor"


@pytest.mark.parametrize("algo", ["xxhash", "xxhash_cbor"])
def test_per_process_seeded_hashes_are_refused_with_the_fix(algo):
    with pytest.raises(SymramStartupError, match="--prefix-caching-hash-algo sha256_cbor"):
        ensure_reproducible_hashes(cfg(algo))
