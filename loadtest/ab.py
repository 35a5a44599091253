"""A/B load test: vanilla vLLM against vLLM + symram, same workload, one run.

    python -m loadtest.ab               # full run on the mid model (~20-25 min on 2 cores)
    python -m loadtest.ab --smoke       # tiny model, 2 points, ~3 min
    make ab AB_ARGS="..."               # the same (a repository tool: not in the wheel)

Both arms start with identical engine arguments and the same vLLM KV-cache size, sized
to hold about two chat users' histories, so a vanilla engine serving more users must
recompute while symram serves the histories from its DRAM tier. The symram arm sits
behind the gateway when it is installed. After a warm-up, each seeded workload point
(scenario, user count, repeat) runs on both arms back to back, the order alternating
from point to point; a point uses its own seed on both arms, so no point hits what an
earlier one cached.

The chat scenario is swept over user counts; an arm stops climbing after its first
point that misses the SLO (``--full-sweep`` keeps going). docqa and noreuse run at
``--side-users``. Results: ``OUT/NAME.json`` (with ``sessions_at_slo_baseline``,
``sessions_at_slo_symram``, ``sessions_ratio`` and the machine), ``OUT/NAME.md`` and
``OUT/NAME_<scenario>_<plot>.png``; engine logs and per-request records go to
``OUT/logs/NAME/`` (git-ignored). The JSON is rewritten after every point; Ctrl-C
stops Locust and every engine and keeps the partial results (status "interrupted").
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from loadtest.ab_arms import (
    CPU_BLOCK_TOKENS,
    Arm,
    EngineSettings,
    build_arms,
    kv_bytes_per_token,
    round_up,
    warm_documents,
    warm_up,
)
from loadtest.ab_locust import LocustProcess, run_point
from loadtest.ab_metrics import delta, scrape, tier_breakdown
from loadtest.ab_peer import PeerSpec, run_peer_check
from loadtest.ab_slo import Slo, combine_repeats, sessions_at_slo, sessions_ratio, summarize
from loadtest.machine import describe_machine
from loadtest.report import write_report
from loadtest.workloads import (
    ChatSpec,
    DocQASpec,
    NoReuseSpec,
    Scenario,
    WorkloadSpec,
    spec_to_dict,
    working_set_tokens,
)
from symram_vllm.serving.stack import StartupError, running

RESULTS = Path(__file__).parent / "results"
ARMS = ("baseline", "symram")

# Defaults per profile; explicit flags win.
PROFILES: dict[str, dict[str, Any]] = {
    "full": {
        "size": "mid", "scenarios": "chat,docqa,noreuse", "name": "ab",
        "users": "2,4,8,12,16", "repeats": 3, "side_repeats": 1, "side_users": 4,
        "kv_users": 3.0,
        "rounds": 5, "system_tokens": 512, "context_tokens": 1024, "question_tokens": 64,
        "answer_tokens": 32, "think_time": 4.0, "spawn_rate": 0.5,
        "documents": 6, "document_tokens": 2048, "queries": 3, "hit_ratio": 0.75,
        "noreuse_tokens": 1024, "noreuse_requests": 3,
        "side_question_tokens": 64, "side_answer_tokens": 16,
        "slo_ttft_p95": 2.0, "point_timeout": 300, "peer_check": True,
    },
    "smoke": {
        "size": "tiny", "scenarios": "chat,docqa", "name": "ab_smoke",
        "users": "1,2", "repeats": 1, "side_repeats": 1, "side_users": 2, "kv_users": 1.0,
        "rounds": 2, "system_tokens": 256, "context_tokens": 384, "question_tokens": 32,
        "answer_tokens": 8, "think_time": 0.0, "spawn_rate": 0.0,
        "documents": 3, "document_tokens": 512, "queries": 2, "hit_ratio": 1.0,
        "noreuse_tokens": 256, "noreuse_requests": 1,
        "side_question_tokens": 32, "side_answer_tokens": 8,
        "slo_ttft_p95": 2.0, "point_timeout": 120, "peer_check": False,
    },
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.ab", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    p = parser.add_argument
    p("--smoke", action="store_true", help="tiny model, few users, short: a plumbing check")
    p("--size", choices=["tiny", "mid"], help="demo model size (full: mid)")
    p("--model", type=Path, help="model directory instead of the demo model")
    p("--scenarios", help="comma list of chat,docqa,noreuse")
    p("--users", help="chat user counts to sweep, e.g. 1,2,4,8")
    p("--side-users", type=int, help="users for docqa and noreuse")
    p("--repeats", type=int, help="chat runs per user count and arm; figures are medians "
      "(full: 3, smoke: 1)")
    p("--side-repeats", type=int, help="runs per arm of docqa and noreuse (default 1)")
    p("--rounds", type=int, help="chat rounds per user")
    p("--system-tokens", type=int, help="chat: shared system prompt tokens")
    p("--context-tokens", type=int, help="chat: per-user context tokens in round 0")
    p("--question-tokens", type=int, help="chat: new user tokens per round")
    p("--answer-tokens", type=int, help="output tokens per request (chat)")
    p("--documents", type=int, help="docqa: known documents")
    p("--document-tokens", type=int, help="docqa: tokens per document")
    p("--queries", type=int, help="docqa: queries per user")
    p("--hit-ratio", type=float, help="docqa: share of queries on a known document")
    p("--noreuse-tokens", type=int, help="noreuse: prompt tokens")
    p("--noreuse-requests", type=int, help="noreuse: requests per user")
    p("--kv-users", type=float, help="size vLLM's KV cache for this many chat users")
    p("--kv-cache-tokens", type=int, help="vLLM KV-cache size in tokens (overrides --kv-users)")
    p("--dram-bytes", default="4GiB", help="symram DRAM tier budget")
    p("--disk-bytes", default="0", help="symram disk tier budget (0 = DRAM only)")
    p("--slo-ttft-p95", type=float, help="p95 TTFT objective per point, seconds")
    p("--slo-ttft", type=float, help="per-request TTFT objective for goodput (default: p95's)")
    p("--slo-tpot", type=float, help="per-request TPOT objective for goodput, seconds")
    p("--think-time", type=float, help="mean seconds between a user's requests (jittered)")
    p("--spawn-rate", type=float, help="users started per second (all at once: 0)")
    p("--point-timeout", type=int, help="cap per point, seconds (a capped point fails)")
    p("--full-sweep", action="store_true", help="keep sweeping an arm after it misses the SLO")
    p("--no-gateway", action="store_true", help="symram arm direct, even with a gateway")
    p("--peer-check", action=argparse.BooleanOptionalAction,
      help="also run `vllm bench serve --dataset-name prefix_repetition` on both arms "
      "(full: on, smoke: off)")
    p("--seed", type=int, default=0)
    p("--out-dir", type=Path, default=RESULTS)
    p("--name", help="result file stem (full: ab, smoke: ab_smoke)")
    args = parser.parse_args(argv)
    profile = PROFILES["smoke" if args.smoke else "full"]
    for key, value in profile.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.slo_ttft is None:
        args.slo_ttft = args.slo_ttft_p95
    return args


@dataclass
class Point:
    scenario: Scenario
    users: int
    repeat: int
    index: int


def build_specs(args: argparse.Namespace) -> dict[Scenario, WorkloadSpec]:
    specs: dict[Scenario, WorkloadSpec] = {}
    wanted = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    for scenario in wanted:
        if scenario == "chat":
            specs["chat"] = ChatSpec(args.rounds, args.system_tokens, args.context_tokens,
                                     args.question_tokens, args.answer_tokens, args.seed)
        elif scenario == "docqa":
            specs["docqa"] = DocQASpec(args.documents, args.document_tokens,
                                       args.side_question_tokens, args.side_answer_tokens,
                                       args.queries, args.hit_ratio, args.seed)
        elif scenario == "noreuse":
            specs["noreuse"] = NoReuseSpec(args.noreuse_tokens, args.side_answer_tokens,
                                           args.noreuse_requests, args.seed)
        else:
            raise SystemExit(f"unknown scenario {scenario!r}; use chat, docqa, noreuse")
    return specs


def with_seed(spec: WorkloadSpec, seed: int) -> WorkloadSpec:
    values = spec_to_dict(spec) | {"seed": seed}
    return type(spec)(**values)  # type: ignore[arg-type]


def engine_settings(args: argparse.Namespace, model: Path,
                    specs: dict[Scenario, WorkloadSpec]) -> EngineSettings:
    longest = max(s.max_prompt_tokens() + 64 for s in specs.values())
    max_model_len = round_up(longest, CPU_BLOCK_TOKENS)
    if args.kv_cache_tokens:
        kv_tokens = args.kv_cache_tokens
    else:
        chat = specs.get("chat")
        want = (working_set_tokens(chat, 1) * args.kv_users if isinstance(chat, ChatSpec)
                else max_model_len)
        kv_tokens = int(want)
    # vLLM refuses to start unless one max-length request fits, with a block to spare.
    kv_tokens = round_up(max(kv_tokens, max_model_len + CPU_BLOCK_TOKENS), CPU_BLOCK_TOKENS)
    return EngineSettings(model, max_model_len, kv_tokens, kv_bytes_per_token(model))


class Runner:
    def __init__(self, args: argparse.Namespace, argv: list[str]) -> None:
        self.args = args
        self.console = Console(stderr=True)
        self.slo = Slo(ttft_p95_s=args.slo_ttft_p95, ttft_s=args.slo_ttft, tpot_s=args.slo_tpot)
        self.specs = build_specs(args)
        self.out_dir: Path = args.out_dir
        self.raw_dir = self.out_dir / "logs" / args.name  # git-ignored: logs, raw records
        self.json_path = self.out_dir / f"{args.name}.json"
        self.points: list[dict[str, Any]] = []
        self.result: dict[str, Any] = {
            "status": "starting",
            "command": "python -m loadtest.ab " + shlex.join(argv),
            "machine": describe_machine(),
            "slo": {"ttft_p95_s": self.slo.ttft_p95_s, "ttft_s": self.slo.ttft_s,
                    "tpot_s": self.slo.tpot_s, "max_error_rate": self.slo.max_error_rate},
            "workloads": {name: spec_to_dict(spec) for name, spec in self.specs.items()},
            "think_time_s": args.think_time,
            "spawn_rate": args.spawn_rate,
            "repeats": {"chat": args.repeats, "side": args.side_repeats},
            "points": self.points,
        }

    # -- plan ------------------------------------------------------------------------
    def plan(self) -> list[Point]:
        points: list[Point] = []
        users = [int(u) for u in self.args.users.split(",")]
        for scenario in self.specs:
            counts = users if scenario == "chat" else [self.args.side_users]
            for n in counts:
                repeats = self.args.repeats if scenario == "chat" else self.args.side_repeats
                for repeat in range(repeats):
                    points.append(Point(scenario, n, repeat, len(points)))
        return points

    # -- run -------------------------------------------------------------------------
    def run(self) -> int:
        args = self.args
        from symram_vllm.demo_model import build_demo_model

        model = args.model or build_demo_model(None, args.size)
        settings = engine_settings(args, Path(model), self.specs)
        self.raw_dir.mkdir(parents=True, exist_ok=True)
        disk_dir = Path(tempfile.mkdtemp(prefix="symram-ab-disk-")) if args.disk_bytes not in (
            "0", "", None) else None
        processes, arms = build_arms(
            settings, self.raw_dir, dram_bytes=args.dram_bytes, disk_dir=disk_dir,
            disk_bytes=args.disk_bytes, use_gateway=not args.no_gateway)
        self.result |= {
            "model": {"size": args.size if not args.model else "custom", "path": str(model),
                      "kv_bytes_per_token": settings.bytes_per_token},
            "engine": {"kv_cache_tokens": settings.kv_cache_tokens,
                       "kv_cache_bytes": settings.kv_cache_bytes,
                       "max_model_len": settings.max_model_len,
                       "vllm_args": settings.vllm_args(), "dram_bytes": args.dram_bytes,
                       "disk_bytes": args.disk_bytes if disk_dir else None},
            "topology": {name: arm.topology for name, arm in arms.items()},
            "arms": {name: {"url": arm.url, "engine_url": arm.engine_url}
                     for name, arm in arms.items()},
        }
        if arms["symram"].topology == "direct" and not args.no_gateway:
            self.result["notes"] = ["gateway not installed: the symram arm was measured "
                                    "direct, like the baseline"]
        self.console.print(
            f"A/B on {self.result['model']['size']} model; vLLM KV cache "
            f"{settings.kv_cache_tokens} tokens ({settings.kv_cache_bytes} B) per arm; "
            f"symram arm: {arms['symram'].topology}; logs and records in {self.raw_dir}")
        status = "failed"
        try:
            with running(processes):
                self.result["processes"] = [
                    {"name": p.name, "pid": p.pid, "ports": p.ports, "log": str(p.log_path)}
                    for p in processes.processes]
                for arm in arms.values():
                    with self.console.status(f"warm-up {arm.name}"):
                        warm_up(arm, min(settings.max_model_len - 64, 1024))
                self.result["status"] = "running"
                self.sweep(arms)
                if args.peer_check:
                    self.peer_check(arms, Path(model), settings)
            status = "complete"
        except KeyboardInterrupt:
            status = "interrupted"
            self.console.print("[yellow]interrupted: engines stopped, partial results kept[/]")
        except StartupError as exc:
            self.console.print(f"[red]engine start failed:[/] {exc}")
        finally:
            LocustProcess.kill()
            if disk_dir is not None:
                shutil.rmtree(disk_dir, ignore_errors=True)
            self.result["status"] = status
            self.finish()
        return 0 if status == "complete" else 1

    def sweep(self, arms: dict[str, Arm]) -> None:
        plan = self.plan()
        failed: dict[tuple[str, str], int] = {}  # (scenario, arm) -> users of first miss
        with Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), console=self.console,
        ) as progress:
            overall = progress.add_task("points", total=len(plan) * len(ARMS))
            for point in plan:
                order = ARMS if point.index % 2 == 0 else ARMS[::-1]
                for arm_name in order:
                    key = (point.scenario, arm_name)
                    if (point.scenario == "chat" and not self.args.full_sweep
                            and key in failed and point.users > failed[key]):
                        progress.advance(overall)
                        continue
                    task = progress.add_task(
                        f"{point.scenario} u={point.users} {arm_name}", total=None)
                    record = self.run_one(arms[arm_name], point, progress, task)
                    progress.remove_task(task)
                    progress.advance(overall)
                    self.points.append(record)
                    summary = record["summary"]
                    verdict = "[green]ok[/]" if summary["meets_slo"] else "[red]miss[/]"
                    progress.console.print(
                        f"{point.scenario:8} users={point.users:<3} {arm_name:8} "
                        f"TTFT p50 {summary['ttft_p50_s']:.3f}s p95 {summary['ttft_p95_s']:.3f}s"
                        f"  {summary['requests_per_s']:.2f} req/s  cached "
                        f"{summary['cached_fraction']:.0%}  SLO {verdict}")
                    self.save()
                    # An arm stops climbing once a user count misses the SLO on the
                    # median of all its repeats (one noisy repeat does not stop it).
                    runs = [p["summary"] for p in self.points if p["scenario"] ==
                            point.scenario and p["arm"] == arm_name and p["users"] == point.users]
                    expected = (self.args.repeats if point.scenario == "chat"
                                else self.args.side_repeats)
                    if (len(runs) == expected
                            and not combine_repeats(runs, self.slo)["meets_slo"]):
                        failed.setdefault(key, point.users)

    def run_one(self, arm: Arm, point: Point, progress: Progress, task: Any) -> dict[str, Any]:
        spec = with_seed(self.specs[point.scenario], self.args.seed * 10_000 + point.index)
        prefix = self.raw_dir / f"{point.scenario}_u{point.users}_r{point.repeat}_{arm.name}"
        if isinstance(spec, DocQASpec):
            # The known documents, once, before the measured window (Locust is told not to).
            warm_documents(arm, spec)
        before = scrape(arm.engine_url)

        def on_progress(done: int, expected: int) -> None:
            progress.update(task, completed=done, total=expected)

        run = run_point(arm.url, spec, point.users, prefix, timeout_s=self.args.point_timeout,
                        think_time_s=self.args.think_time,
                        spawn_rate=self.args.spawn_rate or None, on_progress=on_progress)
        after = scrape(arm.engine_url)
        summary = summarize(run.records, self.slo, completed=run.completed)
        return {
            "scenario": point.scenario, "arm": arm.name, "users": point.users,
            "repeat": point.repeat, "seed": spec.seed, "expected_requests": run.expected,
            "locust_returncode": run.returncode, "wall_s": run.wall_s,
            "locust_command": run.command, "summary": summary,
            "tiers": tier_breakdown(delta(before, after)), "when": time.time(),
        }

    def peer_check(self, arms: dict[str, Arm], model: Path, settings: EngineSettings) -> None:
        """vLLM's own load generator on the same two arms. Its prefixes (8 x 1024 tokens
        by default, fewer on small engines) exceed the vLLM KV cache, as the chat
        histories do."""
        prefix = min(1024, settings.max_model_len // 2)
        spec = PeerSpec(prefix_len=prefix, num_prefixes=max(
            4, 2 * settings.kv_cache_tokens // prefix), seed=self.args.seed,
            goodput_ttft_ms=int(self.slo.ttft_s * 1000))
        self.result["peer_check"] = {"spec": spec.__dict__}
        for name in ARMS[::-1]:  # symram first: the order the sweep did not favour
            with self.console.status(f"vllm bench serve (prefix_repetition) on {name}"):
                summary = run_peer_check(arms[name].url, model, spec,
                                         self.raw_dir / f"peer_{name}.json")
            self.result["peer_check"][name] = summary
            self.console.print(
                f"peer check {name:8}: median TTFT {summary.get('median_ttft_ms')} ms, "
                f"p95 {summary.get('p95_ttft_ms')} ms, goodput "
                f"{summary.get('request_goodput')} req/s")
            self.save()

    # -- results ---------------------------------------------------------------------
    def aggregate(self) -> None:
        results: dict[str, dict[str, dict[str, Any]]] = {}
        for scenario in self.specs:
            results[scenario] = {}
            for arm in ARMS:
                table: dict[str, Any] = {}
                by_users: dict[int, list[dict[str, Any]]] = {}
                for p in self.points:
                    if p["scenario"] == scenario and p["arm"] == arm:
                        by_users.setdefault(p["users"], []).append(p)
                for users, pts in sorted(by_users.items()):
                    row = combine_repeats([p["summary"] for p in pts], self.slo)
                    row["tiers"] = pts[-1]["tiers"] if len(pts) == 1 else _median_tiers(pts)
                    table[str(users)] = row
                results[scenario][arm] = table
        self.result["results"] = results
        chat = results.get("chat", {})
        meets = {arm: {int(u): bool(r["meets_slo"]) for u, r in chat.get(arm, {}).items()}
                 for arm in ARMS}
        base, sym = sessions_at_slo(meets["baseline"]), sessions_at_slo(meets["symram"])
        self.result["sessions_at_slo_baseline"] = base
        self.result["sessions_at_slo_symram"] = sym
        self.result["sessions_ratio"] = sessions_ratio(sym, base)
        swept = [int(u) for u in self.args.users.split(",")]
        self.result["sessions_ceiling"] = {
            "swept_users": swept,
            "symram_sustained_every_swept_count": bool(sym) and sym == max(swept),
        }

    def save(self) -> None:
        self.aggregate()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.json_path.with_suffix(".json.tmp")
        text = json.dumps(_finite(self.result), indent=2, default=_json_default, allow_nan=False)
        tmp.write_text(text + "\n")
        tmp.replace(self.json_path)

    def finish(self) -> None:
        self.save()
        written = write_report(self.result, self.out_dir, self.args.name)
        self.console.print(
            f"[bold]{self.result['status']}[/]: sessions at p95 TTFT <= "
            f"{self.slo.ttft_p95_s}s: vanilla {self.result['sessions_at_slo_baseline']}, "
            f"symram {self.result['sessions_at_slo_symram']}, ratio "
            f"{self.result['sessions_ratio']}")
        self.console.print(f"wrote {self.json_path}, " + ", ".join(
            str(p) for p in written.values()))


def _median_tiers(points: list[dict[str, Any]]) -> dict[str, Any]:
    """Tier figures of the repeat whose recomputed fraction is the median."""
    ranked = sorted(points, key=lambda p: p["tiers"]["fraction"].get("recomputed", 0.0))
    return ranked[len(ranked) // 2]["tiers"]


def _finite(value: Any) -> Any:
    """NaN (a percentile of nothing) -> None: ab.json stays strict JSON."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _json_default(value: object) -> object:
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)

    def terminate(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    # SIGINT too: a shell without job control starts background commands with SIGINT
    # ignored, and Python then installs no Ctrl-C handler of its own (the A/B run
    # would ignore the SIGINT its test sends, as `symram up` does not).
    previous = {signum: signal.signal(signum, terminate)
                for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        return Runner(args, argv).run()
    finally:
        for signum, handler in previous.items():
            if handler is not None:  # None: not set from Python, nothing to restore
                signal.signal(signum, handler)


if __name__ == "__main__":
    raise SystemExit(main())
