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


def test_random_weight_specs_keep_their_hash():
    """Adding the `circuit` and `arch` fields must not move the cache key of existing
    models."""
    import hashlib
    import sys
    from dataclasses import asdict

    for size in ("tiny", "mid"):
        fields = asdict(SIZES[size])
        del fields["circuit"], fields["arch"]
        payload = json.dumps({"spec": fields, "python": list(sys.version_info[:2]),
                              "format": 1}, sort_keys=True)
        assert spec_hash(SIZES[size]) == hashlib.sha256(payload.encode()).hexdigest()[:16]
    assert spec_hash(SIZES["tiny-induction"]) != spec_hash(SIZES["tiny"])


def test_induction_model_continues_a_cued_stretch_from_its_kv():
    """tiny-induction reads its greedy tokens out of the KV of earlier positions, by
    clear margins: after a cue that repeats part of the prompt it continues that part,
    and with another prefix in the cache it would say something else."""
    import random

    import torch
    from transformers import AutoModelForCausalLM

    path = build_demo_model(None, "tiny-induction")
    config = AutoConfig.from_pretrained(path)
    assert config.tie_word_embeddings and config.rope_parameters["rope_theta"] == 1e20
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    rng = random.Random(7)
    for _ in range(3):
        tokens = rng.sample(range(10, 4096), 300)
        prefix, filler = tokens[:256], tokens[256:]
        start = rng.randrange(0, 200)
        prompt = prefix + filler + prefix[start : start + 8]
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                 output_scores=True, return_dict_in_generate=True)
        assert out.sequences[0, len(prompt):].tolist() == prefix[start + 8 : start + 20]
        for scores in out.scores:
            top2 = scores[0].float().topk(2).values
            assert float(top2[0] - top2[1]) > 3.0


@pytest.mark.parametrize(("arch", "model_type", "shape"), [
    ("qwen3", "qwen3", {"head_dim": 64, "num_key_value_heads": 2}),
    ("gemma3", "gemma3_text", {"sliding_window": 64, "num_hidden_layers": 6}),
    ("deepseek-mla", "deepseek_v3", {"kv_lora_rank": 512, "qk_rope_head_dim": 64}),
    ("granite-hybrid", "granitemoehybrid",
     {"layer_types": ["linear_attention", "linear_attention", "full_attention"]}),
    ("qwen3-next", "qwen3_next", {"layer_types": ["linear_attention"] * 3 + ["full_attention"]}),
])
def test_each_arch_builds_offline_with_its_family_shape(tmp_path, arch, model_type, shape):
    path = build_demo_model(tmp_path / arch, "tiny", arch=arch)
    config = AutoConfig.from_pretrained(path)
    assert config.model_type == model_type
    for key, value in shape.items():
        assert getattr(config, key) == value, key
    if arch == "gemma3":
        assert config.layer_types == ["sliding_attention"] * 2 + ["full_attention"] + \
            ["sliding_attention"] * 2 + ["full_attention"]
    stamp = json.loads((path / STAMP_FILE).read_text())
    assert stamp["spec"]["arch"] == arch
    # Same tokenizer as every demo model; weights deterministic per arch.
    again = build_demo_model(tmp_path / f"{arch}-2", "tiny", arch=arch, force=True)
    assert (path / "model.safetensors").read_bytes() == (again / "model.safetensors").read_bytes()


def test_arch_is_part_of_the_cache_key_and_llama_keeps_its_key():
    from symram_vllm.demo_model import spec_for

    assert spec_for("tiny", "llama") is SIZES["tiny"]
    from symram_vllm.demo_archs import ARCHS

    hashes = {spec_hash(spec_for("tiny", arch)) for arch in ARCHS}
    assert len(hashes) == len(ARCHS)


def test_unknown_arch_and_arch_only_sizes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="qwen3"):
        build_demo_model(tmp_path / "x", "tiny", arch="mistral-moe")
    with pytest.raises(ValueError, match="only as arch 'llama'"):
        build_demo_model(tmp_path / "y", "tiny-induction", arch="qwen3")


def test_bigram_init_makes_the_model_predict_each_tokens_usual_successor():
    """demo_train starts from a bigram model: at step 0 the greedy next token is the
    corpus's most frequent successor of the current token, through the whole network."""
    import torch

    from symram_vllm.demo_train import TrainedArch, bigram_init, build_model

    class Tok:
        bos_token_id, eos_token_id, pad_token_id = 0, 1, 2

    arch = TrainedArch(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=1, num_key_value_heads=1)
    torch.manual_seed(0)
    model = build_model(arch, 16, Tok()).eval()
    successor = {t: (3 * t + 5) % 16 for t in range(16)}
    rng = torch.Generator().manual_seed(1)
    ids = [3]
    for _ in range(4000):  # the usual successor 80% of the time, else random
        usual = torch.rand(1, generator=rng).item() < 0.8
        ids.append(successor[ids[-1]] if usual else int(torch.randint(16, (1,), generator=rng)))
    bigram_init(model, torch.tensor(ids))
    with torch.no_grad():
        logits = model(torch.arange(16).view(16, 1)).logits[:, -1]
    assert logits.argmax(-1).tolist() == [successor[t] for t in range(16)]


def test_trained_model_is_copied_from_the_committed_weights(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from symram_vllm.demo_train import WEIGHTS_DIR, heldout_texts

    path = build_demo_model(tmp_path / "trained", "trained")
    assert (path / "model.safetensors").read_bytes() == \
        (WEIGHTS_DIR / "model.safetensors").read_bytes()
    config = AutoConfig.from_pretrained(path)
    assert (config.num_hidden_layers, config.max_position_embeddings) == (4, 1024)
    training = json.loads((path / "training.json").read_text())
    tok = AutoTokenizer.from_pretrained(path)
    assert len(tok) == config.vocab_size
    # Trained, not random: well below the uniform 8.3 nats on files it never saw.
    ids = tok("\n".join(heldout_texts())[:20000], return_tensors="pt")["input_ids"][:, :512]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        loss = float(model(ids, labels=ids).loss)
    assert loss < 6.5, loss
    assert abs(loss - training["final_val_loss"]) < 1.0
