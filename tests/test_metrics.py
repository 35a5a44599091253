"""symram's metrics in vLLM's pipeline: real histograms, unit suffixes last, worker
gauges summed over ranks (not last rank wins), exported into a real Prometheus
registry; the gateway's `backend` label; the Grafana dashboard against these names."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from symram_vllm import latency_sink
from symram_vllm.connectors.vllm_stats import (
    COUNTERS,
    GAUGES,
    HISTOGRAMS,
    SymramConnectorStats,
    SymramPromMetrics,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def registry():
    return CollectorRegistry()


@pytest.fixture
def prom(registry):
    types = {cls: functools.partial(cls, registry=registry) for cls in (Counter, Gauge, Histogram)}
    return SymramPromMetrics(SimpleNamespace(kv_transfer_config=None), types,  # type: ignore
                             ["engine"], {0: ["0"]})


def sample(registry: CollectorRegistry, name: str) -> float | None:
    text = generate_latest(registry).decode()
    for line in text.splitlines():
        if line.split(" ")[0] == name:
            return float(line.rsplit(" ", 1)[1])
    return None


def rank_stats(source: str, used: float, flag: float = 0.0) -> SymramConnectorStats:
    stats = SymramConnectorStats()
    stats.set_gauge("dram_bytes_used", used, source=source)
    stats.set_gauge("disk_writes_disabled", flag, source=source)
    stats.add("saved_blocks", 2)
    return stats


def test_worker_gauges_are_summed_over_ranks_not_last_rank_wins(prom, registry):
    step = rank_stats("rank0", 100.0).aggregate(rank_stats("rank1", 50.0, flag=1.0))
    prom.observe(step.data)
    assert sample(registry, 'symram:dram_used_bytes{engine="0"}') == 150.0
    assert sample(registry, 'symram:disk_writes_disabled{engine="0"}') == 1.0  # a flag: max
    assert sample(registry, 'symram:saved_blocks_total{engine="0"}') == 4.0


def test_redis_tier_available_is_the_minimum_over_ranks(prom, registry):
    # One rank still reconnecting fails every Redis load of the engine: report 0.
    up, down = SymramConnectorStats(), SymramConnectorStats()
    up.set_gauge("redis_tier_available", 1.0, source="rank0")
    down.set_gauge("redis_tier_available", 0.0, source="rank1")
    prom.observe(up.aggregate(down).data)
    assert sample(registry, 'symram:redis_tier_available{engine="0"}') == 0.0
    both = SymramConnectorStats()
    both.set_gauge("redis_tier_available", 1.0, source="rank0")
    both.set_gauge("redis_tier_available", 1.0, source="rank1")
    prom.observe(both.data)
    assert sample(registry, 'symram:redis_tier_available{engine="0"}') == 1.0


def test_a_later_value_of_the_same_rank_replaces_the_earlier(prom, registry):
    # vLLM's log line accumulates stats over steps with aggregate(): no double counting.
    older = rank_stats("rank0", 100.0).aggregate(rank_stats("rank1", 50.0))
    newer = older.aggregate(rank_stats("rank0", 120.0))
    assert newer.reduce()["dram_bytes_used"] == 170.0


def test_stats_survive_a_plain_dict_round_trip():
    stats = rank_stats("rank0", 10.0)
    stats.add_latencies({"load": {"counts": [1] + [0] * len(latency_sink.BUCKETS),
                                  "sums": [1e-6] + [0.0] * len(latency_sink.BUCKETS)}})
    again = SymramConnectorStats(data=json.loads(json.dumps(stats.data)))
    assert again.reduce() == stats.reduce() and not again.is_empty()


def test_latency_histograms_are_exact_and_add_across_ranks(prom, registry):
    latency_sink.drain()
    for seconds in (0.0002, 0.0003, 0.004, 0.1):
        latency_sink.record("get", seconds)
    rank0 = SymramConnectorStats()
    rank0.add_latencies(latency_sink.drain())
    latency_sink.record("get", 0.0003)
    latency_sink.record("load", 0.02)
    rank1 = SymramConnectorStats()
    rank1.add_latencies(latency_sink.drain())
    prom.observe(rank0.aggregate(rank1).data)
    name = "symram:page_get_duration_seconds"
    assert sample(registry, f'{name}_count{{engine="0"}}') == 5.0
    assert sample(registry, f'{name}_sum{{engine="0"}}') == pytest.approx(0.1048)
    assert sample(registry, f'{name}_bucket{{engine="0",le="0.00025"}}') == 1.0
    assert sample(registry, f'{name}_bucket{{engine="0",le="0.0005"}}') == 3.0
    assert sample(registry, f'{name}_bucket{{engine="0",le="0.005"}}') == 4.0
    assert sample(registry, 'symram:load_duration_seconds_count{engine="0"}') == 1.0
    assert latency_sink.drain() == {}


def test_a_bucket_mean_never_leaves_its_bucket():
    seen: list[float] = []
    counts = [0] * (len(latency_sink.BUCKETS) + 1)
    counts[8] = 3
    sums = [0.0] * len(counts)
    sums[8] = 3 * latency_sink.BUCKETS[8] + 1e-12  # rounding above the bound
    latency_sink.replay({"counts": counts, "sums": sums}, seen.append)
    assert seen == [latency_sink.BUCKETS[8]] * 3


def test_quantile_gauges_are_gone_and_units_come_last():
    assert not any(re.search(r"_p\d+_", name) for name in GAUGES)
    for name in (*COUNTERS, *GAUGES):
        assert not re.search(r"_bytes_(used|capacity|read|written)$", name), name
    assert {"dram_used_bytes", "dram_capacity_bytes", "disk_used_bytes",
            "disk_capacity_bytes"} <= set(GAUGES)
    assert all(metric.endswith("_seconds") for metric, _ in HISTOGRAMS.values())
    assert "bypass_active" in GAUGES


def test_internal_tier_stat_names_map_to_exported_ones(prom, registry):
    stats = SymramConnectorStats()
    stats.add("disk_bytes_written", 4096)
    stats.set_gauge("disk_bytes_capacity", 1 << 30)
    prom.observe(stats.data)
    assert sample(registry, 'symram:disk_written_bytes_total{engine="0"}') == 4096.0
    assert sample(registry, 'symram:disk_capacity_bytes{engine="0"}') == float(1 << 30)


def test_gateway_labels_engines_backend_not_instance():
    from symram_vllm.serving.gateway.metrics import GatewayMetrics

    metrics = GatewayMetrics()
    metrics.routes.labels("e0", "prefix").inc()
    text = metrics.render().decode()
    assert 'symram_gateway_route_decisions_total{backend="e0",reason="prefix"}' in text
    for family in metrics.registry.collect():
        for s in family.samples:
            assert "instance" not in s.labels, (family.name, s.labels)


def test_dashboard_uses_the_exported_names_and_the_backend_label():
    board = (ROOT / "deploy" / "grafana" / "symram-dashboard.json").read_text()
    assert "exported_instance" not in board
    assert "sum by (backend, reason) (rate(symram_gateway_route_decisions_total" in board
    exported = {f"symram:{n}_total" for n in COUNTERS} | {f"symram:{n}" for n in GAUGES} | {
        f"symram:{metric}_bucket" for metric, _ in HISTOGRAMS.values()}
    used = set(re.findall(r"symram:[a-z_0-9]+", board))
    assert used and used <= exported, used - exported
    assert "symram:page_get_duration_seconds_bucket" in used
    assert "symram:bypass_active" in used
