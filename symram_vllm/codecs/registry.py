"""Codecs by name: "none", "int8", "fp8", "zstd", composed with "+" ("fp8+zstd").

Grammar: ``[page format] ["+" byte stage]`` where the page format is one of none /
int8 / fp8 (default none) and the byte stage is "zstd" or "zstd:LEVEL". Quantizing
after compressing makes no sense and two stages of one kind cannot stack, so those
are rejected with the reason.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from symram_vllm.codecs.base import ByteTransform, Codec, FixedSizeCodec, PageGeometry
from symram_vllm.codecs.chain import ChainCodec
from symram_vllm.codecs.fp8 import Fp8Codec
from symram_vllm.codecs.int8 import Int8Codec
from symram_vllm.codecs.none import NoneCodec
from symram_vllm.codecs.zstd import DEFAULT_LEVEL, ZstdCodec, check_level

PageFormatFactory = Callable[..., FixedSizeCodec]
ByteStageFactory = Callable[[int], ByteTransform]

PAGE_FORMATS: dict[str, PageFormatFactory] = {
    "none": NoneCodec,
    "int8": Int8Codec,
    "fp8": Fp8Codec,
}
BYTE_STAGES: dict[str, tuple[ByteStageFactory, int]] = {
    "zstd": (ZstdCodec, DEFAULT_LEVEL),
}


def available_codecs() -> list[str]:
    return [*PAGE_FORMATS, *BYTE_STAGES]


def _unknown(part: str, name: str) -> ValueError:
    valid = ", ".join(available_codecs())
    return ValueError(
        f"unknown codec {part!r} in {name!r}; valid codecs: {valid} "
        f"(combine a page format with a byte stage as e.g. 'fp8+zstd' or 'int8+zstd:9')"
    )


@dataclass(frozen=True)
class CodecSpec:
    """A parsed, validated codec name (no geometry needed: config validation uses it)."""

    page_format: str = "none"
    byte_stage: str | None = None
    level: int | None = None

    @property
    def name(self) -> str:
        """Canonical name: "none+zstd" -> "zstd", "zstd:3" -> "zstd" (3 is the default)."""
        if self.byte_stage is None:
            return self.page_format
        stage = self.byte_stage
        if self.level is not None and self.level != BYTE_STAGES[stage][1]:
            stage = f"{stage}:{self.level}"
        return stage if self.page_format == "none" else f"{self.page_format}+{stage}"

    @property
    def fixed_size(self) -> bool:
        return self.byte_stage is None

    @property
    def lossless(self) -> bool:
        return self.page_format == "none"


def parse_codec(name: str) -> CodecSpec:
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"codec name must be a non-empty string, got {name!r}; valid codecs: "
                         f"{', '.join(available_codecs())}")
    page_format: str | None = None
    stage: str | None = None
    level: int | None = None
    for raw in name.lower().replace(" ", "").split("+"):
        base, _, arg = raw.partition(":")
        if base in PAGE_FORMATS:
            if arg:
                raise ValueError(f"codec {base!r} takes no parameter (got {raw!r} in {name!r})")
            if stage is not None:
                raise ValueError(
                    f"{name!r}: {base!r} must come before {stage!r} (quantize, then compress)"
                )
            if page_format is not None:
                raise ValueError(f"{name!r}: only one of {', '.join(PAGE_FORMATS)} per codec")
            page_format = base
        elif base in BYTE_STAGES:
            if stage is not None:
                raise ValueError(f"{name!r}: only one byte stage ({', '.join(BYTE_STAGES)})")
            stage = base
            if arg:
                try:
                    level = check_level(int(arg))
                except ValueError as exc:
                    raise ValueError(f"{name!r}: bad {base} level {arg!r}: {exc}") from exc
        else:
            raise _unknown(raw, name)
    return CodecSpec(page_format or "none", stage, level)


def get_codec(name: str, geometry: PageGeometry, *, measure_error: bool = True) -> Codec:
    """Build the codec `name` for pages of `geometry`.

    `measure_error` makes quantizing codecs decode each page after encoding it to
    fill ``PageMeta.max_abs_error`` / ``rel_error`` (about doubles encode time).
    """
    spec = parse_codec(name)
    inner = PAGE_FORMATS[spec.page_format](geometry, measure_error=measure_error)
    if spec.byte_stage is None:
        return inner
    factory, default_level = BYTE_STAGES[spec.byte_stage]
    stage = factory(default_level if spec.level is None else spec.level)
    return ChainCodec(spec.name, inner, stage)


def register_page_format(name: str, factory: PageFormatFactory) -> None:
    _check_new(name)
    PAGE_FORMATS[name] = factory


def register_byte_stage(name: str, factory: ByteStageFactory, default_level: int) -> None:
    _check_new(name)
    BYTE_STAGES[name] = (factory, default_level)


def _check_new(name: str) -> None:
    if not name.isidentifier() or name != name.lower():
        raise ValueError(f"codec names are lowercase identifiers, got {name!r}")
    if name in PAGE_FORMATS or name in BYTE_STAGES:
        raise ValueError(f"codec {name!r} is already registered")
