"""The A/B workloads: seeded determinism, growing chat histories, the docqa hit/miss mix."""

from __future__ import annotations

import itertools

import pytest

from loadtest.workloads import (
    VOCAB_HIGH,
    VOCAB_LOW,
    ChatSpec,
    DocQASpec,
    NoReuseSpec,
    chat_turns,
    docqa_turns,
    document,
    noreuse_turns,
    spec_from_dict,
    spec_to_dict,
    turns_for,
    warmup_prompts,
    working_set_tokens,
)


def test_same_seed_same_prompts_other_seed_other_prompts():
    spec = ChatSpec(rounds=3, seed=7)
    assert [t.prompt for t in chat_turns(spec, 2)] == [t.prompt for t in chat_turns(spec, 2)]
    other = ChatSpec(rounds=3, seed=8)
    assert chat_turns(spec, 2)[0].prompt != chat_turns(other, 2)[0].prompt
    # Users differ from each other, but share the system prompt.
    a, b = chat_turns(spec, 0)[0].prompt, chat_turns(spec, 1)[0].prompt
    assert a != b
    assert a[: spec.system_tokens] == b[: spec.system_tokens]
    assert a[: spec.system_tokens + 1] != b[: spec.system_tokens + 1]


def test_chat_history_grows_and_each_round_extends_the_last():
    spec = ChatSpec(rounds=5, system_tokens=100, context_tokens=300, question_tokens=20,
                    answer_tokens=10)
    turns = chat_turns(spec, 3)
    assert [len(t.prompt) for t in turns] == [spec.history_tokens(r) for r in range(5)]
    assert [len(t.prompt) for t in turns] == [420, 450, 480, 510, 540]
    for prev, cur in itertools.pairwise(turns):
        # The next prompt is the previous prompt + the reply stand-in + a question.
        assert cur.prompt[: len(prev.prompt)] == prev.prompt
        assert cur.reusable_tokens == len(prev.prompt) + spec.answer_tokens
    assert turns[0].reusable_tokens == spec.system_tokens
    assert [t.kind for t in turns] == ["first"] + ["followup"] * 4
    assert all(t.max_tokens == spec.answer_tokens for t in turns)
    assert spec.max_prompt_tokens() == 540


def test_token_ids_stay_in_the_safe_vocabulary_range():
    for turn in chat_turns(ChatSpec(rounds=2), 0) + docqa_turns(DocQASpec(), 0):
        assert all(VOCAB_LOW <= t < VOCAB_HIGH for t in turn.prompt)


def test_docqa_mix_matches_hit_ratio_and_hits_reuse_known_documents():
    spec = DocQASpec(documents=4, document_tokens=64, question_tokens=8, queries=50,
                     hit_ratio=0.7, seed=3)
    known = {tuple(document(spec, d)) for d in range(spec.documents)}
    turns = [t for u in range(20) for t in docqa_turns(spec, u)]
    hits = [t for t in turns if t.kind == "hit"]
    misses = [t for t in turns if t.kind == "miss"]
    assert len(turns) == 1000
    assert 0.65 < len(hits) / len(turns) < 0.75
    assert all(tuple(t.prompt[:64]) in known for t in hits)
    assert all(t.reusable_tokens == 64 for t in hits)
    # A miss is a document nobody else sends.
    assert all(tuple(t.prompt[:64]) not in known for t in misses)
    assert len({tuple(t.prompt[:64]) for t in misses}) == len(misses)
    assert all(t.reusable_tokens == 0 for t in misses)
    assert warmup_prompts(spec) == [document(spec, d) for d in range(4)]


@pytest.mark.parametrize("ratio,expected", [(0.0, "miss"), (1.0, "hit")])
def test_docqa_extreme_ratios(ratio, expected):
    turns = docqa_turns(DocQASpec(hit_ratio=ratio, queries=10), 0)
    assert {t.kind for t in turns} == {expected}


def test_noreuse_prompts_are_all_distinct():
    spec = NoReuseSpec(prompt_tokens=32, requests=5)
    prompts = [tuple(t.prompt) for u in range(4) for t in noreuse_turns(spec, u)]
    assert len(set(prompts)) == 20
    assert all(len(p) == 32 for p in prompts)


def test_spec_round_trip_and_dispatch():
    for spec in (ChatSpec(rounds=2), DocQASpec(queries=2), NoReuseSpec(requests=2)):
        scenario = turns_for(spec, 0)[0].scenario
        assert spec_from_dict(scenario, spec_to_dict(spec)) == spec
        assert len(turns_for(spec, 0)) == 2


def test_working_set_counts_the_system_prompt_once():
    spec = ChatSpec(rounds=2, system_tokens=100, context_tokens=200, question_tokens=10,
                    answer_tokens=5)
    # Per user: context + 2 questions + 2 answers = 230; plus the shared 100.
    assert working_set_tokens(spec, 1) == 330
    assert working_set_tokens(spec, 3) == 100 + 3 * 230
