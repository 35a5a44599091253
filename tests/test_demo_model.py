import json

import pytest
from transformers import AutoConfig, AutoTokenizer

from symram_vllm.demo_model import SIZES, STAMP_FILE, build_demo_model, spec_hash


def test_tiny_model_is_built_offline_and_cached(tmp_path):
    path = build_demo_model(tmp_path / "tiny", "tiny")
    stamp = json.loads((path / STAMP_FILE).read_text())
    assert stamp["hash"] == spec_hash(SIZES["tiny"])
    config = AutoConfig.from_pretrained(path)
    assert (config.hidden_size, config.num_hidden_layers, config.num_key_value_heads) == (256, 2, 2)
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok.encode("def f(x):\n    return x")
    assert tok.decode(ids) == "def f(x):\n    return x"
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat.endswith("<|assistant|>\n")
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert build_demo_model(path, "tiny") == path  # cached: not rebuilt
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime


def test_deterministic_across_builds(tmp_path):
    a = build_demo_model(tmp_path / "a", "tiny")
    b = build_demo_model(tmp_path / "b", "tiny")
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()


def test_mid_spec_matches_the_documented_shape():
    mid = SIZES["mid"]
    assert (mid.hidden_size, mid.intermediate_size, mid.num_hidden_layers,
            mid.num_attention_heads, mid.num_key_value_heads) == (768, 2048, 8, 4, 2)


def test_refuses_unknown_size_and_foreign_dir(tmp_path):
    with pytest.raises(ValueError, match="tiny"):
        build_demo_model(tmp_path / "x", "huge")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        build_demo_model(foreign, "tiny")
