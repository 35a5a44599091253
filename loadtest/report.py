"""Markdown report and PNG plots from an A/B result (``ab.json``).

    python -m loadtest.report loadtest/results/ab.json   # re-render from the JSON

Plots: TTFT p50/p95 vs users (with the SLO line), throughput and goodput vs users,
and where prompt tokens came from (device prefix cache, symram DRAM, symram disk,
recomputed) per arm and user count.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: files only
import matplotlib.pyplot as plt

ARMS = ("baseline", "symram")
ARM_LABEL = {"baseline": "vanilla vLLM", "symram": "vLLM + symram"}
ARM_COLOR = {"baseline": "#d62728", "symram": "#1f77b4"}
TIER_COLOR = {"device": "#7f7f7f", "symram_dram": "#1f77b4", "symram_disk": "#17becf",
              "recomputed": "#ff7f0e"}


def _series(result: Mapping[str, Any], scenario: str, arm: str) -> list[tuple[int, dict]]:
    table = result.get("results", {}).get(scenario, {}).get(arm, {})
    return sorted(((int(u), row) for u, row in table.items()), key=lambda item: item[0])


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.{digits}f}"
    return str(value)


def _scaled(value: Any, factor: float) -> Any:
    return value * factor if isinstance(value, int | float) else value


def _num(value: Any) -> float:
    """For plots: None (no data) -> NaN, which matplotlib leaves as a gap."""
    return float(value) if isinstance(value, int | float) else float("nan")


# (field, matplotlib format, label suffix) per line drawn for each arm.
Line = tuple[str, str, str]


def _plot_by_users(result: Mapping[str, Any], path: Path, scenario: str, lines: list[Line],
                   ylabel: str, title: str, slo: float | None = None) -> Path:
    """One line per (arm, field) against the user count, optionally with the SLO."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for arm in ARMS:
        rows = _series(result, scenario, arm)
        if not rows:
            continue
        users = [u for u, _ in rows]
        for field, style, suffix in lines:
            ax.plot(users, [_num(r[field]) for _, r in rows], style, color=ARM_COLOR[arm],
                    label=f"{ARM_LABEL[arm]} {suffix}")
    if slo:
        ax.axhline(slo, color="black", linewidth=0.8, linestyle=":", label=f"SLO p95 ≤ {slo} s")
    ax.set_xlabel("concurrent users (sessions)")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{title} ({scenario})")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_ttft(result: Mapping[str, Any], path: Path, scenario: str = "chat") -> Path:
    return _plot_by_users(
        result, path, scenario, [("ttft_p50_s", "--o", "p50"), ("ttft_p95_s", "-s", "p95")],
        "time to first token (s)", "TTFT vs users",
        slo=result.get("slo", {}).get("ttft_p95_s"))


def plot_throughput(result: Mapping[str, Any], path: Path, scenario: str = "chat") -> Path:
    return _plot_by_users(
        result, path, scenario, [("requests_per_s", "-o", "requests/s"),
                                 ("goodput_rps", "--^", "goodput (req/s in SLO)")],
        "requests per second", "throughput and goodput vs users")


def plot_tiers(result: Mapping[str, Any], path: Path, scenario: str = "chat") -> Path:
    """Stacked bars: fraction of prompt tokens per source, per (arm, users)."""
    labels: list[str] = []
    stacks: dict[str, list[float]] = {tier: [] for tier in TIER_COLOR}
    for arm in ARMS:
        for users, row in _series(result, scenario, arm):
            fractions = (row.get("tiers") or {}).get("fraction") or {}
            labels.append(f"{'B' if arm == 'baseline' else 'S'}{users}")
            for tier in TIER_COLOR:
                stacks[tier].append(float(fractions.get(tier, 0.0)))
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(labels) + 2), 4.2))
    bottom = [0.0] * len(labels)
    for tier, color in TIER_COLOR.items():
        ax.bar(labels, stacks[tier], bottom=bottom, color=color, label=tier.replace("_", " "))
        bottom = [b + v for b, v in zip(bottom, stacks[tier], strict=True)]
    ax.set_ylim(0, 1)
    ax.set_ylabel("fraction of prompt tokens")
    ax.set_xlabel("arm (B = vanilla, S = symram) and users")
    ax.set_title(f"where prompt KV came from ({scenario})")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _point_table(result: Mapping[str, Any], scenario: str) -> list[str]:
    lines = [
        "| users | arm | TTFT p50 (s) | TTFT p95 (s) | p95 by turn kind (s) | TPOT p50 (ms) | "
        "E2E p95 (s) | req/s | goodput req/s | cached | recomputed | errors | meets SLO |",
        "|---:|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    rows = {arm: dict(_series(result, scenario, arm)) for arm in ARMS}
    for users in sorted(set(rows["baseline"]) | set(rows["symram"])):
        for arm in ARMS:
            row = rows[arm].get(users)
            if row is None:
                continue
            fractions = (row.get("tiers") or {}).get("fraction") or {}
            kinds = ", ".join(f"{k} {_fmt(v, 2)}"
                              for k, v in (row.get("ttft_p95_s_by_kind") or {}).items())
            lines.append(
                f"| {users} | {ARM_LABEL[arm]} | {_fmt(row['ttft_p50_s'])} | "
                f"{_fmt(row['ttft_p95_s'])} | {kinds or '-'} | "
                f"{_fmt(_scaled(row['tpot_p50_s'], 1000), 1)} | "
                f"{_fmt(row['e2e_p95_s'])} | {_fmt(row['requests_per_s'], 2)} | "
                f"{_fmt(row['goodput_rps'], 2)} | "
                f"{_fmt(_scaled(row['cached_fraction'], 100), 0)}% | "
                f"{_fmt(_scaled(fractions.get('recomputed'), 100), 0)}% | "
                f"{int(row['errors'])} | {_fmt(bool(row['meets_slo']))} |"
            )
    return lines


def _peer_table(peer: Mapping[str, Any]) -> list[str]:
    spec = peer.get("spec", {})
    lines = [
        "## Peer client: vllm bench serve (prefix_repetition)", "",
        f"{spec.get('num_prefixes')} prefixes x {spec.get('prefix_len')} tokens + "
        f"{spec.get('suffix_len')}-token suffixes, {spec.get('num_prompts')} prompts, "
        f"{spec.get('max_concurrency')} concurrent, {spec.get('output_len')} output tokens; "
        f"goodput at TTFT <= {spec.get('goodput_ttft_ms')} ms.", "",
        "| arm | completed | failed | median TTFT (ms) | p95 TTFT (ms) | median TPOT (ms) | "
        "req/s | goodput req/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for arm in ARMS:
        row = peer.get(arm)
        if not row:
            continue
        lines.append(
            f"| {ARM_LABEL[arm]} | {_fmt(row.get('completed'))} | {_fmt(row.get('failed'))} | "
            f"{_fmt(row.get('median_ttft_ms'), 1)} | {_fmt(row.get('p95_ttft_ms'), 1)} | "
            f"{_fmt(row.get('median_tpot_ms'), 1)} | {_fmt(row.get('request_throughput'), 2)} | "
            f"{_fmt(row.get('request_goodput'), 2)} |")
    if peer.get("symram", {}).get("command"):
        lines += ["", f"command: `{peer['symram']['command']}`"]
    return [*lines, ""]


def render_markdown(result: Mapping[str, Any], images: Mapping[str, str]) -> str:
    slo = result.get("slo", {})
    engine = result.get("engine", {})
    machine = result.get("machine", {})
    ratio = result.get("sessions_ratio")
    base, sym = result.get("sessions_at_slo_baseline"), result.get("sessions_at_slo_symram")
    ratio_text = (f"{ratio:.2f}x" if isinstance(ratio, int | float)
                  else "unbounded (the baseline sustains none of the swept loads)")
    lines = [
        f"# symram A/B load test ({result.get('status', 'unknown')})",
        "",
        f"Vanilla vLLM vs vLLM + symram on the same seeded workloads, same engine "
        f"arguments and the same vLLM KV-cache size ({engine.get('kv_cache_tokens')} tokens, "
        f"{engine.get('kv_cache_bytes')} bytes), arms alternated point by point in one run.",
        "",
        f"**Sessions sustained at p95 TTFT ≤ {slo.get('ttft_p95_s')} s (chat):** "
        f"vanilla {base}, symram {sym}, ratio {ratio_text}.",
        "",
        f"- model: `{result.get('model', {}).get('size')}` demo model "
        f"({result.get('model', {}).get('kv_bytes_per_token')} KV bytes/token)",
        f"- topology: vanilla {result.get('topology', {}).get('baseline')}, symram "
        f"{result.get('topology', {}).get('symram')}",
        f"- symram tiers: DRAM {engine.get('dram_bytes')}, disk "
        f"{engine.get('disk_bytes') or 'off'}",
        f"- SLO: p95 TTFT ≤ {slo.get('ttft_p95_s')} s per point, no errors; goodput counts "
        f"requests with TTFT ≤ {slo.get('ttft_s')} s"
        + (f" and TPOT ≤ {slo['tpot_s']} s" if slo.get("tpot_s") else "") + ".",
        f"- machine: {machine.get('cpu_count')} x {machine.get('cpu_model')}, "
        f"{machine.get('memory_gib')} GiB, CUDA {machine.get('cuda')}, {machine.get('when')}",
        f"- reproduce: `{result.get('command')}`",
        "",
    ]
    workloads = result.get("workloads", {})
    for scenario in ("chat", "docqa", "noreuse"):
        if not result.get("results", {}).get(scenario):
            continue
        lines += [f"## {scenario}", "", f"workload: `{json.dumps(workloads.get(scenario))}`", ""]
        lines += _point_table(result, scenario)
        lines.append("")
        for kind in ("ttft", "throughput", "tiers"):
            image = images.get(f"{scenario}_{kind}")
            if image:
                lines.append(f"![{scenario} {kind}]({image})")
        lines.append("")
    peer = result.get("peer_check")
    if peer:
        lines += _peer_table(peer)
    lines += [
        "## Notes",
        "",
        "- CPU engines on a shared, noisy machine: compare the arms within this run; "
        "absolute numbers are not GPU numbers.",
        "- TTFT is taken at the first streamed chunk with text; TPOT = (E2E - TTFT) / "
        "(output tokens - 1); outputs have a fixed length (`ignore_eos`).",
        "- cached = prompt tokens the engine reported as cached "
        "(`usage.prompt_tokens_details.cached_tokens`: device prefix cache + symram); "
        "recomputed = prompt tokens vLLM computed (`vllm:prompt_tokens_by_source`).",
    ]
    if result.get("status") != "complete":
        lines.append(f"- **This run is {result.get('status')}: the tables hold the points "
                     "that finished.**")
    return "\n".join(lines) + "\n"


def write_report(result: Mapping[str, Any], out_dir: Path, name: str = "ab") -> dict[str, Path]:
    """Write NAME.md and NAME_<scenario>_<plot>.png; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    images: dict[str, str] = {}
    for scenario, table in result.get("results", {}).items():
        if not table:
            continue
        for kind, plot in (("ttft", plot_ttft), ("throughput", plot_throughput),
                           ("tiers", plot_tiers)):
            path = out_dir / f"{name}_{scenario}_{kind}.png"
            plot(result, path, scenario)
            written[f"{scenario}_{kind}"] = path
            images[f"{scenario}_{kind}"] = path.name
    md = out_dir / f"{name}.md"
    md.write_text(render_markdown(result, images))
    written["markdown"] = md
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Render the A/B report from its JSON.")
    parser.add_argument("json_path", type=Path)
    args = parser.parse_args(argv)
    result = json.loads(args.json_path.read_text())
    for path in write_report(result, args.json_path.parent, args.json_path.stem).values():
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
