"""A/B arithmetic: percentiles, goodput, the SLO verdict, sessions at SLO, the metrics
deltas and tier split, SSE parsing, and the report files."""

from __future__ import annotations

import json
import math

import pytest

from loadtest.ab_metrics import delta, parse_metrics, tier_breakdown
from loadtest.ab_peer import PeerSpec, bench_command
from loadtest.ab_slo import (
    Slo,
    combine_repeats,
    percentile,
    sessions_at_slo,
    sessions_ratio,
    summarize,
)
from loadtest.ab_stream import parse_stream
from loadtest.report import render_markdown, write_report


def rec(ttft: float, *, start: float = 0.0, e2e: float | None = None, ok: bool = True,
        out: int = 11, prompt: int = 100, cached: int = 0, kind: str = "hit") -> dict:
    e2e = ttft + 1.0 if e2e is None else e2e
    r = {"ok": ok, "start": start, "e2e_s": e2e, "kind": kind, "prompt_tokens": prompt,
         "reusable_tokens": prompt // 2}
    if ok:
        r |= {"ttft_s": ttft, "tpot_s": (e2e - ttft) / (out - 1), "output_tokens": out,
              "cached_tokens": cached}
    return r


def test_percentile_is_linear_interpolation():
    assert percentile([1, 2, 3, 4, 5], 50) == 3
    assert percentile(list(range(1, 101)), 95) == pytest.approx(95.05)
    assert math.isnan(percentile([], 95))


def test_goodput_counts_only_requests_within_the_objectives():
    slo = Slo(ttft_p95_s=1.0, ttft_s=1.0, tpot_s=0.2)
    records = [
        rec(0.5, start=0.0, e2e=1.5),   # ok: ttft 0.5, tpot 0.1
        rec(0.9, start=1.0, e2e=3.9),   # tpot 0.3 > 0.2: not good
        rec(1.5, start=2.0, e2e=2.5),   # ttft > 1.0: not good
        rec(0.2, start=3.0, e2e=7.0, ok=False),  # failed: not good, and an error
    ]
    s = summarize(records, slo)
    assert s["requests"] == 4 and s["errors"] == 1
    assert s["duration_s"] == pytest.approx(10.0)  # 0.0 .. 3.0 + 7.0
    assert s["good_requests"] == 1
    assert s["goodput_rps"] == pytest.approx(0.1)
    assert s["requests_per_s"] == pytest.approx(0.3)
    assert not s["meets_slo"]  # an error fails the point


def test_point_verdict_uses_p95_errors_and_completion():
    slo = Slo(ttft_p95_s=1.0)
    fast = [rec(0.1 * i, start=i) for i in range(1, 11)]  # p95 0.955
    assert summarize(fast, slo)["meets_slo"]
    assert not summarize(fast, slo, completed=False)["meets_slo"]
    slow = [*fast[:-1], rec(3.0, start=10)]
    assert summarize(slow, slo)["ttft_p95_s"] > 1.0
    assert not summarize(slow, slo)["meets_slo"]
    assert not summarize([], slo)["meets_slo"]


def test_cached_fraction_and_by_kind():
    s = summarize([rec(0.1, cached=80, kind="hit"), rec(0.5, cached=0, kind="miss")], Slo())
    assert s["cached_fraction"] == pytest.approx(0.4)
    assert s["ttft_p50_s_by_kind"] == {"hit": 0.1, "miss": 0.5}


def test_combine_repeats_takes_medians_then_judges():
    slo = Slo(ttft_p95_s=1.0)
    reps = [{"ttft_p95_s": v, "errors": 0, "error_rate": 0.0, "requests": 10,
             "completed": True, "meets_slo": v <= 1.0, "ttft_p95_s_by_kind": {"hit": v / 2}}
            for v in (0.8, 1.4, 0.9)]
    out = combine_repeats(reps, slo)
    assert out["ttft_p95_s"] == 0.9 and out["meets_slo"] and out["repeats"] == 3
    assert out["ttft_p95_s_by_kind"] == {"hit": 0.45}
    reps[2]["completed"] = False
    assert not combine_repeats(reps, slo)["meets_slo"]


@pytest.mark.parametrize("meets,expected", [
    ({1: True, 2: True, 4: True, 8: False}, 4),
    ({1: True, 2: False, 4: True}, 1),     # a lucky point above a miss does not count
    ({1: False, 2: True}, 0),
    ({}, 0),
    ({8: True, 1: True, 4: True}, 8),      # order of the mapping does not matter
])
def test_sessions_at_slo(meets, expected):
    assert sessions_at_slo(meets) == expected


def test_sessions_ratio():
    assert sessions_ratio(6, 2) == 3.0
    assert sessions_ratio(4, 0) is None


METRICS_BEFORE = """# HELP symram:loaded_blocks_total x
symram:loaded_blocks_total{engine="0",model_name="demo"} 10.0
symram:loaded_blocks_created{engine="0",model_name="demo"} 1.7e9
symram:dram_hits_total{engine="0",model_name="demo"} 10.0
symram:dram_pages{engine="0",model_name="demo"} 5.0
vllm:prompt_tokens_by_source_total{engine="0",model_name="demo",source="local_compute"} 100
vllm:prompt_tokens_by_source_total{engine="0",model_name="demo",source="local_cache_hit"} 0
vllm:prompt_tokens_by_source_total{engine="0",model_name="demo",source="external_kv_transfer"} 0
vllm:num_requests_running{engine="0",model_name="demo"} 3
"""
METRICS_AFTER = """symram:loaded_blocks_total{engine="0",model_name="demo"} 40.0
symram:dram_hits_total{engine="0",model_name="demo"} 25.0
symram:disk_hits_total{engine="0",model_name="demo"} 5.0
symram:dram_pages{engine="0",model_name="demo"} 9.0
vllm:prompt_tokens_by_source_total{engine="0",model_name="demo",source="local_compute"} 300
vllm:prompt_tokens_by_source_total{engine="0",model_name="demo",source="local_cache_hit"} 200
vllm:prompt_tokens_by_source_total{engine="0",model_name="demo",source="external_kv_transfer"} 400
vllm:external_prefix_cache_queries_total{engine="0",model_name="demo"} 800
vllm:external_prefix_cache_hits_total{engine="0",model_name="demo"} 400
"""


def test_metrics_parse_delta_and_tier_split():
    before, after = parse_metrics(METRICS_BEFORE), parse_metrics(METRICS_AFTER)
    assert "symram:loaded_blocks_created" not in before  # timestamps dropped
    assert "vllm:num_requests_running" not in before  # not a series we follow
    assert before["vllm:prompt_tokens_by_source_total:local_compute"] == 100
    d = delta(before, after)
    assert d["symram:loaded_blocks_total"] == 30
    assert d["symram:dram_pages"] == 9  # a gauge: its value after
    t = tier_breakdown(d)
    # 200 computed, 200 device, 400 external split 15:5 DRAM:disk page hits.
    assert t["tokens"] == {"device": 200, "symram_dram": 300, "symram_disk": 100,
                           "recomputed": 200}
    assert t["prompt_tokens"] == 800
    assert sum(t["fraction"].values()) == pytest.approx(1.0)
    assert t["external_hit_rate"] == 0.5
    assert t["symram_loaded_blocks"] == 30


def test_tier_split_of_a_vanilla_engine_is_device_and_recompute():
    t = tier_breakdown({"vllm:prompt_tokens_by_source_total:local_compute": 30.0,
                        "vllm:prompt_tokens_by_source_total:local_cache_hit": 10.0})
    assert t["fraction"] == {"device": 0.25, "symram_dram": 0.0, "symram_disk": 0.0,
                             "recomputed": 0.75}


def sse(*chunks: dict) -> list[bytes]:
    return [b"data: " + json.dumps(c).encode() for c in chunks] + [b"", b"data: [DONE]"]


def test_parse_stream_times_the_first_text_chunk_and_reads_usage():
    ticks = iter([1.0, 1.5, 2.0, 3.0, 9.0])
    lines = sse(
        {"choices": [{"text": ""}]},          # t=1.0: a choice without text
        {"choices": [{"text": "a"}]},         # t=1.5: first content
        {"choices": [{"text": "b"}]},         # t=2.0
        {"choices": [{"text": "c"}]},         # t=3.0
        {"choices": [], "usage": {"prompt_tokens": 50, "completion_tokens": 4,
                                  "prompt_tokens_details": {"cached_tokens": 32}}},
    )
    out = parse_stream(lines, start=0.5, clock=lambda: next(ticks))
    assert out["ttft_s"] == pytest.approx(1.0)
    assert out["e2e_s"] == pytest.approx(8.5)  # end clock 9.0
    assert out["output_tokens"] == 4
    assert out["tpot_s"] == pytest.approx(7.5 / 3)
    assert out["cached_tokens"] == 32 and out["prompt_tokens_reported"] == 50


def test_parse_stream_raises_on_an_error_event():
    with pytest.raises(RuntimeError, match="overloaded"):
        parse_stream(sse({"error": {"message": "overloaded"}}), start=0.0)


def synthetic_result() -> dict:
    def row(p50: float, p95: float, meets: bool, recomputed: float) -> dict:
        return {"ttft_p50_s": p50, "ttft_p95_s": p95, "tpot_p50_s": 0.02, "e2e_p95_s": 2.0,
                "requests_per_s": 1.0 / p50, "goodput_rps": 0.5 / p50, "cached_fraction": 0.5,
                "errors": 0, "meets_slo": meets,
                "tiers": {"fraction": {"device": 0.2, "symram_dram": 0.8 - recomputed,
                                       "symram_disk": 0.0, "recomputed": recomputed}}}
    return {
        "status": "complete", "command": "python -m loadtest.ab --smoke",
        "slo": {"ttft_p95_s": 2.0, "ttft_s": 2.0, "tpot_s": None},
        "model": {"size": "tiny", "kv_bytes_per_token": 1024},
        "engine": {"kv_cache_tokens": 1024, "kv_cache_bytes": 1 << 20, "dram_bytes": "4GiB"},
        "topology": {"baseline": "direct", "symram": "gateway -> engine"},
        "machine": {"cpu_count": 2, "cpu_model": "test"},
        "workloads": {"chat": {"rounds": 2}},
        "results": {"chat": {
            "baseline": {"1": row(0.3, 0.5, True, 0.8), "2": row(1.5, 3.0, False, 0.8)},
            "symram": {"1": row(0.2, 0.3, True, 0.1), "2": row(0.4, 0.9, True, 0.1)},
        }},
        "sessions_at_slo_baseline": 1, "sessions_at_slo_symram": 2, "sessions_ratio": 2.0,
    }


def test_report_writes_markdown_and_three_plots_per_scenario(tmp_path):
    written = write_report(synthetic_result(), tmp_path, "ab")
    assert set(written) == {"markdown", "chat_ttft", "chat_throughput", "chat_tiers"}
    for key, path in written.items():
        assert path.exists() and path.stat().st_size > 0
        if key != "markdown":
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = written["markdown"].read_text()
    assert "vanilla 1, symram 2, ratio 2.00x" in md
    assert "![chat ttft](ab_chat_ttft.png)" in md
    assert "| 2 | vanilla vLLM | 1.500 | 3.000 |" in md


def test_report_handles_missing_values_and_unbounded_ratio():
    result = synthetic_result() | {"sessions_ratio": None, "sessions_at_slo_baseline": 0,
                                   "status": "interrupted"}
    result["results"]["chat"]["baseline"]["1"]["ttft_p50_s"] = None
    md = render_markdown(result, {})
    assert "unbounded" in md and "interrupted" in md
    assert "| 1 | vanilla vLLM | - |" in md


def test_peer_check_command_and_report_table(tmp_path):
    spec = PeerSpec(prefix_len=256, num_prefixes=6, goodput_ttft_ms=1500)
    cmd = bench_command("http://h:1", tmp_path / "model", spec, tmp_path / "peer.json")
    assert cmd[1:5] == ["-m", "loadtest.ab_vllm_bench", "bench", "serve"]
    flags = dict(zip(cmd[5::2], cmd[6::2], strict=False))
    assert flags["--dataset-name"] == "prefix_repetition"
    assert flags["--prefix-repetition-prefix-len"] == "256"
    assert flags["--base-url"] == "http://h:1" and "ttft:1500" in cmd
    result = synthetic_result() | {"peer_check": {
        "spec": spec.__dict__,
        "baseline": {"completed": 32, "failed": 0, "median_ttft_ms": 812.5,
                     "p95_ttft_ms": 1900.0, "median_tpot_ms": 20.0,
                     "request_throughput": 2.0, "request_goodput": 1.5},
        "symram": {"completed": 32, "failed": 0, "median_ttft_ms": 95.0, "command": "x y"},
    }}
    md = render_markdown(result, {})
    assert "| vanilla vLLM | 32 | 0 | 812.5 | 1900.0 | 20.0 | 2.00 | 1.50 |" in md
    assert "| vLLM + symram | 32 | 0 | 95.0 | - |" in md
    assert "command: `x y`" in md
