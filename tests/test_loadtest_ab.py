"""The A/B runner's planning and bookkeeping without engines: profiles, KV-cache sizing,
the point plan, aggregation into sessions at SLO, and the strict-JSON results file."""

from __future__ import annotations

import json

import pytest

from loadtest.ab import Runner, build_specs, engine_settings, parse_args, with_seed
from loadtest.ab_arms import kv_bytes_per_token
from loadtest.workloads import ChatSpec, DocQASpec


def write_config(path, **overrides):
    config = {"num_attention_heads": 4, "hidden_size": 768, "num_hidden_layers": 8,
              "num_key_value_heads": 2, "dtype": "bfloat16"} | overrides
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_profiles_fill_only_what_is_not_given():
    full, smoke = parse_args([]), parse_args(["--smoke"])
    assert (full.size, full.name, full.peer_check) == ("mid", "ab", True)
    assert (full.repeats, full.side_repeats, smoke.repeats) == (3, 1, 1)
    assert (smoke.size, smoke.name, smoke.peer_check) == ("tiny", "ab_smoke", False)
    mine = parse_args(["--smoke", "--users", "3", "--rounds", "7", "--slo-ttft-p95", "1.5"])
    assert (mine.users, mine.rounds, mine.size) == ("3", 7, "tiny")
    assert mine.slo_ttft == 1.5  # the per-request objective follows the p95 one


def test_kv_bytes_per_token_from_the_model_config(tmp_path):
    # mid demo model: 8 layers x K,V x 2 KV heads x 192 head dim x 2 bytes
    assert kv_bytes_per_token(write_config(tmp_path / "mid")) == 12288
    assert kv_bytes_per_token(write_config(tmp_path / "f32", dtype="float32",
                                           head_dim=64)) == 8 * 2 * 2 * 64 * 4


def test_kv_cache_is_sized_for_kv_users_and_fits_one_request(tmp_path):
    model = write_config(tmp_path / "m")
    args = parse_args(["--scenarios", "chat,docqa"])
    specs = build_specs(args)
    chat = specs["chat"]
    assert isinstance(chat, ChatSpec) and isinstance(specs["docqa"], DocQASpec)
    settings = engine_settings(args, model, specs)
    assert settings.max_model_len % 128 == 0
    assert settings.max_model_len >= max(s.max_prompt_tokens() for s in specs.values()) + 64
    assert settings.kv_cache_tokens % 128 == 0
    assert settings.kv_cache_tokens >= settings.max_model_len + 128
    per_user = chat.max_prompt_tokens() - chat.system_tokens + chat.answer_tokens
    wanted = int(args.kv_users * (chat.system_tokens + per_user))
    assert wanted <= settings.kv_cache_tokens < wanted + 128 + settings.max_model_len
    assert settings.kv_cache_bytes == settings.kv_cache_tokens * 12288
    flags = settings.vllm_args()
    assert flags[flags.index("--kv-cache-memory-bytes") + 1] == str(settings.kv_cache_bytes)
    assert "--enable-prompt-tokens-details" in flags and "sha256_cbor" in flags
    explicit = engine_settings(parse_args(["--kv-cache-tokens", "100000"]), model, specs)
    assert explicit.kv_cache_tokens == 100096  # rounded up to a block


def test_plan_alternates_arms_and_seeds_points_apart(tmp_path):
    args = parse_args(["--users", "1,2,4", "--repeats", "2", "--scenarios", "chat,noreuse",
                       "--out-dir", str(tmp_path)])
    runner = Runner(args, [])
    plan = runner.plan()
    assert [(p.scenario, p.users, p.repeat) for p in plan] == [
        ("chat", 1, 0), ("chat", 1, 1), ("chat", 2, 0), ("chat", 2, 1), ("chat", 4, 0),
        ("chat", 4, 1), ("noreuse", 4, 0)]  # side scenarios: --side-repeats (1)
    assert [p.index for p in plan] == list(range(7))
    spec = runner.specs["chat"]
    seeds = {with_seed(spec, args.seed * 10_000 + p.index).seed for p in plan}
    assert len(seeds) == 7
    assert with_seed(spec, 5) == ChatSpec(**{**spec.__dict__, "seed": 5})


def point(arm: str, users: int, p95: float, repeat: int = 0) -> dict:
    return {"scenario": "chat", "arm": arm, "users": users, "repeat": repeat,
            "summary": {"ttft_p50_s": p95 / 2, "ttft_p95_s": p95, "errors": 0,
                        "error_rate": 0.0, "requests": 10, "completed": True,
                        "meets_slo": p95 <= 2.0, "tpot_p50_s": float("nan")},
            "tiers": {"fraction": {"recomputed": 0.5}}}


def test_aggregate_and_save_give_sessions_and_strict_json(tmp_path):
    args = parse_args(["--users", "2,4,8", "--scenarios", "chat", "--out-dir", str(tmp_path),
                       "--name", "t", "--repeats", "2"])
    runner = Runner(args, ["--users", "2,4,8"])
    runner.points += [
        point("baseline", 2, 1.0), point("baseline", 2, 1.2, 1),
        point("baseline", 4, 1.9), point("baseline", 4, 2.6, 1),  # median 2.25: miss
        point("symram", 2, 0.5), point("symram", 2, 0.6, 1),
        point("symram", 4, 0.9), point("symram", 4, 1.0, 1),
        point("symram", 8, 1.5), point("symram", 8, 3.0, 1),  # median 2.25: miss
    ]
    runner.save()
    result = json.loads((tmp_path / "t.json").read_text())  # strict: NaN became null
    assert result["sessions_at_slo_baseline"] == 2
    assert result["sessions_at_slo_symram"] == 4
    assert result["sessions_ratio"] == 2.0
    assert result["results"]["chat"]["baseline"]["4"]["ttft_p95_s"] == pytest.approx(2.25)
    assert result["results"]["chat"]["symram"]["2"]["repeats"] == 2
    assert result["results"]["chat"]["symram"]["2"]["tpot_p50_s"] is None
    assert result["command"] == "python -m loadtest.ab --users 2,4,8"
    assert result["machine"]["cpu_count"] >= 1
    assert not result["sessions_ceiling"]["symram_sustained_every_swept_count"]
    assert "NaN" not in (tmp_path / "t.json").read_text()
