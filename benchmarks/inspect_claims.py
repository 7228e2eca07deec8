"""Check two published claims at MiniLM scale with ``deltatune inspect``.

1. "LoRA vs Full Fine-tuning: An Illusion of Equivalence" (Shuttleworth et al., 2024): LoRA deltas put
   *intruder dimensions* (top singular vectors of ``W + ΔW`` with cosine < ε to every singular vector of ``W``)
   into the weights; full fine-tuning does not.
2. "Reinforcement Learning Finetunes Small Subnetworks" (Mukherjee et al., 2025) and the sparse fine-tuning
   papers: a sparse update is concentrated on few entries, and most of full fine-tuning's entries move little.

Three deltas are trained on SST-2 with the same data order, batch, steps and schedule: LoRA r = 8 (α = 8),
SpIEL sparse with LoRA's trainable count, and full fine-tuning (each at its method's default LR, the SST-2
sweep's best for LoRA and sparse).  A run whose ``delta/`` already exists under ``--work`` is reused.  Then
:func:`deltatune.inspect.inspect_deltas` runs on the three, writes its report and plots to ``--report`` and
copies small README figures to ``docs/img/inspect_*.png``; the numbers go to ``--out`` (``.json`` + ``.md``).

Run::

    python benchmarks/inspect_claims.py            # trains what is missing, then inspects
    python benchmarks/inspect_claims.py --train-only --methods full   # one run (e.g. in parallel processes)
    python benchmarks/inspect_claims.py --extra lora-lr0.002          # also LoRA at 4× its LR
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

METHODS = ("lora", "sparse", "full")
EPSILONS = (0.5, 0.7, 0.9)
FIGURES = ("intruders", "rel_norm", "spectra", "pairwise_cosine", "concentration")


def _config(method: str) -> Any:
    import deltatune as dt
    from deltatune.model import attach
    from deltatune.train.config import TrainConfig
    from deltatune.train.tasks import build_task

    lora = dt.LoRAConfig(r=8, alpha=8)
    if method.startswith("lora"):
        return lora
    if method == "full":
        from deltatune.methods.full import FullConfig

        return FullConfig()
    probe = build_task(TrainConfig(train_limit=1, eval_limit=1)).load_model()
    return dt.SparseConfig(num_tunable=attach(probe, lora).trainable_count)


def lr_of(method: str) -> float | None:
    """The LR a run name asks for (``lora-lr0.002``), else ``None`` (the method's default)."""
    return float(method.split("-lr", 1)[1]) if "-lr" in method else None


def train(method: str, steps: int, work: Path) -> tuple[Path, dict[str, Any]]:
    """Train (or reuse) ``work/<method>``; returns the delta folder and what the run recorded."""
    from deltatune.train import loop
    from deltatune.train.config import TrainConfig

    run = work / method
    delta = run / "delta"
    info_file = run / "inspect_claims.json"
    if (delta / "manifest.json").is_file() and info_file.is_file():
        info = json.loads(info_file.read_text())
        if info.get("steps") == steps:
            print(f"reusing {run}", flush=True)
            return delta, info
    cfg = TrainConfig(out_dir=str(run), max_steps=steps, batch_size=16, max_length=64, eval_every=0,
                      eval_before=False, checkpoint_every=0, keep_best=False, progress=False, overwrite=True,
                      lr=lr_of(method))
    t0 = time.perf_counter()
    result = loop.train(cfg, _config(method))
    info = {"method": method, "steps": steps, "trainable": result.delta.trainable_count,
            "dev_accuracy": round(float(result.final["accuracy"]), 4), "train_s": round(time.perf_counter() - t0, 1)}
    info_file.write_text(json.dumps(info))
    print(f"trained {method}: {info}", flush=True)
    return delta, info


def claim_rows(report: dict[str, Any], labels: list[str]) -> list[dict[str, Any]]:
    """One row per delta: the numbers the two claims are about, over the matrices all three deltas touch."""
    from deltatune.inspect.summary import common_matrices, delta_summary, intruder_curve

    common = common_matrices(report["layers"], labels)
    blocks = {k for k in common if any(r["key"] == k and r["layer"] is not None for r in report["layers"])}
    rows = []
    for lab in labels:
        row = delta_summary(report["layers"], lab, keys=common)
        curve = intruder_curve(report["layers"], lab, EPSILONS, keys=blocks)
        row.update({f"block_intruders_eps{e}": n for e, n in zip(EPSILONS, curve, strict=True)})
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--work", default="runs/inspect-claims", help="where the three runs live (reused if present)")
    ap.add_argument("--report", default="runs/inspect-claims/report", help="inspect's report folder")
    ap.add_argument("--out", default="benchmarks/results/inspect_claims.json")
    ap.add_argument("--figures", default="docs/img", help="where the small README figures go")
    ap.add_argument("--train-only", action="store_true")
    ap.add_argument("--methods", default=",".join(METHODS), help="train only these (comma list); inspect needs all")
    ap.add_argument("--extra", default="", help="more runs to train and inspect, e.g. lora-lr0.002 (LoRA at 4× LR)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 degrades least on a busy machine)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    names = [m for m in args.methods.split(",") + args.extra.split(",") if m]
    runs = {m: train(m, args.steps, work) for m in names}
    if args.train_only:
        return
    labels = list(METHODS) + [m for m in names if m not in METHODS]
    from _common import machine_meta, write_report

    from deltatune.inspect import InspectOptions, inspect_deltas

    t0 = time.perf_counter()
    report = inspect_deltas([str(runs[m][0]) for m in labels], InspectOptions(out=args.report, labels=labels))
    inspect_s = round(time.perf_counter() - t0, 1)
    rows = claim_rows(report, labels)
    for row in rows:
        row.update({k: runs[row["input"]][1][k] for k in ("trainable", "dev_accuracy", "train_s")})
    figures = Path(args.figures)
    figures.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in FIGURES:
        src = Path(args.report) / f"{name}.png"
        if src.is_file():
            shutil.copyfile(src, figures / f"inspect_{name}.png")
            copied.append(str(figures / f"inspect_{name}.png"))
    meta = machine_meta() | {"steps": args.steps, "batch": 16, "max_length": 64, "task": "sst2",
                             "inspect_s": inspect_s, "pairs": report["pairs_summary"],
                             "recommendation": report["recommendation"], "figures": copied}
    columns = tuple(rows[0])
    print(write_report(args.out, meta, rows, columns, title=f"inspect claims (SST-2, MiniLM, {args.steps} steps)"))


if __name__ == "__main__":
    main()
