import pytest
import torch

from symram_vllm.layout import KVLayout, LayoutError

# vLLM 0.32's CPU backend hands the connector one [B, H, N, C] tensor per layer,
# e.g. torch.Size([512, 2, 128, 128]) bf16 for 2 KV heads of head size 64 (C = K||V).
CPU_SHAPE = (12, 2, 128, 128)


def caches(layers: int = 3, shape=CPU_SHAPE, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(0)
    return {f"model.layers.{i}.self_attn.attn": torch.randn(shape, generator=gen).to(dtype)
            for i in range(layers)}


def test_page_holds_every_layer_k_and_v_of_one_block():
    kv = caches()
    layout = KVLayout(kv)
    assert layout.page_bytes == 3 * 2 * 128 * 128 * 2
    assert layout.description.text == "BHNC[2x128x128]x3:bfloat16"
    pages = torch.empty(1, layout.page_bytes, dtype=torch.uint8)
    layout.save_blocks([5], pages, [0])
    for view, cache in zip(layout.page_views(pages[0]), kv.values(), strict=True):
        assert torch.equal(view, cache[5])


def test_round_trip_into_other_blocks_is_bit_exact():
    kv = caches()
    layout = KVLayout(kv)
    pages = torch.empty(3, layout.page_bytes, dtype=torch.uint8)
    src = [1, 7, 3]
    layout.save_blocks(src, pages, [0, 1, 2])
    before = {name: t.clone() for name, t in kv.items()}
    dst = [10, 0, 4]
    layout.load_blocks(pages, [0, 1, 2], dst)
    for name, cache in kv.items():
        for s, d in zip(src, dst, strict=True):
            assert torch.equal(cache[d], before[name][s])
        untouched = [b for b in range(CPU_SHAPE[0]) if b not in dst]
        assert torch.equal(cache[untouched], before[name][untouched])


def test_strided_engine_layout_round_trips():
    # A GPU-style physical layout [H, B, N, C] seen through a [B, H, N, C] view.
    phys = torch.randn(2, 6, 16, 128).to(torch.float16)
    view = phys.permute(1, 0, 2, 3)
    layout = KVLayout({"l0": view})
    pages = torch.empty(1, layout.page_bytes, dtype=torch.uint8)
    layout.save_blocks([4], pages, [0])
    view[2].zero_()
    layout.load_blocks(pages, [0], [2])
    assert torch.equal(view[2], view[4])


def test_inconsistent_layers_are_refused():
    with pytest.raises(LayoutError, match="blocks"):
        KVLayout({"a": torch.zeros(4, 2, 8, 8), "b": torch.zeros(5, 2, 8, 8)})
    with pytest.raises(LayoutError, match="no KV cache"):
        KVLayout({})
    layout = KVLayout(caches(1))
    with pytest.raises(LayoutError, match="bytes"):
        layout.page_views(torch.empty(10, dtype=torch.uint8))
