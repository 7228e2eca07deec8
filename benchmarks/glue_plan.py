"""The plan of ``benchmarks/glue.py``: tasks, methods and budgets, the runs of each (method, task, budget) cell (an
LR sweep at seed 0, then more seeds at the best LR), the resumable runs file, and each method's config at a budget.
Pure functions and small classes, no training (``tests/unit/test_bench_glue.py``)."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

TASKS = {"sst2": 64, "mrpc": 128, "rte": 128, "cola": 64, "stsb": 128}  # task → max length (tokens)
BUDGETS = {"r8": 8, "r32": 32}  # budget label → LoRA rank whose trainable count it is
FIXED = "fixed"
BUDGET_ORDER = (*BUDGETS, FIXED)
SPARSE_METHODS = ("sparse", "lt-sft", "random-sparse", "lift", "sara", "dsee", "s2ft", "bitfit", "hft", "lisa")
FIXED_METHODS = ("bitfit", "hft", "lisa")  # budget fixed by design
METHODS = ("lora", *SPARSE_METHODS)
LORA_TARGETS = ["all-linear"]
S2FT_O_SHARE = 0.4  # share of the budget in attention-output heads (S2FT's default ratios on MiniLM)
BATCH = 16
WARMUP_STEPS = 2
PRELOAD = ("torch", "transformers", "transformers.models.bert.modeling_bert", "deltatune", "deltatune.train.loop")
QUICK = {"tasks": ["sst2", "stsb"], "methods": ["lora", "sparse", "s2ft", "bitfit"], "budgets": ["r8"],
         "steps": 10, "seeds": 1, "lrs": [1.0], "train_limit": 320, "eval_limit": 200}
COLUMNS = ("method", "budget", "task", "trainable", "lr", "metric_name", "metric", "std", "seeds", "heldout",
           "sweep", "step_s", "peak_mb")
AVG_COLUMNS = ("method", "budget", "tasks", "trainable", "metric", "vs_lora", "heldout", "heldout_vs_lora",
               "provisional", "step_s", "peak_mb")


# --- the plan ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Group:
    """One (method, task, budget) cell of the table: an LR sweep at seed 0, then more seeds at the best LR."""

    method: str
    task: str
    budget: str


@dataclasses.dataclass(frozen=True)
class Settings:
    """What every run of one benchmark shares; part of each run's key (runs of other settings are not reused)."""

    steps: int
    seeds: int
    lr_mults: tuple[float, ...]
    train_limit: int | None = None
    eval_limit: int | None = None


@dataclasses.dataclass(frozen=True)
class Run:
    method: str
    task: str
    budget: str
    lr: float
    seed: int
    steps: int
    train_limit: int | None = None
    eval_limit: int | None = None

    @property
    def key(self) -> str:
        return run_key(self.method, self.task, self.budget, self.lr, self.seed, self.steps, self.train_limit,
                       self.eval_limit)


def run_key(method: str, task: str, budget: str, lr: float, seed: int, steps: int, train_limit: int | None,
            eval_limit: int | None) -> str:
    return (f"{method}|{task}|{budget}|lr={lr:.6g}|seed={seed}|steps={steps}|train={train_limit or 'all'}"
            f"|eval={eval_limit or 'all'}")


def plan_groups(methods: Iterable[str], tasks: Iterable[str], budgets: Iterable[str]) -> list[Group]:
    """Task by task, budget by budget, method by method; fixed-budget methods once per task (budget ``fixed``)."""
    methods, budgets = list(methods), list(budgets)
    groups = []
    for task in tasks:
        for budget in budgets:
            groups += [Group(m, task, budget) for m in methods if m not in FIXED_METHODS]
        groups += [Group(m, task, FIXED) for m in methods if m in FIXED_METHODS]
    return groups


def sweep_lrs(default_lr: float, mults: Iterable[float]) -> list[float]:
    """The LRs a method is swept over: ``mults`` × its default LR (rounded to 6 significant digits)."""
    return [float(f"{default_lr * m:.6g}") for m in mults]


def _make_run(group: Group, lr: float, seed: int, s: Settings) -> Run:
    return Run(group.method, group.task, group.budget, lr, seed, s.steps, s.train_limit, s.eval_limit)


def _score(record: dict[str, Any] | None) -> float:
    """A run's main metric for choosing; a failed or undefined run scores −∞."""
    if record is None or record.get("error") or record.get("metric") is None:
        return -math.inf
    value = float(record["metric"])
    return -math.inf if math.isnan(value) else value


def choose_lr(group: Group, lrs: list[float], records: dict[str, dict], s: Settings) -> float | None:
    """The sweep LR whose seed-0 run scored best (first of equals); None until every seed-0 run is recorded.

    Every GLUE main metric is greater-is-better."""
    runs = [_make_run(group, lr, 0, s) for lr in lrs]
    if any(r.key not in records for r in runs):
        return None
    scores = [_score(records[r.key]) for r in runs]
    return lrs[max(range(len(lrs)), key=lambda i: (scores[i], -i))]


def pending_runs(group: Group, lrs: list[float], records: dict[str, dict], s: Settings) -> list[Run]:
    """The runs of ``group`` still to do that can be done now: the missing seed-0 sweep runs, else (once the
    sweep is complete) the missing seeds at the chosen LR (none if every sweep run failed)."""
    sweep = [r for r in (_make_run(group, lr, 0, s) for lr in lrs) if r.key not in records]
    if sweep:
        return sweep
    best = choose_lr(group, lrs, records, s)
    assert best is not None
    if _score(records[_make_run(group, best, 0, s).key]) == -math.inf:
        return []  # every sweep run failed: no seeds to add
    return [r for r in (_make_run(group, best, seed, s) for seed in range(1, s.seeds)) if r.key not in records]


def remaining(group: Group, lrs: list[float], records: dict[str, dict], s: Settings) -> int:
    """Runs ``group`` still needs (sweep runs, plus the further seeds: counted in full until the LR is chosen)."""
    sweep = sum(_make_run(group, lr, 0, s).key not in records for lr in lrs)
    if sweep:
        return sweep + s.seeds - 1
    return len(pending_runs(group, lrs, records, s))


def total_runs(n_groups: int, n_lrs: int, seeds: int) -> int:
    return n_groups * (n_lrs + seeds - 1)


def finite(value: Any) -> Any:
    """``value`` with every NaN/±inf float (an undefined correlation) as None, recursively: the runs file is JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


# --- the runs file ----------------------------------------------------------------------------------------------
class RunStore:
    """``FILE.runs.jsonl``: one JSON record per finished run, keyed by ``record["key"]``; appends are atomic
    (the whole file is rewritten through ``deltatune.io.atomic.atomic_file``, so a crash never leaves half a line)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def load(self) -> dict[str, dict]:
        records: dict[str, dict] = {}
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    record = json.loads(line)
                    records[record["key"]] = record  # a later line (a retried run) replaces an earlier one
        return records

    def append(self, record: dict[str, Any]) -> None:
        from deltatune.io.atomic import atomic_file

        old = self.path.read_text(encoding="utf-8") if self.path.is_file() else ""
        with atomic_file(self.path) as tmp:
            tmp.write_text(old + json.dumps(record, allow_nan=False, default=str) + "\n", encoding="utf-8")


def runs_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".runs.jsonl")


# --- budgets ----------------------------------------------------------------------------------------------------
def lora_mapping(rank: int) -> dict[str, Any]:
    return {"r": rank, "alpha": float(rank), "targets": list(LORA_TARGETS)}


def solve_affine(count: Callable[[int], int], target: int, lo: int = 1, hi: int = 2) -> int:
    """The integer knob ``k`` whose count is nearest ``target``, for a count affine in ``k`` (two probes)."""
    c_lo, c_hi = count(lo), count(hi)
    slope = (c_hi - c_lo) / (hi - lo)
    if slope <= 0:
        raise ValueError(f"count does not grow with the knob ({c_lo} at {lo}, {c_hi} at {hi})")
    return max(0, round(lo + (target - c_lo) / slope))


def budget_mapping(method: str, budget: str, target: int | None, probe: Callable[[str, dict], int]) -> dict[str, Any]:
    """The config mapping of ``method`` at ``budget`` (``target`` trainable values; None for ``fixed``).

    ``probe(method, mapping)`` attaches the method to a fresh MiniLM and returns its trainable count."""
    if method in FIXED_METHODS or budget == FIXED:
        return {}
    rank = BUDGETS[budget]
    if method == "lora":
        return lora_mapping(rank)
    assert target is not None
    if method in ("sparse", "lt-sft", "random-sparse"):
        return {"num_tunable": target, "targets": list(LORA_TARGETS)}
    if method == "lift":
        return {"lora_rank": rank, "targets": list(LORA_TARGETS)}
    if method == "dsee":
        r = max(1, rank // 2)
        base = {"r": r, "alpha": float(2 * r), "targets": list(LORA_TARGETS)}
        n = solve_affine(lambda k: probe("dsee", base | {"num_sparse": k}), target)
        return base | {"num_sparse": max(1, n)}
    if method == "s2ft":
        fixed = {"v_ratio": 0.0, "u_ratio": 0.0}
        per_head = probe("s2ft", fixed | {"o_count": 2, "d_count": 1}) - probe("s2ft", fixed | {"o_count": 1,
                                                                                                "d_count": 1})
        o = max(1, round(S2FT_O_SHARE * target / per_head))
        d = solve_affine(lambda k: probe("s2ft", fixed | {"o_count": o, "d_count": k}), target)
        return fixed | {"o_count": o, "d_count": d}
    if method == "sara":
        f0 = 0.01
        c0 = probe("sara", {"fraction": f0, "targets": list(LORA_TARGETS)})
        f1 = min(1.0, f0 * target / c0)
        c1 = probe("sara", {"fraction": f1, "targets": list(LORA_TARGETS)})
        f2 = f1 if c1 == c0 else min(1.0, f1 + (target - c1) * (f1 - f0) / (c1 - c0))  # one secant step
        return {"fraction": float(f"{f2:.6g}"), "targets": list(LORA_TARGETS)}
    raise ValueError(f"glue benchmark: no budget rule for method {method!r}")


class Prober:
    """Trainable counts of configs attached to a fresh MiniLM (2 labels; heads are not counted), cached."""

    def __init__(self) -> None:
        self.model: Any = None
        self.cache: dict[str, int] = {}

    def __call__(self, method: str, mapping: dict[str, Any]) -> int:
        key = json.dumps([method, mapping], sort_keys=True)
        if key not in self.cache:
            import copy

            import deltatune as dt
            from deltatune.model import attach

            if self.model is None:
                from transformers import AutoModelForSequenceClassification

                from deltatune.train.config import default_model_path

                self.model = AutoModelForSequenceClassification.from_pretrained(default_model_path(), num_labels=2)
            self.cache[key] = attach(copy.deepcopy(self.model), dt.make_config(method, dict(mapping))).trainable_count
        return self.cache[key]
