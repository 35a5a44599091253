import itertools
import time

import pytest
import torch
from test_disk_tier import GatedIO

from symram_vllm.keys import BlockKey
from symram_vllm.tiers.disk import DiskTier, DiskTierConfig
from symram_vllm.tiers.page_format import HEADER_BYTES
from symram_vllm.tiers.policy import (
    BlockLedger,
    EvictionPolicy,
    PlacementPolicy,
    PolicyConfig,
    RecomputeCost,
    TierCost,
)
from symram_vllm.tiers.snapshot import ManifestError
from symram_vllm.tiers.stack import TierStack

PAGE = 4096
FILE = HEADER_BYTES + PAGE
# Attention-heavy costs so a block's position clearly matters in these tests.
STEEP = {"block_tokens": 16, "seconds_per_token": 1e-4, "seconds_per_token_context": 1e-5}


def key(i: int) -> BlockKey:
    return BlockKey(i.to_bytes(32, "big"))


def page(i: int) -> torch.Tensor:
    return torch.full((PAGE,), i % 256, dtype=torch.uint8)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def build(tmp_path, dram_pages, disk_pages=None, clock=None, disk_io=None, disk_cfg=None,
          **policy):
    clock = clock or Clock()
    policy.setdefault("recompute", STEEP)
    disk = None
    if disk_pages:
        disk = DiskTier(tmp_path / "disk", disk_pages * FILE, clock=clock, file_io=disk_io,
                        config=DiskTierConfig(**(disk_cfg or {})))
    removed: list[BlockKey] = []
    stack = TierStack(PAGE, dram_pages * PAGE, disk, config=PolicyConfig(**policy),
                      pin_memory=False, clock=clock, on_removed=removed.append)
    return stack, removed, clock


def put_all(stack, positions: dict[int, int]) -> None:
    for i, pos in positions.items():
        assert stack.put(key(i), page(i), position=pos)
        if stack.disk is not None:
            stack.disk.flush()


# -- cost model ------------------------------------------------------------------------------
def test_recompute_cost_grows_with_prefix_position():
    rc = RecomputeCost(**STEEP)
    assert rc.block_seconds(0) == pytest.approx(16 * 1e-4 + 136 * 1e-5)
    costs = [rc.block_seconds(p) for p in range(50)]
    assert all(b > a for a, b in itertools.pairwise(costs))
    # Each earlier block adds block_tokens^2 token-pairs of attention.
    assert costs[10] - costs[0] == pytest.approx(10 * 16 * 16 * 1e-5)


def test_tier_cost_and_placement():
    disk = TierCost(bandwidth_gbps=2.0, latency_s=1e-4, cost_per_gb=0.1)
    assert disk.load_seconds(2_000_000) == pytest.approx(1e-4 + 1e-3)
    placement = PlacementPolicy(PolicyConfig(disk=disk, recompute=STEEP))
    assert placement.worth_storing("disk", 2_000_000, position=0)
    slow = PlacementPolicy(PolicyConfig(disk=TierCost(bandwidth_gbps=1e-6), recompute=STEEP))
    assert not slow.worth_storing("disk", PAGE, position=0)
    assert slow.worth_storing("disk", PAGE, position=10_000)  # deep blocks are worth it
    strict = PlacementPolicy(PolicyConfig(disk=disk, recompute=STEEP, min_saving_s=1.0))
    assert not strict.worth_storing("disk", PAGE, position=0)
    assert placement.holding_cost("disk", 10**9) == pytest.approx(0.1)


def test_policy_config_is_strict():
    with pytest.raises(ValueError):
        PolicyConfig(write_policy="write_around")
    with pytest.raises(ValueError):
        PolicyConfig(dram={"bandwidth_gbps": 0})
    with pytest.raises(ValueError):
        PolicyConfig(unknown=1)


def test_score_order_recency_salience_cost():
    clock = Clock()
    ledger = BlockLedger()
    policy = EvictionPolicy(PolicyConfig(recompute=STEEP), ledger, clock)
    ledger.touch(key(1), clock.now, position=0)  # cheap
    ledger.touch(key(2), clock.now, position=8)  # expensive
    ledger.touch(key(3), clock.now, position=0)
    ledger.hit(key(3), clock.now)  # cheap but used
    ledger.touch(key(4), clock.now - 10 * 120, position=8)  # expensive but 10 half-lives old
    assert policy.order([key(i) for i in (3, 2, 1, 4)]) == [key(4), key(1), key(3), key(2)]
    assert policy.choose_victim([key(2), key(3)]) == key(3)


# -- eviction in the stack -----------------------------------------------------------------
def test_cheapest_to_recompute_is_evicted_first(tmp_path):
    stack, removed, _ = build(tmp_path, dram_pages=3)
    put_all(stack, {1: 5, 2: 0, 3: 9})
    put_all(stack, {4: 3})
    assert removed == [key(2)]
    put_all(stack, {5: 7})
    assert removed == [key(2), key(4)]
    assert all(stack.where(key(i)) == "dram" for i in (1, 3, 5))
    assert stack.stats()["stack_tracked_keys"] == 3  # the ledger forgot the evicted
    stack.close()


def test_hit_pages_outlive_unused_ones(tmp_path):
    stack, removed, _ = build(tmp_path, dram_pages=3)
    put_all(stack, {1: 0, 2: 0, 3: 0})
    for i in (1, 1, 3):
        assert torch.equal(stack.get(key(i)), page(i))
    put_all(stack, {4: 0})
    put_all(stack, {5: 0})
    assert removed == [key(2), key(4)]  # 4 is newest, but never hit
    stack.close()


def test_old_expensive_pages_eventually_go(tmp_path):
    stack, removed, clock = build(tmp_path, dram_pages=3)
    put_all(stack, {1: 9})
    clock.now += 10 * 120  # ten recency half-lives
    put_all(stack, {2: 0, 3: 0})
    put_all(stack, {4: 0})
    assert removed == [key(1)]
    stack.close()


def test_chain_tails_go_before_heads_when_parents_are_known(tmp_path):
    stack, removed, _ = build(tmp_path, dram_pages=3)
    stack.put(key(1), page(1), position=0)
    stack.put(key(2), page(2), position=1, parent=key(1))
    stack.put(key(3), page(3), position=2, parent=key(2))
    stack.put(key(4), page(4), position=0)  # cheapest is the head 1, but 3 is the only leaf
    assert removed == [key(3)]
    assert stack.ledger.get(key(2)).children == 0  # 2 is a leaf again
    stack.put(key(5), page(5), position=0)  # leaves 2 (pos 1) and 4 (pos 0): score decides
    assert removed == [key(3), key(4)]
    assert stack.where(key(1)) == stack.where(key(2)) == "dram"
    stack.close()


def test_pins_protect_and_expire(tmp_path):
    stack, removed, clock = build(tmp_path, dram_pages=2)
    put_all(stack, {1: 0, 2: 9})
    assert stack.pin(key(1), ttl_s=10)
    put_all(stack, {3: 9})
    assert removed == [key(2)]  # the cheapest (1) is pinned
    clock.now += 11
    put_all(stack, {4: 9})
    assert removed == [key(2), key(1)]
    stack.close()


# -- placement across tiers --------------------------------------------------------------------
def test_write_back_on_eviction_then_promotion_on_disk_hit(tmp_path):
    stack, removed, _ = build(tmp_path, dram_pages=2, disk_pages=8)
    put_all(stack, {1: 0, 2: 0, 3: 0})
    assert stack.where(key(1)) == "disk" and removed == []
    assert torch.equal(stack.get(key(1)), page(1))  # disk hit, promoted
    assert stack.where(key(1)) == "dram" and stack.disk.exists(key(1))  # inclusive
    stats = stack.stats()
    assert stats["stack_disk_hits"] == 1 and stats["stack_promotions"] == 1
    assert stats["stack_writebacks"] == 2  # 1, then whoever made room for its promotion
    assert torch.equal(stack.get(key(1)), page(1))
    assert stack.stats()["stack_dram_hits"] == 1
    stack.close()


def test_write_back_skipped_when_recompute_beats_the_disk(tmp_path):
    stack, removed, _ = build(tmp_path, dram_pages=1, disk_pages=8,
                              disk={"bandwidth_gbps": 1e-6})
    put_all(stack, {1: 0, 2: 0})
    assert removed == [key(1)] and not stack.contains(key(1))
    assert stack.stats()["stack_writeback_skipped_cost"] == 1
    stack.close()


def test_write_through_selective_after_n_hits(tmp_path):
    stack, removed, _ = build(tmp_path, dram_pages=1, disk_pages=8,
                              write_policy="write_through_selective", write_through_hits=2)
    put_all(stack, {1: 0})
    stack.get(key(1))
    stack.disk.flush()
    assert not stack.disk.exists(key(1))  # one hit: not yet
    stack.get(key(1))
    stack.disk.flush()
    assert stack.disk.exists(key(1)) and stack.stats()["stack_write_through"] == 1
    put_all(stack, {2: 0})  # evicts 1 from DRAM: its disk copy remains
    assert stack.where(key(1)) == "disk" and removed == []
    put_all(stack, {3: 0})  # evicts 2, cold: dropped, not written
    assert removed == [key(2)] and not stack.disk.exists(key(2))
    assert stack.stats()["stack_cold_dropped"] == 1
    stack.close()


def test_write_through_at_zero_hits_writes_every_save(tmp_path):
    stack, _, _ = build(tmp_path, dram_pages=2, disk_pages=8,
                        write_policy="write_through_selective", write_through_hits=0)
    put_all(stack, {1: 0})
    assert stack.disk.exists(key(1)) and stack.where(key(1)) == "dram"
    stack.close()


def test_disk_budget_and_disk_eviction_follow_the_policy(tmp_path):
    stack, removed, _ = build(tmp_path, dram_pages=1, disk_pages=2)
    put_all(stack, {1: 9, 2: 0, 3: 5, 4: 1})
    assert removed == [key(2)]  # disk held 1 (pos 9) and 2 (pos 0) when 3 arrived
    put_all(stack, {5: 2})
    assert removed == [key(2), key(3)]
    stats = stack.stats()
    assert stats["disk_bytes_used"] <= stats["disk_bytes_capacity"] == 2 * FILE
    assert {stack.where(key(i)) for i in (1, 4, 5)} == {"disk", "dram"}
    stack.close()


def test_restarted_disk_still_knows_recompute_cost(tmp_path):
    clock = Clock()
    disk = DiskTier(tmp_path / "disk", 3 * FILE, clock=clock)
    for i, pos in {1: 9, 2: 0, 3: 5}.items():
        disk.set(key(i), page(i), position=pos)
    disk.close()
    stack, removed, _ = build(tmp_path, dram_pages=1, disk_pages=3, clock=clock)
    assert stack.disk.set(key(4), page(4), position=7)  # disk full: someone must go
    assert removed == [key(2)]  # position read back from its page header
    stack.close()


def test_prefetch_promotes_ahead_of_need(tmp_path):
    stack, _, _ = build(tmp_path, dram_pages=4, disk_pages=8)
    for i in (1, 2):
        stack.disk.set(key(i), page(i))
    fut = stack.prefetch([key(1), key(2), key(99)])
    assert fut.result(5) == 2
    assert stack.where(key(1)) == stack.where(key(2)) == "dram"
    assert stack.stats()["stack_prefetched"] == 2
    assert stack.prefetch([key(1)]).result(5) == 1  # already resident: counted, no I/O
    stack.close()


def test_pin_promotes_and_holds_in_both_tiers(tmp_path):
    stack, _, clock = build(tmp_path, dram_pages=2, disk_pages=8)
    stack.disk.set(key(1), page(1))
    assert stack.pin(key(1), ttl_s=5)
    assert stack.where(key(1)) == "dram"
    assert stack.dram.is_pinned(key(1)) and stack.disk.is_pinned(key(1))
    clock.now += 6
    assert not stack.dram.is_pinned(key(1)) and not stack.disk.is_pinned(key(1))
    assert not stack.pin(key(42))
    stack.close()


def test_dram_full_of_pins_sends_puts_to_disk(tmp_path):
    stack, _, _ = build(tmp_path, dram_pages=1, disk_pages=8)
    put_all(stack, {1: 0})
    stack.pin(key(1))
    assert stack.put(key(2), page(2))
    assert stack.where(key(2)) == "disk" and stack.stats()["stack_put_to_disk_direct"] == 1
    assert torch.equal(stack.get(key(2)), page(2))  # served from disk, DRAM cannot take it
    assert stack.stats()["stack_disk_hits"] == 1
    stack.close()


def test_slow_disk_slows_saves_never_reads(tmp_path):
    io = GatedIO()
    stack, removed, _ = build(
        tmp_path, dram_pages=2, disk_pages=8, disk_io=io, save_wait_s=0.2,
        disk_cfg={"write_workers": 1, "write_queue": 0},
    )
    stack.put(key(1), page(1))
    stack.put(key(2), page(2))
    stack.put(key(3), page(3))  # evicts 1 into the (stuck) disk queue
    start = time.perf_counter()
    stack.put(key(4), page(4))  # queue full: the saver waits, then 2 is dropped
    assert time.perf_counter() - start >= 0.2
    stats = stack.stats()
    assert stats["stack_save_wait_timeouts"] == 1 and stats["stack_writeback_dropped"] == 1
    assert removed == [key(2)]
    start = time.perf_counter()
    assert torch.equal(stack.get(key(3)), page(3)) and torch.equal(stack.get(key(4)), page(4))
    assert stack.disk.exists(key(1))  # pending: readable from its staging copy
    assert torch.equal(stack.disk.get(key(1)), page(1))
    assert time.perf_counter() - start < 1.0  # not the 10 s the stuck disk would cost
    io.gate.set()
    stack.disk.flush()
    assert stack.where(key(1)) == "disk"
    stack.close()


def test_snapshot_and_restore(tmp_path):
    stack, _, _ = build(tmp_path, dram_pages=2, disk_pages=8)
    put_all(stack, {1: 0, 2: 3, 3: 4})  # 1 on disk; 2 and 3 in DRAM
    snap = stack.snapshot(tmp_path / "snap.jsonl")
    stack.close()
    stack, _, _ = build(tmp_path, dram_pages=2, disk_pages=8)
    assert stack.where(key(2)) == "disk"  # cold start: nothing in DRAM
    assert stack.restore(snap) == 2
    assert stack.where(key(2)) == stack.where(key(3)) == "dram"
    assert stack.where(key(1)) == "disk"
    assert stack.ledger.get(key(3)).position == 4
    stack.close()
    snap.write_text(snap.read_text().replace('"tier":"disk"', '"tier":"dram"'))
    stack, _, _ = build(tmp_path, dram_pages=2, disk_pages=8)
    with pytest.raises(ManifestError, match="entry 1"):
        stack.restore(snap)
    stack.close()


def test_one_victim_window_for_both_tiers(tmp_path):
    # policy.victim_window is the only eviction sample size: the stack hands it to the
    # DRAM arena and to the disk tier (disk.victim_window was its duplicate).
    stack, _, _ = build(tmp_path, dram_pages=2, disk_pages=4, victim_window=3)
    assert stack.disk is not None and stack.disk.victim_window == 3
    assert stack.dram._victim_window == 3
    stack.close()


def test_eviction_weights_change_the_order():
    # policy.eviction: half_life_s, salience_exponent and cost_exponent each reorder.
    clock = Clock()
    ledger = BlockLedger()
    ledger.touch(key(1), clock.now - 120, position=8)  # expensive, one default half-life old
    ledger.touch(key(2), clock.now, position=0)  # cheap and fresh
    ledger.touch(key(3), clock.now, position=0)
    for _ in range(7):
        ledger.hit(key(3), clock.now)  # cheap but hit 7 times
    keys = [key(1), key(2), key(3)]

    def order(**eviction):
        config = PolicyConfig(recompute=STEEP, eviction=eviction)
        return EvictionPolicy(config, ledger, clock).order(keys)

    assert order() == [key(2), key(1), key(3)]
    assert order(half_life_s=1.0)[0] == key(1)  # age dominates: the old page goes first
    assert order(cost_exponent=0.0, salience_exponent=0.0)[0] == key(1)  # recency alone
    assert order(salience_exponent=0.0)[-1] == key(1)  # hits no longer protect key 3
    assert order(salience_exponent=0.0)[:2] == [key(2), key(3)]


def test_promote_on_hit_off_serves_disk_hits_from_disk(tmp_path):
    stack, _, _ = build(tmp_path, dram_pages=2, disk_pages=8, promote_on_hit=False)
    put_all(stack, {1: 0, 2: 0, 3: 0})
    assert stack.where(key(1)) == "disk"
    assert torch.equal(stack.get(key(1)), page(1))
    assert stack.where(key(1)) == "disk"  # not copied up
    assert stack.stats()["stack_promotions"] == 0
    stack.close()
