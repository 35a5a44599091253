"""The `symram` command line.

Importing this module and building the parser imports neither torch nor vLLM: each
command imports what it needs when it runs, so `symram --help`, `symram gateway` and
`symram doctor` work on a gateway-only install.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from symram_vllm import __version__

EPILOG = """examples:
  symram up                      # redis + vLLM/symram engine(s) + gateway on :8000
  symram serve MODEL --port 8000 --max-model-len 8192   # vLLM's own flags pass through
  symram serve MODEL --dram-bytes 16G -- --enforce-eager
  symram gateway --backend http://127.0.0.1:8001 --backend http://127.0.0.1:8002
  symram stats                   # tier occupancy and hit rates of a running engine
  symram inspect "def fibonacci(n):" --engine http://127.0.0.1:8000
  symram pin "<system prompt>" --ttl 3600
  symram bypass on --reason "suspect cache"   # kill switch; `symram bypass off` resumes
  symram doctor [--config]
  symram demo-model .symram/models/mid --size mid

The A/B load test is a repository tool, not part of the package: `make ab`
(python -m loadtest.ab) in a symram checkout.
"""

# Commands whose unknown arguments belong to vLLM.
PASSTHROUGH = ("serve", "up")


def _cmd_demo_model(args: argparse.Namespace) -> int:
    from symram_vllm.demo_model import build_demo_model, spec_for

    try:
        spec_for(args.size, args.arch)
    except ValueError as exc:
        print(f"symram demo-model: {exc}")
        return 2
    path = build_demo_model(Path(args.path) if args.path else None, args.size, force=args.force,
                            arch=args.arch)
    print(path)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from symram_vllm.config import parse_bytes
    from symram_vllm.serving.launcher import ServeOptions, serve

    extra: dict[str, object] = {}
    if args.dram_bytes is not None:
        try:
            extra["dram_bytes"] = parse_bytes(args.dram_bytes)
        except ValueError as exc:
            print(f"symram serve: --dram-bytes: {exc}", file=sys.stderr)
            return 2
    if args.symram_config:
        extra["config_file"] = str(args.symram_config)
    options = ServeOptions(
        model=args.model,
        host=args.host,
        port=args.port,
        kv_connector=args.kv_connector,
        extra_config=extra,
        vllm_args=list(args.vllm_args),
    )
    return serve(options, dry_run=args.dry_run)


def _cmd_doctor(args: argparse.Namespace) -> int:
    from symram_vllm import doctor

    return doctor.run(show_config=args.config)


def _cmd_up(args: argparse.Namespace) -> int:
    from symram_vllm.serving.stack import UpOptions, up

    options = UpOptions(
        model=args.model, size=args.size, instances=args.instances, host=args.host,
        port=args.port, dram_bytes=args.dram_bytes, disk_bytes=args.disk_bytes,
        state_dir=args.state_dir, redis=not args.no_redis, gateway=not args.no_gateway,
        vllm_args=list(args.vllm_args),
    )
    return up(options)


# The snapshot tools import the disk tier (torch): their parser is built only when one
# of them runs, so `symram --help` stays torch-free.
SNAPSHOT_COMMANDS = {
    "snapshot": "write a tamper-evident manifest of a (stopped) engine's disk tier",
    "restore": "verify a snapshot and make the next engine start use it",
}


def _cmd_snapshot_tool(argv: list[str]) -> int:
    from symram_vllm.snapshot_cli import add_commands

    parser = argparse.ArgumentParser(prog="symram")
    add_commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


def _cmd_gateway(args: argparse.Namespace) -> int:
    from symram_vllm.serving.gateway.__main__ import main as gateway_main

    return gateway_main(args.gateway_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="symram",
        description="Tiered, content-addressed KV cache for vLLM.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"symram {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo-model",
        help="build the deterministic offline demo/test model",
        description="Train a byte-level BPE tokenizer on the Python stdlib and save a "
        "random-weight Llama with a fixed seed. Nothing is downloaded; an existing "
        "build with the same config hash is reused.",
    )
    demo.add_argument("path", nargs="?", help="output directory (default: ~/.cache/symram/models)")
    demo.add_argument("--size", default="tiny", help="tiny (2 layers), mid (8 layers, ~58M) or "
                      "tiny-induction (tiny with a copy circuit, for codec accuracy) or "
                      "trained (a small Llama trained on the stdlib, committed weights)")
    demo.add_argument("--arch", default="llama", help="model family: llama, qwen3, gemma3, "
                      "deepseek-mla or granite-hybrid (docs/models.md)")
    demo.add_argument("--force", action="store_true", help="rebuild even if cached")
    demo.set_defaults(func=_cmd_demo_model)

    serve = sub.add_parser(
        "serve",
        help="start vLLM's OpenAI server with the symram connector",
        description="Starts vLLM's OpenAI server (python -m "
        "vllm.entrypoints.launchers.api_server.entry) with --kv-transfer-config "
        '\'{"kv_connector":"symram","kv_role":"kv_both"}\' and '
        "--prefix-caching-hash-algo sha256_cbor, prints the command, waits for "
        "health and prints a sample request. Every option not listed here is vLLM's and "
        "is passed to it as given (after `--` too).",
        usage="symram serve MODEL [options] [vLLM options ...] [-- vLLM options ...]",
        allow_abbrev=False,  # a vLLM flag must never be read as an abbreviation of ours
    )
    serve.add_argument("model", help="model path or name, as for `vllm serve`")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--kv-connector",
        default="symram",
        help="symram (default) or none for a vanilla vLLM baseline",
    )
    serve.add_argument("--dram-bytes", help="DRAM tier budget, e.g. 8G (= 8 GiB; default 4G)")
    serve.add_argument("--symram-config", type=Path, help="YAML config file for symram")
    serve.add_argument("--dry-run", action="store_true", help="print the vLLM command only")
    serve.set_defaults(func=_cmd_serve)

    up = sub.add_parser(
        "up",
        help="start redis + vLLM/symram engine(s) + gateway; Ctrl-C stops all",
        description="One-command local stack: redis-server (if installed), N vLLM + "
        "symram engines with control ports and the Redis directory, and the gateway on "
        "--port. Waits for health, prints the URL and a sample request; logs go to "
        "STATE_DIR/logs. Options not listed here (and those after `--`) go to every "
        "vLLM engine.",
        allow_abbrev=False,
    )
    up.add_argument("--model", help="model path or name (default: the demo model)")
    up.add_argument("--size", default="mid", help="demo model size when --model is unset")
    up.add_argument("--instances", type=int, default=1, help="vLLM engines (default 1)")
    up.add_argument("--host", default="127.0.0.1", help="gateway bind address")
    up.add_argument("--port", type=int, default=8000, help="public (gateway) port")
    up.add_argument("--dram-bytes", default="4GiB", help="DRAM tier budget per engine")
    up.add_argument("--disk-bytes", default="8GiB", help="disk tier budget per engine (0: off)")
    up.add_argument("--state-dir", type=Path, default=Path(".symram"),
                    help="models, disk tiers and logs (default .symram)")
    up.add_argument("--no-redis", action="store_true", help="embedded directory, no Redis")
    up.add_argument("--no-gateway", action="store_true", help="serve engine 0 directly")
    up.set_defaults(func=_cmd_up)

    gateway = sub.add_parser(
        "gateway", add_help=False,
        help="the OpenAI-compatible gateway with KV-aware routing (symram gateway --help)")
    gateway.add_argument("gateway_args", nargs=argparse.REMAINDER)
    gateway.set_defaults(func=_cmd_gateway)

    from symram_vllm.ops_cli import add_commands as add_ops_commands

    add_ops_commands(sub)
    for name, summary in SNAPSHOT_COMMANDS.items():
        tool = sub.add_parser(name, add_help=False, help=f"{summary} (symram {name} --help)")
        tool.add_argument("tool_args", nargs=argparse.REMAINDER)

    doctor = sub.add_parser(
        "doctor", help="check this host (vLLM, torch/CUDA, Redis, disk) and the config",
        description="Checks the vLLM version, CUDA/pinned memory/kvikio, that the "
        "configured Redis answers, and free disk space against disk_bytes; exit status 1 "
        "when a check fails.")
    doctor.add_argument("--config", action="store_true",
                        help="print the resolved configuration (defaults < file < SYMRAM_* "
                        "env) and exit")
    doctor.set_defaults(func=_cmd_doctor)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["gateway"]:  # all of it, --help included, is the gateway's
        return _cmd_gateway(argparse.Namespace(gateway_args=argv[1:]))
    if argv[:1] and argv[0] in SNAPSHOT_COMMANDS:
        return _cmd_snapshot_tool(argv)
    # Everything after `--` belongs to vLLM, untouched by our parser.
    passthrough: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, passthrough = argv[:cut], argv[cut + 1 :]
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.command not in PASSTHROUGH:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if passthrough and args.command not in PASSTHROUGH:
        parser.error(f"`--` passes arguments to vLLM; `symram {args.command}` takes none")
    args.vllm_args = unknown + passthrough
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
