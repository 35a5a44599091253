"""A whole `DirectoryBatch` in one pipelined round trip to Redis (or Redis Cluster).

Every command is an ``EVALSHA`` of the directory's scripts (or one ``HGETALL`` for the
dedupe counters), sent in one non-transactional pipeline; on a cluster, redis-py's
cluster pipeline splits it per node and every script's keys share the namespace's
hash slot. Scripts are called by SHA, not through redis-py's ``Script`` objects,
whose pipelines ask ``SCRIPT EXISTS`` first: a second round trip per batch. A server
that lost its scripts (restart, failover to a replica that never ran them) answers
``NOSCRIPT``; the scripts are then loaded and only those commands are sent again.

A lease query is split in chunks (one script call must not block Redis for long);
all its chunks go in the same pipeline, so a chunk after a miss may lease keys
nobody will load: those come back in ``over_leased`` for the caller to release.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis

from symram_vllm.directory import redis_scripts as lua
from symram_vllm.directory.base import DedupeStats
from symram_vllm.directory.batch import BatchResult, DirectoryBatch, WriteOp
from symram_vllm.redis_link import OUTAGE_ERRORS

if TYPE_CHECKING:
    from symram_vllm.directory.redis_directory import RedisDirectory

SCRIPTS = {
    "add": lua.ADD,
    "remove": lua.REMOVE,
    "record_store": lua.RECORD_STORE,
    "acquire": lua.ACQUIRE_LEASE,
    "release": lua.RELEASE_LEASE,
}
SHAS = {name: hashlib.sha1(src.encode()).hexdigest() for name, src in SCRIPTS.items()}
DEDUPE_FIELDS = ("logical_bytes", "physical_bytes", "logical_blocks", "physical_blocks")


@dataclass(frozen=True)
class Command:
    script: str | None  # None: the HGETALL of the dedupe counters
    keys: list[str]
    args: list[Any]
    # What the answer means: ("lease", query index, chunk keys) or ("write",) ...
    role: tuple[Any, ...]


def parse_dedupe(raw: Any) -> DedupeStats:
    values: dict[str, int] = {}
    if isinstance(raw, dict):
        for name in DEDUPE_FIELDS:
            with contextlib.suppress(TypeError, ValueError):
                values[name] = int(raw.get(name.encode(), 0))
    return DedupeStats(**values)


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


class RedisBatcher:
    def __init__(self, directory: RedisDirectory) -> None:
        self.d = directory
        self.round_trips = 0
        self.noscript_reloads = 0

    def preload(self) -> None:
        """Load the scripts now (start-up), so the first batch needs no NOSCRIPT retry."""
        if self.d.link.available:
            self.d.link.call(lambda r: [r.script_load(src) for src in SCRIPTS.values()], None)

    # -- commands ----------------------------------------------------------------------------
    def _write_commands(self, op: WriteOp) -> list[Command]:
        d, size = self.d, self.d.options.write_chunk
        out: list[Command] = []
        for chunk in _chunks(op.keys, size):
            if op.kind == "add":
                keys, args = d._block_keys(chunk), [d.location(op.tier or ""), d._ttl_ms]
                out.append(Command("add", keys, args, ("write",)))
            elif op.kind in ("remove", "remove_own"):
                args = d._drop_args(op.tier) if op.kind == "remove" else d._own_args(op.tier)
                out.append(Command("remove", d._block_keys(chunk), args, ("write",)))
            elif op.kind == "record_store":
                keys = [*d._block_keys(chunk), d.keys.stats]
                out.append(Command("record_store", keys, [op.nbytes, d._ttl_ms], ("write",)))
            else:
                leases = [d.keys.lease(k) for k in chunk]
                out.append(Command("release", leases, [d.instance_id], ("write",)))
        return out

    def commands(self, batch: DirectoryBatch, *, writes_only: bool = False) -> list[Command]:
        d = self.d
        out = [c for op in batch.writes for c in self._write_commands(op)]
        if writes_only:
            return out
        for index, query in enumerate(batch.leases):
            lease_ms = max(1, round(query.ttl_s * 1000))
            for chunk in _chunks(query.keys, d.options.lookup_chunk):
                out.append(Command(
                    "acquire", d._pair_keys(chunk), [*d._me(), lease_ms], ("lease", index, chunk)
                ))
        if batch.read_dedupe:
            out.append(Command(None, [d.keys.stats], [], ("dedupe",)))
        return out

    # -- the round trip ------------------------------------------------------------------------
    def _send(self, r: Any, commands: list[Command]) -> list[Any]:
        pipe = r.pipeline(transaction=False)
        for c in commands:
            if c.script is None:
                pipe.hgetall(c.keys[0])
            else:
                # execute_command: the cluster pipeline blocks its evalsha() helper
                pipe.execute_command("EVALSHA", SHAS[c.script], len(c.keys), *c.keys, *c.args)
        self.round_trips += 1
        results = pipe.execute(raise_on_error=False)
        for result in results:
            if isinstance(result, OUTAGE_ERRORS):
                raise result  # the link opens its breaker and queues the writes
        return list(results)

    def run(self, r: Any, commands: list[Command]) -> list[Any]:
        """Answers of `commands` in order (an exception object where one failed)."""
        if not commands:
            return []
        results = self._send(r, commands)
        missing = [i for i, res in enumerate(results)
                   if isinstance(res, redis.exceptions.NoScriptError)]
        if missing:
            self.noscript_reloads += 1
            for src in SCRIPTS.values():
                r.script_load(src)
            again = self._send(r, [commands[i] for i in missing])
            for i, res in zip(missing, again, strict=True):
                results[i] = res
        return results

    def apply(self, batch: DirectoryBatch) -> BatchResult:
        d = self.d
        commands = self.commands(batch)
        answers = d.link.call(lambda r: self.run(r, commands), None)
        if answers is None:
            if not d.link.available:  # an outage: replay the writes when Redis is back
                writes = self.commands(batch, writes_only=True)
                if writes:
                    d.link.write(lambda r: self.run(r, writes))
            return BatchResult(leased=[0] * len(batch.leases), ok=False)
        return self._read(batch, commands, answers)

    def _read(self, batch: DirectoryBatch, commands: list[Command], answers: list[Any]
              ) -> BatchResult:
        result = BatchResult(leased=[0] * len(batch.leases))
        stopped: set[int] = set()
        for command, answer in zip(commands, answers, strict=True):
            if isinstance(answer, Exception):
                self.d.link._error(answer)
                if command.role[0] == "lease":
                    stopped.add(command.role[1])
                continue
            if command.role[0] == "lease":
                _, index, chunk = command.role
                n = int(answer)
                if index in stopped:
                    result.over_leased.extend(chunk[:n])
                    continue
                result.leased[index] += n
                if n < len(chunk):
                    stopped.add(index)
            elif command.role[0] == "dedupe":
                result.dedupe = parse_dedupe(answer)
        for n in result.leased:
            self.d._count_lookup(n)
        return result
