"""Proxy tuning demo with tiny Llama models (Liu et al. 2024; EFT up-scaling, Mitchell et al. 2024).

1. "Pretrain" two random tiny Llamas (small, large) on the first 90% of Tiny Shakespeare (plain torch loop): the
   two bases.  Both share one byte-level BPE tokenizer of 2048 tokens trained here on the two training texts
   (the proxy rule needs one vocabulary; a 30k-token vocabulary would make the output layer dominate on CPU).
2. Tune the small base on WikiText-2 ``valid.txt`` with ``deltatune`` (method ``full``: a dense delta).
3. Report perplexity on held-out Shakespeare (last 10%) and WikiText-2 ``test.txt`` for: small base, small
   tuned, large base, and the large base proxy-tuned, ``softmax(s_large + α(s_small_tuned − s_small_base))``,
   for α ∈ {0.5, 1}.  The combined logits use :func:`deltatune.proxy.proxy_logits` on full-sequence forwards.

Run: ``OMP_NUM_THREADS=2 .venv/bin/python benchmarks/proxy_tuning.py [--out runs/proxy_demo]`` (≈ 7 min on 2 busy CPU
cores; ``--quick`` for a 1-minute smoke run).  Writes ``OUT/results.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import deltatune
from deltatune.proxy import proxy_logits
from deltatune.train.config import TrainConfig
from deltatune.train.glue import default_data_dir
from deltatune.train.loop import train

BLOCK = 64


def tokens(tok, text: str) -> torch.Tensor:
    ids = tok(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def blocks(ids: torch.Tensor, n: int | None = None) -> torch.Tensor:
    k = len(ids) // BLOCK
    out = ids[: k * BLOCK].view(k, BLOCK)
    return out[:n] if n else out


def train_tokenizer(files: list[Path], where: Path, size: int = 2048):
    """A byte-level BPE tokenizer trained on ``files`` (training texts only), saved and reloaded as HF fast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train([str(f) for f in files], trainers.BpeTrainer(vocab_size=size, special_tokens=["<pad>", "<eos>"],
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", eos_token="<eos>")
    fast.model_max_length = 10**9
    fast.save_pretrained(where)
    return AutoTokenizer.from_pretrained(where)


def llama(hidden: int, layers: int, vocab: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=BLOCK,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg)


def pretrain(model: LlamaForCausalLM, data: torch.Tensor, steps: int, lr: float, batch: int = 16) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(0)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        idx = torch.randint(0, len(data), (batch,), generator=g)
        x = data[idx]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return float(loss.detach())


@torch.no_grad()
def logits(model, data: torch.Tensor) -> list[torch.Tensor]:
    model.eval()
    return [model(input_ids=data[i:i + 16]).logits.float() for i in range(0, len(data), 16)]


def ppl(chunks: list[torch.Tensor], data: torch.Tensor) -> float:
    nll, n = 0.0, 0
    for c, i in zip(chunks, range(0, len(data), 16), strict=True):
        y = data[i:i + 16, 1:]
        lp = torch.log_softmax(c[:, :-1], -1)
        nll += -lp.gather(-1, y.unsqueeze(-1)).sum().item()
        n += y.numel()
    return math.exp(nll / n)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/proxy_demo")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=200, help="pretraining steps per base (tuning: 3/4 of it)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    data_root = Path(default_data_dir())
    tok = train_tokenizer([data_root / "tinyshakespeare" / "input.txt", data_root / "wikitext-2" / "valid.txt"],
                          out / "tokenizer")
    shakes = tokens(tok, (data_root / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8"))
    cut = int(0.9 * len(shakes))
    shakes_train, shakes_eval = blocks(shakes[:cut]), blocks(shakes[cut:], 48)
    wiki_eval = blocks(tokens(tok, (data_root / "wikitext-2" / "test.txt").read_text(encoding="utf-8")[:400_000]), 48)
    steps = 40 if args.quick else args.steps
    vocab = len(tok)
    bases = {}
    for name, hidden, layers, lr in (("small", 64, 2, 3e-3), ("large", 128, 4, 2e-3)):
        model = llama(hidden, layers, vocab, seed=1 if name == "small" else 2)
        t0 = time.time()
        loss = pretrain(model, shakes_train, steps, lr)
        print(f"pretrained {name} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params) {steps} steps: "
              f"loss {loss:.3f} in {time.time() - t0:.0f}s", flush=True)
        model.save_pretrained(out / name)
        tok.save_pretrained(out / name)
        bases[name] = model.eval()
    cfg = TrainConfig(model=str(out / "small"), task="text",
                      data=str(data_root / "wikitext-2" / "valid.txt"), out_dir=str(out / "tuned"),
                      max_steps=3 * steps // 4, batch_size=16, max_length=BLOCK, lr=2e-3, eval_every=0,
                      eval_before=False, checkpoint_every=0, progress=False, overwrite=True)
    result = train(cfg, deltatune.make_config("full", {}))
    print(f"tuned small on WikiText-2 valid: {cfg.max_steps} steps", flush=True)
    tuned = LlamaForCausalLM.from_pretrained(out / "small").eval()
    deltatune.apply_delta(tuned, deltatune.load_delta(result.delta_dir))
    results: dict[str, dict[str, float]] = {}
    for domain, data in (("shakespeare", shakes_eval), ("wikitext", wiki_eval)):
        s_small, s_tuned, s_large = logits(bases["small"], data), logits(tuned, data), logits(bases["large"], data)
        row = {"small base": ppl(s_small, data), "small tuned": ppl(s_tuned, data), "large base": ppl(s_large, data)}
        for alpha in (0.5, 1.0):
            comb = [proxy_logits(a, [b], c, [alpha]) for a, b, c in zip(s_large, s_tuned, s_small, strict=True)]
            row[f"large proxy-tuned α={alpha}"] = ppl(comb, data)
        results[domain] = row
    results["seconds"] = {"total": time.time() - start}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    for domain in ("shakespeare", "wikitext"):
        print(f"{domain:12s} " + "  ".join(f"{k}: {v:.1f}" for k, v in results[domain].items()))
    print(f"total {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
