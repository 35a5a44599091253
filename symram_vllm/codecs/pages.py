"""Typed per-layer views into rows of a uint8 page array, shared by the fixed codecs."""

from __future__ import annotations

import torch

from symram_vllm.codecs.base import CorruptPageError

ALIGN = 16


def align_up(n: int, to: int = ALIGN) -> int:
    return -(-n // to) * to


def region(pages: torch.Tensor, start: int, nbytes: int, dtype: torch.dtype,
           shape: tuple[int, ...]) -> torch.Tensor:
    """Bytes [start, start + nbytes) of every row of `pages`, as `dtype` [rows, *shape]."""
    if pages.dim() != 2 or pages.dtype != torch.uint8:
        raise CorruptPageError(f"pages must be a 2-D uint8 array, got {pages.dtype} "
                               f"{tuple(pages.shape)}")
    try:
        return pages[:, start : start + nbytes].view(dtype).view(pages.shape[0], *shape)
    except RuntimeError as exc:  # misaligned offset or row stride for a wider dtype
        raise ValueError(
            f"page buffer cannot be viewed as {dtype}: rows must start at a multiple of "
            f"{dtype.itemsize} bytes ({exc})"
        ) from exc

