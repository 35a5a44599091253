import threading

import pytest
import torch

from symram_vllm.keys import BlockKey
from symram_vllm.tiers.dram import DramTier, DramTierFull


def key(i: int) -> BlockKey:
    return BlockKey(i.to_bytes(32, "big"))


def page(value: int, size: int = 64) -> torch.Tensor:
    return torch.full((size,), value, dtype=torch.uint8)


def test_budget_sets_slot_count_and_rejects_too_small():
    tier = DramTier(64, 64 * 3 + 10)
    assert tier.num_slots == 3
    assert tier.stats().bytes_capacity == 192
    with pytest.raises(ValueError, match="SYMRAM_DRAM_BYTES"):
        DramTier(64, 63)


def test_lru_evicts_least_recently_used_and_reports_it():
    evicted = []
    tier = DramTier(64, 64 * 3, on_evict=lambda k, _p: evicted.append(k))
    for i in range(3):
        assert tier.set(key(i), page(i))
    assert tier.get(key(0)) is not None  # 0 becomes most recent
    tier.set(key(3), page(3))
    assert evicted == [key(1)]
    assert not tier.exists(key(1))
    assert torch.equal(tier.get(key(0)), page(0))
    assert tier.stats().evictions == 1


def test_pins_protect_pages_and_expire():
    now = [100.0]
    tier = DramTier(64, 64 * 2, clock=lambda: now[0])
    tier.set(key(0), page(0))
    tier.set(key(1), page(1))
    assert tier.pin(key(0), ttl_s=10)
    tier.set(key(2), page(2))  # must evict 1, not the pinned 0
    assert tier.exists(key(0)) and not tier.exists(key(1))
    now[0] += 11  # pin expired: 0 is the LRU victim again
    tier.get(key(2))
    tier.set(key(3), page(3))
    assert not tier.exists(key(0))
    assert not tier.pin(key(42))


def test_all_pinned_raises_full():
    tier = DramTier(64, 64)
    tier.set(key(0), page(0))
    tier.pin(key(0))
    with pytest.raises(DramTierFull):
        tier.reserve(key(1))


def test_reader_holds_page_against_eviction():
    tier = DramTier(64, 64)
    tier.set(key(0), page(7))
    view = tier.acquire(key(0))
    with pytest.raises(DramTierFull):
        tier.reserve(key(1))
    assert int(view[0]) == 7
    tier.release(key(0))
    assert tier.reserve(key(1)) is not None


def test_reserve_commit_abort_and_duplicates():
    tier = DramTier(64, 64 * 2)
    slot = tier.reserve(key(0))
    assert tier.reserve(key(0)) is None  # being written
    assert not tier.exists(key(0))  # not visible until committed
    slot.fill_(5)
    tier.commit(key(0))
    assert tier.reserve(key(0)) is None  # already stored
    assert torch.equal(tier.get(key(0)), page(5))
    tier.reserve(key(1))
    tier.abort(key(1))
    assert not tier.exists(key(1))
    assert tier.stats().pages == 1


def test_wrong_page_size_is_rejected():
    tier = DramTier(64, 128)
    with pytest.raises(ValueError, match="64 uint8 bytes"):
        tier.set(key(0), page(0, size=32))


def test_concurrent_writers_and_readers_keep_pages_intact():
    tier = DramTier(256, 256 * 16)
    errors: list[str] = []

    def worker(offset: int) -> None:
        for i in range(200):
            k = key(offset * 1000 + i % 24)
            value = (offset * 31 + i % 24) % 251
            tier.set(k, torch.full((256,), value, dtype=torch.uint8))
            got = tier.get(k)
            if got is not None and not bool((got == value).all()):
                errors.append(f"torn page for {k}")

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    stats = tier.stats()
    assert stats.pages == 16 and stats.evictions > 0
