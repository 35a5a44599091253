"""Seeded, deterministic workloads for the Locust A/B tests.

Prompts are lists of token ids sent to ``/v1/completions``: lengths are exact, and a
shared prefix is shared token for token (text would be re-tokenized, and a merge
across a turn boundary would change the block hashes of everything after it).
Every prompt is a pure function of (spec, user index, turn index), so both arms of
an A/B run and any rerun with the same seed send byte-identical requests, whatever
order Locust schedules the users in and whatever the model answers.

Scenarios:

* ``chat``: U users hold R-round conversations. Round 0 is a system prompt of S tokens
  shared by every user, then a per-user context of C tokens (the file or notes the user
  pasted) and a question; each later round appends a stand-in of the assistant's reply
  (seeded, as long as the requested output) and a new question, so the per-user
  history grows by ``answer_tokens + question_tokens`` per round. A
  vanilla engine whose KV cache is smaller than the users' histories recomputes them;
  a tier that kept them serves them.
* ``docqa``: D documents of L tokens are queried repeatedly; each query is a hit (one
  of the D documents) with probability ``hit_ratio``, else a miss (a document never
  seen before), followed by a fresh question.
* ``noreuse``: every prompt is new: the control, where a cache can only cost.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Literal

Scenario = Literal["chat", "docqa", "noreuse"]
SCENARIOS: tuple[Scenario, ...] = ("chat", "docqa", "noreuse")

# Token ids drawn from [10, 4000): valid for both demo models (vocab 4096 and 8192),
# clear of the special tokens at the bottom of the vocabulary.
VOCAB_LOW = 10
VOCAB_HIGH = 4000


def tokens(tag: str, n: int, seed: int) -> list[int]:
    """n token ids determined by (seed, tag) alone."""
    rng = random.Random(f"{seed}:{tag}")
    return [rng.randrange(VOCAB_LOW, VOCAB_HIGH) for _ in range(n)]


@dataclass(frozen=True)
class Turn:
    """One request of a workload."""

    scenario: Scenario
    user: int
    index: int
    prompt: list[int] = field(repr=False)
    max_tokens: int
    # Leading prompt tokens this workload has sent before (by anyone): the most a
    # perfect cache could serve.
    reusable_tokens: int
    # docqa: "hit" (a known document) or "miss"; chat: "first" / "followup"; noreuse: "miss".
    kind: str


@dataclass(frozen=True)
class ChatSpec:
    rounds: int = 4
    system_tokens: int = 512
    context_tokens: int = 1024
    question_tokens: int = 64
    answer_tokens: int = 32
    seed: int = 0

    def history_tokens(self, rounds_done: int) -> int:
        """Prompt length of round `rounds_done` (0-based)."""
        step = self.question_tokens + self.answer_tokens
        return self.system_tokens + self.context_tokens + self.question_tokens + (
            rounds_done * step)

    def max_prompt_tokens(self) -> int:
        return self.history_tokens(self.rounds - 1)


@dataclass(frozen=True)
class DocQASpec:
    documents: int = 4
    document_tokens: int = 2048
    question_tokens: int = 64
    answer_tokens: int = 16
    queries: int = 4
    hit_ratio: float = 0.75
    seed: int = 0

    def max_prompt_tokens(self) -> int:
        return self.document_tokens + self.question_tokens


@dataclass(frozen=True)
class NoReuseSpec:
    prompt_tokens: int = 1024
    answer_tokens: int = 16
    requests: int = 4
    seed: int = 0

    def max_prompt_tokens(self) -> int:
        return self.prompt_tokens


def system_prompt(spec: ChatSpec) -> list[int]:
    return tokens("chat:system", spec.system_tokens, spec.seed)


def chat_turns(spec: ChatSpec, user: int) -> list[Turn]:
    """The whole conversation of one chat user, round by round."""
    shared = system_prompt(spec)
    history = shared + tokens(f"chat:u{user}:context", spec.context_tokens, spec.seed)
    turns: list[Turn] = []
    for r in range(spec.rounds):
        question = tokens(f"chat:u{user}:r{r}:question", spec.question_tokens, spec.seed)
        prompt = history + question
        # Round 0 can reuse only the shared system prompt; later rounds their history.
        reusable = len(shared) if r == 0 else len(history)
        turns.append(
            Turn("chat", user, r, prompt, spec.answer_tokens, reusable,
                 "first" if r == 0 else "followup")
        )
        answer = tokens(f"chat:u{user}:r{r}:answer", spec.answer_tokens, spec.seed)
        history = prompt + answer
    return turns


def document(spec: DocQASpec, index: int) -> list[int]:
    """One of the D known documents."""
    return tokens(f"docqa:doc{index}", spec.document_tokens, spec.seed)


def docqa_turns(spec: DocQASpec, user: int) -> list[Turn]:
    turns: list[Turn] = []
    for q in range(spec.queries):
        rng = random.Random(f"{spec.seed}:docqa:u{user}:q{q}")
        if spec.documents > 0 and rng.random() < spec.hit_ratio:
            doc = document(spec, rng.randrange(spec.documents))
            kind, reusable = "hit", spec.document_tokens
        else:
            doc = tokens(f"docqa:fresh:u{user}:q{q}", spec.document_tokens, spec.seed)
            kind, reusable = "miss", 0
        question = tokens(f"docqa:u{user}:q{q}:question", spec.question_tokens, spec.seed)
        turns.append(Turn("docqa", user, q, doc + question, spec.answer_tokens, reusable, kind))
    return turns


def noreuse_turns(spec: NoReuseSpec, user: int) -> list[Turn]:
    return [
        Turn("noreuse", user, i, tokens(f"noreuse:u{user}:{i}", spec.prompt_tokens, spec.seed),
             spec.answer_tokens, 0, "miss")
        for i in range(spec.requests)
    ]


def warmup_prompts(spec: DocQASpec) -> list[list[int]]:
    """The known documents, sent once before a docqa run so a "hit" query has a
    document the server saw before (a miss stays a miss)."""
    return [document(spec, d) for d in range(spec.documents)]


WorkloadSpec = ChatSpec | DocQASpec | NoReuseSpec


def turns_for(spec: WorkloadSpec, user: int) -> list[Turn]:
    if isinstance(spec, ChatSpec):
        return chat_turns(spec, user)
    if isinstance(spec, DocQASpec):
        return docqa_turns(spec, user)
    return noreuse_turns(spec, user)


def scenario_of(spec: WorkloadSpec) -> Scenario:
    if isinstance(spec, ChatSpec):
        return "chat"
    if isinstance(spec, DocQASpec):
        return "docqa"
    return "noreuse"


def spec_from_dict(scenario: Scenario, values: dict[str, object]) -> WorkloadSpec:
    cls = {"chat": ChatSpec, "docqa": DocQASpec, "noreuse": NoReuseSpec}[scenario]
    return cls(**values)  # type: ignore[arg-type]


def spec_to_dict(spec: WorkloadSpec) -> dict[str, object]:
    return asdict(spec)


def working_set_tokens(spec: WorkloadSpec, users: int) -> int:
    """Distinct prompt tokens the workload wants cached at its peak (for sizing caches)."""
    if isinstance(spec, ChatSpec):
        per_user = spec.max_prompt_tokens() - spec.system_tokens + spec.answer_tokens
        return spec.system_tokens + users * per_user
    if isinstance(spec, DocQASpec):
        return spec.documents * spec.document_tokens
    return 0
