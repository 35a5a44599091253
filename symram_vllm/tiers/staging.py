"""A bounded pool of aligned staging buffers: the disk tier's write queue.

An async write copies its page into a staging buffer at submit time (the caller may
reuse its memory at once, e.g. a DRAM slot being evicted), so the number of
buffers *is* the queue bound. A slow disk therefore turns into back-pressure on
savers (block) or skipped saves (drop), never into unbounded RAM.
"""

from __future__ import annotations

import queue

from symram_vllm.tiers.aligned_io import AlignedBuffer


class StagingPool:
    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"staging capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        # LIFO so the most recently used (warm, already faulted-in) buffer is reused.
        self._free: queue.LifoQueue[AlignedBuffer | None] = queue.LifoQueue()
        for _ in range(capacity):
            self._free.put(None)  # allocated on first use, sized to the page

    def acquire(self, nbytes: int, block: bool, timeout: float | None) -> AlignedBuffer | None:
        try:
            buf = self._free.get(block=block, timeout=timeout if block else None)
        except queue.Empty:
            return None
        if buf is None or buf.capacity < nbytes:
            buf = AlignedBuffer(nbytes)
        return buf

    def release(self, buf: AlignedBuffer) -> None:
        self._free.put(buf)

    def wait_for_room(self, timeout: float | None) -> bool:
        """Block until a buffer is free (without keeping it)."""
        try:
            buf = self._free.get(block=True, timeout=timeout)
        except queue.Empty:
            return False
        self._free.put(buf)
        return True

    def in_use(self) -> int:
        return self.capacity - self._free.qsize()
