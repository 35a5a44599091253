"""The benchmark's delaying TCP proxy (loadtest/delay_proxy.py): bytes arrive intact
and in order, each round trip gains two one-way delays, and pipelined traffic is
delayed once, not once per message."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

import pytest

from loadtest.delay_proxy import DelayProxy

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def echo_server():
    """A plain TCP echo server on a free port (one thread per connection)."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve_one(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(1 << 16):
                conn.sendall(data)

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=serve_one, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join()
    listener.close()


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        assert chunk, "connection closed early"
        out += chunk
    return bytes(out)


def round_trip_s(port: int, n: int = 20) -> float:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        samples = []
        for _ in range(n):
            started = time.perf_counter()
            sock.sendall(b"ping")
            recv_exactly(sock, 4)
            samples.append(time.perf_counter() - started)
    return sorted(samples)[n // 2]


def test_forwards_bytes_intact_and_in_order(echo_server):
    payload = os.urandom(3 << 20)  # many reads and writes on both sides
    with (DelayProxy("127.0.0.1", echo_server, 0.001) as proxy,
          socket.create_connection(("127.0.0.1", proxy.port)) as sock):
        sender = threading.Thread(target=sock.sendall, args=(payload,))
        sender.start()
        echoed = recv_exactly(sock, len(payload))
        sender.join()
    assert echoed == payload


def test_a_round_trip_gains_two_one_way_delays(echo_server):
    # 20 ms: host noise (a few ms on a busy host, in either median) stays small next to
    # the delay, so the bounds can leave room for it and still tell one delay each way
    # from one in all, or from several.
    delay = 0.02
    direct = round_trip_s(echo_server)
    with DelayProxy("127.0.0.1", echo_server, delay) as proxy:
        proxied = round_trip_s(proxy.port)
        # Pipelined: 50 messages sent at once come back after ~one round trip, not 50.
        with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
            started = time.perf_counter()
            for _ in range(50):
                sock.sendall(b"x" * 100)
            recv_exactly(sock, 5000)
            pipelined = time.perf_counter() - started
    added = proxied - direct
    # Timers fire late on a loaded host, never early (but the direct median, subtracted,
    # may be the noisier one): a loose upper bound and a little room below.
    assert 1.8 * delay <= added < 3.5 * delay, f"added {added * 1e3:.2f} ms"
    assert pipelined < 25 * delay  # one message at a time would take 100 x delay


def test_negative_delay_is_refused():
    with pytest.raises(ValueError):
        DelayProxy("127.0.0.1", 1, -0.001)


def test_stop_with_open_connections_ends_cleanly(echo_server, caplog):
    """Stopping cancels every connection's tasks on the proxy's own loop: done from the
    caller's thread, one cancel at a time, the loop could end after the first and the
    next cancel raised "Event loop is closed" (a CI failure)."""
    caplog.set_level(logging.ERROR, logger="asyncio")
    for _ in range(30):
        proxy = DelayProxy("127.0.0.1", echo_server, 0.001).start()
        socks = [socket.create_connection(("127.0.0.1", proxy.port)) for _ in range(4)]
        for sock in socks:
            sock.sendall(b"ping")
            assert recv_exactly(sock, 4) == b"ping"
        thread = proxy._thread
        proxy.stop()
        assert thread is not None and not thread.is_alive()
        proxy.stop()  # twice is harmless
        for sock in socks:
            sock.close()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
