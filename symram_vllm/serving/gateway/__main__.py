"""``symram gateway`` (or ``python -m symram_vllm.serving.gateway``): run the gateway
under uvicorn."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from symram_vllm.serving.gateway.config import (
    DEFAULT_CONTROL_PORT_OFFSET,
    BackendConfig,
    ConfigError,
    GatewayConfig,
    load_gateway_config,
)

EPILOG = f"""\
backends:
  --backend URL[,control=URL][,name=NAME][,max_inflight=N]   (repeatable)
  --control URL     control endpoint of the --backend just before it
  A backend without a control URL gets http://HOST:(PORT + --control-port-offset)
  (default offset {DEFAULT_CONTROL_PORT_OFFSET}: engine :8000 -> control :9100). The control
  endpoint is what an engine started with SYMRAM_CONTROL_PORT serves; without one the
  gateway still proxies to the engine but cannot route by prefix or prefetch.

examples:
  symram gateway --port 8000 \\
      --backend http://127.0.0.1:8001,control=http://127.0.0.1:9101 \\
      --backend http://127.0.0.1:8002 --control http://127.0.0.1:9102
  symram gateway --config gateway.yaml

Settings not on the command line (API keys, tenants, limits, timeouts, routing weights)
come from --config (YAML) and SYMRAM_GATEWAY_* environment variables; command-line
values win over both. See docs/gateway.md.
"""


class _Ordered(argparse.Action):
    """Keeps --backend and --control in the order given, so each --control pairs with
    the --backend before it."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        items = getattr(namespace, "endpoints", None) or []
        items.append((self.dest, values))
        namespace.endpoints = items


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="symram gateway",
        description="OpenAI-compatible gateway in front of vLLM + symram engines: routes each "
        "request to the engine whose KV tiers hold the longest prefix of its prompt, "
        "prefetches that prefix from disk on arrival, and adds API keys with per-tenant cache "
        "isolation, rate limits, Prometheus metrics (/metrics) and a dashboard (/dashboard).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="listen port (default 8000)")
    parser.add_argument("--backend", action=_Ordered, dest="backend", metavar="URL[,opts]",
                        help="an engine's OpenAI base URL (repeatable; replaces the config's "
                        "backends)")
    parser.add_argument("--discover", action="append", metavar="URL[,control_port=N]",
                        help="a DNS name whose every address is an engine, e.g. a Kubernetes "
                        "headless service: http://symram-engine:8000 (repeatable)")
    parser.add_argument("--control", action=_Ordered, dest="control", metavar="URL",
                        help="control endpoint of the preceding --backend")
    parser.add_argument("--control-port-offset", type=int, metavar="N",
                        help="control port = backend port + N for backends without one "
                        f"(default {DEFAULT_CONTROL_PORT_OFFSET})")
    parser.add_argument("--no-control", action="store_true",
                        help="no control endpoints: proxy and balance without prefix routing")
    parser.add_argument("--config", metavar="FILE", help="YAML config file")
    parser.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug"))
    parser.add_argument("--check", action="store_true",
                        help="validate the configuration, print it (secrets hidden) and exit")
    return parser


def _backends(endpoints: Sequence[tuple[str, str]]) -> list[dict[str, Any]]:
    backends: list[dict[str, Any]] = []
    for kind, value in endpoints:
        if kind == "backend":
            backends.append(BackendConfig.parse(value).model_dump(exclude_none=True))
        elif not backends:
            raise ValueError(f"--control {value} comes before any --backend")
        elif backends[-1].get("control_url"):
            raise ValueError(f"backend {backends[-1]['url']} already has a control URL")
        else:
            backends[-1]["control_url"] = value
    return backends


def _discovery(spec: str) -> dict[str, Any]:
    url, *options = [part.strip() for part in spec.split(",")]
    out: dict[str, Any] = {"url": url}
    for option in options:
        name, _, value = option.partition("=")
        if name not in ("control_port", "interval_s"):
            raise ConfigError(f"--discover option {option!r}: expected control_port=N or "
                              "interval_s=S")
        out[name] = value
    return out


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    overrides: dict[str, Any] = {}
    for name in ("host", "port", "log_level", "control_port_offset"):
        value = getattr(args, name)
        if value is not None:
            overrides[name] = value
    if args.discover:
        overrides["discover"] = [_discovery(spec) for spec in args.discover]
    if args.no_control:
        overrides["control_port_offset"] = None
    endpoints = getattr(args, "endpoints", None) or []
    if endpoints:
        try:
            overrides["backends"] = _backends(endpoints)
        except ValueError as exc:
            raise ConfigError(f"invalid --backend/--control: {exc}") from exc
    return load_gateway_config(args.config, overrides)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        print(f"symram gateway: {exc}", file=sys.stderr)
        return 2
    if args.check:
        print(json.dumps(config.model_dump(mode="json"), indent=2))
        return 0
    if not config.backends and not config.discover:
        print("symram gateway: no backends: pass --backend URL or --discover URL (or "
              "backends:/discover: in --config)",
              file=sys.stderr)
        return 2

    import uvicorn

    from symram_vllm.serving.gateway.app import create_app

    logging.basicConfig(level=config.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(config)
    uvicorn.run(app, host=config.host, port=config.port, log_level=config.log_level,
                access_log=config.log_level == "debug",
                timeout_graceful_shutdown=int(config.timeouts.shutdown_grace_s) or None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
