"""Moves a whole job of engine blocks in and out of tier pages, through the codec.

A job is n engine blocks and n rows of the DRAM arena (``[slots, page_bytes]``).

* Codec ``none``: a page is the block's raw bytes in canonical order, moved with
  ``KVLayout.save_blocks``/``load_blocks``: one device operation per layer (one per
  job on block-major caches and on the Triton path), never one per block.
* ``int8``/``fp8``: one ``encode_blocks``/``decode_blocks`` call per job, one kernel
  launch per layer, written straight into the arena rows.

Device work is asynchronous on CUDA (the caller runs it on a side stream); every
method returns only after the bytes have landed (``fence``), because the caller
publishes saved rows to readers and hands loaded blocks back to vLLM right after.
The check for inf/NaN scale groups is read after that same fence, so the save path
has no extra host sync.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from symram_vllm.codecs import get_codec
from symram_vllm.codecs.base import FixedSizeCodec, PageGeometry
from symram_vllm.connectors.faults import CopyFaults
from symram_vllm.layout import KVLayout


class PageMover:
    def __init__(
        self, layout: KVLayout, codec_name: str = "none", faults: CopyFaults | None = None
    ) -> None:
        self.layout = layout
        self.codec_name = codec_name
        self.faults = faults or CopyFaults.from_env()
        self.codec: FixedSizeCodec | None = None
        if codec_name != "none":
            codec = get_codec(
                codec_name, PageGeometry.from_tensors(layout.caches), measure_error=False
            )
            if not isinstance(codec, FixedSizeCodec):
                raise ValueError(
                    f"codec {codec_name!r} makes pages of varying size; the DRAM tier needs "
                    "none, int8 or fp8"
                )
            self.codec = codec
        self.page_bytes = self.codec.encoded_size() if self.codec else layout.page_bytes

    def save(
        self, block_ids: Sequence[int], pages: torch.Tensor, rows: Sequence[int]
    ) -> tuple[list[int], int]:
        """Engine blocks `block_ids` -> rows `rows` of `pages` ([P, page_bytes] uint8).

        Returns, per block, the count of scale groups that held inf/NaN (int8/fp8;
        they decode as NaN: a caller aborts such pages rather than cache them; codec
        none copies bytes unchecked and reports 0), and the device operations issued."""
        self.faults.check("save")
        if self.codec is None:
            ops = self.layout.save_blocks(block_ids, pages, rows)
            self.fence()
            return [0] * len(block_ids), ops
        nonfinite = self.codec.encode_blocks_lazy(self.layout.caches, block_ids, pages, rows)
        self.fence()
        return [int(n) for n in nonfinite.tolist()], self._codec_ops(pages)

    def load(self, pages: torch.Tensor, rows: Sequence[int], block_ids: Sequence[int]) -> int:
        """Rows `rows` of `pages` -> engine blocks `block_ids` (distinct). Returns the
        device operations issued."""
        self.faults.check("load")
        if self.codec is None:
            ops = self.layout.load_blocks(pages, rows, block_ids)
        else:
            self.codec.decode_blocks(pages, list(rows), self.layout.caches, list(block_ids))
            ops = self._codec_ops(pages)
        self.fence()
        return ops

    def _codec_ops(self, pages: torch.Tensor) -> int:
        """One kernel per layer, the padding fills and NaN count, and one copy across
        devices when the pages live elsewhere than the cache."""
        return len(self.layout.caches) + 3 + int(pages.device != self.layout.device)

    def fence(self) -> None:
        """Wait (this thread only) until the copies queued on the current stream landed."""
        if self.layout.device.type == "cuda":
            torch.cuda.current_stream(self.layout.device).synchronize()
