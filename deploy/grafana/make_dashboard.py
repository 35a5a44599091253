"""Write deploy/grafana/symram-dashboard.json (Grafana 10+, Prometheus data source).

    python deploy/grafana/make_dashboard.py

Every series is one the code exports today: symram's connector metrics (through
vLLM's own /metrics, prefix ``symram:``), vLLM's, and the gateway's
(``symram_gateway_*``, on the gateway's /metrics). tests/test_deploy.py checks each
expression against the metric names defined in the code, and that the committed JSON
is this script's output.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

OUT = Path(__file__).with_name("symram-dashboard.json")
DS = {"type": "prometheus", "uid": "${datasource}"}
# Every query is filtered by the instance picker.
SEL = '{instance=~"$instance"}'

# The gateway labels its series by engine as `backend` (Prometheus's own `instance` is the
# scrape target: the gateway itself).
GW_RATE = "[$__rate_interval]"

# (title, unit, [(expr, legend)]) per row
ROWS: list[tuple[str, list[tuple[str, str, list[tuple[str, str]]]]]] = [
    ("Latency and load", [
        ("Time to first token (p50 / p95)", "s", [
            (f"histogram_quantile(0.5, sum by (le) (rate(vllm:time_to_first_token_seconds_bucket"
             f"{SEL}[$__rate_interval])))", "p50"),
            (f"histogram_quantile(0.95, sum by (le) (rate(vllm:time_to_first_token_seconds_bucket"
             f"{SEL}[$__rate_interval])))", "p95"),
        ]),
        ("Time per output token (p50 / p95)", "s", [
            ("histogram_quantile(0.5, sum by (le) (rate("
             f"vllm:request_time_per_output_token_seconds_bucket{SEL}[$__rate_interval])))",
             "p50"),
            ("histogram_quantile(0.95, sum by (le) (rate("
             f"vllm:request_time_per_output_token_seconds_bucket{SEL}[$__rate_interval])))",
             "p95"),
        ]),
        ("Requests running / waiting", "short", [
            (f"sum by (instance) (vllm:num_requests_running{SEL})", "running {{instance}}"),
            (f"sum by (instance) (vllm:num_requests_waiting{SEL})", "waiting {{instance}}"),
        ]),
        ("vLLM device KV-cache usage and preemptions", "percentunit", [
            (f"avg by (instance) (vllm:kv_cache_usage_perc{SEL})", "usage {{instance}}"),
            (f"sum by (instance) (rate(vllm:num_preemptions_total{SEL}[$__rate_interval]))",
             "preemptions/s {{instance}}"),
        ]),
    ]),
    ("Where prompt KV comes from", [
        ("Prompt tokens by source (/s)", "short", [
            (f"sum by (source) (rate(vllm:prompt_tokens_by_source_total{SEL}"
             "[$__rate_interval]))", "{{source}}"),
        ]),
        ("Hit rate: device prefix cache vs symram", "percentunit", [
            (f"sum(rate(vllm:prefix_cache_hits_total{SEL}[$__rate_interval])) / "
             f"sum(rate(vllm:prefix_cache_queries_total{SEL}[$__rate_interval]))",
             "device prefix cache"),
            (f"sum(rate(vllm:external_prefix_cache_hits_total{SEL}[$__rate_interval])) / "
             f"sum(rate(vllm:external_prefix_cache_queries_total{SEL}[$__rate_interval]))",
             "symram (of device misses)"),
        ]),
        ("symram page reads by tier (/s)", "short", [
            (f"sum(rate(symram:dram_hits_total{SEL}[$__rate_interval]))", "DRAM"),
            (f"sum(rate(symram:disk_hits_total{SEL}[$__rate_interval]))", "disk"),
            (f"sum(rate(symram:tier_misses_total{SEL}[$__rate_interval]))", "miss"),
            (f"sum(rate(symram:load_failed_blocks_total{SEL}[$__rate_interval]))",
             "failed load (recomputed)"),
        ]),
        ("symram blocks loaded / saved (/s)", "short", [
            (f"sum(rate(symram:loaded_blocks_total{SEL}[$__rate_interval]))", "loaded"),
            (f"sum(rate(symram:saved_blocks_total{SEL}[$__rate_interval]))", "saved"),
            (f"sum(rate(symram:save_skipped_blocks_total{SEL}[$__rate_interval]))",
             "save skipped"),
            (f"sum(rate(symram:prefetched_pages_total{SEL}[$__rate_interval]))", "prefetched"),
        ]),
    ]),
    ("Gateway", [
        ("Gateway requests (/s) by status", "reqps", [
            (f"sum by (status) (rate(symram_gateway_requests_total{GW_RATE}))", "{{status}}"),
            (f"sum by (reason) (rate(symram_gateway_rejections_total{GW_RATE}))",
             "rejected: {{reason}}"),
        ]),
        ("Gateway TTFT (p50 / p95, arrival to first content)", "s", [
            ("histogram_quantile(0.5, sum by (le) (rate(symram_gateway_ttft_seconds_bucket"
             f"{GW_RATE})))", "p50"),
            ("histogram_quantile(0.95, sum by (le) (rate(symram_gateway_ttft_seconds_bucket"
             f"{GW_RATE})))", "p95"),
        ]),
        ("Routing decisions (/s) by engine and reason", "short", [
            ("sum by (backend, reason) (rate(symram_gateway_route_decisions_total"
             f"{GW_RATE}))", "{{backend}} {{reason}}"),
        ]),
        ("Matched prefix tokens at routing (p50 / p95)", "short", [
            ("histogram_quantile(0.5, sum by (le) (rate("
             f"symram_gateway_matched_prefix_tokens_bucket{GW_RATE})))", "p50"),
            ("histogram_quantile(0.95, sum by (le) (rate("
             f"symram_gateway_matched_prefix_tokens_bucket{GW_RATE})))", "p95"),
        ]),
        ("Prefetch on arrival (/s)", "short", [
            ("sum by (outcome) (rate(symram_gateway_prefetches_total"
             f"{GW_RATE}))", "{{outcome}}"),
            (f"sum(rate(symram_gateway_prefetched_blocks_total{GW_RATE}))", "blocks promoted"),
        ]),
        ("Engines: in flight, healthy, errors", "short", [
            ("sum by (backend) (symram_gateway_inflight)", "in flight {{backend}}"),
            ("min by (backend) (symram_gateway_backend_healthy)", "healthy {{backend}}"),
            (f"sum by (kind) (rate(symram_gateway_upstream_errors_total{GW_RATE}))",
             "upstream error: {{kind}}"),
            (f"sum(rate(symram_gateway_retries_total{GW_RATE}))", "retries"),
        ]),
    ]),
    ("symram tiers", [
        ("Copy bandwidth", "Bps", [
            (f"sum(rate(symram:load_bytes_total{SEL}[$__rate_interval]))", "load (tier -> engine)"),
            (f"sum(rate(symram:save_bytes_total{SEL}[$__rate_interval]))", "save (engine -> tier)"),
            (f"sum(rate(symram:disk_read_bytes_total{SEL}[$__rate_interval]))", "disk read"),
            (f"sum(rate(symram:disk_written_bytes_total{SEL}[$__rate_interval]))", "disk write"),
        ]),
        ("Tier occupancy", "percentunit", [
            (f"sum by (instance) (symram:dram_used_bytes{SEL}) / "
             f"sum by (instance) (symram:dram_capacity_bytes{SEL})", "DRAM {{instance}}"),
            (f"sum by (instance) (symram:disk_used_bytes{SEL}) / "
             f"sum by (instance) (symram:disk_capacity_bytes{SEL})", "disk {{instance}}"),
        ]),
        ("Page get latency (p50 / p95, all engines)", "s", [
            ("histogram_quantile(0.5, sum by (le) (rate("
             f"symram:page_get_duration_seconds_bucket{SEL}[$__rate_interval])))", "p50"),
            ("histogram_quantile(0.95, sum by (le) (rate("
             f"symram:page_get_duration_seconds_bucket{SEL}[$__rate_interval])))", "p95"),
        ]),
        ("Load / save job latency (p95)", "s", [
            ("histogram_quantile(0.95, sum by (le) (rate("
             f"symram:load_duration_seconds_bucket{SEL}[$__rate_interval])))", "load p95"),
            ("histogram_quantile(0.95, sum by (le) (rate("
             f"symram:save_duration_seconds_bucket{SEL}[$__rate_interval])))", "save p95"),
        ]),
        ("Evictions, spills, promotions (/s)", "short", [
            (f"sum(rate(symram:dram_evictions_total{SEL}[$__rate_interval]))", "DRAM evictions"),
            (f"sum(rate(symram:spilled_pages_total{SEL}[$__rate_interval]))", "spilled to disk"),
            (f"sum(rate(symram:spill_dropped_pages_total{SEL}[$__rate_interval]))",
             "spill dropped"),
            (f"sum(rate(symram:promotions_total{SEL}[$__rate_interval]))", "disk -> DRAM"),
            (f"sum(rate(symram:disk_evictions_total{SEL}[$__rate_interval]))", "disk evictions"),
        ]),
        ("Disk health", "short", [
            (f"sum(increase(symram:integrity_failures_total{SEL}[$__range]))",
             "integrity failures"),
            (f"sum(increase(symram:disk_write_errors_total{SEL}[$__range]))", "write errors"),
            (f"max(symram:disk_writes_disabled{SEL})", "writes disabled"),
            (f"max(symram:disk_write_queue_depth{SEL})", "write queue depth"),
            (f"max by (instance) (symram:bypass_active{SEL})", "bypass on {{instance}}"),
        ]),
        # Separate links with separate backoffs: after a Redis outage the directory may
        # be back before every worker's page-tier link (Redis-only blocks recompute).
        ("Redis and control links", "short", [
            (f"min by (instance) (symram:directory_available{SEL})",
             "directory {{instance}}"),
            (f"min by (instance) (symram:redis_tier_available{SEL})",
             "Redis page tier {{instance}}"),
            (f"sum by (instance) (increase(symram:control_restarts_total{SEL}[$__range]))",
             "control restarts {{instance}}"),
        ]),
    ]),
]


def panel(panel_id: int, title: str, unit: str, targets: list[tuple[str, str]],
          x: int, y: int) -> dict[str, Any]:
    return {
        "id": panel_id,
        "type": "timeseries",
        "title": title,
        "datasource": DS,
        "gridPos": {"h": 8, "w": 12, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"},
                    "tooltip": {"mode": "multi"}},
        "targets": [
            {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": chr(65 + i)}
            for i, (expr, legend) in enumerate(targets)
        ],
    }


def dashboard() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    y = 0
    next_id = 1
    for row_title, row_panels in ROWS:
        panels.append({"id": next_id, "type": "row", "title": row_title, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        next_id += 1
        y += 1
        for i, (title, unit, targets) in enumerate(row_panels):
            panels.append(panel(next_id, title, unit, targets, 12 * (i % 2), y + 8 * (i // 2)))
            next_id += 1
        y += 8 * ((len(row_panels) + 1) // 2)
    return {
        "uid": "symram-overview",
        "title": "symram: tiered KV cache for vLLM",
        "tags": ["symram", "vllm", "kv-cache"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-30m", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus",
             "label": "Prometheus", "current": {}},
            {"name": "instance", "type": "query", "datasource": DS, "label": "engine",
             "query": "label_values(vllm:num_requests_running, instance)",
             "includeAll": True, "multi": True, "allValue": ".*", "refresh": 2,
             "current": {}},
        ]},
        "annotations": {"list": []},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(OUT)
