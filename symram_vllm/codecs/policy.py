"""Which codec each tier stores its pages with, validated at config time.

    CodecPolicy.model_validate({"dram": "none", "disk": "fp8+zstd"})

The DRAM tier keeps fixed-size slots, so it only accepts fixed-size codecs; the disk
and redis tiers store records of any length and accept every codec.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, field_validator

from symram_vllm.codecs.base import Codec, PageGeometry
from symram_vllm.codecs.registry import get_codec, parse_codec


class CodecPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    dram: str = "none"
    disk: str = "none"
    redis: str = "none"
    measure_error: bool = True

    @field_validator("dram", "disk", "redis")
    @classmethod
    def _canonical(cls, value: str) -> str:
        return parse_codec(value).name

    @field_validator("dram")
    @classmethod
    def _fixed_size(cls, value: str) -> str:
        if not parse_codec(value).fixed_size:
            raise ValueError(
                f"the dram tier stores fixed-size slots; use none, int8 or fp8, not {value!r}"
            )
        return value

    def codec_name(self, tier: str) -> str:
        if tier not in ("dram", "disk", "redis"):
            raise ValueError(f"unknown tier {tier!r}; tiers with a codec: dram, disk, redis")
        return str(getattr(self, tier))

    def codec_for(self, tier: str, geometry: PageGeometry) -> Codec:
        return get_codec(self.codec_name(tier), geometry, measure_error=self.measure_error)
