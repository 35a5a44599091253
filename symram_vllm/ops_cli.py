"""`symram stats`, `inspect`, `pin` and `bypass`: an operator's view of a running
engine, through its control endpoint (``symram_vllm.control``).

The engine is found by ``--control URL`` (rank 0), else from the local config
(``control_host``/``control_port``, as ``symram doctor --config`` shows it). Every rank
answers on ``control_port + rank``; the commands ask each of them (``tp_size`` comes
from ``/symram/info``). ``inspect`` and ``pin`` take a prompt: its tokens come from the
engine's own ``/tokenize`` (``--engine``, or a gateway in front of it), its chain keys
are computed exactly as the gateway does (``serving/gateway/keys.py``). Nothing here
imports torch or vLLM.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

TIMEOUT_S = 10.0


class OpsError(RuntimeError):
    """A control endpoint could not be reached or refused; the message says which."""


def _local_config() -> Any:
    from symram_vllm.config import ConfigError, load_config

    try:
        return load_config()
    except ConfigError as exc:
        raise OpsError(f"the local config is invalid: {exc}") from exc


def control_token(given: str | None) -> str | None:
    """--token, else the local config's control_token / control_token_file (the value the
    engine was given, e.g. SYMRAM_CONTROL_TOKEN)."""
    if given:
        return given
    config = _local_config()
    if config.control_token is not None:
        return str(config.control_token.get_secret_value())
    if config.control_token_file is not None:
        try:
            return config.control_token_file.read_text().strip()
        except OSError as exc:
            raise OpsError(f"cannot read control_token_file: {exc}") from exc
    return None


def client(args: argparse.Namespace) -> httpx.Client:
    token = control_token(getattr(args, "token", None))
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(timeout=TIMEOUT_S, trust_env=False, headers=headers)


def control_base(given: str | None) -> str:
    if given:
        return given.rstrip("/")
    config = _local_config()
    if not config.control_port:
        raise OpsError("no --control URL given and control_port is not set in the local "
                       "config (SYMRAM_CONTROL_PORT); pass --control http://HOST:PORT")
    host = config.control_host if config.control_host not in ("0.0.0.0", "::") else "127.0.0.1"
    return f"http://{host}:{config.control_port}"


def _call(http: httpx.Client, method: str, url: str, body: Any = None) -> Any:
    try:
        response = http.request(method, url, json=body)
    except httpx.HTTPError as exc:
        raise OpsError(f"cannot reach {url}: {type(exc).__name__}: {exc} (is the engine "
                       "running with control_port set?)") from exc
    try:
        data = response.json()
    except ValueError:
        data = None
    if response.status_code == 401:
        raise OpsError(f"{url}: the control endpoint refused the token: pass --token, or set "
                       "control_token (SYMRAM_CONTROL_TOKEN) as on the engine")
    if response.status_code >= 400:
        message = (data or {}).get("error", {}).get("message") if isinstance(data, dict) \
            else None
        raise OpsError(f"{url}: HTTP {response.status_code}: {message or response.text[:200]}")
    return data


def rank_urls(http: httpx.Client, base: str) -> tuple[dict[str, Any], list[str]]:
    """(rank 0's info, the control URL of every rank)."""
    info = _call(http, "GET", f"{base}/symram/info")
    parts = urlsplit(base)
    tp = int(info.get("tp_size") or 1)
    port = parts.port or 80
    host = parts.netloc.rsplit(":", 1)[0] if parts.port else parts.netloc
    urls = [urlunsplit(parts._replace(netloc=f"{host}:{port + r}")) for r in range(tp)]
    return info, urls


def prompt_keys(http: httpx.Client, engine: str, info: dict[str, Any], prompt: str,
                chat: bool, model: str | None) -> tuple[list[int], list[bytes]]:
    from symram_vllm.serving.gateway.config import DEFAULT_NONE_HASH_SEED
    from symram_vllm.serving.gateway.keys import tier_keys

    engine = engine.rstrip("/")
    if model is None:
        models = _call(http, "GET", f"{engine}/v1/models").get("data") or []
        if not models:
            raise OpsError(f"{engine}/v1/models lists no model; pass --model")
        model = str(models[0]["id"])
    body: dict[str, Any] = {"model": model}
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    tokens = _call(http, "POST", f"{engine}/tokenize", body)["tokens"]
    seed = info.get("none_hash_seed") or DEFAULT_NONE_HASH_SEED
    keys = tier_keys(tokens, str(info["signature_digest"]), int(info["block_size"]), None,
                     seed=seed)
    return tokens, keys


# -- commands -------------------------------------------------------------------------
def _ratio(hit: float, total: float) -> str:
    return f"{100 * hit / total:.1f}%" if total else "-"


def summarize(per_rank: list[dict[str, float]]) -> dict[str, Any]:
    """Tier occupancy and hit rates, summed over ranks."""
    def total(name: str) -> float:
        return sum(float(s.get(name, 0.0)) for s in per_rank)

    dram_hits, disk_hits = total("stack_dram_hits"), total("stack_disk_hits")
    remote_hits, misses = total("stack_remote_hits"), total("stack_misses")
    reads = dram_hits + disk_hits + remote_hits + misses
    out: dict[str, Any] = {
        "ranks": len(per_rank),
        "dram": {"pages": int(total("dram_pages")), "used_bytes": int(total("dram_bytes_used")),
                 "capacity_bytes": int(total("dram_bytes_capacity"))},
        "hits": {"dram": int(dram_hits), "disk": int(disk_hits), "remote": int(remote_hits),
                 "misses": int(misses)},
        "hit_rate": (dram_hits + disk_hits + remote_hits) / reads if reads else None,
    }
    if any("disk_bytes_capacity" in s for s in per_rank):
        out["disk"] = {"pages": int(total("disk_pages")),
                       "used_bytes": int(total("disk_bytes_used")),
                       "capacity_bytes": int(total("disk_bytes_capacity"))}
    return out


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def cmd_stats(args: argparse.Namespace) -> int:
    with client(args) as http:
        info, urls = rank_urls(http, control_base(args.control))
        per_rank = [_call(http, "GET", f"{url}/symram/stats") for url in urls]
    summary = summarize(per_rank)
    if args.json:
        print(json.dumps({"info": info, "summary": summary, "ranks": per_rank}, indent=2))
        return 0
    print(f"engine {info.get('instance_id') or '-'} ({info.get('model') or '?'}), "
          f"{len(urls)} rank(s), codec {info.get('codec', '?')}")
    for tier in ("dram", "disk"):
        if tier in summary:
            t = summary[tier]
            print(f"  {tier:<5} {t['pages']:>9} pages  {_gib(t['used_bytes'])} of "
                  f"{_gib(t['capacity_bytes'])} "
                  f"({_ratio(t['used_bytes'], t['capacity_bytes'])})")
    h = summary["hits"]
    reads = h["dram"] + h["disk"] + h["remote"] + h["misses"]
    print(f"  reads {reads}: dram {h['dram']} ({_ratio(h['dram'], reads)}), disk {h['disk']} "
          f"({_ratio(h['disk'], reads)}), remote {h['remote']}, misses {h['misses']}")
    return 0


def _lookup_all(http: httpx.Client, urls: list[str], keys: list[bytes]) -> list[dict]:
    body = {"keys": [k.hex() for k in keys]}
    return [_call(http, "POST", f"{url}/symram/lookup", body) for url in urls]


def cmd_inspect(args: argparse.Namespace) -> int:
    with client(args) as http:
        info, urls = rank_urls(http, control_base(args.control))
        tokens, keys = prompt_keys(http, args.engine, info, args.prompt, args.chat,
                                   args.model)
        held = _lookup_all(http, urls, keys) if keys else [{"dram": 0, "disk": 0, "any": 0}
                                                               for _ in urls]
    block = int(info["block_size"])
    # A prefix is usable only as far as every rank holds it.
    prefix = {tier: min(h[tier] for h in held) for tier in ("dram", "disk", "any")}
    report = {"tokens": len(tokens), "full_blocks": len(keys), "block_size": block,
              "held_blocks": prefix, "held_tokens": prefix["any"] * block, "ranks": held}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"prompt: {len(tokens)} tokens, {len(keys)} full blocks of {block}")
    print(f"held: {prefix['any']} blocks ({prefix['any'] * block} tokens) in some tier; "
          f"leading run in DRAM {prefix['dram']}, on disk {prefix['disk']}")
    if len(urls) > 1:
        for rank, h in enumerate(held):
            print(f"  rank {rank}: dram {h['dram']}, disk {h['disk']}, any {h['any']}")
    return 0


def cmd_pin(args: argparse.Namespace) -> int:
    with client(args) as http:
        info, urls = rank_urls(http, control_base(args.control))
        _, keys = prompt_keys(http, args.engine, info, args.prompt, args.chat, args.model)
        if not keys:
            print("symram pin: the prompt has no full block; nothing to pin", file=sys.stderr)
            return 1
        body: dict[str, Any] = {"keys": [k.hex() for k in keys]}
        path = "unpin" if args.unpin else "pin"
        if not args.unpin:
            body["ttl_s"] = args.ttl
        results = [_call(http, "POST", f"{url}/symram/{path}", body) for url in urls]
    if args.unpin:
        print(f"unpinned {len(keys)} blocks on {len(urls)} rank(s)")
    else:
        pinned = min(int(r["pinned"]) for r in results)
        print(f"pinned {pinned} of {len(keys)} blocks for {args.ttl:.0f} s on {len(urls)} "
              "rank(s)" + ("" if pinned == len(keys) else
                           " (the rest is not held yet: send the prompt once, then pin)"))
    return 0


def cmd_bypass(args: argparse.Namespace) -> int:
    with client(args) as http:
        _, urls = rank_urls(http, control_base(args.control))
        if args.state == "status":
            states = [_call(http, "GET", f"{url}/symram/bypass") for url in urls]
        else:
            body = {"active": args.state == "on", "reason": args.reason or "",
                    "by": args.by or ""}
            states = [_call(http, "POST", f"{url}/symram/bypass", body) for url in urls]
    active = [bool(s.get("active")) for s in states]
    if args.state == "status":
        print("bypass is " + ("ON" if all(active) else "off" if not any(active) else
                              f"mixed across ranks {active}"))
    else:
        print(f"bypass {args.state} ({len(urls)} rank(s)): symram loads and saves are "
              + ("stopped" if args.state == "on" else "running"))
    return 0 if len(set(active)) == 1 else 1


def _wrap(func: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            return int(func(args))
        except OpsError as exc:
            print(f"symram {args.command}: {exc}", file=sys.stderr)
            return 1
    return run


def add_commands(sub: Any) -> None:
    def control(p: argparse.ArgumentParser) -> None:
        p.add_argument("--control", metavar="URL",
                       help="rank 0's control endpoint (default: from the local config)")
        p.add_argument("--token", help="the engines' control token (default: control_token "
                       "or control_token_file of the local config, SYMRAM_CONTROL_TOKEN)")

    def prompt(p: argparse.ArgumentParser) -> None:
        p.add_argument("prompt", help="the prompt text")
        p.add_argument("--engine", default="http://127.0.0.1:8000",
                       help="engine (or gateway) URL whose /tokenize to use "
                       "(default http://127.0.0.1:8000)")
        p.add_argument("--model", help="model name (default: the first the engine serves)")
        p.add_argument("--chat", action="store_true",
                       help="treat the prompt as one user chat message (chat template)")

    stats = sub.add_parser("stats", help="tier occupancy and hit rates of a running engine")
    control(stats)
    stats.add_argument("--json", action="store_true", help="machine-readable output")
    stats.set_defaults(func=_wrap(cmd_stats))

    inspect = sub.add_parser("inspect", help="whether a prompt's prefix is held, and where")
    control(inspect)
    prompt(inspect)
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    inspect.set_defaults(func=_wrap(cmd_inspect))

    pin = sub.add_parser("pin", help="keep a prompt's prefix resident for a TTL (or unpin)")
    control(pin)
    prompt(pin)
    pin.add_argument("--ttl", type=float, default=3600.0, help="seconds (default 3600)")
    pin.add_argument("--unpin", action="store_true", help="release a pinned prefix")
    pin.set_defaults(func=_wrap(cmd_pin))

    bypass = sub.add_parser(
        "bypass", help="kill switch: stop (on) or resume (off) symram in a running engine",
        description="`on` stops symram's loads and saves in a running engine without a "
        "restart (vLLM runs as if symram were absent; the tiers keep their pages); `off` "
        "resumes. Logged by the engine at WARNING, shown as symram:bypass_active.")
    bypass.add_argument("state", choices=("on", "off", "status"))
    control(bypass)
    bypass.add_argument("--reason", help="why (goes to the engine's audit log)")
    bypass.add_argument("--by", help="who (default: the caller's address)")
    bypass.set_defaults(func=_wrap(cmd_bypass))
