"""The `symram` command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from symram_vllm.config import ConfigError, parse_bytes

EPILOG = """examples:
  symram demo-model .symram/models/mid --size mid
  symram serve .symram/models/mid --port 8000
  symram serve MODEL --kv-connector symram --dram-bytes 16GiB -- --max-model-len 8192
  symram doctor
  symram up                      # redis + vLLM/symram engine(s) + gateway on :8000
  symram ab --smoke              # Locust A/B: vanilla vLLM vs vLLM+symram
"""


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
    vllm_args = list(getattr(args, "vllm_args", []))
    options = ServeOptions(
        model=args.model,
        host=args.host,
        port=args.port,
        kv_connector=args.kv_connector,
        extra_config=extra,
        vllm_args=vllm_args,
    )
    return serve(options, dry_run=args.dry_run)


def _cmd_doctor(_args: argparse.Namespace) -> int:
    from symram_vllm import capability
    from symram_vllm.config import load_config
    from symram_vllm.serving.launcher import vllm_distribution

    try:
        config = load_config()
    except ConfigError as exc:
        print(f"config: ERROR {exc}")
        return 1
    report = {
        "vllm_distribution": vllm_distribution() or "not installed",
        **capability.describe(),
        "config": config.model_dump(mode="json"),
    }
    print(json.dumps(report, indent=2))
    return 0


def _cmd_up(args: argparse.Namespace) -> int:
    from symram_vllm.serving.stack import UpOptions, up

    options = UpOptions(
        model=args.model, size=args.size, instances=args.instances, host=args.host,
        port=args.port, dram_bytes=args.dram_bytes, disk_bytes=args.disk_bytes,
        state_dir=args.state_dir, redis=not args.no_redis, gateway=not args.no_gateway,
        vllm_args=list(getattr(args, "vllm_args", [])),
    )
    return up(options)


def _cmd_ab(args: argparse.Namespace) -> int:
    return run_ab(list(args.ab_args))


def run_ab(argv: list[str]) -> int:
    # The A/B runner lives in the repository's loadtest/, next to this package.
    root = Path(__file__).resolve().parent.parent
    if not (root / "loadtest" / "ab.py").exists():
        print("symram ab: loadtest/ab.py not found; run it from a symram checkout "
              "(python -m loadtest.ab)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(root))
    from loadtest.ab import main as ab_main

    return ab_main(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="symram",
        description="Tiered, content-addressed KV cache for vLLM.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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
        description="Expands to vLLM's server with --kv-transfer-config "
        '\'{"kv_connector":"symram","kv_role":"kv_both"}\' and '
        "--prefix-caching-hash-algo sha256_cbor, prints the command, waits for "
        "health and prints a sample request. Arguments after `--` go to vLLM.",
    )
    serve.add_argument("model", help="model path or name, as for `vllm serve`")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--kv-connector",
        default="symram",
        help="symram (default) or none for a vanilla vLLM baseline",
    )
    serve.add_argument("--dram-bytes", help="DRAM tier budget, e.g. 8GiB (default 4GiB)")
    serve.add_argument("--symram-config", type=Path, help="YAML config file for symram")
    serve.add_argument("--dry-run", action="store_true", help="print the vLLM command only")
    serve.set_defaults(func=_cmd_serve)

    up = sub.add_parser(
        "up",
        help="start redis + vLLM/symram engine(s) + gateway; Ctrl-C stops all",
        description="One-command local stack: redis-server (if installed), N vLLM + "
        "symram engines with control ports and the Redis directory, and the gateway on "
        "--port. Waits for health, prints the URL and a sample request; logs go to "
        "STATE_DIR/logs. Arguments after `--` go to every vLLM engine.",
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

    ab = sub.add_parser(
        "ab", help="Locust A/B load test: vanilla vLLM vs vLLM+symram (python -m loadtest.ab)",
        add_help=False,
    )
    ab.add_argument("ab_args", nargs=argparse.REMAINDER, help="options of python -m loadtest.ab")
    ab.set_defaults(func=_cmd_ab)

    from symram_vllm.snapshot_cli import add_commands as add_snapshot_commands

    add_snapshot_commands(sub)

    doctor = sub.add_parser("doctor", help="show capabilities (CUDA, pinned memory, kvikio)")
    doctor.set_defaults(func=_cmd_doctor)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["ab"]:  # all of it, --help and `--` included, is the runner's
        return run_ab(argv[1:])
    # Everything after `--` belongs to vLLM, untouched by our parser.
    passthrough: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, passthrough = argv[:cut], argv[cut + 1 :]
    args = parser.parse_args(argv)
    args.vllm_args = passthrough
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
