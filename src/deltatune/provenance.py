"""``Provenance``: where a delta came from, as a typed field of the delta (not inside its metrics).

* ``operation`` — what made it: ``train``, ``merge``, ``compose``, ``compress``, ``rebase``, ``import`` (a PEFT
  adapter) or ``attach`` (built in Python);
* ``base`` — the base model's path or name, where known (``deltatune eval/apply`` load it by default); a local
  folder is recorded absolute (:func:`path_reference`), so the delta finds it from any working folder;
* ``task`` — the task trained on: its name and, for a user's own data, the columns and the label map;
* ``train`` — the training configuration (``TrainConfig`` as a mapping);
* ``parents`` — for merges, compositions, compressions and rebases: one record per input delta (its method,
  operation, base, task and fingerprint), in input order.

Saved in the manifest's ``provenance`` field and validated on load (typed :class:`DeltaFormatError` naming the
field).  A delta saved before this field existed gets one rebuilt from its metrics (``train``, ``task_info``).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from deltatune.errors import ConfigError, DeltaFormatError

OPERATIONS = ("train", "merge", "compose", "compress", "rebase", "import", "attach", "half_reset")
FIELDS = {"operation", "base", "task", "train", "parents"}
PARENT_FIELDS = ("method", "operation", "base", "task", "fingerprint")


def split_spec(spec: str) -> tuple[str, str | None] | None:
    """``(PATH, SPLIT)`` of a data reference ``PATH:SPLIT`` whose ``PATH`` is a local file (a JSON object of
    splits), ``(spec, None)`` when ``spec`` itself is a local file or folder (so the split suffix is read only when
    the whole does not exist); ``None`` when neither names one."""
    if Path(spec).exists():
        return spec, None
    head, sep, split = spec.rpartition(":")
    return (head, split) if sep and head and split and Path(head).exists() else None


def local_reference(spec: str, absolute: Callable[[str], str] = os.path.abspath) -> str | None:
    """``spec`` with its local path made ``absolute`` (``PATH:SPLIT`` keeps its split: :func:`split_spec`);
    ``None`` when it names no local file or folder."""
    parts = split_spec(spec)
    if parts is None:
        return None
    path, split = parts
    return absolute(path) if split is None else f"{absolute(path)}:{split}"


def path_reference(path: str | Path | None) -> str | None:
    """What a delta records as a path it refers to (its base model, its training data): a local file or folder
    (or ``FILE:SPLIT``) as its absolute path, symbolic links kept (a relative one would resolve against whatever
    folder the delta is later used from), anything else (a hub name) as given."""
    if path is None or str(path) == "":
        return None
    ref = local_reference(str(path))
    return str(path) if ref is None else ref


@dataclass
class Provenance:
    operation: str = "attach"
    base: str | None = None
    task: dict[str, Any] | None = None
    train: dict[str, Any] | None = None
    parents: list[dict[str, Any]] = field(default_factory=list)

    @property
    def task_name(self) -> str | None:
        return None if self.task is None else self.task.get("name")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def derived(self, operation: str, parents: list[Any]) -> Provenance:
        """A provenance for a delta made by ``operation`` from the deltas ``parents`` (keeping base and task when
        every parent agrees on them, and the underlying-delta records of a stacked parent: what is compressed,
        summed or merged from a delta trained on top of others still needs them beneath).

        An underlying delta that is itself among ``parents`` is not kept beneath: composing ``B`` (trained on ``A``)
        with ``A`` already holds ``Δ_A + Δ_B``, and ``A`` merged beneath again would count it twice
        (:func:`_among`)."""
        bases = {p.provenance.base for p in parents}
        tasks = [p.provenance.task for p in parents]
        stack: list[dict[str, Any]] = []  # a stacked parent's underlying deltas stay beneath what is made of it
        for p in parents:
            stack += [copy.deepcopy(r) for r in recorded_stack(p) if all(s.get("path") != r.get("path") for s in stack)]
        stack = [r for r in stack if not _among(r, parents)]
        return Provenance(operation=operation, base=bases.pop() if len(bases) == 1 else None,
                          task=copy.deepcopy(tasks[0]) if tasks and all(t == tasks[0] for t in tasks) else None,
                          parents=[*stack, *(parent_record(p) for p in parents)])

    @classmethod
    def from_json(cls, value: Any, where: str) -> Provenance:
        """Validate a manifest's ``provenance`` field (types of every entry)."""
        if not isinstance(value, dict) or set(value) != FIELDS:
            got = sorted(value) if isinstance(value, dict) else type(value).__name__
            raise DeltaFormatError(f"{where}: field 'provenance' must have exactly the fields {sorted(FIELDS)}, "
                                   f"got {str(got)[:120]}")
        if value["operation"] not in OPERATIONS:
            raise DeltaFormatError(f"{where}: provenance.operation is {str(value['operation'])[:40]!r}; expected one "
                                   f"of {list(OPERATIONS)}")
        if value["base"] is not None and not isinstance(value["base"], str):
            raise DeltaFormatError(f"{where}: provenance.base must be a string or null")
        for key in ("task", "train"):
            if value[key] is not None and not isinstance(value[key], dict):
                raise DeltaFormatError(f"{where}: provenance.{key} must be an object or null")
        if value["task"] is not None and not isinstance(value["task"].get("name"), str):
            raise DeltaFormatError(f"{where}: provenance.task.name must be a string")
        parents = value["parents"]
        if not isinstance(parents, list) or not all(isinstance(p, dict) for p in parents):
            raise DeltaFormatError(f"{where}: provenance.parents must be a list of objects")
        for i, parent in enumerate(parents):  # an underlying delta is found by its path and checked by its digest
            if parent.get("role") == ON_ROLE and not all(isinstance(parent.get(k), str) and parent[k]
                                                         for k in ("path", "digest")):
                raise DeltaFormatError(f"{where}: provenance.parents[{i}] records an underlying delta (role "
                                       f"{ON_ROLE!r}) and needs a non-empty string 'path' and 'digest', got "
                                       f"{str({k: parent.get(k) for k in ('path', 'digest')})[:120]}")
        return cls(**copy.deepcopy(value))

    @classmethod
    def from_metrics(cls, metrics: dict[str, Any]) -> Provenance:
        """The provenance of a delta saved before the field existed, from its ``train``/``task_info`` metrics."""
        train = metrics.get("train") if isinstance(metrics.get("train"), dict) else None
        info = metrics.get("task_info") if isinstance(metrics.get("task_info"), dict) else {}
        name = (train or {}).get("task") or info.get("task")
        task = {"name": str(name), **info} if name else None
        base = (train or {}).get("model")
        return cls(operation="train" if train else "attach", base=base if isinstance(base, str) else None,
                   task=task, train=copy.deepcopy(train))


def _among(record: dict[str, Any], deltas: list[Any]) -> bool:
    """Whether the underlying delta ``record`` names is one of ``deltas``: one of the same method whose content its
    recorded digest matches (:func:`deltatune.train.stacking.digest_matches`, the check that finds it on use)."""
    from deltatune.train.stacking import digest_matches

    digest = record.get("digest")
    return isinstance(digest, str) and any(d.method == record.get("method") and digest_matches(digest, d)
                                           for d in deltas)


def parent_record(delta: Any) -> dict[str, Any]:
    """What a derived delta records about one input: method, operation, base, task and fingerprint."""
    return {"method": delta.method, "operation": delta.provenance.operation, "base": delta.provenance.base,
            "task": copy.deepcopy(delta.provenance.task), "fingerprint": copy.deepcopy(delta.fingerprint)}


#: The role of a parent record naming a delta another was trained on top of (``train --on``).
ON_ROLE = "on"


class StackedDeltaRefused(ConfigError):
    """A delta trained on top of others, used where the deltas beneath it cannot come along."""


def recorded_stack(delta: Any) -> list[dict[str, Any]]:
    """The underlying-delta records of a stacked delta's provenance (empty for a delta trained on the bare base)."""
    return [p for p in delta.provenance.parents if p.get("role") == ON_ROLE]


def require_unstacked(delta: Any, what: str) -> None:
    """Refuse ``what`` (:class:`StackedDeltaRefused`) for a delta trained on top of others: it would run on the bare
    base without the deltas beneath it."""
    under = [str(r.get("path"))[:200] for r in recorded_stack(delta)]
    if under:
        raise StackedDeltaRefused(
            f"{what}: the delta was trained on top of {under}, which would be left out; write base + those deltas + "
            "this one as one checkpoint (`deltatune apply`) and use that as the base")
