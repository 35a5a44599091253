"""TieredStore through the verbs the worker's jobs use: whole-job reserve / commit /
abort for saves, acquire / release of a prefix's arena rows for loads, and the events
the scheduler learns residency from. Pins and prefetches are the stack's own."""

import torch

from symram_vllm.keys import BlockKey
from symram_vllm.store import TieredStore


def key(i: int) -> BlockKey:
    return BlockKey(i.to_bytes(32, "big"))


def save(store: TieredStore, pages: dict[BlockKey, torch.Tensor]) -> list[bool]:
    """One save job: reserve every row at once, fill, commit. True where stored."""
    keys = list(pages)
    rows = store.reserve_many(keys, list(range(len(keys))), [None] * len(keys))
    for k, row in zip(keys, rows, strict=True):
        if row is not None:
            store.dram.arena[row].copy_(pages[k].reshape(-1))
            store.commit(k)
    return [row is not None for row in rows]


def load(store: TieredStore, keys: list[BlockKey]) -> list[torch.Tensor]:
    """One load job: the held prefix's pages (copies), rows released after."""
    rows = store.acquire_prefix(keys)
    try:
        return [store.dram.arena[row].clone() for row in rows]
    finally:
        store.release_many(keys[: len(rows)])


def test_save_load_and_events():
    store = TieredStore(32, 32 * 2, pin_memory=False)
    assert save(store, {key(1): torch.full((32,), 1, dtype=torch.uint8)}) == [True]
    # Present already: not reserved again, the first bytes are kept.
    assert save(store, {key(1): torch.full((32,), 9, dtype=torch.uint8)}) == [False]
    (page,) = load(store, [key(1)])
    assert torch.equal(page, torch.full((32,), 1, dtype=torch.uint8))
    assert load(store, [key(2)]) == []
    save(store, {key(2): torch.zeros(32, dtype=torch.uint8)})
    # key(1) was read once, key(2) never: the eviction score (salience) drops key(2).
    save(store, {key(3): torch.zeros(32, dtype=torch.uint8)})
    events = store.drain_events()
    assert events.stored == [key(1).chain, key(2).chain, key(3).chain]
    assert events.removed == [key(2).chain]
    assert not store.drain_events()
    stats = store.stats()
    assert stats["store_get_hits"] == 1 and stats["store_get_misses"] == 1
    assert stats["store_put_skipped_present"] == 1 and stats["store_put_pages"] == 3
    assert stats["dram_evictions"] == 1


def test_a_prefix_load_stops_at_the_first_missing_page():
    store = TieredStore(32, 32 * 4, pin_memory=False)
    save(store, {key(i): torch.full((32,), i, dtype=torch.uint8) for i in (1, 2, 4)})
    pages = load(store, [key(1), key(2), key(3), key(4)])
    assert [int(p[0]) for p in pages] == [1, 2]  # key(4) is useless without key(3)
    assert store.stats()["store_get_misses"] == 1


def test_aborted_rows_store_nothing_and_pins_keep_pages():
    store = TieredStore(32, 32 * 2, pin_memory=False)
    rows = store.reserve_many([key(1), key(2)], [0, 1], [None, None])
    assert all(row is not None for row in rows)
    store.commit(key(1))
    store.abort(key(2))  # e.g. the copy failed: never published
    assert store.contains(key(1)) and not store.contains(key(2))
    assert store.drain_events().stored == [key(1).chain]
    store.stack.pin(key(1))  # two slots: the pinned page keeps one of them
    assert save(store, {key(2): torch.zeros(32, dtype=torch.uint8),
                        key(3): torch.zeros(32, dtype=torch.uint8)}) == [True, False]
    assert store.contains(key(1)) and store.contains(key(2))
    store.stack.unpin(key(1))
    assert store.stack.evict(key(1)) and not store.contains(key(1))
    assert key(1).chain in store.drain_events().removed


def test_full_store_rejects_a_save_without_error():
    store = TieredStore(32, 32, pin_memory=False)
    save(store, {key(1): torch.zeros(32, dtype=torch.uint8)})
    store.stack.pin(key(1))
    assert save(store, {key(2): torch.zeros(32, dtype=torch.uint8)}) == [False]
    assert store.stats()["store_put_rejected_full"] == 1


def test_disk_backed_store_spills_writes_back_and_survives_restart(tmp_path):
    from symram_vllm.tiers.disk import DiskTier
    from symram_vllm.tiers.policy import PolicyConfig

    policy = PolicyConfig(background_writeback_s=0)  # driven by hand below
    pages = {key(i): torch.full((4096,), i, dtype=torch.uint8) for i in range(1, 7)}
    store = TieredStore(4096, 4096 * 2, disk=DiskTier(tmp_path, 1 << 20), policy=policy,
                        pin_memory=False)
    for k, page in pages.items():  # one page per job: the arena holds two
        assert save(store, {k: page}) == [True]
    store.stack.disk.flush(5)
    # Four pages left DRAM for disk: none of them is reported removed.
    assert store.drain_events().removed == []
    assert [store.stack.where(k) for k in pages].count("disk") == 4
    # The two DRAM-only pages reach disk in the background pass.
    assert store.stack.write_back_idle() == 2
    store.stack.disk.flush(5)
    assert store.stats()["stack_background_writebacks"] == 2
    store.close()
    reopened = TieredStore(4096, 4096 * 2, disk=DiskTier(tmp_path, 1 << 20), policy=policy,
                           pin_memory=False)
    try:
        for k, page in pages.items():  # each promoted from disk by its load
            (got,) = load(reopened, [k])
            assert torch.equal(got, page), k
        assert reopened.stats()["stack_disk_hits"] == 6
    finally:
        reopened.close()
