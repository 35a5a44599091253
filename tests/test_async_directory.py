"""The asynchronous fleet directory: the scheduling path never calls the wrapped
directory, a step costs at most one batch (one pipelined round trip with Redis),
fleet lookups come back leased at a later step, and nothing queued is lost."""

from __future__ import annotations

import threading
from collections import Counter

import pytest
from redis_fixtures import key, keys, wait_until

from symram_vllm.directory import EmbeddedDirectory
from symram_vllm.directory.async_directory import AsyncDirectory, AsyncDirectoryOptions
from symram_vllm.directory.base import DedupeStats
from symram_vllm.directory.batch import BatchResult, DirectoryBatch, WriteOp

pytestmark = pytest.mark.timeout(60)



class CountingDirectory(EmbeddedDirectory):
    """An in-process directory that records every call and the thread it came from;
    `shared` makes it look like a fleet directory (lease lookups are worth asking)."""

    def __init__(self, shared: bool = True) -> None:
        super().__init__()
        self.shared = shared
        self.calls: Counter[str] = Counter()
        self.threads: set[int] = set()
        self.batches: list[DirectoryBatch] = []
        self.leases: Counter[bytes] = Counter()
        self.gate = threading.Event()
        self.gate.set()

    def _note(self, name: str) -> None:
        self.calls[name] += 1
        self.threads.add(threading.get_ident())

    def apply_batch(self, batch: DirectoryBatch) -> BatchResult:
        self.gate.wait()
        self._note("apply_batch")
        self.batches.append(batch)
        return super().apply_batch(batch)

    def add(self, chain_keys, tier):
        self._note("add")
        super().add(chain_keys, tier)

    def remove(self, chain_keys, tier=None):
        self._note("remove")
        super().remove(chain_keys, tier)

    def longest_prefix(self, chain_keys):
        self._note("longest_prefix")
        return super().longest_prefix(chain_keys)

    def tiers_of(self, chain_key):
        self._note("tiers_of")
        return super().tiers_of(chain_key)

    def acquire_lease(self, chain_keys, ttl_s):
        self._note("acquire_lease")
        n = super().acquire_lease(chain_keys, ttl_s)
        self.leases.update(chain_keys[:n])
        return n

    def release_lease(self, chain_keys):
        self._note("release_lease")
        self.leases.subtract(chain_keys)

    def record_store(self, chain_keys, nbytes):
        self._note("record_store")
        return super().record_store(chain_keys, nbytes)

    def dedupe(self) -> DedupeStats:
        self._note("dedupe")
        return super().dedupe()

    def stats(self):
        self._note("stats")
        return super().stats()


@pytest.fixture
def opened():
    made: list[AsyncDirectory] = []

    def make(inner, **kw) -> AsyncDirectory:
        kw.setdefault("interval_s", 0.001)
        d = AsyncDirectory(inner, AsyncDirectoryOptions(**kw))
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


def scheduler_step(d: AsyncDirectory, step: int, running: int, waiting: list[str]) -> None:
    """What the scheduler half does in one step with `running` decoding requests: each
    filled a block (stored by the workers: register; dedupe: record_store; save
    decision: held_local), some blocks were evicted, and waiting requests look up."""
    for r in range(running):
        filled = [key(step, f"req{r}")]
        d.record_store(filled, 4096)
        d.held_local(filled)
        d.register(filled, "dram")
    d.unregister_own([key(step - 2, "req0")], "dram")
    for request_id in waiting:
        d.lookup(request_id, keys(8, "doc"))
    d.dedupe()
    d.stats()
    d.end_step()


def test_256_running_requests_make_no_directory_call_on_the_scheduling_path(opened):
    inner = CountingDirectory()
    inner.add(keys(8, "doc"), "redis")
    inner.calls.clear()
    inner.threads.clear()
    # Batches are counted per step: no idle flush (after 1 s without a step, by default)
    # may send part of one when a busy host stalls the test between two steps.
    d = opened(inner, idle_flush_s=60)
    steps = 20
    for step in range(steps):
        scheduler_step(d, step, running=256, waiting=[f"w{step}", f"w{step - 1}"])
        # The model runs here; the batch goes out meanwhile.
        assert wait_until(lambda s=step: inner.calls["apply_batch"] == s + 1)
    assert threading.get_ident() not in inner.threads
    assert inner.threads == {d._thread.ident}
    # One batch per step: writes of 256 requests, lease lookups and the dedupe read.
    assert inner.calls["apply_batch"] == steps
    assert all(len(b.writes) <= 4 for b in inner.batches)  # merged, not 256 ops
    # Nothing lost: every registered block is in the wrapped directory.
    assert inner.longest_prefix([key(s, "req5") for s in range(steps)]) == steps


def test_steps_faster_than_round_trips_share_batches(opened):
    inner = CountingDirectory()
    d = opened(inner)
    inner.gate.clear()  # the "network" is slow: batches wait
    for step in range(10):
        scheduler_step(d, step, running=16, waiting=[])
    inner.gate.set()
    d.end_step()
    assert wait_until(lambda: inner.longest_prefix([key(s, "req3") for s in range(10)]) == 10)
    assert inner.calls["apply_batch"] <= 3  # 10 steps, far fewer round trips


def test_lookup_is_answered_leased_at_a_later_step(opened):
    inner = CountingDirectory()
    doc = keys(10, "doc")
    inner.add(doc[:6], "redis")  # another engine put 6 blocks in the shared tier
    d = opened(inner)
    first = d.lookup("r1", doc)
    assert first.pending and first.held == 0 and first.leased == 0
    d.end_step()
    assert wait_until(lambda: d.stats()["fleet_answers"] == 1)
    answer = d.lookup("r1", doc)
    assert (answer.held, answer.leased, answer.pending) == (6, 6, False)
    assert all(inner.leases[k] == 1 for k in doc[:6])
    d.release(doc[: answer.leased])
    d.end_step()
    assert wait_until(lambda: all(inner.leases[k] == 0 for k in doc[:6]))


def test_own_blocks_are_answered_at_once_without_a_fleet_lookup(opened):
    inner = CountingDirectory()
    d = opened(inner)
    doc = keys(4, "own")
    d.register(doc, "dram")
    assert d.lookup("r", doc) == d.lookup("r", doc)
    assert d.lookup("r", doc).held == 4 and not d.lookup("r", doc).pending
    assert d.stats()["fleet_lookups"] == 0


def test_in_process_directory_needs_no_fleet_lookup(opened):
    d = opened(CountingDirectory(shared=False))
    doc = keys(4, "x")
    d.register(doc[:2], "dram")
    assert d.lookup("r", doc).held == 2 and not d.lookup("r", doc).pending
    assert d.stats()["fleet_lookups"] == 0


def test_forgotten_request_releases_its_leases(opened):
    inner = CountingDirectory()
    doc = keys(5, "doc")
    inner.add(doc, "redis")
    d = opened(inner)
    d.lookup("gone", doc)
    d.end_step()
    assert wait_until(lambda: d.stats()["fleet_answers"] == 1)
    assert all(inner.leases[k] == 1 for k in doc)
    d.forget("gone")
    d.end_step()
    assert wait_until(lambda: all(inner.leases[k] == 0 for k in doc))


def test_request_forgotten_while_its_lookup_is_in_flight_releases_on_arrival(opened):
    inner = CountingDirectory()
    doc = keys(5, "doc")
    inner.add(doc, "redis")
    d = opened(inner)
    inner.gate.clear()
    d.lookup("gone", doc)
    d.end_step()
    assert wait_until(lambda: d.stats()["pending_lookups"] == 1)
    d.forget("gone")
    inner.gate.set()
    d.end_step()
    assert wait_until(lambda: inner.calls["release_lease"] >= 1)
    assert all(inner.leases[k] == 0 for k in doc)
    assert d.lookup("gone", doc).pending  # asked afresh, not the old answer


def test_stale_answer_is_released_and_asked_again(opened):
    inner = CountingDirectory()
    doc = keys(3, "doc")
    inner.add(doc, "redis")
    d = opened(inner, answer_ttl_s=0.05)
    d.lookup("r", doc)
    d.end_step()
    assert wait_until(lambda: d.stats()["fleet_answers"] == 1)
    assert wait_until(lambda: d.local_prefix(doc) == 0)  # the answer aged out
    again = d.lookup("r", doc)
    assert again.pending and d.stats()["stale_answers"] == 1
    d.end_step()
    assert wait_until(lambda: inner.leases[doc[0]] == 1 and d.stats()["fleet_answers"] == 2)


def test_unregister_updates_the_local_view_at_once(opened):
    inner = CountingDirectory()
    d = opened(inner)
    doc = keys(4, "v")
    d.register(doc, "dram")
    d.register(doc, "disk")
    d.unregister_own(doc[2:], "dram")
    assert d.local_prefix(doc) == 4 and d.tiers_local(doc[2:3]) == [frozenset({"disk"})]
    d.unregister(doc[1:2])
    assert d.local_prefix(doc) == 1 and d.held_local(doc) == [True, False, True, True]
    d.end_step()
    assert wait_until(lambda: inner.longest_prefix(doc) == 1)
    assert inner.tiers_of(doc[2]) == frozenset({"disk"})


def test_dedupe_and_stats_are_cached_reads(opened):
    inner = CountingDirectory()
    d = opened(inner, dedupe_interval_s=0.01)
    d.record_store(keys(4, "s"), 100)
    d.record_store(keys(4, "s"), 100)
    d.end_step()
    assert wait_until(lambda: d.dedupe().logical_blocks == 8)
    assert d.dedupe().physical_blocks == 4 and d.stats()["round_trips"] >= 1


def test_idle_engine_still_sends_queued_writes(opened):
    inner = CountingDirectory()
    d = opened(inner, idle_flush_s=0.02)
    d.register(keys(3, "idle"), "dram")  # no end_step follows
    assert wait_until(lambda: inner.longest_prefix(keys(3, "idle")) == 3)


def test_write_queue_is_bounded(opened):
    inner = CountingDirectory()
    d = opened(inner, max_queued_keys=10)
    inner.gate.clear()
    d.end_step()
    assert wait_until(lambda: d.stats()["round_trips"] == 0 and inner.calls["apply_batch"] == 0)
    for i in range(8):
        d.register(keys(3, f"q{i}"), f"t{i}")  # distinct tiers: no merging
    assert d.stats()["dropped_keys"] >= 12 and d.stats()["queued_keys"] <= 10
    inner.gate.set()


def test_a_failing_directory_does_not_kill_the_thread(opened):
    class Broken(CountingDirectory):
        fail = True

        def apply_batch(self, batch):
            if self.fail:
                self.fail = False
                raise RuntimeError("boom")
            return super().apply_batch(batch)

    inner = Broken()
    d = opened(inner)
    d.register(keys(2, "a"), "dram")
    d.end_step()
    assert wait_until(lambda: d.stats()["batch_errors"] == 1)
    d.register(keys(2, "b"), "dram")
    d.end_step()
    assert wait_until(lambda: inner.longest_prefix(keys(2, "b")) == 2)


def test_close_sends_what_is_queued():
    inner = CountingDirectory()
    d = AsyncDirectory(inner, AsyncDirectoryOptions(idle_flush_s=5.0))
    d.register(keys(3, "late"), "dram")
    d.close()
    assert inner.longest_prefix(keys(3, "late")) == 3


def test_batch_merges_writes_but_keeps_per_key_order():
    batch = DirectoryBatch()
    batch.add_write(WriteOp("add", [b"a"], "dram"))
    batch.add_write(WriteOp("record_store", [b"b"], nbytes=1))
    batch.add_write(WriteOp("add", [b"b"], "dram"))  # after b's record_store: not merged
    batch.add_write(WriteOp("remove", [b"a"], "dram"))
    batch.add_write(WriteOp("add", [b"c"], "dram"))  # unrelated to "a": merges
    batch.add_write(WriteOp("add", [b"a"], "dram"))  # after the remove of "a": not
    batch.add_write(WriteOp("add", [], "dram"))
    assert [(w.kind, w.keys) for w in batch.writes] == [
        ("add", [b"a"]), ("record_store", [b"b"]), ("add", [b"b", b"c"]),
        ("remove", [b"a"]), ("add", [b"a"])]
    with pytest.raises(ValueError, match="needs a tier"):
        WriteOp("add", [b"a"])
    with pytest.raises(ValueError, match="kind"):
        WriteOp("upsert", [b"a"], "dram")  # type: ignore[arg-type]


def test_options_are_checked():
    with pytest.raises(ValueError, match="answer_ttl_s"):
        AsyncDirectoryOptions(answer_ttl_s=60, lease_ttl_s=30)
    with pytest.raises(ValueError, match="interval_s"):
        AsyncDirectoryOptions(interval_s=0)
