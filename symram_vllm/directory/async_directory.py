"""The fleet directory off the scheduling path: in-process answers now, network later.

vLLM's scheduler loop is single-threaded; a Redis round trip inside it is latency for
every running request. ``AsyncDirectory`` wraps any ``Directory`` and splits it in two:

* **The scheduling path** (every public method but ``close``) only touches memory: a
  local view of what *this* instance registered, answers of earlier fleet lookups,
  and queues. It never waits on the network, whatever the wrapped directory is.
* **One background thread** owns the wrapped directory. When the scheduler ends a
  step (``end_step``) it drains the queues into one ``DirectoryBatch`` (writes in
  order, lease lookups of waiting requests, every ``dedupe_interval_s`` the dedupe
  read) and applies it: one pipelined round trip for a Redis directory. Batches are
  at least ``interval_s`` apart; a step that ends while one is in flight joins the
  next, so there is at most one round trip per step. When no step has ended for
  ``idle_flush_s`` (an idle engine), queued work goes out anyway.

Fleet lookups are asked, not mirrored: ``lookup(request_id, keys)`` answers at once
from the local view and queues a lease lookup (lookup + protect, one script) for the
request; the answer is there at a later step. The alternative, a local mirror of
the whole fleet directory refreshed in the background, costs memory and refresh
traffic that grow with the fleet and is still stale; docs/directory.md has the
measurement. Stale knowledge only costs a miss (an answer not back yet) or a load
error (a page gone since), which vLLM recomputes: never a wrong token, because
chain keys name the content.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from symram_vllm.directory.base import DedupeStats, Directory
from symram_vllm.directory.batch import BatchResult, DirectoryBatch, LeaseQuery, WriteOp

logger = logging.getLogger(__name__)

# Fleet-answer keys remembered before expired ones are swept.
FLEET_KEYS_MAX = 1 << 20


@dataclass(frozen=True)
class AsyncDirectoryOptions:
    interval_s: float = 0.005
    # Without end_step calls for this long (an idle engine), queued work goes anyway.
    idle_flush_s: float = 1.0
    lease_ttl_s: float = 30.0
    # An answer older than this is not used (its lease may be about to end).
    answer_ttl_s: float = 2.0
    dedupe_interval_s: float = 1.0
    # Queued write keys kept while the background thread is behind (oldest dropped).
    max_queued_keys: int = 1 << 20
    max_answers: int = 1 << 14

    def __post_init__(self) -> None:
        for name in ("interval_s", "idle_flush_s", "lease_ttl_s", "answer_ttl_s",
                     "dedupe_interval_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"AsyncDirectoryOptions.{name} must be > 0")
        if self.answer_ttl_s >= self.lease_ttl_s:
            raise ValueError("AsyncDirectoryOptions.answer_ttl_s must be < lease_ttl_s")
        if self.max_queued_keys < 1 or self.max_answers < 1:
            raise ValueError("AsyncDirectoryOptions: queue bounds must be >= 1")


@dataclass(frozen=True)
class FleetLookup:
    """``held`` leading keys can be loaded now; ``keys[:leased]`` of them are leased in
    the fleet directory (the caller releases them with ``release``); ``pending``: a
    fleet lookup is in flight, asking again at a later step may answer more."""

    held: int
    leased: int = 0
    pending: bool = False


@dataclass
class _Answer:
    keys: list[bytes]
    leased: int
    at: float


class AsyncDirectory:
    def __init__(self, inner: Directory, options: AsyncDirectoryOptions | None = None) -> None:
        self.inner = inner
        self.options = options or AsyncDirectoryOptions()
        self._lock = threading.Lock()
        self._own: dict[bytes, set[str]] = {}
        self._fleet: dict[bytes, float] = {}  # key -> deadline: usable per a fleet answer
        self._writes = DirectoryBatch()
        self._queued_keys = 0
        self._leases: list[tuple[str, LeaseQuery]] = []
        self._asked: dict[str, list[bytes]] = {}
        self._answers: OrderedDict[str, _Answer] = OrderedDict()
        self._dedupe = DedupeStats()
        self._inner_stats: dict[str, float] = {}
        self._counters: dict[str, float] = dict.fromkeys(
            ("round_trips", "batch_errors", "dropped_keys", "fleet_lookups", "fleet_answers",
             "fleet_hit_blocks", "stale_answers"), 0.0)
        self._last_batch_s = 0.0
        self._dedupe_due = 0.0
        self._stepped_at = 0.0
        self._wake = threading.Event()
        self._closed = threading.Event()
        # flush(): requests made, and the last request whose batch has been applied.
        self._flush_asked = 0
        self._flush_done = 0
        self._flushed = threading.Condition(self._lock)
        self._thread = threading.Thread(target=self._run, name="symram-directory", daemon=True)
        self._thread.start()

    # -- scheduling path: writes (queued) ------------------------------------------------------
    def register(self, keys: list[bytes], tier: str) -> None:
        """This instance now holds `keys` in `tier`."""
        with self._lock:
            for key in keys:
                self._own.setdefault(key, set()).add(tier)
            self._queue(WriteOp("add", list(keys), tier))

    def unregister(self, keys: list[bytes], tier: str | None = None) -> None:
        """`Directory.remove`: tier None = all of this instance's locations; a shared
        tier's removal is fleet-wide (the shared storage lost the page)."""
        with self._lock:
            for key in keys:
                self._drop_own(key, tier)
                self._fleet.pop(key, None)
            self._queue(WriteOp("remove", list(keys), tier))

    def unregister_own(self, keys: list[bytes], tier: str) -> None:
        """`Directory.remove_own`: only this instance's location in `tier`."""
        with self._lock:
            for key in keys:
                self._drop_own(key, tier)
            self._queue(WriteOp("remove_own", list(keys), tier))

    def record_store(self, keys: list[bytes], nbytes: int) -> None:
        """Dedupe accounting of a store request (fleet-wide counters, read by ``dedupe``)."""
        with self._lock:
            self._queue(WriteOp("record_store", list(keys), nbytes=nbytes))

    def release(self, keys: list[bytes]) -> None:
        """Drop the leases ``lookup`` reported (``keys[:leased]``)."""
        with self._lock:
            self._queue(WriteOp("release", list(keys)))

    def _drop_own(self, key: bytes, tier: str | None) -> None:
        tiers = self._own.get(key)
        if tiers is None:
            return
        if tier is None:
            tiers.clear()
        else:
            tiers.discard(tier)
        if not tiers:
            del self._own[key]

    def _queue(self, op: WriteOp) -> None:
        self._writes.add_write(op)
        self._queued_keys += len(op.keys)
        while self._queued_keys > self.options.max_queued_keys and len(self._writes.writes) > 1:
            dropped = self._writes.writes.pop(0)
            self._queued_keys -= len(dropped.keys)
            self._counters["dropped_keys"] += len(dropped.keys)

    # -- scheduling path: reads (local) -----------------------------------------------------------
    def local_prefix(self, keys: list[bytes]) -> int:
        """Leading keys this instance holds or a recent fleet answer found usable."""
        now = time.monotonic()
        with self._lock:
            for i, key in enumerate(keys):
                if key not in self._own and self._fleet.get(key, 0.0) <= now:
                    return i
            return len(keys)

    def held_local(self, keys: list[bytes]) -> list[bool]:
        """Per key: known held (by this instance, or usable per a recent fleet answer).
        False may be stale knowledge: saving such a block again is waste, not harm."""
        now = time.monotonic()
        with self._lock:
            return [k in self._own or self._fleet.get(k, 0.0) > now for k in keys]

    def tiers_local(self, keys: list[bytes]) -> list[frozenset[str]]:
        """This instance's own tiers of each key (no fleet knowledge)."""
        with self._lock:
            return [frozenset(self._own.get(k, ())) for k in keys]

    def lookup(self, request_id: str, keys: list[bytes]) -> FleetLookup:
        """How much of `keys` (prefix order) a waiting request can load. Never blocks:
        the first call queues a fleet lease lookup; a later call (next step) returns
        its answer once, leased. Release ``keys[:leased]`` when the load ends or is
        not made."""
        now = time.monotonic()
        with self._lock:
            local = 0
            while local < len(keys) and keys[local] in self._own:
                local += 1
            if not self.inner.shared or local == len(keys):
                return FleetLookup(local)
            answer = self._answers.pop(request_id, None)
            if answer is not None:
                if answer.keys == keys[: len(answer.keys)] and now - answer.at < \
                        self.options.answer_ttl_s:
                    return FleetLookup(max(local, answer.leased), answer.leased)
                self._counters["stale_answers"] += 1
                self._queue(WriteOp("release", answer.keys[: answer.leased]))
            if request_id not in self._asked:
                asked = self._asked[request_id] = list(keys)  # identity marks this query
                self._leases.append((request_id, LeaseQuery(asked, self.options.lease_ttl_s)))
                self._counters["fleet_lookups"] += 1
            return FleetLookup(local, 0, True)

    def forget(self, request_id: str) -> None:
        """The request is gone: an answer not taken yet is released."""
        with self._lock:
            self._asked.pop(request_id, None)
            answer = self._answers.pop(request_id, None)
            if answer is not None and answer.leased:
                self._queue(WriteOp("release", answer.keys[: answer.leased]))

    def end_step(self) -> None:
        """The scheduler finished a step: send what it queued (one batch)."""
        self._stepped_at = time.monotonic()
        self._wake.set()

    def flush(self, timeout: float = 10.0) -> bool:
        """Send everything queued now and wait until it is applied (lookups answered).
        For shutdown and tests; never called on the scheduling path."""
        with self._lock:
            self._flush_asked += 1
            target = self._flush_asked
            self._dedupe_due = 0.0  # the flushed batch reads the dedupe counters too
        self._stepped_at = time.monotonic()
        self._wake.set()
        with self._flushed:
            return self._flushed.wait_for(lambda: self._flush_done >= target, timeout)

    def dedupe(self) -> DedupeStats:
        """Fleet dedupe counters as of the last read (every ``dedupe_interval_s``)."""
        return self._dedupe

    def stats(self) -> dict[str, float]:
        """Counters of this object and the wrapped directory's last stats (cached)."""
        with self._lock:
            return {
                **self._inner_stats,
                **self._counters,
                "queued_keys": float(self._queued_keys),
                "pending_lookups": float(len(self._asked)),
                "own_keys": float(len(self._own)),
                "last_batch_s": self._last_batch_s,
            }

    # -- background thread -------------------------------------------------------------------------
    def _run(self) -> None:
        sent_at = 0.0
        while not self._closed.is_set():
            stepped = self._wake.wait(self.options.idle_flush_s)
            if self._closed.is_set():
                break
            if not stepped and time.monotonic() - self._stepped_at < self.options.idle_flush_s:
                continue  # steps are running: a batch goes at the end of the next one
            pause = sent_at + self.options.interval_s - time.monotonic()
            if pause > 0:
                time.sleep(pause)  # coalesce: steps ending meanwhile join this batch
            self._wake.clear()
            sent_at = time.monotonic()
            self._send_once(sent_at)
        self._send_once(time.monotonic())  # writes queued before close still go out

    def _drain(self, now: float) -> tuple[DirectoryBatch, list[str], int]:
        with self._lock:
            flush_asked = self._flush_asked
            batch, self._writes, self._queued_keys = self._writes, DirectoryBatch(), 0
            ids = [request_id for request_id, _ in self._leases]
            batch.leases = [query for _, query in self._leases]
            self._leases = []
        if now >= self._dedupe_due:
            batch.read_dedupe = True
            self._dedupe_due = now + self.options.dedupe_interval_s
        return batch, ids, flush_asked

    def _send_once(self, now: float) -> None:
        batch, ids, flush_asked = self._drain(now)
        try:
            if batch:
                self._apply(batch, ids, now)
        finally:
            with self._flushed:
                self._flush_done = max(self._flush_done, flush_asked)
                self._flushed.notify_all()

    def _apply(self, batch: DirectoryBatch, ids: list[str], now: float) -> None:
        started = time.monotonic()
        try:
            result = self.inner.apply_batch(batch)
        except Exception:  # a directory bug must not kill the thread (or the engine)
            logger.exception("symram: directory batch failed")
            result = BatchResult(leased=[0] * len(batch.leases), ok=False)
            self._counters["batch_errors"] += 1
        inner_stats = self.inner.stats()
        with self._lock:
            self._counters["round_trips"] += 1
            self._last_batch_s = time.monotonic() - started
            self._inner_stats = inner_stats
            if result.dedupe is not None:
                self._dedupe = result.dedupe
            if result.over_leased:
                self._queue(WriteOp("release", list(result.over_leased)))
            for request_id, query, leased in zip(ids, batch.leases, result.leased, strict=True):
                self._answer(request_id, query, leased, now)

    def _answer(self, request_id: str, query: LeaseQuery, leased: int, now: float) -> None:
        if self._asked.get(request_id) is not query.keys:
            if leased:  # forgotten meanwhile: nobody will load these
                self._queue(WriteOp("release", query.keys[:leased]))
            return
        del self._asked[request_id]
        self._counters["fleet_answers"] += 1
        self._counters["fleet_hit_blocks"] += leased
        deadline = now + self.options.answer_ttl_s
        for key in query.keys[:leased]:
            self._fleet[key] = deadline
        self._answers[request_id] = _Answer(query.keys, leased, now)
        while len(self._answers) > self.options.max_answers:
            _, old = self._answers.popitem(last=False)
            self._queue(WriteOp("release", old.keys[: old.leased]))
        if len(self._fleet) > FLEET_KEYS_MAX:
            self._fleet = {k: d for k, d in self._fleet.items() if d > now}

    def close(self) -> None:
        """Send what is queued, stop the thread, close the wrapped directory."""
        self._closed.set()
        self._wake.set()
        self._thread.join(timeout=10.0)
        self.inner.close()
