"""Moves one engine block in and out of a tier page, through the configured codec.

With codec ``none`` a page is the block's raw bytes (``KVLayout.gather``/``scatter``).
With ``int8``/``fp8`` the block is quantized straight into the DRAM slot on the way
out and dequantized straight into the engine's cache on the way in: no full-size
temporary on either path. The device dispatch (Triton on CUDA, the byte-identical
torch reference on CPU) lives in ``symram_vllm.kernels``.
"""

from __future__ import annotations

import torch

from symram_vllm.codecs import get_codec
from symram_vllm.codecs.base import FixedSizeCodec, PageGeometry
from symram_vllm.layout import KVLayout


class PageMover:
    def __init__(self, layout: KVLayout, codec_name: str = "none") -> None:
        self.layout = layout
        self.codec_name = codec_name
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

    def save(self, block_id: int, slot: torch.Tensor) -> int:
        """Engine block `block_id` (all layers) -> the flat uint8 page `slot`.

        Returns the page's count of scale groups that held inf/NaN (int8/fp8; they
        decode as NaN): a caller should abort such a page rather than cache it. Codec
        none copies bytes unchecked and returns 0."""
        if self.codec is None:
            self.layout.gather(block_id, slot)
            return 0
        metas = self.codec.encode_blocks(self.layout.caches, [block_id], slot.view(1, -1), [0])
        return sum(m.nonfinite_groups for m in metas)

    def load(self, page: torch.Tensor, block_id: int) -> None:
        """The flat uint8 page -> engine block `block_id` (all layers)."""
        if self.codec is None:
            self.layout.scatter(page, block_id)
        else:
            self.codec.decode_blocks(page.view(1, -1), [0], self.layout.caches, [block_id])
