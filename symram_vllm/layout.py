"""How one vLLM KV block maps to the bytes of one tier page.

A page holds one block of every layer, K and V, back to back:

    page = layer0[H, N, C] | layer1[H, N, C] | ...      (each contiguous, engine dtype)

where each layer's cache is vLLM's standardized per-layer view ``[B, H, N, C]``
(blocks, KV heads, tokens in a block, K‖V content). With vLLM's hybrid allocator
(several KV-cache groups, e.g. sliding-window and full-attention layers), layers of
different groups may be views of one shared tensor, and each group has its own block
id for the same token block: a page still holds that token block of every layer, and
the copies take one block id per group (``[groups, n]``). The page order is canonical,
whatever the physical strides of the engine's cache are, so a page written by one
backend can be read by another with the same logical shape. This module knows
tensors, not vLLM.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from symram_vllm.kernels import block_copy


class LayoutError(ValueError):
    """The engine's KV cache does not have the shape symram was told to expect."""


@dataclass(frozen=True)
class LayerSpec:
    name: str
    block_shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int
    nbytes: int
    group: int = 0


@dataclass(frozen=True)
class LayoutDescription:
    """What must match for two engines to share pages (goes into the key signature)."""

    num_layers: int
    block_shape: tuple[int, ...]
    dtype: str

    @property
    def text(self) -> str:
        dims = "x".join(str(d) for d in self.block_shape)
        return f"BHNC[{dims}]x{self.num_layers}:{self.dtype}"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class KVLayout:
    """Maps block ids of the engine's per-layer caches to canonical page bytes.

    `layer_groups` maps each layer to its KV-cache group (vLLM's hybrid allocator);
    omitted, every layer is in group 0."""

    def __init__(
        self, kv_caches: dict[str, torch.Tensor], layer_groups: dict[str, int] | None = None
    ) -> None:
        if not kv_caches:
            raise LayoutError("no KV cache tensors were registered")
        self.layer_names = list(kv_caches)
        groups = layer_groups or {}
        missing = [name for name in self.layer_names if layer_groups and name not in groups]
        if missing:
            raise LayoutError(f"layers {missing} belong to no KV-cache group")
        self.layer_group = [groups.get(name, 0) for name in self.layer_names]
        self.num_groups = max(self.layer_group) + 1
        self._caches = [kv_caches[name] for name in self.layer_names]
        first = self._caches[0]
        if first.dim() < 2:
            raise LayoutError(f"KV cache tensor of shape {tuple(first.shape)} has no block dim")
        self.num_blocks = first.shape[0]
        specs: list[LayerSpec] = []
        offset = 0
        for name, cache in zip(self.layer_names, self._caches, strict=True):
            if cache.shape[0] != self.num_blocks:
                raise LayoutError(
                    f"layer {name} has {cache.shape[0]} blocks, expected {self.num_blocks}; "
                    "symram needs every layer's cache to index the same block pool"
                )
            nbytes = cache[0].numel() * cache.element_size()
            specs.append(LayerSpec(name, tuple(cache.shape[1:]), cache.dtype, offset, nbytes,
                                   groups.get(name, 0)))
            offset += nbytes
        self.layers = specs
        self.page_bytes = offset
        shapes = {s.block_shape for s in specs}
        dtypes = {s.dtype for s in specs}
        if len(shapes) != 1 or len(dtypes) != 1:
            raise LayoutError(f"layers differ in block shape {shapes} or dtype {dtypes}")
        self.description = LayoutDescription(
            len(specs), specs[0].block_shape, _dtype_name(specs[0].dtype)
        )
        self.device = first.device
        # Contiguous runs of a page inside one engine block: one per layer for
        # layer-major caches, one per page for block-major (BLHNC) caches.
        self.segments = block_copy.plan_segments(self._caches, self.layer_group)

    @property
    def caches(self) -> list[torch.Tensor]:
        """Every layer's [B, H, N, C] cache, in page order (what codecs encode from)."""
        return list(self._caches)

    def page_views(self, page: torch.Tensor) -> list[torch.Tensor]:
        """Typed per-layer views into a flat uint8 page (no copy)."""
        if page.numel() != self.page_bytes:
            raise LayoutError(f"page has {page.numel()} bytes, layout needs {self.page_bytes}")
        return [
            page[s.offset : s.offset + s.nbytes].view(s.dtype).view(s.block_shape)
            for s in self.layers
        ]

    def block_views(self, block_id: int | Sequence[int]) -> list[torch.Tensor]:
        """The engine-side [H, N, C] view of a token block in every layer: `block_id`,
        or one block id per KV-cache group."""
        ids = [block_id] * self.num_groups if isinstance(block_id, int) else list(block_id)
        return [cache[ids[g]] for cache, g in zip(self._caches, self.layer_group, strict=True)]

    @property
    def block_major(self) -> bool:
        """Every block's pages across all layers are one contiguous span (BLHNC)."""
        return len(self.segments) == 1 and self.segments[0].nbytes == self.page_bytes

    def save_blocks(
        self, block_ids: block_copy.BlockIds, pages: torch.Tensor, rows: Sequence[int]
    ) -> int:
        """Engine blocks `block_ids` (n, or ``[groups, n]``) -> rows `rows` of the uint8
        page array `pages` ([P, page_bytes]), in canonical page order. Returns device
        operations issued."""
        self._check_pages(pages)
        return block_copy.save_blocks(self.segments, block_ids, pages, rows)

    def load_blocks(
        self, pages: torch.Tensor, rows: Sequence[int], block_ids: block_copy.BlockIds
    ) -> int:
        """Rows `rows` of `pages` -> engine blocks `block_ids` (distinct; n, or
        ``[groups, n]`` where -1 skips that group's part of the page)."""
        self._check_pages(pages)
        return block_copy.load_blocks(self.segments, pages, rows, block_ids)

    def _check_pages(self, pages: torch.Tensor) -> None:
        if pages.dim() != 2 or pages.dtype != torch.uint8 or pages.shape[1] != self.page_bytes:
            raise LayoutError(
                f"pages must be uint8 [P, {self.page_bytes}], got {pages.dtype} "
                f"{tuple(pages.shape)}"
            )
