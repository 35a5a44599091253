"""An exception anywhere in a copy job is an outcome, never a vanished future.

Audit finding (issue J.1): a load that raised was still reported in
``finished_recving`` with no load errors, so vLLM attended to whatever its blocks
held. Here the n-th copy raises (``CopyFaults``, the same hook ``SYMRAM_FAULT_COPY``
sets in a real engine), for loads and saves, under every fixed-size codec.
"""

from __future__ import annotations

import pytest
import torch

from symram_vllm.config import SymramConfig
from symram_vllm.connectors.faults import CopyFaults, InjectedCopyFault
from symram_vllm.connectors.metadata import BlockJob, SymramConnectorMetadata
from symram_vllm.connectors.worker import WorkerSide
from tests.test_connector_halves import BS, drain, kv_caches

CODECS = ["none", "int8", "fp8"]
KEYS = [bytes([i + 1]) * 32 for i in range(3)]


def worker_with(codec: str, faults: str) -> tuple[WorkerSide, dict[str, torch.Tensor]]:
    kv = kv_caches(3)
    worker = WorkerSide(SymramConfig(dram_bytes=16 * 2 * 2 * BS * 64 * 2, codec=codec), rank=0)
    worker.register_kv_caches(kv)
    assert worker.mover is not None
    worker.mover.faults = CopyFaults.parse(faults)
    return worker, kv


def save(worker: WorkerSide, req: str, blocks: list[int]) -> None:
    worker.submit_saves(SymramConnectorMetadata(saves=[BlockJob(req, blocks, KEYS)]))
    drain(worker)


@pytest.mark.parametrize("codec", CODECS)
def test_a_load_that_raises_fails_every_block_of_its_job(codec):
    worker, kv = worker_with(codec, "load:2")
    save(worker, "w", [1, 2, 3])
    worker.start_loads(SymramConnectorMetadata(loads=[BlockJob("ok", [4, 5, 6], KEYS)]))
    drain(worker)
    assert worker.take_load_errors() == set()
    marker = {name: t[[0, 7]].clone() for name, t in kv.items()}
    worker.start_loads(SymramConnectorMetadata(loads=[BlockJob("bad", [0, 7], KEYS[:2])]))
    _, recving = drain(worker)
    # Reported finished so vLLM moves on, but every block of the job is a load error:
    # vLLM recomputes them instead of attending to stale KV.
    assert recving == {"bad"}
    assert worker.take_load_errors() == {0, 7}
    for name, t in kv.items():
        assert torch.equal(t[[0, 7]], marker[name])  # the fault struck before any write
    counters, _ = worker.take_counters()
    assert counters["load_job_errors"] == 1 and counters["load_failed_blocks"] == 2


@pytest.mark.parametrize("codec", CODECS)
def test_a_save_that_raises_publishes_nothing_and_frees_its_rows(codec):
    worker, _ = worker_with(codec, "save:1")
    free_before = worker.store.dram.free_slots()
    save(worker, "w", [1, 2, 3])
    meta = worker.build_worker_meta()
    # The keys are processed (the scheduler stops waiting) but none is stored.
    assert meta is not None and meta.processed == KEYS and meta.keys("local", "stored") == []
    assert worker.store.dram.free_slots() == free_before
    assert not any(worker.store.contains(k) for k in worker_keys(worker))
    counters, _ = worker.take_counters()
    assert counters["save_job_errors"] == 1 and counters.get("saved_blocks", 0) == 0
    # The next save of the same blocks works: nothing was left reserved.
    save(worker, "w2", [1, 2, 3])
    assert worker.build_worker_meta().keys("local", "stored") == KEYS


def worker_keys(worker: WorkerSide):
    from symram_vllm.keys import BlockKey

    return [BlockKey(k, worker.rank) for k in KEYS]


def test_a_future_that_raises_still_fails_its_blocks():
    # Last line of defence: even a future that raises (the runner itself broke) turns
    # into load errors for the job's blocks.
    from concurrent.futures import Future

    worker, _ = worker_with("none", "")
    future: Future = Future()
    future.set_exception(RuntimeError("runner broke"))
    job = BlockJob("r", [3, 4], KEYS[:2])
    worker.jobs.loads["r"] = (job, future)
    _, recving = worker.get_finished(set())
    assert recving == {"r"} and worker.take_load_errors() == {3, 4}


def test_a_load_that_cannot_be_submitted_fails_its_blocks():
    worker, _ = worker_with("none", "")

    def broken(fn):
        raise RuntimeError("pool shut down")

    worker.runner.submit = broken  # type: ignore[method-assign]
    worker.start_loads(SymramConnectorMetadata(loads=[BlockJob("r", [1, 2], KEYS[:2])]))
    _, recving = worker.get_finished(set())
    assert recving == {"r"} and worker.take_load_errors() == {1, 2}


def test_fault_spec_is_validated():
    assert CopyFaults.parse("save:1, load:3").fail_at == {"save": 1, "load": 3}
    for bad in ("copy:1", "load:0", "load:x", "load"):
        with pytest.raises(ValueError, match="SYMRAM_FAULT_COPY"):
            CopyFaults.parse(bad)
    faults = CopyFaults.parse("load:2")
    faults.check("load")
    faults.check("save")
    with pytest.raises(InjectedCopyFault):
        faults.check("load")
    faults.check("load")  # only the n-th call
