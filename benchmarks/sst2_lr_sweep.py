"""SST-2 dev accuracy of LoRA r=8 vs SpIEL sparse at LoRA's trainable count, over a small LR grid.

Both train MiniLM-L6 on every linear layer of the encoder for ``--steps`` steps (batch 16, max length
64, constant LR, same seed and batches) through ``deltatune.train.loop.train`` and are scored on all
872 dev rows.  Sparse gets LoRA's count on the encoder blocks (331,776; LoRA's own 337,920 also
covers the pooler), so the comparison slightly favours LoRA.  Sparse also runs without regrowth
(fixed random support) at one LR, to separate SpIEL's drop/regrow from plain sparse training.  The
best LR per method sets ``train_step.py``'s learning rates and the methods' default LRs.

Run::

    python benchmarks/sst2_lr_sweep.py --out benchmarks/results/sst2_lr_sweep.json
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

GRID = [("lora", 5e-4, {}), ("lora", 1e-3, {}), ("lora", 2e-3, {}),
        ("sparse", 5e-4, {}), ("sparse", 1e-3, {}), ("sparse", 2e-3, {}), ("sparse", 3e-3, {}),
        ("sparse", 1e-2, {}), ("sparse", 3e-3, {"regrow": False})]
COLUMNS = ("method", "lr", "variant", "trainable", "dev_accuracy", "wall_s")


def run(method: str, lr: float, extra: dict, steps: int, out: Path) -> dict:
    import deltatune as dt
    from deltatune.model import attach
    from deltatune.train import loop
    from deltatune.train.config import TrainConfig
    from deltatune.train.tasks import build_task

    lora = dt.LoRAConfig(r=8, alpha=8)
    if method == "lora":
        mc = lora
    else:
        probe = build_task(TrainConfig(train_limit=1, eval_limit=1)).load_model()
        blocks = dt.LoRAConfig(r=8, alpha=8, targets=[r"bert\.encoder\..*"])
        mc = dt.SparseConfig(num_tunable=attach(probe, blocks).trainable_count, **extra)
    cfg = TrainConfig(out_dir=str(out / f"{method}-{lr}-{len(extra)}"), max_steps=steps, batch_size=16,
                      max_length=64, lr=lr, lr_schedule="constant", warmup_ratio=0.0, eval_every=0,
                      eval_before=False, checkpoint_every=0, progress=False)
    t0 = time.perf_counter()
    result = loop.train(cfg, mc)
    return {"method": method, "lr": lr, "variant": "no regrow" if extra.get("regrow") is False else "",
            "trainable": result.delta.trainable_count, "dev_accuracy": round(result.final["accuracy"], 4),
            "wall_s": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", default="benchmarks/results/sst2_lr_sweep.json")
    ap.add_argument("--work", default="/tmp/deltatune-lr-sweep", help="where the runs write their deltas")
    args = ap.parse_args()
    rows = [run(m, lr, extra, args.steps, Path(args.work)) for m, lr, extra in GRID]
    meta = machine_meta() | {"steps": args.steps, "batch": 16, "max_length": 64, "schedule": "constant"}
    print(write_report(args.out, meta, rows, COLUMNS, title=f"SST-2 LR sweep ({args.steps} steps)"))


if __name__ == "__main__":
    main()
