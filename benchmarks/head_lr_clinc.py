"""CLINC150 head learning rate (the README's head_lr table): MiniLM + LoRA r=8, lr 5e-4, batch 16, max length 24,
scored on a seeded 1,500-row sample of the test split; the head at the delta's lr ("same"), the default
(10 × lr, "default") or 2e-2 ("x40").

Run: ``python benchmarks/head_lr_clinc.py same|default|x40 [STEPS=200]``; prints one JSON line.
"""

from __future__ import annotations

import csv
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import deltatune
from deltatune.train import loop
from deltatune.train.config import TrainConfig
from deltatune.train.glue import default_data_dir


def main() -> None:
    mode, steps = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 200
    data = Path(default_data_dir()) / "clinc150"
    with open(data / "test.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    random.Random(0).shuffle(rows)
    with tempfile.TemporaryDirectory() as tmp:
        sample = Path(tmp) / "test1500.csv"
        with open(sample, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["text", "intent"])
            writer.writeheader()
            writer.writerows(rows[:1500])
        head_lr = {"same": 5e-4, "default": None, "x40": 2e-2}[mode]
        start = time.time()
        cfg = TrainConfig(task="classify", data=str(data / "train.csv"), eval_data=str(sample),
                          label_column="intent", out_dir=f"{tmp}/run", max_steps=steps, batch_size=16, max_length=24,
                          lr=5e-4, head_lr=head_lr, eval_every=0, eval_before=False, checkpoint_every=0,
                          progress=False, keep_best=False)
        res = loop.train(cfg, deltatune.make_config("lora", {"r": 8}))
    print(json.dumps({"mode": mode, "steps": steps, "head_lr": head_lr, "final": res.final,
                      "seconds": round(time.time() - start)}))


if __name__ == "__main__":
    main()
