"""The gateway benchmark's harness at a small scale (loadtest/bench_gateway.py): the stub
engine, both gateways as subprocesses, the alternating latency phase and the
concurrent-streams phase, end to end, so `make bench-gateway` cannot rot unnoticed.
The figures themselves are not asserted (a benchmark, not a timed test)."""

from __future__ import annotations

import asyncio
import json

from loadtest.bench_gateway import (
    ARMS,
    KINDS,
    StubEngine,
    _read_chunked,
    main,
    percentile,
)


def test_small_run_end_to_end(tmp_path):
    out = tmp_path / "gateway.json"
    code = main(["--pairs", "6", "--repeats", "2", "--warmup", "2", "--streams", "40",
                 "--hold-s", "1.5", "--interval-s", "0.25", "--opening", "16",
                 "--out", str(out), "--no-progress"])
    result = json.loads(out.read_text())
    held = result["concurrent"]
    assert code == 0, held["error_samples"]
    for key in ("added_p50_ms", "added_p95_ms", "routed_added_p50_ms", "routed_added_p95_ms"):
        assert isinstance(result[key], float), key
    assert result["target_added_p50_ms"] == 2.0
    latency = result["latency"]
    assert len(latency["runs"]) == 2
    for kind in KINDS:
        for arm in ARMS:
            stats = latency["median_over_repeats"][kind][arm]
            assert stats["p50_ms"] > 0 and stats["p95_ms"] >= stats["p50_ms"]
        for arm in ("proxy", "routed"):
            assert result["gateway_cpu_ms_per_request"][kind][arm] >= 0  # 10 ms ticks
    assert held["errors"] == 0, held["error_samples"]
    assert held["completed"] == held["requested"] == 40
    assert held["stub"]["peak"] == 40  # all open at the stub at once
    assert held["client_peak_open"] == 40
    assert result["concurrent_streams_ok"] is True
    assert result["stream_events"] == 6
    assert result["command"].startswith("python -m loadtest.bench_gateway --pairs 6")
    assert result["machine"]["cpu_count"] >= 1


def test_stub_streams_chunked_sse_and_counts_concurrency():
    async def scenario() -> tuple[bytes, dict[str, int]]:
        stub = StubEngine()
        server = await asyncio.start_server(stub.serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        body = json.dumps({"model": "stub", "stream": True, "max_tokens": 3,
                           "messages": [{"role": "user", "content": "hi"}]}).encode()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\ncontent-length: %d\r\n\r\n%s"
                     % (len(body), body))
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"chunked" in head
        data = await _read_chunked(reader)
        writer.close()
        server.close()
        await server.wait_closed()
        return data, stub.stats()

    data, stats = asyncio.run(scenario())
    events = [e for e in data.split(b"\n\n") if e]
    assert len(events) == 4 and events[-1] == b"data: [DONE]"
    assert stats["peak"] == 1 and stats["completed"] == 1 and stats["active"] == 0


def test_percentile():
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert percentile(list(range(101)), 0.95) == 95
