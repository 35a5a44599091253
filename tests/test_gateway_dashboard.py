"""The dashboard: per-instance occupancy and hit rates from /symram/stats, and the
event timeline derived from stats deltas."""

from __future__ import annotations

import httpx
import pytest
from test_gateway_fakes import engines, gateway_config, running_gateway, tokenize, wait_for

from symram_vllm.keys import BlockKey
from symram_vllm.serving.gateway.dashboard import Timeline, occupancy


def test_timeline_counts_deltas_and_survives_restarts():
    timeline = Timeline(history=10)
    timeline.record("a", {"dram_puts": 5, "stack_dram_hits": 1}, t=1.0)
    assert list(timeline.points) == []  # the first poll is the baseline
    timeline.record("a", {"dram_puts": 9, "stack_dram_hits": 4, "stack_disk_hits": 2,
                          "dram_evictions": 1, "stack_misses": 3, "stack_prefetched": 2}, t=2.0)
    timeline.record("b", {"dram_puts": 1}, t=2.0)
    timeline.record("b", {"dram_puts": 4}, t=3.0)
    timeline.record("a", {"dram_puts": 2}, t=3.0)  # engine restarted: counters went down
    points = list(timeline.points)
    assert points[0] == {"t": 2.0, "instance": "a", "ingest": 4, "prefetch": 2, "evict": 1,
                         "hit": 5, "miss": 3}
    series = timeline.series(bucket_s=1.0)
    assert series["t"] == [2.0, 3.0]
    assert series["ingest"] == [4, 3 + 2]
    for _ in range(20):
        timeline.record("a", {"dram_puts": 2}, t=4.0)
    assert len(timeline.points) == 10


def test_occupancy_and_hit_rate():
    stats = {"dram_bytes_used": 50, "dram_bytes_capacity": 200, "dram_pages": 5,
             "stack_dram_hits": 6, "stack_disk_hits": 2, "stack_misses": 2,
             "disk_bytes_used": 10, "disk_bytes_capacity": 1000, "disk_pages": 1}
    out = occupancy(stats)
    assert out["hit_rate"] == pytest.approx(0.8) and out["dram_hit_rate"] == pytest.approx(0.6)
    assert out["dram"] == {"used": 50, "capacity": 200, "pages": 5}
    assert out["disk"]["capacity"] == 1000
    assert occupancy({})["hit_rate"] is None and "disk" not in occupancy({})


def test_dashboard_serves_live_data(tmp_path):
    with engines("a", "b", dram_pages=4, disk_path=None) as (a, b), \
            running_gateway(gateway_config([a, b])) as (url, gw):
        page = httpx.get(f"{url}/dashboard")
        script = httpx.get(f"{url}/dashboard/static/uPlot.iife.min.js")
        style = httpx.get(f"{url}/dashboard/static/uPlot.min.css")
        assert wait_for(lambda: all(x.last_stats for x in gw.pool.backends))
        keys = a.store_prompt(tokenize("x" * 40), None)  # 10 pages into a 4-page DRAM
        a.stack.get(BlockKey(keys[-1], 0))  # a hit
        a.stack.get(BlockKey(b"\x01" * 32, 0))  # a miss

        def seen(event: str) -> float:  # a's events over all polls so far
            points = list(gw.timeline.points)  # a copy: the gateway's thread appends
            return sum(p[event] for p in points if p["instance"] == "a")

        # The 10 puts and the two reads may span stats polls (0.2 s apart, a busy host):
        # count them over all points, and wait until a poll has seen the reads too.
        assert wait_for(lambda: seen("ingest") == 10 and seen("hit") >= 1
                        and seen("miss") >= 1)
        data = httpx.get(f"{url}/dashboard/data").json()
    assert page.status_code == 200 and "uPlot" in page.text and "/dashboard/data" in page.text
    assert script.status_code == 200 and script.text.startswith("/*! https://github.com/leeoniya")
    assert style.status_code == 200
    inst = {i["name"]: i for i in data["instances"]}
    assert set(inst) == {"a", "b"}
    tiers = inst["a"]["tiers"]
    assert tiers["dram"]["pages"] == 4 and tiers["dram"]["capacity"] == 4 * 4096
    assert tiers["hits"] == {"dram": 1, "disk": 0, "miss": 1}
    assert tiers["hit_rate"] == pytest.approx(0.5)
    assert inst["a"]["healthy"] and inst["a"]["control_ok"]
    timeline = data["timeline"]
    assert set(timeline) == {"t", "ingest", "prefetch", "evict", "hit", "miss"}
    assert sum(timeline["ingest"]) >= 10 and sum(timeline["evict"]) >= 6
    assert sum(timeline["hit"]) >= 1 and sum(timeline["miss"]) >= 1
