"""Block ids of vLLM's hybrid allocator, as the scheduler side hands them to workers.

A model with several KV-cache groups (full attention, sliding window, ...) gives
each group its own block ids for the same token blocks. A sliding-window ("windowed")
group frees blocks that leave the window under a running request, and its block
table then holds vLLM's null block there. Two consequences:

* a load writes every group's blocks, skipping (-1) a windowed group's unallocated
  ones: there is nothing of that group to restore outside its window;
* a block freed under one request can be handed to another in the same step, so the
  workers must finish reading it (a save in flight) before the step's forward pass
  overwrites it: ``allocated_blocks`` names this step's newly handed-out blocks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vllm.v1.core.sched.output import SchedulerOutput

# vLLM's null block: what a sliding-window group's block table holds for blocks that
# left the window (block 0 of the pool is reserved for it, never allocated).
NULL_BLOCK_ID = 0


def load_targets(
    req_id: str, windowed_groups: frozenset[int], all_ids: tuple[list[int], ...],
    start: int, count: int,
) -> list[list[int]]:
    """Every group's block ids for a load of `count` blocks from `start`; -1 where
    a windowed group left a block unallocated (outside its window at the hit's
    end: nothing to load there)."""
    targets: list[list[int]] = []
    for group, ids in enumerate(all_ids):
        part = list(ids[start : start + count])
        if len(part) != count:
            raise RuntimeError(
                f"symram: request {req_id} has {len(part)} block ids in "
                f"KV-cache group {group} for a {count}-block load from block {start}"
            )
        if group in windowed_groups:
            part = [-1 if b == NULL_BLOCK_ID else b for b in part]
        elif NULL_BLOCK_ID in part:
            raise RuntimeError(
                f"symram: request {req_id} got vLLM's null block in "
                f"full-attention KV-cache group {group} for a load from block {start}"
            )
        targets.append(part)
    return targets


def allocated_blocks(scheduler_output: SchedulerOutput) -> list[int]:
    """Engine blocks (every group) handed to requests this step: new requests' tables
    and running requests' new blocks."""
    blocks: set[int] = set()
    for req in scheduler_output.scheduled_new_reqs:
        for ids in req.block_ids:
            blocks.update(ids)
    for new in scheduler_output.scheduled_cached_reqs.new_block_ids:
        for ids in new or ():
            blocks.update(ids)
    blocks.discard(NULL_BLOCK_ID)
    return sorted(blocks)
