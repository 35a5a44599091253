"""Codec registry, composition, page formats, metadata and errors (CPU, torch path)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from pydantic import ValidationError

from symram_vllm.codecs import (
    ChainCodec,
    CodecPolicy,
    CorruptPageError,
    FixedSizeCodec,
    Fp8Codec,
    Int8Codec,
    NoneCodec,
    PageGeometry,
    available_codecs,
    get_codec,
    parse_codec,
    register_page_format,
)
from symram_vllm.codecs import registry as codec_registry
from symram_vllm.codecs.synthetic import synthetic_kv
from symram_vllm.kernels import reference
from symram_vllm.keys import BlockKey
from symram_vllm.layout import KVLayout
from symram_vllm.tiers.dram import DramTier

LAYERS, HEADS, TOKENS, HEAD_DIM = 3, 2, 16, 64
CONTENT = 2 * HEAD_DIM


def caches(blocks: int = 6, dtype: torch.dtype = torch.bfloat16) -> list[torch.Tensor]:
    return [synthetic_kv(blocks, HEADS, TOKENS, HEAD_DIM, dtype, seed=layer)
            for layer in range(LAYERS)]


def geometry(dtype: torch.dtype = torch.bfloat16) -> PageGeometry:
    return PageGeometry(LAYERS, HEADS, TOKENS, CONTENT, dtype)


def block(kv: list[torch.Tensor], block_id: int) -> list[torch.Tensor]:
    return [cache[block_id] for cache in kv]


def empty_block(dtype: torch.dtype = torch.bfloat16) -> list[torch.Tensor]:
    return [torch.full((HEADS, TOKENS, CONTENT), 9.0, dtype=dtype) for _ in range(LAYERS)]


def assert_blocks_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.view(torch.int16), y.view(torch.int16))


# -- registry -----------------------------------------------------------------------------
def test_available_codecs():
    assert available_codecs() == ["none", "int8", "fp8", "zstd"]


@pytest.mark.parametrize(
    "name,canonical",
    [
        ("none", "none"),
        ("int8", "int8"),
        ("FP8", "fp8"),
        ("zstd", "zstd"),
        ("none+zstd", "zstd"),
        ("zstd:3", "zstd"),  # 3 is the default level
        ("fp8 + zstd:9", "fp8+zstd:9"),
        ("int8+zstd:-3", "int8+zstd:-3"),
    ],
)
def test_names_are_canonicalised(name, canonical):
    assert parse_codec(name).name == canonical


@pytest.mark.parametrize(
    "name,message",
    [
        ("fp9", r"unknown codec 'fp9'.*valid codecs: none, int8, fp8, zstd"),
        ("fp8+lz4", r"unknown codec 'lz4'"),
        ("zstd+fp8", r"must come before 'zstd'"),
        ("int8+fp8", r"only one of none, int8, fp8"),
        ("zstd+zstd", r"only one byte stage"),
        ("int8:2", r"takes no parameter"),
        ("zstd:99", r"bad zstd level"),
        ("zstd:fast", r"bad zstd level"),
        ("zstd:0", r"bad zstd level"),
        ("", r"non-empty"),
        ("fp8+", r"unknown codec ''"),
    ],
)
def test_bad_names_raise_value_error_with_reason(name, message):
    with pytest.raises(ValueError, match=message):
        parse_codec(name)
    with pytest.raises(ValueError, match=message):
        get_codec(name, geometry())


def test_get_codec_builds_the_right_kinds():
    g = geometry()
    kinds = {"none": NoneCodec, "int8": Int8Codec, "fp8": Fp8Codec}
    for name, cls in kinds.items():
        codec = get_codec(name, g)
        assert type(codec) is cls and codec.fixed_size and codec.name == name
    chain = get_codec("fp8+zstd:7", g)
    assert isinstance(chain, ChainCodec) and not chain.fixed_size and not chain.lossless
    assert isinstance(chain.inner, Fp8Codec) and chain.transform.level == 7
    assert get_codec("zstd", g).lossless and get_codec("none", g).lossless
    assert not get_codec("int8", g).lossless


def test_register_page_format(monkeypatch):
    monkeypatch.setattr(codec_registry, "PAGE_FORMATS", dict(codec_registry.PAGE_FORMATS))
    register_page_format("raw", NoneCodec)
    assert "raw" in available_codecs()
    assert parse_codec("raw+zstd").name == "raw+zstd"
    with pytest.raises(ValueError, match="already registered"):
        register_page_format("int8", NoneCodec)
    with pytest.raises(ValueError, match="lowercase identifiers"):
        register_page_format("Bad-Name", NoneCodec)


# -- sizes --------------------------------------------------------------------------------
def test_encoded_sizes_of_fixed_codecs():
    g = geometry()
    assert g.page_bytes == LAYERS * HEADS * TOKENS * CONTENT * 2
    assert get_codec("none", g).encoded_size(g.page_bytes) == g.page_bytes
    codes = LAYERS * HEADS * TOKENS * CONTENT  # one byte each
    scales = LAYERS * HEADS * TOKENS * 2 * 4  # float32 per token, K and V
    for name in ("int8", "fp8"):
        size = get_codec(name, g).encoded_size(g.page_bytes)
        assert size == -(-(codes + scales) // 16) * 16
        assert g.page_bytes / size == pytest.approx(2 / (1 + 4 / HEAD_DIM), rel=1e-3)


def test_encoded_size_is_only_for_fixed_size_codecs():
    g = geometry()
    with pytest.raises(ValueError, match=r"varying size.*max_encoded_size"):
        get_codec("fp8+zstd", g).encoded_size(g.page_bytes)
    assert get_codec("fp8+zstd", g).max_encoded_size() > get_codec("fp8", g).encoded_size()
    with pytest.raises(ValueError, match="built for pages of"):
        get_codec("int8", g).encoded_size(g.page_bytes + 2)


def test_none_pages_are_byte_compatible_with_kv_layout():
    kv = caches()
    layout = KVLayout({f"layer{i}": c for i, c in enumerate(kv)})
    codec = get_codec("none", PageGeometry.from_tensors(kv))
    assert codec.encoded_size(layout.page_bytes) == layout.page_bytes
    pages = torch.empty(1, layout.page_bytes, dtype=torch.uint8)
    layout.save_blocks([4], pages, [0])
    assert torch.equal(codec.encode(block(kv, 4)).data, pages[0])


# -- round trips --------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["none", "zstd", "zstd:1", "zstd:-5"])
def test_lossless_codecs_round_trip_exactly(name):
    kv = caches(dtype=torch.float16)
    codec = get_codec(name, geometry(torch.float16))
    page = codec.encode(block(kv, 2))
    out = empty_block(torch.float16)
    codec.decode(page.data, out, page.meta)
    assert_blocks_equal(out, block(kv, 2))
    assert page.meta.max_abs_error == 0.0 and page.meta.rel_error == 0.0


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_zstd_after_quantization_is_lossless(fmt):
    kv = caches()
    plain = get_codec(fmt, geometry())
    chained = get_codec(f"{fmt}+zstd", geometry())
    a, b = plain.encode(block(kv, 1)), chained.encode(block(kv, 1))
    assert b.data.numel() < a.data.numel()
    out_a, out_b = empty_block(), empty_block()
    plain.decode(a.data, out_a)
    chained.decode(b.data, out_b, b.meta)
    assert_blocks_equal(out_a, out_b)
    assert b.meta.codec == f"{fmt}+zstd" and b.meta.nbytes == b.data.numel()
    assert b.meta.rel_error == a.meta.rel_error


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_quantized_pages_hold_kernel_output(fmt):
    kv = caches()
    codec = get_codec(fmt, geometry())
    page = codec.encode(block(kv, 3))
    rows = page.data.view(1, -1)
    for layer, cache in enumerate(kv):
        q, s = reference.gather_quantize(cache, [3], fmt, "token")
        assert torch.equal(codec.codes_view(rows, layer).view(torch.uint8), q.view(torch.uint8))
        assert torch.equal(codec.scales_view(rows, layer), s)
    assert page.meta.scales is not None
    assert tuple(page.meta.scales.shape) == (LAYERS, HEADS, TOKENS, 2)


def test_decode_accepts_bytes_and_rejects_wrong_sizes():
    kv = caches()
    codec = get_codec("int8", geometry())
    page = codec.encode(block(kv, 0))
    out = empty_block()
    codec.decode(bytes(page.data.numpy()), out)
    ref = empty_block()
    codec.decode(page.data, ref)
    assert_blocks_equal(out, ref)
    with pytest.raises(CorruptPageError, match="pages are"):
        codec.decode(page.data[:-16], out)
    with pytest.raises(ValueError, match=r"encoded with 'fp8'"):
        codec.decode(page.data, out, get_codec("fp8", geometry()).encode(block(kv, 0)).meta)
    with pytest.raises(ValueError, match="codec expects"):
        codec.encode(block(kv, 0)[:2])


def test_corrupt_zstd_pages_raise():
    kv = caches()
    codec = get_codec("fp8+zstd", geometry())
    data = codec.encode(block(kv, 0)).data
    out = empty_block()
    flipped = data.clone()
    flipped[data.numel() // 2] ^= 0x55
    with pytest.raises(CorruptPageError):
        codec.decode(flipped, out)
    with pytest.raises(CorruptPageError):
        codec.decode(data[: data.numel() - 40], out)
    with pytest.raises(CorruptPageError, match="not a zstd frame"):
        codec.decode(torch.zeros(64, dtype=torch.uint8), out)
    other = get_codec("int8+zstd", PageGeometry(LAYERS, HEADS, 2 * TOKENS, CONTENT,
                                                torch.bfloat16))
    with pytest.raises(CorruptPageError, match="expected"):
        other.decode(data, [torch.empty(HEADS, 2 * TOKENS, CONTENT, dtype=torch.bfloat16)
                            for _ in range(LAYERS)])


# -- straight into DRAM-tier slots -------------------------------------------------------
@pytest.mark.parametrize("name", ["none", "int8", "fp8"])
def test_batched_encode_into_dram_arena_equals_per_page_encode(name):
    kv = caches(blocks=8)
    codec = get_codec(name, geometry())
    tier = DramTier(codec.encoded_size(), 6 * codec.encoded_size(), pin_memory=False)
    tier.arena.fill_(0xAB)  # slots hold stale bytes; padding must not leak them
    block_ids, slots = [5, 1, 6], [4, 0, 2]
    metas = codec.encode_blocks(kv, block_ids, tier.arena, slots)
    assert [m.codec for m in metas] == [name] * 3
    for b, slot in zip(block_ids, slots, strict=True):
        assert torch.equal(tier.arena[slot], codec.encode(block(kv, b)).data)
    assert torch.all(tier.arena[3] == 0xAB), "rows not listed are not written"

    restored = [torch.zeros_like(c) for c in kv]
    codec.decode_blocks(tier.arena, slots, restored, [0, 7, 3])
    for dst, src in zip([0, 7, 3], block_ids, strict=True):
        expected = empty_block()
        codec.decode(tier.arena[slots[block_ids.index(src)]], expected)
        assert_blocks_equal([c[dst] for c in restored], expected)
    assert not any(c[1].any() for c in restored), "blocks not listed are not written"


def test_encode_into_a_reserved_slot():
    kv = caches()
    codec = get_codec("fp8", geometry())
    tier = DramTier(codec.encoded_size(), 4 * codec.encoded_size(), pin_memory=False)
    key = BlockKey(b"\x01" * 32)
    slot = tier.reserve(key)
    assert slot is not None
    meta = codec.encode_into(block(kv, 2), slot)
    tier.commit(key)
    assert meta.nbytes == codec.encoded_size()
    out = empty_block()
    codec.decode(tier.get(key), out)
    expected = empty_block()
    codec.decode(codec.encode(block(kv, 2)).data, expected)
    assert_blocks_equal(out, expected)


# -- metadata -----------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_meta_reports_measured_error(fmt):
    kv = caches()
    codec = get_codec(fmt, geometry())
    page = codec.encode(block(kv, 4))
    out = empty_block()
    codec.decode(page.data, out)
    x = torch.cat([t.float().flatten() for t in block(kv, 4)])
    x_hat = torch.cat([t.float().flatten() for t in out])
    assert page.meta.max_abs_error == pytest.approx(float((x - x_hat).abs().max()), rel=1e-6)
    assert page.meta.rel_error == pytest.approx(float((x - x_hat).norm() / x.norm()), rel=1e-4)
    assert 0 < page.meta.rel_error < 0.05
    assert page.meta.raw_nbytes == geometry().page_bytes
    assert page.meta.ratio == pytest.approx(geometry().page_bytes / codec.encoded_size())
    summary = page.meta.as_dict()
    json.dumps(summary)
    assert summary["codec"] == fmt and 0 < summary["scale_min"] <= summary["scale_max"]

    quiet = get_codec(fmt, geometry(), measure_error=False).encode(block(kv, 4))
    assert quiet.meta.max_abs_error is None and quiet.meta.rel_error is None
    assert torch.equal(quiet.data, page.data)


@pytest.mark.parametrize("name", ["int8", "fp8", "int8+zstd"])
def test_meta_counts_non_finite_groups(name):
    kv = caches()
    kv[1][2, 0, 5, 3] = float("nan")
    kv[2][2, 1, 0, 100] = float("inf")
    kv[2][2, 1, 0, 101] = float("-inf")  # same group as the inf above
    codec = get_codec(name, geometry())
    page = codec.encode(block(kv, 2))
    assert page.meta.nonfinite_groups == 2
    assert page.meta.max_abs_error is not None and page.meta.max_abs_error < 1.0
    out = empty_block()
    codec.decode(page.data, out)
    poisoned = [torch.zeros(HEADS, TOKENS, CONTENT, dtype=torch.bool) for _ in range(LAYERS)]
    poisoned[1][0, 5, :HEAD_DIM] = True  # K half of token 5, head 0
    poisoned[2][1, 0, HEAD_DIM:] = True  # V half of token 0, head 1
    for got, want in zip(out, poisoned, strict=True):
        assert torch.equal(torch.isnan(got), want), "exactly the poisoned groups are NaN"
    if isinstance(codec, FixedSizeCodec):  # the batched path counts per page too
        pages = torch.empty(3, codec.encoded_size(), dtype=torch.uint8)
        metas = codec.encode_blocks(kv, [2, 0, 1], pages, [0, 1, 2])
        assert [m.nonfinite_groups for m in metas] == [2, 0, 0]


def test_zstd_is_thread_safe():
    kv = caches(blocks=8)
    codec = get_codec("int8+zstd", geometry())

    def round_trip(b: int) -> bool:
        page = codec.encode(block(kv, b))
        out = empty_block()
        codec.decode(page.data, out)
        expected = empty_block()
        get_codec("int8", geometry()).decode(get_codec("int8", geometry()).encode(
            block(kv, b)).data, expected)
        return all(torch.equal(x, y) for x, y in zip(out, expected, strict=True))

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(round_trip, list(range(8)) * 3))


# -- per-tier policy ----------------------------------------------------------------------
def test_policy_validates_and_canonicalises():
    policy = CodecPolicy.model_validate({"dram": "none", "disk": "FP8+zstd:3"})
    assert policy.disk == "fp8+zstd" and policy.redis == "none"
    codec = policy.codec_for("disk", geometry())
    assert isinstance(codec, ChainCodec) and codec.name == "fp8+zstd"
    assert policy.codec_for("dram", geometry()).fixed_size
    with pytest.raises(ValueError, match="unknown tier"):
        policy.codec_for("tape", geometry())


@pytest.mark.parametrize(
    "config,message",
    [
        ({"dram": "zstd"}, "dram tier stores fixed-size slots"),
        ({"disk": "fp9"}, "valid codecs: none, int8, fp8, zstd"),
        ({"dsik": "fp8"}, "Extra inputs are not permitted"),
    ],
)
def test_policy_rejects_bad_config(config, message):
    with pytest.raises(ValidationError, match=message):
        CodecPolicy.model_validate(config)


# -- geometry and synthetic data ---------------------------------------------------------
def test_geometry_from_tensors():
    kv = caches()
    assert PageGeometry.from_tensors(kv) == geometry()
    assert PageGeometry.from_tensors(block(kv, 0)) == geometry()
    with pytest.raises(ValueError, match="layers differ"):
        PageGeometry.from_tensors([kv[0], kv[1].half()])
    with pytest.raises(ValueError, match=">= 1"):
        PageGeometry(0, 1, 1, 2, torch.bfloat16)
    with pytest.raises(ValueError, match="bfloat16/float16"):
        get_codec("int8", PageGeometry(1, 1, 16, 128, torch.float32))


def test_synthetic_kv_is_deterministic_and_shaped():
    a = synthetic_kv(3, 2, 16, 64, seed=5)
    assert a.shape == (3, 2, 16, 128) and a.dtype == torch.bfloat16 and a.is_contiguous()
    assert torch.equal(a, synthetic_kv(3, 2, 16, 64, seed=5))
    assert not torch.equal(a, synthetic_kv(3, 2, 16, 64, seed=6))
    k, v = a[..., :64].float(), a[..., 64:].float()
    # Keys carry outlier channels: their peak-to-RMS ratio is well above the values'.
    assert (k.abs().amax() / k.square().mean().sqrt()) > (v.abs().amax() / v.square().mean().sqrt())
    with pytest.raises(ValueError, match="unknown KV profile"):
        synthetic_kv(1, 1, 16, 64, profile="weird")


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_padding_is_zeroed_so_equal_blocks_give_equal_pages(fmt):
    # 3 tokens: 24 bytes of scales end off a 16-byte boundary, so the page has padding.
    g = PageGeometry(1, 1, 3, 128, torch.float16)
    codec = get_codec(fmt, g)
    kv = [torch.randn(2, 1, 3, 128, generator=torch.Generator().manual_seed(0)).half()]
    assert codec.encoded_size() == 416  # 384 code bytes + 24 scale bytes -> 16-aligned
    pages = torch.full((2, 416), 0xAB, dtype=torch.uint8)
    codec.encode_blocks(kv, [1], pages, [1])
    assert torch.all(pages[1, 408:] == 0)
    assert torch.equal(pages[1], codec.encode([kv[0][1]]).data)
    out = [torch.empty(1, 3, 128, dtype=torch.float16)]
    codec.decode(pages[1], out)
    assert torch.allclose(out[0].float(), kv[0][1].float(), rtol=0.07, atol=0.03)


# -- zstd frames: truncation anywhere is caught ------------------------------------------
@pytest.mark.parametrize("cut", [1, 4, 5, 100])
def test_zstd_frame_cut_anywhere_is_corrupt(cut):
    """Even a frame cut inside its 4-byte content checksum (which zstd's streaming
    reader accepts) is rejected, and so are bytes after the frame."""
    from symram_vllm.codecs.zstd import ZstdCodec

    z = ZstdCodec(1)
    page = torch.arange(20_000, dtype=torch.int64).remainder(7).to(torch.uint8)
    frame = z.encode_buffer(page.numpy())
    with pytest.raises(CorruptPageError):
        z.decode_into(frame[:-cut], bytearray(page.numel()))
    with pytest.raises(CorruptPageError):
        z.decode_into(frame + b"\0", bytearray(page.numel()))
    out = bytearray(page.numel())
    z.decode_into(frame, out)
    assert bytes(out) == page.numpy().tobytes()


# -- the connector's page mover reports poisoned pages ---------------------------------------
@pytest.mark.parametrize("codec", ["none", "int8", "fp8"])
def test_page_mover_save_counts_nonfinite_groups(codec):
    from symram_vllm.connectors.page_mover import PageMover

    kv = caches()
    kv[1][3, 0, 5, 0] = float("nan")  # one K group of block 3, layer 1
    kv[0][3, 1, 7, -1] = float("inf")  # one V group of block 3, layer 0
    mover = PageMover(KVLayout({f"layer{i}": c for i, c in enumerate(kv)}), codec)
    pages = torch.empty(3, mover.page_bytes, dtype=torch.uint8)
    nonfinite, _ = mover.save([2, 3, 4], pages, [0, 1, 2])
    # codec none copies bytes unchecked; the quantized codecs count the poisoned groups
    assert nonfinite == [0, 0 if codec == "none" else 2, 0]
