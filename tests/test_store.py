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
    # key(1) was read once, key(2) never: the eviction score (salience) drops key(2).
    store.put(key(3), torch.zeros(32, dtype=torch.uint8))
    events = store.drain_events()
    assert events.stored == [key(1).chain, key(2).chain, key(3).chain]
    assert events.removed == [key(2).chain]
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
    assert store.prefetch([key(1), key(2), key(3)]).result(timeout=5) == 2
    store.unpin(key(1))
    assert store.evict(key(1)) and not store.contains(key(1))
    assert key(1).chain in store.drain_events().removed


def test_full_store_rejects_put_without_error():
    store = TieredStore(32, 32, pin_memory=False)
    store.put(key(1), torch.zeros(32, dtype=torch.uint8))
    store.pin(key(1))
    assert store.reserve(key(2)) is None
    assert store.stats()["store_put_rejected_full"] == 1


def test_disk_backed_store_spills_writes_back_and_survives_restart(tmp_path):
    from symram_vllm.tiers.disk import DiskTier
    from symram_vllm.tiers.policy import PolicyConfig

    policy = PolicyConfig(background_writeback_s=0)  # driven by hand below
    pages = {key(i): torch.full((4096,), i, dtype=torch.uint8) for i in range(1, 7)}
    store = TieredStore(4096, 4096 * 2, disk=DiskTier(tmp_path, 1 << 20), policy=policy,
                        pin_memory=False)
    for k, page in pages.items():
        assert store.put(k, page)
    store.stack.disk.flush(5)
    # Four pages left DRAM for disk: none of them is reported removed.
    assert store.drain_events().removed == []
    assert [store.where(k) for k in pages].count("disk") == 4
    # The two DRAM-only pages reach disk in the background pass.
    assert store.stack.write_back_idle() == 2
    store.stack.disk.flush(5)
    assert store.stats()["stack_background_writebacks"] == 2
    store.close()
    reopened = TieredStore(4096, 4096 * 2, disk=DiskTier(tmp_path, 1 << 20), policy=policy,
                           pin_memory=False)
    try:
        for k, page in pages.items():
            assert torch.equal(reopened.get(k), page), k
        assert reopened.stats()["stack_disk_hits"] == 6
    finally:
        reopened.close()
