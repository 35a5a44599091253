"""The channel between the control endpoint's process and the vLLM worker it serves.

The HTTP side of the control plane (uvicorn, the guard, JSON parsing, validation) runs
in a child process (``control_child``) at low CPU priority, so a flood of requests
costs the worker neither GIL time nor, while the engine is busy, CPU. What remains in
the worker is the part only it can do: looking keys up in its ``TierStack``, queueing
prefetches, pinning, and flipping the bypass switch. This module is that part and the
wire both halves speak.

Invariants:

* **Compact frames.** ``<u32 length><u8 op><u32 id>`` then the payload; keys travel as
  raw 32-byte chains (a 1,024-key lookup is 32 KiB, parsed with one ``memoryview``
  slice per key). Replies carry the request's id with ``REPLY`` or ``ERROR`` set.
* **One worker thread, budgeted.** ``LinkServer`` answers on one daemon thread. Its
  work on keys (lookup, prefetch, pin, unpin) is held to ``cpu_share`` of wall time by
  a ``WorkBudget`` (its CPU time and any time it ran without the CPU, as the guard
  counts it); over budget, those requests wait in the socket, the thread asleep in
  ``select`` holding no GIL. Everything else (stats, the bypass kill switch, the
  child's own replies) is answered at once, never queued behind key work.
* **Prefetch waits cost the worker nothing.** The wait for a promotion is a deadline in
  the thread's heap and a done-callback on the prefetch future, not a blocked thread.
* **The child can die; the worker cannot.** End of stream on the socket means the
  child is gone: logged, the endpoint is down until ``ControlServer`` restarts the
  child (``control_restart``), the engine serves on. The child, in turn, exits when
  the worker's end closes (and when its parent changes), so a killed engine leaves no
  control process behind.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import logging
import select
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from symram_vllm.keys import KEY_BYTES, BlockKey

logger = logging.getLogger(__name__)

HEADER = struct.Struct("<IBI")  # payload length, op, request id
MAX_FRAME = 4 * 1024 * 1024
WAIT = struct.Struct("<d")  # prefetch wait_s, pin ttl_s: ahead of the keys
LOOKUP_REPLY = struct.Struct("<III")  # dram, disk, any

# Requests from the child (answered by the worker).
LOOKUP, PREFETCH, STATS, PIN, UNPIN, BYPASS_GET, BYPASS_SET = 1, 2, 3, 4, 5, 6, 7
# Requests from the worker (answered by the child).
CONFIG, GUARD_STATS, STOP = 16, 17, 18
# Sent by the child once it accepts connections.
READY = 32
REPLY, ERROR = 0x40, 0x80
KEY_OPS = frozenset({LOOKUP, PREFETCH, PIN, UNPIN})  # budgeted: work per key


def frame(op: int, rid: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(len(payload), op, rid) + payload


def split_frames(buffer: bytearray) -> list[tuple[int, int, bytes]]:
    """Whole frames at the head of `buffer` (consumed); a partial tail stays."""
    out = []
    offset = 0
    while len(buffer) - offset >= HEADER.size:
        length, op, rid = HEADER.unpack_from(buffer, offset)
        if length > MAX_FRAME:
            raise ValueError(f"control link frame of {length} bytes")
        end = offset + HEADER.size + length
        if end > len(buffer):
            break
        out.append((op, rid, bytes(buffer[offset + HEADER.size:end])))
        offset = end
    del buffer[:offset]
    return out


def pack_keys(chains: list[bytes]) -> bytes:
    return b"".join(chains)


def iter_keys(payload: bytes | memoryview, rank: int) -> Iterator[BlockKey]:
    """The payload's keys, made one at a time (a ``BlockKey`` costs a few microseconds:
    a lookup that stops at its first miss makes no more than it reads)."""
    view = memoryview(payload)
    if len(view) % KEY_BYTES:
        raise ValueError("key payload is not a whole number of chain keys")
    for i in range(0, len(view), KEY_BYTES):
        yield BlockKey(bytes(view[i:i + KEY_BYTES]), rank)


def unpack_keys(payload: bytes | memoryview, rank: int) -> list[BlockKey]:
    return list(iter_keys(payload, rank))


# -- the answers (worker side; plain functions of the stack) -----------------------------
def lookup(stack: Any, keys: Iterable[BlockKey]) -> tuple[int, int, int]:
    """(DRAM prefix, disk prefix, held-anywhere prefix) of `keys`, in blocks; reads
    `keys` up to the first one held nowhere."""
    disk_tier = getattr(stack, "disk", None)
    dram = disk = held = 0
    dram_open = disk_open = True
    for key in keys:
        tier = stack.where(key)
        if tier is None:
            break
        held += 1
        if dram_open and tier == "dram":
            dram += 1
        else:
            dram_open = False
        # The stack is inclusive: a DRAM page may have its disk copy too.
        on_disk = tier == "disk" or (disk_tier is not None and disk_tier.exists(key))
        if disk_open and on_disk:
            disk += 1
        else:
            disk_open = False
    return dram, disk, held


class LinkServer:
    """The worker's end: one daemon thread answering the control child's requests
    against `stack` (see the module docstring). ``ready`` is set when the child reports
    it is listening, ``lost`` when the link ends (the child's end closed, or this thread
    failed), and then `on_lost` runs on this thread: the owner's supervisor wakes on it
    instead of polling."""

    def __init__(self, sock: socket.socket, stack: Any, rank: int, *, cpu_share: float,
                 cpu_burst_s: float = 0.05, name: str = "symram-control-link",
                 on_lost: Callable[[], None] | None = None) -> None:
        self.sock = sock
        self.stack = stack
        self.rank = rank
        self.cpu_share = cpu_share
        self.cpu_burst_s = cpu_burst_s
        self.ready = threading.Event()
        self.lost = threading.Event()
        self.on_lost = on_lost
        self.budget: Any = None  # made on the link thread (it reads that thread's clock)
        self.answered = 0
        self.cpu_s = 0.0  # this thread's CPU time, as of its last request
        self._send_lock = threading.Lock()
        self._pending: dict[int, tuple[threading.Event, list[Any]]] = {}
        self._next_id = 1
        self._id_lock = threading.Lock()
        self._deadlines: list[tuple[float, int, Callable[[], None]]] = []
        self._wake_r, self._wake_w = socket.socketpair()
        self._closing = False
        self.stopping = False  # set by the owner before it asks the child to stop
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self.thread.start()

    # -- sending (any thread) ------------------------------------------------------------
    def send(self, op: int, rid: int, payload: bytes = b"") -> bool:
        data = frame(op, rid, payload)
        with self._send_lock:
            try:
                self.sock.sendall(data)
            except OSError:
                return False
        return True

    def request(self, op: int, payload: bytes = b"", timeout_s: float = 5.0) -> Any:
        """Ask the child (CONFIG, GUARD_STATS, STOP); its JSON reply, or TimeoutError."""
        with self._id_lock:
            rid = self._next_id
            self._next_id += 1
        done: tuple[threading.Event, list[Any]] = (threading.Event(), [])
        self._pending[rid] = done
        try:
            if not self.send(op, rid, payload):
                raise ConnectionError("the control child is gone")
            if not done[0].wait(timeout_s):
                raise TimeoutError(f"the control child did not answer op {op}")
        finally:
            self._pending.pop(rid, None)
        op_back, body = done[1][0]
        reply = json.loads(body) if body else None
        if op_back & ERROR:
            raise RuntimeError(f"control child: {reply}")
        return reply

    def close(self) -> None:
        self._closing = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        if self.thread.is_alive() and threading.current_thread() is not self.thread:
            self.thread.join(5.0)
        for sock in (self.sock, self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                sock.close()

    # -- the thread ------------------------------------------------------------------------
    def _run(self) -> None:
        from symram_vllm.control_guard import WorkBudget

        self.budget = WorkBudget(self.cpu_share, self.cpu_burst_s, cpu=time.thread_time)
        buffer = bytearray()
        key_work: deque[tuple[int, int, bytes]] = deque()
        try:
            while not self._closing:
                timeout = self._timeout(key_work)
                readable, _, _ = select.select([self.sock, self._wake_r], [], [], timeout)
                if self._wake_r in readable:
                    self._wake_r.recv(4096)
                if self.sock in readable:
                    chunk = self.sock.recv(1 << 20)
                    if not chunk:
                        break
                    buffer += chunk
                    for op, rid, payload in split_frames(buffer):
                        if op in KEY_OPS:
                            key_work.append((op, rid, payload))
                        else:
                            self._dispatch(op, rid, payload)
                self._expire()
                while key_work and self.budget.pause_s() <= 0:
                    op, rid, payload = key_work.popleft()
                    started, cpu = time.perf_counter(), time.thread_time()
                    self._dispatch(op, rid, payload)
                    # Wall time this thread held its place without running (preempted,
                    # perhaps holding the GIL), as the guard counts it; CPU time is
                    # charged through the thread's clock.
                    self.budget.charge(time.perf_counter() - started
                                       - (time.thread_time() - cpu))
                    if select.select([self.sock], [], [], 0)[0]:
                        break  # read what came meanwhile: a bypass may be waiting
        except Exception:  # the endpoint is optional; the worker is not
            logger.exception("symram rank %d: control link failed; control endpoint down",
                             self.rank)
        finally:
            if not (self._closing or self.stopping):
                logger.error("symram rank %d: the control endpoint process is gone; the "
                             "engine serves on", self.rank)
                # If it was this thread that failed, the child would wait on us forever:
                # end of stream tells it to exit.
                with contextlib.suppress(OSError):
                    self.sock.shutdown(socket.SHUT_RDWR)
            self.lost.set()
            for event, box in list(self._pending.values()):
                box.append((ERROR, b'"the control child is gone"'))
                event.set()
            if self.on_lost is not None:
                self.on_lost()

    def _timeout(self, key_work: deque[Any]) -> float | None:
        waits = []
        if key_work:
            waits.append(max(self.budget.pause_s(), 0.001))
        if self._deadlines:
            waits.append(max(self._deadlines[0][0] - time.monotonic(), 0.0))
        return min(waits) if waits else None

    def _expire(self) -> None:
        now = time.monotonic()
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, fire = heapq.heappop(self._deadlines)
            fire()

    def _dispatch(self, op: int, rid: int, payload: bytes) -> None:
        if op & (REPLY | ERROR):
            waiter = self._pending.get(rid)
            if waiter is not None:
                waiter[1].append((op, payload))
                waiter[0].set()
            return
        if op == READY:
            self.ready.set()
            return
        try:
            reply = self._answer(op, rid, payload)
        except Exception as exc:
            logger.exception("symram rank %d: control op %d failed", self.rank, op)
            self.send(op | ERROR, rid, json.dumps(f"{type(exc).__name__}: {exc}").encode())
            return
        if reply is not None:
            self.answered += 1
            self.send(op | REPLY, rid, reply)

    def _answer(self, op: int, rid: int, payload: bytes) -> bytes | None:
        from symram_vllm import bypass

        if op == LOOKUP:
            return LOOKUP_REPLY.pack(*lookup(self.stack, iter_keys(payload, self.rank)))
        if op == PREFETCH:
            (wait_s,) = WAIT.unpack_from(payload)
            self._prefetch(rid, unpack_keys(payload[WAIT.size:], self.rank), wait_s)
            return None  # answered when the promotion finishes or the wait runs out
        if op == STATS:
            # With the control plane's own cost in the worker (the load tests read it).
            self.cpu_s = time.thread_time()
            return json.dumps({**self.stack.stats(), "control_link_cpu_s": self.cpu_s,
                               "control_link_answered": self.answered}).encode()
        if op == PIN:
            (ttl_s,) = WAIT.unpack_from(payload)
            keys = unpack_keys(payload[WAIT.size:], self.rank)
            pinned = sum(bool(self.stack.pin(key, ttl_s)) for key in keys)
            logger.info("symram control: pinned %d of %d blocks for %.0f s", pinned,
                        len(keys), ttl_s)
            return json.dumps({"requested": len(keys), "pinned": pinned}).encode()
        if op == UNPIN:
            keys = unpack_keys(payload, self.rank)
            for key in keys:
                self.stack.unpin(key)
            return json.dumps({"requested": len(keys)}).encode()
        if op == BYPASS_GET:
            state = bypass.switch().state()
            return json.dumps({"active": state is not None, **(state or {})}).encode()
        if op == BYPASS_SET:
            ask = json.loads(payload)
            return json.dumps(bypass.switch().set(
                bool(ask["active"]), by=str(ask["by"]), reason=str(ask["reason"]))).encode()
        raise ValueError(f"unknown control op {op}")

    def _prefetch(self, rid: int, keys: list[BlockKey], wait_s: float) -> None:
        started = time.monotonic()
        tiers = [self.stack.where(k) for k in keys]
        before = tiers.count("dram")
        # Only pages on disk go to the prefetch pool: keys held nowhere cost nothing there.
        on_disk = [k for k, tier in zip(keys, tiers, strict=True) if tier == "disk"]

        def answer(resident: int, done: bool) -> None:
            self.answered += 1
            self.send(PREFETCH | REPLY, rid, json.dumps({
                "requested": len(keys), "dram_resident": resident,
                "promoted": max(resident - before, 0), "done": done,
                "seconds": round(time.monotonic() - started, 6)}).encode())

        if not on_disk:
            answer(before, True)
            return
        future = self.stack.prefetch(on_disk)
        once = threading.Lock()

        def finished(fut: Any) -> None:  # on the prefetch pool's thread
            if once.acquire(blocking=False):
                try:
                    promoted = int(fut.result())
                except Exception:
                    logger.exception("symram control: prefetch failed")
                    promoted = 0
                answer(before + promoted, True)

        def timed_out() -> None:  # on the link thread
            # Unfinished, it keeps running; the load that follows finds what it finished.
            if once.acquire(blocking=False):
                answer(sum(self.stack.where(k) == "dram" for k in keys), False)

        heapq.heappush(self._deadlines, (started + wait_s, rid, timed_out))
        future.add_done_callback(finished)
