"""Does ``deltatune search`` find a configuration at ≤ LoRA r=8's parameter count that beats LoRA r=8 on MiniLM/MRPC?

1. Search (20 trials by default) over the registered PEFT methods with their default budgets, layers
   {all, top:3, bottom:3} and modules {method default, [query, value]}, restricted to configurations with at most
   LoRA r=8's trainable parameters (``max_params``; draws above it train nothing and do not count); every trial
   trains ``--steps`` steps and is scored on the FIRST half of the MRPC dev rows (``eval_limit``),
   pruned by optuna's median pruner.
2. Retrain LoRA r=8 and every front configuration with at most LoRA r=8's trainable parameters (``--seeds``
   seeds each) and score their final deltas on the SECOND half of the dev rows, which the search never saw.
3. Write ``--report`` (JSON): the front, the winner, its parameter count and cost (search wall time).

Run: ``OMP_NUM_THREADS=2 .venv/bin/python benchmarks/search_mrpc.py --out runs/search_mrpc`` (hours on a busy
2-core machine; ``--trials 3 --steps 20`` for a smoke run).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from deltatune.api import load_base_for
from deltatune.config import parse_config
from deltatune.model import apply_delta
from deltatune.search.candidates import Resolver
from deltatune.search.front import front_rows, save_front
from deltatune.search.space import SearchSpace
from deltatune.search.study import run_search
from deltatune.train.config import TrainConfig
from deltatune.train.evaluate import evaluate
from deltatune.train.loop import train
from deltatune.train.tasks import build_task

SKIP = ("full", "hft", "lisa")  # full-size updates: never at or below LoRA r=8's count


def held_out_score(delta, train_map: dict, half: int) -> float:
    """Main metric of ``delta`` on dev rows [half:] (never used by the search)."""
    cfg = parse_config(TrainConfig, {**train_map, "eval_limit": None, "out_dir": "/tmp/unused"}, "held-out")
    task = build_task(cfg)
    task.eval = task.eval.select(range(half, len(task.eval)))
    model = load_base_for(delta).eval()
    apply_delta(model, delta)
    with torch.no_grad():
        return float(evaluate(model, task, 64, torch.device("cpu"))[task.main_metric])


def retrain(name: str, method_map: dict, train_map: dict, seeds: int, out: Path, half: int) -> dict:
    from deltatune.methods.registry import get_method

    scores, params = [], 0
    for seed in range(seeds):
        cfg = parse_config(TrainConfig, {**train_map, "seed": seed, "out_dir": str(out / f"{name}-s{seed}"),
                                         "overwrite": True, "progress": False}, "retrain")
        m = dict(method_map)
        result = train(cfg, get_method(m.pop("name")).parse(m))
        params = result.delta.trainable_count
        scores.append(held_out_score(result.delta, train_map, half))
    return {"name": name, "method": method_map, "params": params, "held_out": scores,
            "mean": statistics.mean(scores)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/search_mrpc")
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--report", default="benchmarks/results/search_mrpc.json")
    args = ap.parse_args()
    out = Path(args.out)
    half = 204  # MRPC dev has 408 rows: [0, 204) for the search, [204, 408) held out
    train_map = dict(task="mrpc", max_steps=args.steps, eval_every=max(1, args.steps // 3), eval_limit=half,
                     batch_size=16, max_length=128, eval_before=False, checkpoint_every=0)
    from deltatune.methods.registry import METHODS, get_method

    get_method("lora")
    probe = parse_config(TrainConfig, {**train_map, "out_dir": "/tmp/unused"}, "probe")
    lora8 = Resolver(build_task(probe).load_model()).resolve("lora", {"r": 8}, "all", "default")
    space = parse_config(SearchSpace, {"methods": {m: {} for m in sorted(METHODS) if m not in SKIP},
                                       "layers": ["all", "top:3", "bottom:3"], "max_params": lora8.params,
                                       "modules": ["default", ["query", "value"]], "trials": args.trials}, "search")
    result = run_search(space, train_map, out, out / "study.db")
    # the search's cost: the wall time of its trials (also right when the search was resumed)
    search_seconds = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in result.study.trials
                         if t.datetime_complete is not None and t.datetime_start is not None)
    save_front(result, out)
    rows = front_rows(result)
    baseline = retrain("lora-r8", {"name": "lora", "r": 8}, train_map, args.seeds, out / "final", half)
    contenders = [retrain(f"trial-{r['trial']}", r["method"], train_map, args.seeds, out / "final", half)
                  for r in rows if r["params"] <= lora8.params]
    winner = max(contenders, key=lambda c: c["mean"], default=None)
    report = {"search_seconds": search_seconds, "trials": args.trials, "steps": args.steps,
              "lora_r8_params": lora8.params, "front": rows, "baseline": baseline, "contenders": contenders,
              "winner": winner, "winner_beats_lora_r8": bool(winner and winner["mean"] > baseline["mean"])}
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    Path(args.report).write_text(json.dumps(report, indent=1, default=str))
    print(json.dumps({k: report[k] for k in ("lora_r8_params", "winner", "winner_beats_lora_r8")}, indent=1,
                     default=str))


if __name__ == "__main__":
    main()
