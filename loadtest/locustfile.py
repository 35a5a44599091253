"""Locust users for the symram A/B tests: streaming OpenAI completions, one user class
per scenario of ``loadtest.workloads`` (chat, docqa, noreuse).

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 --headless \\
        -u 4 -r 4 ChatUser --workload '{"rounds": 4, "system_tokens": 1024}'

Each user walks its own seeded list of turns (prompt token ids, so lengths and shared
prefixes are exact), then stops; the run quits when every user is done. Requests are
streamed; per request Locust's stats get the end-to-end latency under the scenario
name and ``METRIC`` entries ``time_to_first_token`` (first SSE chunk with text),
``time_per_output_token``, ``e2e_latency``, and the counts ``output_tokens`` and
``cached_tokens`` (usage.prompt_tokens_details.cached_tokens; the engine needs
``--enable-prompt-tokens-details``; a count, not milliseconds, in those two rows).
``--records PATH`` also writes one JSON line per request, which the A/B runner reads.

HttpUser (requests/urllib3), not FastHttpUser: urllib3 yields each chunk of a chunked
response as it arrives, so the first-token time is the chunk's arrival time; the load
here is tens of users, far below where requests' overhead matters.
"""

from __future__ import annotations

import itertools
import json
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import gevent
import locust  # noqa: F401 - before requests: Locust monkey-patches ssl for gevent
import requests
from locust import HttpUser, events, task
from locust.env import Environment
from locust.exception import StopUser

# `locust -f loadtest/locustfile.py` puts loadtest/ on sys.path, not the repository.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from loadtest.ab_stream import parse_stream
from loadtest.workloads import (
    Scenario,
    Turn,
    WorkloadSpec,
    spec_from_dict,
    turns_for,
    warmup_prompts,
)


@events.init_command_line_parser.add_listener
def _add_arguments(parser: Any) -> None:
    group = parser.add_argument_group("symram workload")
    group.add_argument("--workload", default="{}",
                       help="JSON of workload spec fields (see loadtest/workloads.py)")
    group.add_argument("--model-name", default="demo", help="model name in the requests")
    group.add_argument("--think-time", type=float, default=0.0,
                       help="mean seconds a user waits between its requests (each wait is "
                       "drawn from [0.5, 1.5] x this, seeded per user)")
    group.add_argument("--records", default="", help="append one JSON line per request here")
    group.add_argument("--no-warm-docs", action="store_true",
                       help="docqa: skip sending the known documents once before the run")


class RunState:
    """Per-process state shared by the users: the records file and finished users."""

    records: IO[str] | None = None
    finished = 0
    counters: dict[str, Iterator[int]] = {}


@events.init.add_listener
def _on_init(environment: Environment, **_kwargs: Any) -> None:
    options = environment.parsed_options
    if options is not None and options.records:
        RunState.records = open(options.records, "a", buffering=1)  # noqa: SIM115


@events.quitting.add_listener
def _on_quitting(environment: Environment, **_kwargs: Any) -> None:
    if RunState.records is not None:
        RunState.records.close()
        RunState.records = None


@events.test_start.add_listener
def _warm_documents(environment: Environment, **_kwargs: Any) -> None:
    """docqa: the known documents are sent once, before any user starts, so a 'hit'
    query asks about a document the server has seen."""
    options = environment.parsed_options
    if options is None or options.no_warm_docs:
        return
    if not any(cls.scenario == "docqa" for cls in environment.user_classes
               if issubclass(cls, CompletionUser)):
        return
    spec = workload_spec("docqa", options.workload)
    for prompt in warmup_prompts(spec):  # type: ignore[arg-type]
        body = {"model": options.model_name, "prompt": prompt, "max_tokens": 1,
                "temperature": 0}
        requests.post(f"{environment.host}/v1/completions", json=body,
                      timeout=600).raise_for_status()


def workload_spec(scenario: Scenario, workload_json: str) -> WorkloadSpec:
    values = json.loads(workload_json or "{}")
    return spec_from_dict(scenario, values)


class CompletionUser(HttpUser):
    """Walks a seeded list of turns, streaming each as a /v1/completions request."""

    abstract = True
    scenario: Scenario = "chat"

    def on_start(self) -> None:
        options = self.environment.parsed_options
        assert options is not None
        counter = RunState.counters.setdefault(self.scenario, itertools.count())
        self.user_index = next(counter)
        self.spec = workload_spec(self.scenario, options.workload)
        self.model_name: str = options.model_name
        self.think_s: float = options.think_time
        self.think_rng = random.Random(f"{self.spec.seed}:think:{self.user_index}")
        self.turns = iter(turns_for(self.spec, self.user_index))

    def wait_time(self) -> float:
        # Jittered so users do not fall into lock step; seeded, so runs repeat.
        return self.think_s * (0.5 + self.think_rng.random()) if self.think_s else 0.0

    @task
    def next_turn(self) -> None:
        turn = next(self.turns, None)
        if turn is None:
            self.finish()
        else:
            self.send(turn)

    def finish(self) -> None:
        RunState.finished += 1
        runner = self.environment.runner
        if runner is not None and RunState.finished >= runner.target_user_count:
            gevent.spawn_later(0.1, runner.quit)
        raise StopUser()

    def send(self, turn: Turn) -> None:
        body = {
            "model": self.model_name,
            "prompt": turn.prompt,
            "max_tokens": turn.max_tokens,
            "temperature": 0,
            "ignore_eos": True,  # same output length on both arms, whatever the model says
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        record: dict[str, Any] = {
            "scenario": turn.scenario, "user": turn.user, "turn": turn.index,
            "kind": turn.kind, "prompt_tokens": len(turn.prompt),
            "reusable_tokens": turn.reusable_tokens, "start": time.time(),
        }
        start = time.perf_counter()
        with self.client.post("/v1/completions", json=body, stream=True, name=turn.scenario,
                              catch_response=True, timeout=900) as response:
            try:
                if response.status_code != 200:
                    raise RuntimeError(
                        f"HTTP {response.status_code}: {response.error or response.text[:200]}")
                result = parse_stream(response.iter_lines(chunk_size=None), start)
            except Exception as exc:  # any failure is a failed request, never a crash
                record.update(ok=False, error=str(exc)[:300],
                              e2e_s=time.perf_counter() - start)
                response.failure(exc)
            else:
                record.update(ok=True, **result)
                response.request_meta["response_time"] = result["e2e_s"] * 1000  # type: ignore[index]
                response.success()
        if record["ok"]:
            fire = self.environment.events.request.fire
            for name, value in (
                ("time_to_first_token", record["ttft_s"] * 1000),
                ("time_per_output_token", record["tpot_s"] * 1000),
                ("e2e_latency", record["e2e_s"] * 1000),
                ("output_tokens", record["output_tokens"]),
                ("cached_tokens", record["cached_tokens"]),
            ):
                fire(request_type="METRIC", name=name, response_time=value,
                     response_length=0, exception=None, context={})
        if RunState.records is not None:
            RunState.records.write(json.dumps(record) + "\n")


class ChatUser(CompletionUser):
    """Multi-turn chat: shared system prompt, growing per-user history."""

    scenario: Scenario = "chat"


class DocQAUser(CompletionUser):
    """Long-document QA with a set hit/miss mix over D known documents."""

    scenario: Scenario = "docqa"


class NoReuseUser(CompletionUser):
    """Control: every prompt is new."""

    scenario: Scenario = "noreuse"


USER_CLASSES: dict[Scenario, type[CompletionUser]] = {
    "chat": ChatUser, "docqa": DocQAUser, "noreuse": NoReuseUser,
}
