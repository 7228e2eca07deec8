"""GLUE task deltas for the merge-quality and compression benchmarks: training (cached) and scoring.

Every task delta is trained once with ``deltatune.train.loop.train`` on the real MiniLM-L6 and cached
under ``WORK/glue/<task>-<method>-<key>/`` (``key`` hashes every training setting, so changing one
retrains).  The last ``holdout`` rows of each task's *train* split are never trained on: they are the
held-out set used to pick merge / compression hyper-parameters (λ, LiNeS β, ComPEFT α).  The dev
split is only used for the reported numbers.

:class:`TaskScorer` evaluates ``base + parts + this task's own head`` on the held-out rows or on dev
with the task's official GLUE metric, resetting the model to the base weights between evaluations.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

TASKS = ("sst2", "mrpc", "rte", "cola")


@dataclass(frozen=True)
class TrainSpec:
    """One cached training run: method (``full``/``lora``/``sparse``), task, steps, lr and data limits."""

    task: str
    method: str
    steps: int
    lr: float
    batch_size: int = 16
    max_length: int = 128
    holdout: int = 300
    eval_limit: int | None = None
    seed: int = 0
    method_args: dict[str, Any] = field(default_factory=dict)

    def key(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:10]

    def run_dir(self, work: Path) -> Path:
        return Path(work) / "glue" / f"{self.task}-{self.method}-{self.key()}"


def method_config(spec: TrainSpec) -> Any:
    import deltatune as dt

    cls = {"full": dt.FullConfig, "lora": dt.LoRAConfig, "sparse": dt.SparseConfig}[spec.method]
    return cls(**spec.method_args)


def train_rows(task: str) -> int:
    """Number of rows in the task's official train split."""
    from deltatune.train.glue import default_data_dir, read_glue_split

    return len(read_glue_split(default_data_dir(), task, "train"))


def _train_child(spec: TrainSpec, run_dir: str, threads: int | None) -> dict[str, Any]:
    """Train one delta (in a fresh process); write ``run_dir/delta`` and ``run_dir/bench.json``."""
    import torch

    from deltatune.train import loop
    from deltatune.train.config import TrainConfig

    if threads:
        torch.set_num_threads(threads)
    n = train_rows(spec.task)
    cfg = TrainConfig(task=spec.task, out_dir=run_dir, max_steps=spec.steps, batch_size=spec.batch_size,
                      max_length=spec.max_length, lr=spec.lr, lr_schedule="linear", warmup_ratio=0.06,
                      train_limit=n - spec.holdout, eval_limit=spec.eval_limit, eval_every=0, eval_before=False,
                      checkpoint_every=0, keep_best=False, progress=False, seed=spec.seed)
    t0 = time.perf_counter()
    result = loop.train(cfg, method_config(spec))
    info = {"spec": asdict(spec), "train_wall_s": round(time.perf_counter() - t0, 1),
            "torch_threads": torch.get_num_threads(), "final": result.final,
            "trainable": result.delta.trainable_count, "train_rows": n - spec.holdout}
    (Path(run_dir) / "bench.json").write_text(json.dumps(info, indent=1))
    return info


def ensure_trained(spec: TrainSpec, work: Path, threads: int | None = None, log=print) -> tuple[Path, dict]:
    """The cached delta dir of ``spec`` (training it first, in a fresh process, if missing)."""
    from _common import run_isolated

    run_dir = spec.run_dir(work)
    info_file = run_dir / "bench.json"
    if info_file.is_file() and (run_dir / "delta" / "manifest.json").is_file():
        return run_dir / "delta", {**json.loads(info_file.read_text()), "cached": True}
    log(f"training {spec.method} delta on {spec.task} ({spec.steps} steps) -> {run_dir}")
    info = run_isolated(_train_child, spec, str(run_dir), threads, preload=("torch", "transformers", "deltatune"))
    log(f"  done in {info['train_wall_s']} s: {info['final']}")
    return run_dir / "delta", {**info, "cached": False}


# --- scoring ---------------------------------------------------------------------------------------
class TaskScorer:
    """Scores ``base + parts`` with one task delta's head on held-out train rows or on dev."""

    def __init__(self, task: str, delta_dir: Path, max_length: int, holdout: int, eval_limit: int | None,
                 batch_size: int = 64) -> None:
        import torch
        from transformers import AutoTokenizer

        from deltatune.io.delta_format import load_delta
        from deltatune.train.config import TrainConfig, default_model_path
        from deltatune.train.glue import default_data_dir, read_glue_split, tokenize_pairs
        from deltatune.train.tasks import build_task

        self.name = task
        self.delta = load_delta(delta_dir)
        self.batch_size = batch_size
        tok = AutoTokenizer.from_pretrained(default_model_path())
        dev = build_task(TrainConfig(task=task, train_limit=1, eval_limit=eval_limit, max_length=max_length), tok)
        rows = read_glue_split(default_data_dir(), task, "train")
        n = len(rows)
        held = tokenize_pairs(rows.select(range(n - holdout, n)), tok, max_length)
        self.splits = {"dev": dev, "heldout": replace(dev, eval=held)}
        self.main_metric = dev.main_metric
        torch.manual_seed(0)
        self.net = dev.load_model()
        self.base_state = {k: v.detach().clone() for k, v in self.net.state_dict().items()}

    def score(self, parts: dict | None, split: str = "dev", delta: Any = None) -> dict[str, float]:
        """Metrics of base + ``parts`` (+ this task's head); ``delta`` overrides both (own head and parts)."""
        import torch

        from deltatune.delta import Delta
        from deltatune.model import apply_delta
        from deltatune.train.evaluate import evaluate

        self.net.load_state_dict(self.base_state)
        if delta is None:
            delta = Delta(method="merged", config={}, parts=dict(parts or {}), heads=self.delta.heads,
                          fingerprint=self.delta.fingerprint)
        apply_delta(self.net, delta, merge=True, where=f"{self.name} eval")
        return evaluate(self.net, self.splits[split], self.batch_size, torch.device("cpu"))

    def main(self, metrics: dict[str, float]) -> float:
        return float(metrics[self.main_metric])
