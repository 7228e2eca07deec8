"""Train a delta *on top of* other deltas, and use it over the same or other ones (LT-SFT's language + task deltas,
Ansell et al., ACL 2022, arXiv 2110.07560: the task delta is trained with the source-language delta applied, and
at test time the target-language delta is applied instead: ``θ = θ₀ + φ_lang_tgt + φ_task``).

* Training (``deltatune train --on DELTA …``, :attr:`TrainConfig.on`): :func:`prepare_stack` checks every
  underlying delta against the pristine base (:class:`~deltatune.errors.FingerprintMismatch` for another base),
  merges their parts into the base in order (their task heads are not loaded: the new run trains its own), and
  returns a :class:`Stack`.  The new delta belongs to the *pristine* base (its fingerprint is taken before the
  merge), and its provenance lists each underlying delta as a parent with ``role: "on"``, its path and a digest of
  its content.  The :class:`StackGuard` hook stores those digests in every training checkpoint, so a resumed run
  whose underlying delta is gone or changed stops (:class:`UnderlyingDeltaMissing` / :class:`UnderlyingDeltaChanged`).
* Inference: :func:`apply_stacked` merges the recorded underlying deltas (found by path, digest checked) or others
  given explicitly (``on=[…]``: swapping the language delta) into a model and puts the stacked delta on top of them
  (attached or merged), as a :class:`~deltatune.algebra.compose.DeltaStack` (``revert()`` restores the base bit for
  bit); :func:`attach_for_use` (evaluation, prediction) and :func:`merge_for_use` (``deltatune apply``) do the same
  for good.  Where the deltas beneath cannot come along — a shared base serving other deltas, a PEFT adapter — a
  stacked delta is refused (:func:`deltatune.provenance.require_unstacked`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deltatune.algebra.compose import DeltaStack, Mode
from deltatune.delta import Delta
from deltatune.errors import ConfigError, FingerprintMismatch
from deltatune.fingerprint import check_fingerprint, fingerprint
from deltatune.methods.registry import TrainHook
from deltatune.model import default_heads, merge_delta
from deltatune.parts.capabilities import require_capability
from deltatune.provenance import ON_ROLE, parent_record, recorded_stack


class UnderlyingDeltaMissing(ConfigError):
    """A delta that another was trained on top of cannot be found where it was recorded."""


class UnderlyingDeltaChanged(FingerprintMismatch):
    """A delta that another was trained on top of has changed since (its content digest differs)."""


#: The prefix of :func:`content_digest`'s digests; a recorded digest without it is the first version's
#: (:func:`~deltatune.train.loop.delta_digest`: tensors and heads only), still accepted by :func:`digest_matches`.
DIGEST_PREFIX = "v2:"


def content_digest(delta: Delta) -> str:
    """The fingerprint of an underlying delta: SHA-256 over each part's name, kind and metadata (a LoRA's scale, a
    sparse part's shape: what changes its update besides the tensors) and tensors, integer tensors as int64 (a
    re-save with other index widths is the same delta).  Task heads are left out: an underlying delta's heads are
    never applied."""
    h = hashlib.sha256()
    for name in sorted(delta.parts):
        part = delta.parts[name]
        h.update(json.dumps([name, part.kind, part.meta()], sort_keys=True, default=str).encode())
        for key, t in sorted(part.state().items()):
            t = t.detach().cpu()
            t = t.long() if not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool else t
            h.update(f"{name}.{key}:{t.dtype}:{list(t.shape)}".encode())
            h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return DIGEST_PREFIX + h.hexdigest()


def digest_matches(recorded: str, delta: Delta) -> bool:
    """Whether ``delta`` is the one a stack recorded: against :func:`content_digest`, or against the first
    version's digest for a record written before it."""
    if recorded.startswith(DIGEST_PREFIX):
        return recorded == content_digest(delta)
    from deltatune.train.loop import delta_digest

    return recorded == delta_digest(delta)


def load_underlying(path: str | Path, where: str) -> Delta:
    """The delta at ``path`` (:class:`UnderlyingDeltaMissing` when there is none)."""
    from deltatune.api import as_delta

    p = Path(path)
    if not ((p / "manifest.json").is_file() or (p / "adapter_config.json").is_file()):
        raise UnderlyingDeltaMissing(f"{where}: no delta at {str(path)[:200]!r} (a folder with manifest.json or a "
                                     "PEFT adapter_config.json)")
    return as_delta(p)


@dataclass
class Stack:
    """The underlying deltas of a training run, in order, with their paths and content digests."""

    paths: list[str]
    deltas: list[Delta]
    digests: list[str]
    base_fingerprint: dict[str, Any]

    def records(self) -> list[dict[str, Any]]:
        return [{**parent_record(d), "role": ON_ROLE, "path": p, "digest": g}
                for p, d, g in zip(self.paths, self.deltas, self.digests, strict=True)]

    def record(self, delta: Delta) -> None:
        """Make ``delta`` (trained on this stack) belong to the pristine base and name its underlying deltas."""
        delta.fingerprint = dict(self.base_fingerprint)
        delta.provenance.parents = [*self.records(), *delta.provenance.parents]

    def guard(self) -> StackGuard:
        return StackGuard(self)


#: How deep stacks of stacked deltas may go (a deeper chain is a cycle of recorded paths, or a mistake).
MAX_STACK_DEPTH = 32


def with_their_stacks(paths: Sequence[str]) -> tuple[list[str], list[Delta]]:
    """The deltas at ``paths``, each preceded by the deltas it was itself trained on (recorded, digest-checked,
    recursively), each path once: training on top of a stacked delta ``B`` (trained on ``A``) trains on
    ``θ₀ + Δ_A + Δ_B``, the function ``B`` is, and the new delta records both."""
    out_paths: list[str] = []
    out_deltas: list[Delta] = []

    def add(path: str, delta: Delta, depth: int) -> None:
        if path in out_paths:  # its own stack came with it already: each delta is resolved once
            return
        if depth > MAX_STACK_DEPTH:
            raise ConfigError(f"underlying delta {path}: its recorded stack is deeper than {MAX_STACK_DEPTH} (a cycle "
                              "of recorded paths?)")
        for rec, under in zip(recorded_stack(delta), resolve_underlying(delta, f"underlying delta {path}"),
                              strict=True):
            add(str(rec["path"]), under, depth + 1)
        out_paths.append(path)
        out_deltas.append(delta)

    for i, path in enumerate(paths):
        add(path, load_underlying(path, f"--on #{i + 1}"), 0)
    return out_paths, out_deltas


def prepare_stack(model: nn.Module, on: Sequence[str | Path], heads: Sequence[str] | None = None) -> Stack | None:
    """Merge the deltas at ``on`` (in order, each after the deltas it was itself trained on:
    :func:`with_their_stacks`) into ``model``'s base weights; ``None`` when ``on`` is empty.

    Every underlying delta is checked against the pristine base first (another base:
    :class:`FingerprintMismatch`; a kind that cannot be merged: :class:`NotMergeable`), before any weight is
    written."""
    if not on:
        return None
    heads = list(default_heads(model) if heads is None else heads)
    base_fp = fingerprint(model, exclude=heads)
    paths, deltas = with_their_stacks([str(Path(p).resolve()) for p in on])
    for i, d in enumerate(deltas):
        where = f"underlying delta {paths[i]}"
        require_capability(d, "additive", f"training on top of {where}")
        check_fingerprint(d.fingerprint, model, sorted({*d.heads, *heads}), where)
    for i, d in enumerate(deltas):
        merge_delta(model, d, where=f"underlying delta {paths[i]}", force=True, heads=False)
    return Stack(paths, deltas, [content_digest(d) for d in deltas], base_fp)


class StackGuard(TrainHook):
    """Stores the underlying deltas' paths and digests in training checkpoints; on resume, refuses a stack that is
    not the one the run started on (a missing, changed, added or removed underlying delta)."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack

    def state_dict(self) -> dict[str, Any]:
        return {"on": [{"path": p, "digest": g} for p, g in zip(self.stack.paths, self.stack.digests, strict=True)]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        recorded = [(r["path"], r["digest"]) for r in state["on"]]
        current = list(zip(self.stack.paths, self.stack.digests, strict=True))
        if [p for p, _ in recorded] != [p for p, _ in current]:
            raise UnderlyingDeltaChanged(f"the checkpoint was trained on top of {[p for p, _ in recorded]}, this run "
                                         f"on {[p for p, _ in current]}; resume with the same --on deltas")
        for (path, old), (_, new), delta in zip(recorded, current, self.stack.deltas, strict=True):
            if not digest_matches(old, delta):
                raise UnderlyingDeltaChanged(f"underlying delta {path} changed since the run started (content digest "
                                             f"{old[:12]}… then, {new[:12]}… now); resuming would train on another "
                                             "stack")


def resolve_underlying(delta: Delta, where: str = "the delta") -> list[Delta]:
    """The deltas ``delta`` was trained on top of, loaded from their recorded paths and checked unchanged
    (:class:`UnderlyingDeltaMissing`, :class:`UnderlyingDeltaChanged`)."""
    out = []
    for rec in recorded_stack(delta):
        d = load_underlying(rec["path"], f"{where} was trained on top of {rec['path']}")
        if not digest_matches(str(rec["digest"]), d):
            digest = content_digest(d)
            raise UnderlyingDeltaChanged(f"{where} was trained on top of {rec['path']}, which changed since (content "
                                         f"digest {rec['digest'][:12]}… then, {digest[:12]}… now); pass the "
                                         "underlying deltas explicitly (on=[…]) to use others")
        out.append(d)
    return out


def merge_beneath(model: nn.Module, under: Sequence[Delta], where: str) -> None:
    """Merge the deltas a stacked delta was trained on (recorded, digest-checked) into ``model``'s base weights, in
    order, without their task heads."""
    for u in under:
        merge_delta(model, _headless(u), where=f"{where} (underlying)", force=True, heads=False)


def _headless(d: Delta) -> Delta:
    """The delta without task heads or fingerprint (checked separately): an underlying delta adds only its parts."""
    return dataclasses.replace(d, heads={}, fingerprint=None)


def apply_stacked(model: nn.Module, delta: Delta, on: Sequence[Delta] | None = None, mode: Mode = "attach",
                  force: bool = False, where: str = "the delta") -> DeltaStack:
    """``θ = θ₀ + Σ_on Δ + Δ_delta`` on ``model`` (underlying task heads ignored; ``delta``'s heads loaded): the
    underlying deltas merged into the base weights, then ``delta`` attached (``mode="attach"``) or merged on top
    (the returned stack's own mode is ``merge``: a later :meth:`~DeltaStack.push` merges unless given a mode),
    so that a base-dependent kind (DoRA, (IA)³, SSF) computes its update from ``θ₀ + Σ_on Δ``, the weights it was
    trained on, as training, evaluation and prediction do.

    ``on=None``: the deltas recorded in ``delta``'s provenance (by path, digest checked); ``on=[…]``: these
    instead (swap the underlying delta).  Every delta must belong to ``model``'s base
    (:class:`FingerprintMismatch` unless ``force``).  Returns the :class:`DeltaStack`: ``revert()`` (or leaving a
    ``with`` block) restores the base bit for bit."""
    under = resolve_underlying(delta, where) if on is None else list(on)
    if not force:
        heads = default_heads(model)
        for i, d in enumerate(under):
            check_fingerprint(d.fingerprint, model, sorted({*d.heads, *heads}), f"underlying delta #{i + 1} "
                              f"({d.method})")
    stack = DeltaStack(model, mode="merge", force=force)
    try:
        for i, d in enumerate(under):
            stack.push(_headless(d), f"underlying delta #{i + 1}")
        stack.push(delta, where, mode=mode, on_top=True)
    except BaseException:
        stack.revert()
        raise
    return stack


def merge_for_use(model: nn.Module, delta: Delta, force: bool = False, where: str = "the delta") -> None:
    """``θ₀ + Σ_on Δ + Δ_delta`` merged into ``model`` for good (``deltatune apply``): ``delta`` checked against the
    pristine base (unless ``force``), the deltas it was trained on (recorded, digest-checked) merged, then ``delta``
    merged on top, so a base-dependent kind computes its update from the weights it was trained on.  A delta trained
    on the bare base is merged alone, as :func:`~deltatune.model.merge_delta` merges it."""
    under = resolve_underlying(delta, where)
    if not under:
        merge_delta(model, delta, where=where, force=force)
        return
    require_capability(delta, "additive", f"merge ({where})")
    if not force:
        check_fingerprint(delta.fingerprint, model, delta.heads, where)
    merge_beneath(model, under, where)
    merge_delta(model, delta, where=where, force=True)


def attach_for_use(model: nn.Module, delta: Delta, name: str, where: str = "the delta") -> None:
    """Put ``delta`` on ``model`` to run it, under ``name`` (so :func:`deltatune.mixed_batch` can route to it): its
    parts attached and heads loaded after the fingerprint check, then — for a stacked delta — the deltas it was
    trained on (recorded, digest-checked) merged into the base beneath it.  The model then computes
    ``θ₀ + Σ_on Δ + Δ_delta`` for every row: a stacked delta needs a model of its own in a mixed batch."""
    from deltatune.model import apply_delta

    under = resolve_underlying(delta, where)
    apply_delta(model, delta, name=name, where=where)
    merge_beneath(model, under, where)
