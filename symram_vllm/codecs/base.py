"""What a codec is: tensors of one KV block (all layers) <-> the bytes of one tier page.

Two kinds compose into every codec the registry builds:

* a ``FixedSizeCodec`` (none, int8, fp8) turns the block's per-layer tensors into a
  page of a size known in advance, so it can write straight into a DRAM-tier slot;
* ``ByteTransform`` s (zstd) then turn those bytes into fewer bytes of varying size,
  for tiers that store variable-length records (disk, redis).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from symram_vllm.kernels.base import IndexLike
from symram_vllm.kernels.spec import as_index

__all__ = ["IndexLike"]  # re-exported for codec implementations


class CorruptPageError(ValueError):
    """Encoded bytes that cannot be decoded (truncated, checksum mismatch, wrong size)."""


@dataclass(frozen=True)
class PageGeometry:
    """Logical shape of one page: `num_layers` blocks of [heads, tokens, content]."""

    num_layers: int
    heads: int
    tokens: int
    content: int
    dtype: torch.dtype

    def __post_init__(self) -> None:
        dims = (self.num_layers, self.heads, self.tokens, self.content)
        if min(dims) < 1:
            raise ValueError(f"page geometry dims must be >= 1, got {dims}")

    @property
    def block_shape(self) -> tuple[int, int, int]:
        return (self.heads, self.tokens, self.content)

    @property
    def layer_elems(self) -> int:
        return self.heads * self.tokens * self.content

    @property
    def page_bytes(self) -> int:
        """Size of the uncompressed page in the engine dtype (what codec "none" stores)."""
        return self.num_layers * self.layer_elems * self.dtype.itemsize

    @classmethod
    def from_tensors(cls, layers: Sequence[torch.Tensor]) -> PageGeometry:
        """From per-layer block views [H, N, C] or per-layer caches [B, H, N, C]."""
        if not layers:
            raise ValueError("no layers given")
        first = layers[0]
        shape = tuple(first.shape[-3:])
        for t in layers:
            if tuple(t.shape[-3:]) != shape or t.dtype != first.dtype:
                raise ValueError(
                    f"layers differ: {tuple(t.shape)} {t.dtype} vs {tuple(first.shape)} "
                    f"{first.dtype}"
                )
        heads, tokens, content = shape
        return cls(len(layers), heads, tokens, content, first.dtype)

    def check_blocks(self, layers: Sequence[torch.Tensor], what: str) -> None:
        if len(layers) != self.num_layers:
            raise ValueError(f"{what}: {len(layers)} layers, codec expects {self.num_layers}")
        for t in layers:
            if tuple(t.shape[-3:]) != self.block_shape or t.dtype != self.dtype:
                raise ValueError(
                    f"{what}: got {tuple(t.shape)} {t.dtype}, codec expects "
                    f"[..., {self.heads}, {self.tokens}, {self.content}] {self.dtype}"
                )


@dataclass
class PageMeta:
    """What an encoder learnt about one page.

    Errors are over the page's finite elements, against the source the page was
    encoded from: ``max_abs_error`` = max |x - decode(encode(x))| and
    ``rel_error`` = ||x - x_hat||_2 / ||x||_2. Lossless codecs report 0.0; None means
    "not measured" (``measure_error=False``). ``nonfinite_groups`` counts scale groups
    that held inf/NaN and therefore decode to NaN.
    ``scales`` (quantizing codecs) is [layers, *scales shape] float32 and may be a view
    into the encoded page, valid as long as that page is.
    """

    codec: str
    raw_nbytes: int
    nbytes: int
    scales: torch.Tensor | None = None
    max_abs_error: float | None = None
    rel_error: float | None = None
    nonfinite_groups: int = 0
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.raw_nbytes / self.nbytes if self.nbytes else math.inf

    def as_dict(self) -> dict[str, object]:
        """JSON-friendly summary (scales summarised, not listed)."""
        out: dict[str, object] = {
            "codec": self.codec,
            "raw_nbytes": self.raw_nbytes,
            "nbytes": self.nbytes,
            "max_abs_error": self.max_abs_error,
            "rel_error": self.rel_error,
            "nonfinite_groups": self.nonfinite_groups,
            **self.extra,
        }
        if self.scales is not None:
            finite = self.scales[torch.isfinite(self.scales)]
            out["scale_min"] = float(finite.min()) if finite.numel() else None
            out["scale_max"] = float(finite.max()) if finite.numel() else None
        return out


@dataclass
class EncodedPage:
    data: torch.Tensor  # 1-D uint8
    meta: PageMeta


class Codec(ABC):
    """Encodes and decodes the pages of one geometry."""

    name: str
    geometry: PageGeometry
    lossless: bool
    fixed_size: bool

    @abstractmethod
    def encode(self, layers: Sequence[torch.Tensor]) -> EncodedPage:
        """Encode one block: `layers` are its per-layer [H, N, C] tensors (any strides,
        e.g. ``KVLayout.block_views(block_id)``)."""

    def decode(
        self,
        data: torch.Tensor | bytes,
        out: Sequence[torch.Tensor],
        meta: PageMeta | None = None,
    ) -> None:
        """Decode a page into the per-layer [H, N, C] destinations `out` (any strides).
        Pages are self-describing for a given codec and geometry, so `meta` is optional;
        when given, its codec name is checked."""
        if meta is not None and meta.codec != self.name:
            raise ValueError(f"page was encoded with {meta.codec!r}, not {self.name!r}")
        self.geometry.check_blocks(out, "decode")
        self._decode_page(as_page_tensor(data), out)

    @abstractmethod
    def _decode_page(self, page: torch.Tensor, out: Sequence[torch.Tensor]) -> None:
        """Decode a flat uint8 page into checked destinations."""

    @abstractmethod
    def max_encoded_size(self, page_bytes: int | None = None) -> int:
        """Upper bound of an encoded page's size, for sizing buffers."""

    def encoded_size(self, page_bytes: int | None = None) -> int:
        """Exact encoded size of every page (fixed-size codecs only).

        `page_bytes` is the uncompressed page size; it must match the codec's
        geometry (it is accepted to catch a codec built for another layout).
        """
        raise ValueError(
            f"codec {self.name!r} produces pages of varying size; encoded_size() exists only "
            "for fixed-size codecs (none, int8, fp8). Use max_encoded_size() for a bound."
        )

    def _check_page_bytes(self, page_bytes: int | None) -> None:
        if page_bytes is not None and page_bytes != self.geometry.page_bytes:
            raise ValueError(
                f"codec {self.name!r} was built for pages of {self.geometry.page_bytes} bytes, "
                f"got {page_bytes}"
            )

    def __repr__(self) -> str:
        g = self.geometry
        return (
            f"{type(self).__name__}({self.name!r}, {g.num_layers}x[{g.heads},{g.tokens},"
            f"{g.content}] {g.dtype})"
        )


def as_page_tensor(data: torch.Tensor | bytes | bytearray | memoryview) -> torch.Tensor:
    """Flat uint8 view of encoded bytes (copies only when given a read-only buffer)."""
    if isinstance(data, torch.Tensor):
        if data.dtype != torch.uint8:
            raise ValueError(f"encoded pages are uint8 tensors, got {data.dtype}")
        return data.reshape(-1)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


class FixedSizeCodec(Codec):
    """Pages of one size; encodes many blocks straight into rows of a page array.

    The batched verbs are what the connector should call: one kernel launch per layer
    for a whole batch of blocks, written directly into ``pages[page_ids[i]]`` (e.g. the
    DRAM tier's arena, ``[num_slots, slot_bytes]`` uint8).
    """

    fixed_size = True

    def __init__(self, geometry: PageGeometry, *, measure_error: bool = True) -> None:
        self.geometry = geometry
        self.measure_error = measure_error

    def encode_blocks(
        self,
        kv_caches: Sequence[torch.Tensor],
        block_ids: IndexLike,
        pages: torch.Tensor,
        page_ids: IndexLike,
    ) -> list[PageMeta]:
        """Encode block ``block_ids[i]`` of every layer's [B, H, N, C] cache into row
        ``page_ids[i]`` of `pages` ([P, encoded_size] uint8). Returns one meta per block."""
        self.geometry.check_blocks(kv_caches, "encode_blocks")
        ids = as_index(block_ids, kv_caches[0].device)
        return self._encode_rows(kv_caches, ids, pages, as_index(page_ids, pages.device))

    def encode_blocks_lazy(
        self,
        kv_caches: Sequence[torch.Tensor],
        block_ids: IndexLike,
        pages: torch.Tensor,
        page_ids: IndexLike,
    ) -> torch.Tensor:
        """`encode_blocks` without host syncs or error measurement: returns each
        block's count of inf/NaN scale groups as a tensor, to be read once the copies
        have landed (the transfer path's fence), not now."""
        self.geometry.check_blocks(kv_caches, "encode_blocks")
        ids = as_index(block_ids, kv_caches[0].device)
        return self._encode_lazy(kv_caches, ids, pages, as_index(page_ids, pages.device))

    def _encode_lazy(
        self, caches: Sequence[torch.Tensor], ids: torch.Tensor, pages: torch.Tensor,
        rows: torch.Tensor,
    ) -> torch.Tensor:
        metas = self._encode_rows(caches, ids, pages, rows)
        return torch.tensor([m.nonfinite_groups for m in metas], dtype=torch.int64)

    def decode_blocks(
        self,
        pages: torch.Tensor,
        page_ids: IndexLike,
        kv_caches: Sequence[torch.Tensor],
        block_ids: IndexLike,
    ) -> None:
        """Decode row ``page_ids[i]`` of `pages` into block ``block_ids[i]`` of every layer."""
        self.geometry.check_blocks(kv_caches, "decode_blocks")
        ids = as_index(block_ids, kv_caches[0].device)
        self._decode_rows(pages, as_index(page_ids, pages.device), kv_caches, ids)

    @abstractmethod
    def _encode_rows(
        self, caches: Sequence[torch.Tensor], ids: torch.Tensor, pages: torch.Tensor,
        rows: torch.Tensor,
    ) -> list[PageMeta]:
        """encode_blocks on checked arguments: ids and rows are int64 index tensors."""

    @abstractmethod
    def _decode_rows(
        self, pages: torch.Tensor, rows: torch.Tensor, caches: Sequence[torch.Tensor],
        ids: torch.Tensor,
    ) -> None:
        """decode_blocks on checked arguments."""

    @abstractmethod
    def _size(self) -> int: ...

    def encoded_size(self, page_bytes: int | None = None) -> int:
        self._check_page_bytes(page_bytes)
        return self._size()

    def max_encoded_size(self, page_bytes: int | None = None) -> int:
        return self.encoded_size(page_bytes)

    def encode_into(self, layers: Sequence[torch.Tensor], out: torch.Tensor) -> PageMeta:
        """Encode one block into a caller-provided page (e.g. a DRAM slot): no temporary."""
        self.geometry.check_blocks(layers, "encode")
        page = self._check_page(out)
        return self.encode_blocks([t.unsqueeze(0) for t in layers], [0], page, [0])[0]

    def encode(self, layers: Sequence[torch.Tensor]) -> EncodedPage:
        self.geometry.check_blocks(layers, "encode")
        data = torch.empty(self._size(), dtype=torch.uint8, device=layers[0].device)
        return EncodedPage(data, self.encode_into(layers, data))

    def _decode_page(self, page: torch.Tensor, out: Sequence[torch.Tensor]) -> None:
        self.decode_blocks(self._check_page(page), [0], [t.unsqueeze(0) for t in out], [0])

    def _check_page(self, page: torch.Tensor) -> torch.Tensor:
        if page.dtype != torch.uint8 or page.numel() != self._size():
            raise CorruptPageError(
                f"codec {self.name!r} pages are {self._size()} uint8 bytes, got "
                f"{page.numel()} {page.dtype}"
            )
        return page.view(1, -1)


class ByteTransform(ABC):
    """A lossless bytes -> bytes stage applied after a FixedSizeCodec."""

    name: str

    @abstractmethod
    def encode(self, page: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def decode(self, data: torch.Tensor, expected_nbytes: int) -> torch.Tensor: ...

    @abstractmethod
    def max_encoded_size(self, nbytes: int) -> int: ...
