"""What a training run records as it goes: ``metrics.jsonl`` in the run folder, always, and the experiment
trackers of ``report_to`` (TensorBoard, Weights & Biases, MLflow) through accelerate's tracking API.

``metrics.jsonl`` holds one JSON object per line: one per logged optimiser step (``step``, ``loss``, ``lr``,
``step_s``: the step's wall time without evaluation or checkpointing, and, for parts with auxiliary losses,
``aux_loss``) and one per evaluation (``step`` and ``eval``: the task's
metrics).  It is flushed after every line, so a crashed run keeps what it logged; a resumed run first drops
the lines past the checkpoint's step, so no step appears twice.  Trackers get the same values, flattened
(``eval/accuracy``), at the same steps.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from deltatune.errors import ConfigError
from deltatune.io.atomic import atomic_file

METRICS_FILE = "metrics.jsonl"
#: tracker name → the module that must be installed for it
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def check_trackers(names: list[str]) -> list[str]:
    """``names`` if each is a known tracker whose library is installed; a :class:`ConfigError` otherwise."""
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"unknown tracker {name!r} in report_to; known: {sorted(TRACKERS)}")
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise ConfigError(f"report_to {name!r} needs the {TRACKERS[name]!r} package: pip install {TRACKERS[name]}")
    return names


def flatten(entry: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of ``entry`` as ``{"eval/accuracy": 0.9, …}`` (what trackers take)."""
    flat: dict[str, float] = {}
    for key, value in entry.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
            flat[name] = float(value)
    return flat


class RunLog:
    """Appends to ``out/metrics.jsonl`` and logs to the accelerator's trackers (main process only)."""

    def __init__(self, out: Path, accelerator: Any, config: dict[str, Any], resume_step: int | None) -> None:
        self.accelerator, self.file = accelerator, out / METRICS_FILE
        self.main = accelerator.is_main_process
        if self.main:
            _truncate_after(self.file, resume_step if resume_step is not None else -1)
        if accelerator.log_with:
            accelerator.init_trackers("deltatune", config=flatten(config))

    def record(self, entry: dict[str, Any]) -> None:
        if self.main:
            with self.file.open("a", encoding="utf-8") as f:
                f.write(json.dumps(entry, allow_nan=False, default=str) + "\n")
                f.flush()
        if self.accelerator.log_with:
            self.accelerator.log(flatten(entry), step=int(entry["step"]))

    def close(self) -> None:
        if self.accelerator.log_with:
            self.accelerator.end_training()


def _truncate_after(file: Path, step: int) -> None:
    """Keep only the lines of steps ≤ ``step`` (none for a new run: ``step = -1``)."""
    kept: list[str] = []
    if step >= 0 and file.is_file():
        for line in file.read_text(encoding="utf-8").splitlines():
            try:
                if int(json.loads(line)["step"]) <= step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                break  # a torn last line of a crashed run
    with atomic_file(file) as tmp:
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
