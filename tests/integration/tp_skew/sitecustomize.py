"""Test-only: make one tensor-parallel rank report its tier events steps late.

tests/integration/test_engine_tp2.py puts this directory on an engine's PYTHONPATH, so
every process of that engine (the TP workers included) runs this at start-up. When
``symram_vllm.connectors.worker`` is imported, ``WorkerSide.build_worker_meta`` is
wrapped: on rank ``SYMRAM_TEST_DEFER_RANK`` every tier event is held back for
``SYMRAM_TEST_DEFER_STEPS`` calls (steps) before it reaches the scheduler, in order,
while the meta says ``pending`` so the engine keeps stepping until they are out. The
other rank reports at once, so each block's ranks report in different steps. Each
deferral appends ``<pid> <keys>`` to ``SYMRAM_TEST_DEFER_LOG``: the proof it happened.
Nothing of symram is edited; without the variables set this file does nothing.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

TARGET = "symram_vllm.connectors.worker"


def _patch(module) -> None:
    cls = module.WorkerSide
    original = cls.build_worker_meta
    rank = int(os.environ["SYMRAM_TEST_DEFER_RANK"])
    delay = int(os.environ.get("SYMRAM_TEST_DEFER_STEPS", "2"))
    log = os.environ.get("SYMRAM_TEST_DEFER_LOG")

    def build_worker_meta(self):
        meta = original(self)
        if self.rank != rank:
            return meta
        state = self.__dict__.setdefault("_test_deferred", {"calls": 0, "held": []})
        state["calls"] += 1
        now = state["calls"]
        events = list(meta.events) if meta is not None else []
        state["held"] += [(now + delay, event) for event in events]
        due = [event for at, event in state["held"] if at <= now]
        state["held"] = [(at, event) for at, event in state["held"] if at > now]
        if events and log:
            with open(log, "a") as f:
                f.write(f"{os.getpid()} {sum(len(e.keys) for e in events)}\n")
        if meta is None and not due and not state["held"]:
            return None
        out = meta if meta is not None else module.SymramWorkerMetadata()
        out.events = due
        out.pending = out.pending or bool(state["held"])
        return out

    cls.build_worker_meta = build_worker_meta


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module) -> None:
            exec_module(module)
            _patch(module)

        spec.loader.exec_module = exec_and_patch
        return spec


if os.environ.get("SYMRAM_TEST_DEFER_RANK"):
    sys.meta_path.insert(0, _PatchOnImport())
