"""The Redis page tier as a remote tier of one worker's stack.

Reads: ``read_into`` fills a DRAM slot from Redis on a local miss (the stack then
commits the slot: a promotion). Writes: ``offer`` copies a freshly saved page into a
bounded queue, and one thread writes it with ``RedisPageTier.set`` within the
fleet-wide budget. A full queue or a Redis outage drops the write (counted): pages
are recomputable, and the directory only learns of pages that really landed.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable

import numpy as np
import torch

from symram_vllm.keys import BlockKey
from symram_vllm.tiers.redis_tier import RedisPageTier

logger = logging.getLogger(__name__)

KeysCallback = Callable[[list[BlockKey]], None]


class RedisPages:
    name = "redis"

    def __init__(
        self,
        tier: RedisPageTier,
        *,
        queue_pages: int = 64,
        on_stored: KeysCallback | None = None,
        on_removed: KeysCallback | None = None,
    ) -> None:
        self.tier = tier
        self.on_stored = on_stored
        self.on_removed = on_removed
        tier.on_evict = self._evicted
        self._queue: queue.Queue[tuple[BlockKey, bytes] | None] = queue.Queue(queue_pages)
        self._lock = threading.Lock()
        self.counters: dict[str, int] = dict.fromkeys(
            ("reads", "hits", "misses", "size_mismatch", "writes", "write_rejected",
             "write_dropped", "evicted"),
            0,
        )
        self._thread = threading.Thread(target=self._write_loop, name="symram-redis-pages",
                                        daemon=True)
        self._thread.start()

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] += n

    # -- reads ---------------------------------------------------------------------------
    def read_into(self, key: BlockKey, out: torch.Tensor) -> bool:
        self._count("reads")
        data = self.tier.get(key)
        if data is None:
            self._count("misses")
            return False
        if len(data) != out.numel():
            self._count("size_mismatch")
            return False
        out.numpy()[:] = np.frombuffer(data, dtype=np.uint8)
        self._count("hits")
        return True

    def exists(self, key: BlockKey) -> bool:
        return self.tier.exists(key)

    @property
    def reachable(self) -> bool:
        """False while the link waits to reconnect: a read then returned a fallback,
        not Redis's answer."""
        return self.tier.link.available

    # -- writes --------------------------------------------------------------------------
    def offer(self, key: BlockKey, page: torch.Tensor) -> bool:
        """Queue a copy of `page` for Redis; False (dropped) when the queue is full or
        Redis is known to be down."""
        if not self.tier.link.available or self._queue.full():
            self._count("write_dropped")
            return False
        data = page.reshape(-1).numpy().tobytes()
        try:
            self._queue.put_nowait((key, data))
        except queue.Full:
            self._count("write_dropped")
            return False
        return True

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                self._queue.task_done()
                return
            key, data = item
            try:
                stored = self.tier.set(key, data)
            except Exception:  # a writer thread must outlive one bad page
                logger.exception("symram: writing page %s to Redis failed", key)
                stored = False
            if stored:
                self._count("writes")
                if self.on_stored is not None:
                    self.on_stored([key])
            else:
                self._count("write_rejected")
            self._queue.task_done()

    def _evicted(self, keys: list[BlockKey]) -> None:
        self._count("evicted", len(keys))
        if self.on_removed is not None:
            self.on_removed(keys)

    def pending(self) -> bool:
        return self._queue.unfinished_tasks > 0

    def drain(self, timeout: float = 5.0) -> None:
        """Wait until queued writes are done (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)

    # -- reporting -----------------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        with self._lock:
            out = {k: float(v) for k, v in self.counters.items()}
        out["queue_depth"] = float(self._queue.qsize())
        out["available"] = float(self.tier.link.available)
        out.update(self.tier.counters())  # rejected values, bookkeeping repairs
        return out

    def close(self) -> None:
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=1.0)
        self._thread.join(timeout=5.0)
        self.tier.close()
