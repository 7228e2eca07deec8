"""Task heads of a merge: averaged for a soup, kept side by side for a multi-task merge, never dropped silently.

A merge of deltas trained on *different* tasks (say an SST-2 and an MNLI classifier) shares one merged body, but
each task still needs its own head: they cannot be averaged (other labels, often other shapes).  The merged delta
keeps every input's heads, each under ``<head module>@<input name>`` (``classifier@sst2``), and records per input
name its task (columns, label map) in ``config["task_heads"]``.  :func:`for_task` gives the delta one task sees:
the merged parts with that input's heads under their module names and that input's task in its provenance, so
``apply_delta``, ``mixed_batch`` (one name per task, rows routed to their task's head) and ``predict`` use it
like any single-task delta::

    merged = deltatune.algebra.merge(["runs/sst2/delta", "runs/mnli/delta"], "ties", output="dense")
    sst2, mnli = (for_task(merged, name) for name in task_names(merged))   # names: ["sst2", "mnli"]

An input's name is its folder's name (the run's name for a run's ``delta``/``best`` folder), ``input<i>`` for a
:class:`Delta` object, made unique with ``-<i>`` when two inputs share one.  A merge written as a full checkpoint
cannot hold two heads for one module: it is refused (:func:`require_one_task`) unless ``heads="first"``/``"none"``.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from deltatune.delta import Delta
from deltatune.errors import ConfigError

SEP = "@"
CONFIG_KEY = "task_heads"


class TaskHeads(dict):
    """``{head name: {tensor name: tensor}}`` of a merged delta, with the task their label names come from
    (``task``: the inputs' common task record, or ``None``) and, for kept heads, ``kept``: input name →
    ``{"index": input position, "task": its task record}``."""

    def __init__(self, heads: dict[str, dict[str, Tensor]] | None = None, task: dict[str, Any] | None = None,
                 kept: dict[str, dict[str, Any]] | None = None) -> None:
        super().__init__(heads or {})
        self.task = task
        self.kept = kept or {}


def head_key(module: str, name: str) -> str:
    """The name input ``name``'s head of ``module`` is kept under in a multi-task merge."""
    return f"{module}{SEP}{name}"


def input_name(label: str, index: int) -> str:
    """A short name for merge input ``index`` labelled ``label`` (a folder path, or ``input <i>``)."""
    path = Path(label)
    name = path.parent.name if path.name in ("delta", "best") and path.parent.name else path.name
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_.") if not label.startswith("input ") else ""
    return name or f"input{index}"


def input_names(labels: Sequence[str]) -> list[str]:
    """:func:`input_name` of each label, made unique by appending ``-<index>`` where two coincide."""
    names = [input_name(label, i) for i, label in enumerate(labels)]
    return [f"{n}-{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def keep_heads(deltas: Sequence[Delta], labels: Sequence[str]) -> TaskHeads:
    """Every input's heads under :func:`head_key` (copies), with each input's task record."""
    names = input_names(labels)
    heads = {head_key(h, name): {k: v.detach().clone() for k, v in tensors.items()}
             for name, d in zip(names, deltas, strict=True) for h, tensors in d.heads.items()}
    kept = {name: {"index": i, "task": copy.deepcopy(d.provenance.task)}
            for i, (name, d) in enumerate(zip(names, deltas, strict=True)) if d.heads}
    return TaskHeads(heads, kept=kept)


def task_names(delta: Delta) -> list[str]:
    """The input names whose heads ``delta`` keeps (empty for a delta with ordinary heads)."""
    kept = delta.config.get(CONFIG_KEY)
    return list(kept) if isinstance(kept, dict) else []


def for_task(delta: Delta, name: str) -> Delta:
    """The delta task ``name`` of a multi-task merge sees: the same parts (shared, not copied), the heads kept for
    ``name`` under their module names, and ``name``'s task (columns, label map) as its provenance task.

    :class:`ConfigError` naming the kept tasks when ``delta`` keeps none for ``name``."""
    names = task_names(delta)
    if name not in names:
        raise ConfigError(f"the delta keeps no task heads named {name!r}; it keeps: {names or 'none'}"
                          + ("" if names else " (it is not a merge of deltas trained on different tasks)"))
    suffix = f"{SEP}{name}"
    heads = {key[:-len(suffix)]: dict(tensors) for key, tensors in delta.heads.items() if key.endswith(suffix)}
    provenance = copy.deepcopy(delta.provenance)
    provenance.task = copy.deepcopy(delta.config[CONFIG_KEY][name].get("task"))
    config = {k: v for k, v in delta.config.items() if k != CONFIG_KEY}
    config["task_head"] = name
    return Delta(method=delta.method, config=config, parts=delta.parts, heads=heads, fingerprint=delta.fingerprint,
                 metrics=delta.metrics, provenance=provenance)


def require_one_task(heads: Any, where: str, holder: str = "a checkpoint") -> None:
    """Refuse ``heads`` (a merge's :class:`TaskHeads`, or a :class:`Delta`) that keep several inputs' heads:
    ``holder`` (a checkpoint, a model) holds one head per module.  :class:`ConfigError` naming the kept tasks and
    the ways out."""
    kept = heads.config.get(CONFIG_KEY) if isinstance(heads, Delta) else getattr(heads, "kept", None)
    if kept:
        raise ConfigError(f"{where}: the merged inputs were trained on different tasks and the merge keeps each "
                          f"one's head ({', '.join(kept)}); {holder} holds one head per module. Pick one task with "
                          "deltatune.algebra.task_heads.for_task(delta, NAME) (a delta output keeps them all: output "
                          "dense, sparse or lowrank), or merge with heads='first' (the first input's head) or "
                          "heads='none'")
