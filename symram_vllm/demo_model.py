"""Deterministic, offline demo/test model: a byte-level BPE tokenizer trained on the
Python stdlib sources plus a random-weight Llama.

Nothing is downloaded. The same size on the same Python minor version always yields
the same files, so greedy outputs are reproducible across machines and runs, which
is what makes "output with loaded KV == output with recomputed KV" an exact test.

``--arch`` picks the model family (``demo_archs``: llama, qwen3, gemma3, deepseek-mla,
granite-hybrid) at the size's width; random weights for every family.

``trained`` is a 5.2M-parameter Llama trained on the stdlib sources by
``symram_vllm.demo_train``; its weights and tokenizer are committed
(``demo_weights/trained``) and copied into the model directory, not rebuilt.

``tiny-induction`` is the other exception to "random weights": the tiny architecture
with a two-layer induction (copy) circuit written into its weights
(``demo_circuit``), so its greedy tokens are decided by clear margins and read out of
the KV cache. Codec accuracy is measured on it: a random-weight model decides ~12% of
its tokens by at most one bf16 ulp of logit, where any change to the KV flips them.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import sysconfig
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from symram_vllm.demo_circuit import CircuitSpec, rope_parameters, set_induction_weights

STAMP_FILE = "symram-demo-model.json"

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass(frozen=True)
class DemoModelSpec:
    size: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    max_position_embeddings: int = 16384
    seed: int = 1234
    tokenizer_corpus_bytes: int = 4_000_000
    # None: random weights. Else the induction circuit (tied embeddings), see above.
    circuit: CircuitSpec | None = None
    arch: str = "llama"  # demo_archs.ARCHS


SIZES: dict[str, DemoModelSpec] = {
    "tiny": DemoModelSpec("tiny", 256, 512, 2, 4, 2, 4096),
    "mid": DemoModelSpec("mid", 768, 2048, 8, 4, 2, 8192),
    "tiny-induction": DemoModelSpec("tiny-induction", 256, 512, 2, 4, 2, 4096,
                                    circuit=CircuitSpec()),
    # Shape of the committed weights (demo_train.TrainedArch); not built from the spec.
    "trained": DemoModelSpec("trained", 256, 768, 4, 4, 2, 4096,
                             max_position_embeddings=1024),
}


def spec_hash(spec: DemoModelSpec) -> str:
    """Hash of everything that determines the produced files."""
    fields = asdict(spec)
    if fields["circuit"] is None:  # random-weight specs hash as before the field existed
        del fields["circuit"]
    if fields["arch"] == "llama":  # so do llama specs: same cache key as before --arch
        del fields["arch"]
    if spec.size == "trained":  # the committed files are the model
        fields["weights"] = _trained_digest()
    payload = json.dumps(
        {"spec": fields, "python": list(sys.version_info[:2]), "format": 1},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "symram" / "models"


def _stdlib_corpus(max_bytes: int) -> list[str]:
    """Stdlib .py files in sorted order until max_bytes: deterministic per Python version."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts: list[str] = []
    total = 0
    for path in sorted(root.glob("*.py")) + sorted(root.glob("*/*.py")):
        if "site-packages" in path.parts or "test" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        texts.append(text)
        total += len(text)
        if total >= max_bytes:
            break
    if not texts:
        raise RuntimeError(f"no Python stdlib sources found under {root}")
    return texts


def _train_tokenizer(spec: DemoModelSpec, out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    special = ["<s>", "</s>", "<unk>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_stdlib_corpus(spec.tokenizer_corpus_bytes), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)


def _trained_digest() -> str:
    from symram_vllm.demo_train import WEIGHTS_DIR

    weights = WEIGHTS_DIR / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(
            f"the trained demo model's weights are missing ({weights}); they are committed "
            "with the source: restore them with git, or retrain with "
            "`python -m symram_vllm.demo_train`"
        )
    return hashlib.sha256(weights.read_bytes()).hexdigest()[:16]


def _copy_trained(out: Path) -> int:
    """The committed weights and the tokenizer they were trained with; returns the vocab."""
    from symram_vllm.demo_train import WEIGHTS_DIR

    for item in WEIGHTS_DIR.iterdir():
        if item.is_file():
            shutil.copy(item, out / item.name)
    return int(json.loads((out / "config.json").read_text())["vocab_size"])


def _build_weights(spec: DemoModelSpec, out: Path, vocab_size: int) -> None:
    """Random weights, or with ``spec.circuit`` the induction circuit."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if spec.arch != "llama":
        from symram_vllm.demo_archs import model_for

        torch.manual_seed(spec.seed)
        model = model_for(spec.arch, spec, vocab_size)
        _widen_init(model)
        model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
        return
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=3,
        tie_word_embeddings=spec.circuit is not None,
        torch_dtype="bfloat16",
        **({} if spec.circuit is None else {"rope_parameters": rope_parameters(spec.circuit)}),
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config)
    if spec.circuit is not None:
        set_induction_weights(model, spec.circuit)
        model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
        return
    _widen_init(model)
    model = model.to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)


def _widen_init(model: object) -> None:
    """Wider-than-default init so logits are not near-uniform: greedy decoding then
    depends strongly on the KV, which makes wrong KV visible in the output."""
    import torch

    with torch.no_grad():
        for param in model.parameters():  # type: ignore[attr-defined]
            if param.dim() > 1:
                param.normal_(0.0, 0.05)


def is_built(path: Path, spec: DemoModelSpec) -> bool:
    stamp = path / STAMP_FILE
    if not stamp.is_file():
        return False
    try:
        data = json.loads(stamp.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return data.get("hash") == spec_hash(spec)


def spec_for(size: str, arch: str = "llama") -> DemoModelSpec:
    """The spec of `size` built as family `arch`, or ValueError naming the choices."""
    from dataclasses import replace

    from symram_vllm.demo_archs import ARCHS

    if size not in SIZES:
        raise ValueError(f"unknown demo model size {size!r}; choose one of {sorted(SIZES)}")
    if arch not in ARCHS:
        raise ValueError(f"unknown demo model architecture {arch!r}; choose one of {ARCHS}")
    spec = SIZES[size]
    if arch == spec.arch:
        return spec
    if spec.circuit is not None or size == "trained":
        raise ValueError(f"demo model size {size!r} exists only as arch 'llama'")
    return replace(spec, arch=arch)


def build_demo_model(
    path: Path | None = None, size: str = "tiny", force: bool = False, arch: str = "llama"
) -> Path:
    """Build (or reuse) the demo model for `size` at `path`; returns the model directory.

    The directory is written to a temporary sibling and renamed into place, so an
    interrupted build never leaves a half-written model that looks complete.
    """
    spec = spec_for(size, arch)
    digest = spec_hash(spec)
    name = size if arch == "llama" else f"{size}-{arch}"
    target = Path(path) if path is not None else default_cache_dir() / f"{name}-{digest}"
    if not force and is_built(target, spec):
        return target
    if target.exists() and any(target.iterdir()) and not (target / STAMP_FILE).exists():
        raise FileExistsError(
            f"{target} exists and is not a symram demo model; pick an empty or new path"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        if size == "trained":
            vocab = _copy_trained(tmp)
        else:
            _train_tokenizer(spec, tmp)
            from transformers import AutoTokenizer

            vocab = len(AutoTokenizer.from_pretrained(tmp))
            _build_weights(spec, tmp, vocab)
        (tmp / STAMP_FILE).write_text(
            json.dumps({"hash": digest, "spec": asdict(spec), "vocab": vocab}, indent=2)
        )
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
