"""Runs page copies off the forward path.

One mechanism on every device: a small thread pool. On CUDA each copy is enqueued on
a side stream that first waits for the compute stream, and the thread waits on an
event, so the future completes when the bytes have landed; on CPU the copy simply
runs in the thread (torch releases the GIL while copying).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import torch

from symram_vllm.capability import cuda_capability

T = TypeVar("T")


class TransferRunner:
    def __init__(self, device: torch.device, threads: int = 1) -> None:
        self.device = device
        self.use_cuda_stream = device.type == "cuda" and cuda_capability().available
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="symram-xfer")
        self._stream: Any = torch.cuda.Stream(device=device) if self.use_cuda_stream else None

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        if not self.use_cuda_stream:
            return self._pool.submit(fn)
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.device))
        return self._pool.submit(self._on_stream, fn, ready)

    def _on_stream(self, fn: Callable[[], T], ready: Any) -> T:
        stream = self._stream
        stream.wait_event(ready)
        with torch.cuda.stream(stream):
            result = fn()
            done = torch.cuda.Event()
            done.record(stream)
        done.synchronize()
        return result

    def shutdown(self) -> None:
        with contextlib.suppress(Exception):
            self._pool.shutdown(wait=True, cancel_futures=False)
