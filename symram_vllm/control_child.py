"""The control endpoint's own process (see ``symram_vllm.control``).

Started by ``ControlServer.start`` in the vLLM worker as
``python -m symram_vllm.control_child --listen-fd N --link-fd M ...`` with the bound
listening socket and its end of the control link inherited. It lowers its CPU
priority, reads its settings (the token among them: never on the command line, where
``ps`` shows it) from the link's first frame, and serves the control app behind the
guard with uvicorn until one of these happens:

* the worker asks it to stop (``STOP``) or sends SIGTERM;
* the worker's end of the link closes (the worker stopped or died);
* its parent process changes (the worker died while something else holds the link).

It imports neither torch nor vLLM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import sys
import threading
from typing import Any

from symram_vllm import control_link as wire

logger = logging.getLogger("symram.control_child")
PARENT_CHECK_S = 1.0


def _read_config(link: socket.socket) -> dict[str, Any]:
    buffer = bytearray()
    while True:
        frames = wire.split_frames(buffer)
        if frames:
            op, _, payload = frames[0]
            if op != wire.CONFIG:
                raise RuntimeError(f"expected the control settings first, got op {op}")
            if len(frames) > 1 or buffer:
                raise RuntimeError("the worker spoke before the child was ready")
            return json.loads(payload)
        chunk = link.recv(1 << 16)
        if not chunk:
            raise SystemExit(0)  # the worker went away before we started
        buffer += chunk


async def _serve(listen: socket.socket, link: socket.socket, config: dict[str, Any],
                 parent_pid: int) -> None:
    import uvicorn

    from symram_vllm.control import RemoteEngine, build_control_app
    from symram_vllm.control_guard import ControlGuard, ControlLimits

    reader, writer = await asyncio.open_unix_connection(sock=link)
    engine = RemoteEngine(reader, writer)
    app = build_control_app(engine, int(config["rank"]), config["info"])
    guard = ControlGuard(app, config["token"], ControlLimits(**config["limits"]))
    server = uvicorn.Server(uvicorn.Config(
        guard, loop="asyncio", http="h11", lifespan="off", log_level="warning",
        access_log=False, limit_concurrency=128, timeout_keep_alive=5,
        timeout_graceful_shutdown=2,
    ))

    async def on_request(op: int, rid: int, payload: bytes) -> None:
        if op == wire.GUARD_STATS:
            budget = guard.budget
            engine.reply(op, rid, {
                "refused": dict(guard.refused), "pid": os.getpid(),
                "tid": threading.get_native_id(),
                "budget": None if budget is None else {
                    "charged_s": budget.charged_s, "throttled_s": budget.throttled_s,
                    "waiting": budget.waiting},
            })
        elif op == wire.STOP:
            engine.reply(op, rid, {})
            server.should_exit = True
        else:
            writer.write(wire.frame(op | wire.ERROR, rid, b'"unknown op"'))

    async def link_watch() -> None:
        await engine.serve(on_request)
        server.should_exit = True  # the worker's end closed: nothing left to serve

    async def parent_watch() -> None:
        while os.getppid() == parent_pid:
            await asyncio.sleep(PARENT_CHECK_S)
        logger.warning("symram control: the engine process is gone; stopping")
        server.should_exit = True

    async def announce() -> None:
        while not server.started:
            if server.should_exit:
                return
            await asyncio.sleep(0.01)
        writer.write(wire.frame(wire.READY, 0))

    tasks = [asyncio.create_task(job()) for job in (link_watch, parent_watch, announce)]
    try:
        await server.serve(sockets=[listen])
    finally:
        for task in tasks:
            task.cancel()
        writer.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="symram control endpoint process")
    parser.add_argument("--listen-fd", type=int, required=True)
    parser.add_argument("--link-fd", type=int, required=True)
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--nice", type=int, default=10)
    parser.add_argument("--rank", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format=f"%(levelname)s symram control r{args.rank}: %(message)s")
    try:
        os.nice(args.nice)
    except OSError as exc:
        logger.warning("cannot lower the control process's priority: %s", exc)
    listen = socket.socket(fileno=args.listen_fd)
    link = socket.socket(fileno=args.link_fd)
    if os.getppid() != args.parent_pid:
        return 0  # the worker is already gone
    config = _read_config(link)
    listen.setblocking(False)
    link.setblocking(False)
    asyncio.run(_serve(listen, link, config, args.parent_pid))
    return 0


if __name__ == "__main__":
    sys.exit(main())
