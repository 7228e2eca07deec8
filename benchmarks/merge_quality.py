"""Part 2 of ``benchmarks/merge.py``: multi-task merge quality of four GLUE task deltas on MiniLM-L6.

Four dense full fine-tuning deltas (SST-2, MRPC, RTE, CoLA; each with its own classification head) are
merged with each method through ``deltatune.algebra.merge`` (``preset="paper"``: the authors'
semantics — global top-k for TIES/PCB, per-row Breadcrumbs, 1/ρ DARE rescale).  Each task is scored
as ``base + merged encoder delta + that task's own head`` on its dev set with its official metric
(SST-2/RTE accuracy, MRPC F1, CoLA Matthews); ``normalized = merged metric / single-task metric``,
averaged over the tasks (the TIES / PCB papers' normalized accuracy).

Hyper-parameters: each method's sparsity follows its paper (below); the global scale λ (and LiNeS'
β) is chosen from a small fixed grid by the average normalized score on the *held-out rows of the
train splits* (never trained on, never dev).  Each method is merged once at λ = 1 and λ is applied as
a post-scale of that delta — identical to the methods' ``lambda``, since every one ends with
``θ₀ + λ·τ_m`` (checked once against the engine's own λ on task arithmetic: ``engine_check_max_abs_diff``).
LiNeS' β is swept the same way on the cached λ = 1 merge (``deltatune.ops.lines`` factors, α by the
paper's L1 rule); its reported numbers come from a fresh engine merge with ``lines={"alpha": "auto",
"beta": β*}``, compared with the swept version in ``engine_check_max_abs_diff``.
Model Stock is left out: it assumes fine-tunes of the *same* task from different seeds (its
interpolation ratio comes from the angle between such runs), which four different tasks are not.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merge_glue import TASKS, TaskScorer, ensure_trained
from merge_settings import QualitySettings


@dataclass(frozen=True)
class MergeSpec:
    """One merge configuration: engine method and params, λ grid family, optional LiNeS."""

    name: str
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    grid: str | None = None   # "sum" | "mean" | None (no λ)
    lines: bool = False
    note: str = ""


MERGES = (
    MergeSpec("linear", "linear", {}, None, note="uniform average of the task vectors (model soup)"),
    MergeSpec("task_arithmetic", "task_arithmetic", {}, "sum", note="λ·Σ τ_t"),
    MergeSpec("ties", "ties", {"density": 0.2}, "mean", note="top-20% global trim, mass sign, disjoint mean"),
    MergeSpec("dare_ties", "dare_ties", {"density": 0.2}, "mean", note="DARE keep 20% (×1/ρ) then TIES vote"),
    MergeSpec("breadcrumbs", "breadcrumbs", {"density": 0.2, "gamma": 0.1}, "sum",
              note="per row: drop top 10%, keep next 20% (README β=0.2, γ=0.1), summed"),
    MergeSpec("pcb", "pcb", {"density": 0.1}, "mean", note="PCB ratio 0.1, temperature 5, normalized inter"),
    MergeSpec("della", "della", {"density": 0.2, "epsilon": 0.1}, "mean",
              note="MagPrune keep 20% ± 0.1 by rank (×1/p_i), TIES vote"),
    MergeSpec("task_arithmetic+lines", "task_arithmetic", {"lambda": 1.0}, None, lines=True,
              note="LiNeS on Σ τ_t: α = 1/T (auto), β tuned"),
    MergeSpec("ties+lines", "ties", {"density": 0.2, "lambda": 1.0}, None, lines=True,
              note="LiNeS on TIES: α = ‖Στ‖₁/(T‖τ_ties‖₁) (auto), β tuned"),
)
SKIPPED = {"model_stock": "assumes fine-tunes of the same task from different seeds (interpolation ratio from "
                          "their angle); four different tasks give near-orthogonal deltas, so it is not a "
                          "multi-task merge"}
CLAIMS = (("ties", "task_arithmetic"), ("pcb", "task_arithmetic"), ("breadcrumbs", "task_arithmetic"),
          ("task_arithmetic", "linear"))


def _scaled(parts: dict[str, Any], lam: float) -> dict[str, Any]:
    """Dense parts multiplied by ``lam`` (copies)."""
    out = {}
    for name, part in parts.items():
        if part.kind != "dense":
            raise TypeError(f"post-scaling expects dense parts, {name} is {part.kind}")
        new = copy.deepcopy(part)
        new.load_tensors({k: v * lam for k, v in part.state().items()}, "scaled")
        out[name] = new
    return out


class QualityBench:
    def __init__(self, work: Path, s: QualitySettings, threads: int | None, log=print) -> None:
        self.s, self.log = s, log
        self.dirs: dict[str, Path] = {}
        self.train_info: dict[str, dict[str, Any]] = {}
        self.cache: dict[tuple[str, str], dict[str, Any]] = {}
        self.merge_s: list[float] = []
        for task in TASKS:
            self.dirs[task], self.train_info[task] = ensure_trained(s.specs[task], work, threads, log)

    def prepare(self) -> None:
        from deltatune.io.delta_format import load_delta

        spec0 = self.s.specs[TASKS[0]]
        self.scorers = {t: TaskScorer(t, self.dirs[t], spec0.max_length, spec0.holdout, spec0.eval_limit)
                        for t in TASKS}
        self.deltas = [load_delta(self.dirs[t]) for t in TASKS]
        full = {split: {t: sc.score(None, split, delta=sc.delta) for t, sc in self.scorers.items()}
                for split in ("heldout", "dev")}
        self.single = {split: {t: self.scorers[t].main(m) for t, m in full[split].items()} for split in full}
        self.single_full = full["dev"]

    def merge(self, method: str, params: dict[str, Any], lines: dict[str, Any] | None = None) -> dict[str, Any]:
        """The engine's merged parts (timed into ``self.merge_s``)."""
        from deltatune.algebra import merge

        t0 = time.perf_counter()
        # each task is scored with its own head (TaskScorer): the merge's kept heads (one per task) are not needed
        delta = merge(self.deltas, method, params=params, preset="paper", output="dense", seed=0, lines=lines,
                      heads="none")
        self.merge_s.append(round(time.perf_counter() - t0, 2))
        return delta.parts

    def at_one(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """Parts merged with ``λ = 1`` (cached: the λ sweep, the final numbers and LiNeS all reuse them)."""
        key = (method, json.dumps({k: v for k, v in params.items() if k != "lambda"}, sort_keys=True))
        if key not in self.cache:
            self.cache[key] = self.merge(method, {**params, "lambda": 1.0})
        return self.cache[key]

    def normalized(self, parts: dict[str, Any], split: str) -> tuple[float | None, dict[str, dict[str, float]]]:
        metrics = {t: sc.score(parts, split) for t, sc in self.scorers.items()}
        ratios = [self.scorers[t].main(m) / self.single[split][t] for t, m in metrics.items()
                  if self.single[split][t] > 0]
        return (sum(ratios) / len(ratios) if ratios else None), metrics

    def sweep(self, candidates: dict[float, Any]) -> tuple[float, list[dict[str, Any]]]:
        """The candidate with the best average normalized held-out score (first on ties / all None)."""
        rows, best, chosen = [], None, next(iter(candidates))
        for value, make in candidates.items():
            score, _ = self.normalized(make(), "heldout")
            rows.append({"value": value, "heldout_normalized": _r(score)})
            if score is not None and (best is None or score > best):
                best, chosen = score, value
        return chosen, rows

    def run_one(self, spec: MergeSpec) -> dict[str, Any]:
        from deltatune.ops.lines import lines_multitask_alpha

        self.merge_s = []
        lam = beta = alpha = None
        check = None
        if spec.lines:
            base = self.at_one(spec.method, spec.params)
            total = _l1(self.at_one("task_arithmetic", {}))
            alpha = lines_multitask_alpha(total, _l1(base), len(TASKS))
            beta, sweep = self.sweep({b: (lambda b=b: _lines_scaled(base, alpha, b)) for b in self.s.lines_beta})
            parts = self.merge(spec.method, spec.params, {"alpha": "auto", "beta": beta})
            check = _max_diff(parts, _lines_scaled(base, alpha, beta))
        elif spec.grid:
            base = self.at_one(spec.method, spec.params)
            grid = self.s.lambda_sum if spec.grid == "sum" else self.s.lambda_mean
            lam, sweep = self.sweep({v: (lambda v=v: _scaled(base, v)) for v in grid})
            parts = _scaled(base, lam)
            if spec.method == "task_arithmetic":  # the post-scale equals the engine's own λ (checked once, cheap)
                check = _max_diff(self.merge(spec.method, {**spec.params, "lambda": lam}), parts)
        else:
            parts, sweep = self.merge(spec.method, spec.params), []
        held = next((r["heldout_normalized"] for r in sweep if r["value"] in (lam, beta)), None)
        if not sweep:
            held = _r(self.normalized(parts, "heldout")[0])
        score, metrics = self.normalized(parts, "dev")
        row: dict[str, Any] = {"part": "quality", "method": spec.name, "lambda": lam, "beta": beta,
                               "lines_alpha": _r(alpha), "avg_normalized": _r(score), "heldout_normalized": held}
        row.update({t: _r(self.scorers[t].main(m)) for t, m in metrics.items()})
        row["mrpc_accuracy"] = _r(metrics["mrpc"].get("accuracy"))
        row.update({"merge_s": min(self.merge_s) if self.merge_s else None, "merge_runs_s": self.merge_s,
                    "engine_check_max_abs_diff": check, "params": spec.params, "note": spec.note, "sweep": sweep,
                    "dev_metrics": metrics})
        self.log(f"[quality] {spec.name:22s} λ={lam} β={beta} avg normalized {_r(score)} "
                 f"({', '.join(f'{t} {row[t]}' for t in TASKS)}) merges {self.merge_s} s")
        return row


def _l1(parts: dict[str, Any]) -> float:
    return float(sum(float(t.abs().sum()) for p in parts.values() for t in p.state().values()))


def _max_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Largest absolute difference between two sets of parts (same names and tensors expected)."""
    if set(a) != set(b):
        return float("inf")
    return max(float((ta.float() - b[n].state()[k].float()).abs().max())
               for n, p in a.items() for k, ta in p.state().items())


def _lines_scaled(parts: dict[str, Any], alpha: float, beta: float) -> dict[str, Any]:
    """LiNeS applied to merged parts here (``deltatune.ops.lines``), for the β sweep on cached merges."""
    from deltatune.ops.lines import count_layers, layer_index, lines_factor

    names = [f"{n}.{k}" for n, p in parts.items() for k in p.state()]
    n_layers = count_layers(names)
    out = {}
    for name, part in parts.items():
        new = copy.deepcopy(part)
        new.load_tensors({k: v * lines_factor(layer_index(f"{name}.{k}", n_layers), n_layers, alpha, beta)
                          for k, v in part.state().items()}, "lines")
        out[name] = new
    return out


def _r(v: float | None, nd: int = 4) -> float | None:
    return None if v is None else round(float(v), nd)


def run_quality(work: Path, s: QualitySettings, threads: int | None = None, methods: list[str] | None = None,
                log=print) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows of part 2 (single-task reference + one per merge) and the part's metadata (claims included)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    bench = QualityBench(work, s, threads, log)
    bench.prepare()
    single = {"part": "quality", "method": "single_task (own delta)", "avg_normalized": 1.0,
              **{t: _r(v) for t, v in bench.single["dev"].items()},
              "mrpc_accuracy": _r(bench.single_full["mrpc"].get("accuracy")), "dev_metrics": bench.single_full}
    rows = [single]
    for spec in MERGES:
        if methods and spec.name not in methods:
            continue
        try:
            rows.append(bench.run_one(spec))
        except Exception as exc:  # noqa: BLE001 - one failing method must not lose the others' numbers
            log(f"[quality] {spec.name} FAILED: {type(exc).__name__}: {exc}")
            rows.append({"part": "quality", "method": spec.name, "error": f"{type(exc).__name__}: {exc}"[:500]})
    by = {r["method"]: r.get("avg_normalized") for r in rows}
    claims = []
    for a, b in CLAIMS:
        va, vb = by.get(a), by.get(b)
        holds = None if va is None or vb is None else va > vb
        claims.append({"claim": f"{a} > {b}", "holds": holds, a: va, b: vb})
        log(f"[quality] claim {a} > {b}: {'holds' if holds else 'does not hold' if holds is False else 'n/a'} "
            f"({va} vs {vb})")
    spec0 = s.specs[TASKS[0]]
    meta = {"tasks": list(TASKS), "train": {t: {k: v for k, v in bench.train_info[t].items() if k != "final"}
                                           for t in TASKS},
            "single_heldout": bench.single["heldout"], "holdout_rows": spec0.holdout,
            "eval_limit": spec0.eval_limit, "lambda_grid": {"sum": s.lambda_sum, "mean": s.lambda_mean},
            "lines_beta_grid": s.lines_beta, "skipped": SKIPPED, "claims": claims,
            "methods": {m.name: {"engine_method": m.method, "params": m.params, "lambda_grid": m.grid,
                                 "lines": m.lines, "note": m.note} for m in MERGES},
            "preset": "paper", "wall_s": round(time.perf_counter() - t0, 1)}
    return rows, meta
