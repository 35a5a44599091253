"""A TCP proxy that delays every byte by a fixed one-way latency: a remote Redis on
localhost, for benchmarks (`loadtest/bench_directory_engine.py`).

Each direction of each connection is a reader and a writer joined by a queue: the
reader stamps what it read with ``now + delay`` and reads on; the writer waits for the
stamp, then forwards. So a round trip gains ``2 * delay`` (one delay each way), while
pipelined traffic keeps flowing (the delay is latency, not a bandwidth cap), and
bytes keep their order. Run it in a thread (`DelayProxy`) or as a process::

    python -m loadtest.delay_proxy --target 127.0.0.1:6379 --delay-ms 1 --port 7000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import threading
import time

CHUNK = 1 << 16


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                delay_s: float) -> None:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def forward() -> None:
        while True:
            due, data = await queue.get()
            if not data:
                break
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
        with contextlib.suppress(OSError):
            if writer.can_write_eof():
                writer.write_eof()

    sender = asyncio.create_task(forward())
    try:
        while True:
            data = await reader.read(CHUNK)
            queue.put_nowait((loop.time() + delay_s, data))
            if not data:
                break
        await sender
    except (ConnectionError, OSError):
        sender.cancel()
    finally:
        writer.close()


class DelayProxy:
    """Listens on 127.0.0.1:`port` (0: a free one) and forwards to `target_host`:
    `target_port`, each direction `delay_s` late. `start()` runs it in a thread."""

    def __init__(self, target_host: str, target_port: int, delay_s: float,
                 port: int = 0) -> None:
        if delay_s < 0:
            raise ValueError("delay_s must be >= 0")
        self.target = (target_host, target_port)
        self.delay_s = delay_s
        self.port = port
        self.connections = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    async def _handle(self, client_r: asyncio.StreamReader,
                      client_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            upstream_r, upstream_w = await asyncio.open_connection(*self.target)
        except OSError:
            client_w.close()
            return
        pumps = asyncio.gather(_pump(client_r, upstream_w, self.delay_s),
                               _pump(upstream_r, client_w, self.delay_s),
                               return_exceptions=True)
        try:
            await pumps
        except asyncio.CancelledError:
            # `stop()`: end quietly. A handler task that ends cancelled makes asyncio's
            # stream callback log a traceback (task.exception() raises on Python 3.11).
            pumps.cancel()
            client_w.close()
            upstream_w.close()

    async def serve(self) -> None:
        """Serve until cancelled (the process entry point and the thread use it)."""
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        self._loop = asyncio.get_running_loop()
        self._ready.set()
        async with self._server:
            await self._server.serve_forever()

    def start(self, timeout_s: float = 10.0) -> DelayProxy:
        def run() -> None:
            with contextlib.suppress(asyncio.CancelledError):
                asyncio.run(self.serve())

        self._thread = threading.Thread(target=run, name="delay-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise RuntimeError("delay proxy did not start")
        return self

    def stop(self) -> None:
        loop, server = self._loop, self._server
        if loop is not None and server is not None:
            def shut_down() -> None:
                # On the loop's own thread: scheduling one cancel per task from here
                # raced the loop, which could end (and close) after the first.
                server.close()
                for task in asyncio.all_tasks(loop):
                    task.cancel()

            with contextlib.suppress(RuntimeError):  # the loop has ended already
                loop.call_soon_threadsafe(shut_down)
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._thread = None

    def __enter__(self) -> DelayProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def measure_rtt_s(host: str, port: int, n: int = 200) -> float:
    """Median PING round trip (seconds) over one Redis connection."""
    import redis

    client = redis.Redis(host=host, port=port, socket_timeout=5)
    try:
        client.ping()
        samples = []
        for _ in range(n):
            started = time.perf_counter()
            client.ping()
            samples.append(time.perf_counter() - started)
    finally:
        client.close()
    samples.sort()
    return samples[len(samples) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True, help="host:port to forward to")
    parser.add_argument("--delay-ms", type=float, required=True, help="one-way delay")
    parser.add_argument("--port", type=int, default=0, help="listen port (0: free)")
    args = parser.parse_args()
    host, port = args.target.rsplit(":", 1)
    proxy = DelayProxy(host, int(port), args.delay_ms / 1000, port=args.port)

    async def run() -> None:
        task = asyncio.create_task(proxy.serve())
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        while not proxy._ready.is_set():
            await asyncio.sleep(0.005)
        print(f"listening {proxy.port}", flush=True)
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(run())


if __name__ == "__main__":
    main()
