import torch

from symram_vllm.keys import BlockKey
from symram_vllm.store import TieredStore


def key(i: int) -> BlockKey:
    return BlockKey(i.to_bytes(32, "big"))


def test_put_get_and_events():
    store = TieredStore(32, 32 * 2, pin_memory=False)
    assert store.put(key(1), torch.full((32,), 1, dtype=torch.uint8))
    assert store.put(key(1), torch.full((32,), 9, dtype=torch.uint8))  # present: kept as is
    assert torch.equal(store.get(key(1)), torch.full((32,), 1, dtype=torch.uint8))
    assert store.get(key(2)) is None
    store.put(key(2), torch.zeros(32, dtype=torch.uint8))
    store.put(key(3), torch.zeros(32, dtype=torch.uint8))  # evicts key(1)
    events = store.drain_events()
    assert events.stored == [key(1).chain, key(2).chain, key(3).chain]
    assert events.removed == [key(1).chain]
    assert not store.drain_events()
    stats = store.stats()
    assert stats["store_get_hits"] == 1 and stats["store_get_misses"] == 1
    assert stats["store_put_skipped_present"] == 1
    assert stats["dram_evictions"] == 1


def test_pin_evict_and_prefetch():
    store = TieredStore(32, 32 * 2, pin_memory=False)
    store.put(key(1), torch.zeros(32, dtype=torch.uint8))
    store.pin(key(1))
    store.put(key(2), torch.zeros(32, dtype=torch.uint8))
    store.put(key(3), torch.zeros(32, dtype=torch.uint8))
    assert store.contains(key(1)) and not store.contains(key(2))
    assert store.prefetch([key(1), key(2), key(3)]) == 2
    store.unpin(key(1))
    assert store.evict(key(1)) and not store.contains(key(1))
    assert key(1).chain in store.drain_events().removed


def test_full_store_rejects_put_without_error():
    store = TieredStore(32, 32, pin_memory=False)
    store.put(key(1), torch.zeros(32, dtype=torch.uint8))
    store.pin(key(1))
    assert store.reserve(key(2)) is None
    assert store.stats()["store_put_rejected_full"] == 1
