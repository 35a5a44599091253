"""A fixed-size codec followed by a lossless byte stage, e.g. "fp8+zstd": encode runs
left to right, decode right to left. Pages vary in size, so there is no encoded_size()."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from symram_vllm.codecs.base import (
    ByteTransform,
    Codec,
    EncodedPage,
    FixedSizeCodec,
)


class ChainCodec(Codec):
    fixed_size = False

    def __init__(self, name: str, inner: FixedSizeCodec, transform: ByteTransform) -> None:
        self.name = name
        self.inner = inner
        self.transform = transform
        self.geometry = inner.geometry
        self.lossless = inner.lossless

    def encode(self, layers: Sequence[torch.Tensor]) -> EncodedPage:
        page = self.inner.encode(layers)
        data = self.transform.encode(page.data)
        # meta.scales keeps viewing the uncompressed inner page, which it keeps alive.
        return EncodedPage(data, replace(page.meta, codec=self.name, nbytes=data.numel()))

    def _decode_page(self, page: torch.Tensor, out: Sequence[torch.Tensor]) -> None:
        inner = self.transform.decode(page, self.inner.encoded_size())
        self.inner.decode(inner.to(out[0].device), out)

    def max_encoded_size(self, page_bytes: int | None = None) -> int:
        return self.transform.max_encoded_size(self.inner.encoded_size(page_bytes))
