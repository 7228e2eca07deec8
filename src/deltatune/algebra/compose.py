"""Compose deltas: several fine-tunings on one base at once, by summation, with exact revert.

Sparse fine-tunings (and LoRA / dense deltas alike) compose by adding their updates:
``θ' = θ₀ + Σ_t Δ_t`` (Ansell et al., "Composable Sparse Fine-Tuning for Cross-Lingual Transfer",
ACL 2022, arXiv 2110.07560: a language delta plus a task delta, summed).

* :func:`compose` puts a sequence of deltas on a live model and returns a :class:`DeltaStack`:
  ``mode="attach"`` keeps each delta's parts as separately named active parts (the ``DeltaLayer``
  sums their ``ΔW``), ``mode="merge"`` adds them into the base weights.
* :class:`DeltaStack` supports ``push`` / ``pop`` and ``revert`` (also on leaving a ``with`` block,
  exception or not) and restores the base **bit for bit**: in merge mode ``(W + Δ) − Δ`` is not exact
  in floating point, so the values a delta will touch are copied before it is merged.
* :func:`deltatune.algebra.sum_deltas.compose_deltas` sums deltas into a single :class:`Delta`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Literal

import torch
from torch import Tensor, nn

from deltatune.delta import Delta
from deltatune.errors import ConfigError, FingerprintMismatch, ShapeMismatch, TargetError
from deltatune.fingerprint import describe_field, fingerprint, fingerprint_differences, weights_only
from deltatune.model import attach_parts, delta_layers, detach, get_module, load_heads
from deltatune.parts.base import Part, writable, write_in_place
from deltatune.parts.bias import ADDED as ADDED_MARK
from deltatune.parts.capabilities import require_capability

Mode = Literal["attach", "merge"]


# --------------------------------------------------------------------------------------------------
# Snapshots: what a merge will overwrite, copied before it happens
# --------------------------------------------------------------------------------------------------
@dataclass
class _Snapshot:
    """Original values of the tensors one delta touches: whole tensors, or values at flat indices."""

    whole: list[tuple[Tensor, Tensor]] = field(default_factory=list)  # (live tensor, copy)
    at: list[tuple[Tensor, Tensor, Tensor]] = field(default_factory=list)  # (live tensor, flat indices, copy)
    added: list[tuple[nn.Module, str]] = field(default_factory=list)  # parameters a merge creates (BitFit on Llama)

    def take_whole(self, tensor: Tensor) -> None:
        if not any(t is tensor for t, _ in self.whole):
            self.whole.append((tensor, tensor.detach().clone()))

    def take_at(self, tensor: Tensor, indices: Tensor) -> None:
        idx = indices.to(tensor.device)
        self.at.append((tensor, idx, tensor.detach().reshape(-1).index_select(0, idx).clone()))

    def restore(self) -> None:
        """Copy every saved value back; each copy holds the state *before* the delta, so order is free."""
        with torch.no_grad():
            for tensor, idx, values in self.at:
                writable(tensor).view(-1).index_copy_(0, idx, values)
            for tensor, copy in self.whole:
                write_in_place(tensor, copy)
        for module, name in self.added:
            setattr(module, name, None)
            if hasattr(module, ADDED_MARK):
                delattr(module, ADDED_MARK)

    def restore_into(self, tensor: Tensor, value: Tensor) -> None:
        """Write into ``value`` (a copy of ``tensor``) what this snapshot saved of ``tensor``."""
        for t, idx, values in self.at:
            if t is tensor:
                value.view(-1).index_copy_(0, idx, values)
        for t, copy in self.whole:
            if t is tensor:
                value.copy_(copy)

    @property
    def nbytes(self) -> int:
        return (sum(c.numel() * c.element_size() for _, c in self.whole)
                + sum(v.numel() * v.element_size() for _, _, v in self.at))


def _snapshot_parts(model: nn.Module, parts: dict[str, Part], snap: _Snapshot) -> None:
    """A part whose merge writes known entries (:meth:`~deltatune.parts.base.Part.merge_sites`, e.g. a sparse
    part's ``W.flat[indices]``) saves only those; any other part saves every direct parameter of its module."""
    for name, part in parts.items():
        base = get_module(model, name)
        sites = part.merge_sites()
        snap.added.extend((base, p) for p in part.update_shapes() if getattr(base, p, None) is None)
        if sites is not None:
            own = dict(base.named_parameters(recurse=False))
            for p, indices in sites.items():
                snap.take_at(own[p], indices)
        else:
            for p in base.parameters(recurse=False):
                snap.take_whole(p)


def _snapshot_heads(model: nn.Module, heads: Sequence[str], snap: _Snapshot) -> None:
    for head in heads:
        try:
            module = model.get_submodule(head)
        except AttributeError:
            raise TargetError(f"head {head!r} is not a module of this model") from None
        for t in module.state_dict(keep_vars=True).values():
            snap.take_whole(t)


# --------------------------------------------------------------------------------------------------
# Fingerprints and checks
# --------------------------------------------------------------------------------------------------
def fingerprint_diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Fields on which two fingerprints differ (:func:`deltatune.fingerprint.fingerprint_differences`)."""
    return fingerprint_differences(a, b)


def describe_fingerprint_diff(a: dict[str, Any], b: dict[str, Any], a_name: str, b_name: str) -> str:
    """``"same architecture, different weights (values: A has …, B has …)"``-style explanation."""
    diffs = fingerprint_diff(a, b)
    what = "same architecture, different weights" if weights_only(diffs) else "different architectures"
    detail = ", ".join(describe_field(k, a, b, a_name, b_name) for k in diffs)
    return f"{what} ({detail})"


def check_fits(delta: Delta, model: nn.Module, where: str) -> None:
    """Every part fits its module of ``model`` (ShapeMismatch naming the module) and every head its module."""
    for name, part in delta.parts.items():
        try:
            module = get_module(model, name)
        except AttributeError:
            raise TargetError(f"{where}: the model has no module {name!r} for the delta's part") from None
        part.check_base(module, f"{where}: module {name!r}")
    for head, tensors in delta.heads.items():
        try:
            own = model.get_submodule(head).state_dict()
        except AttributeError:
            raise TargetError(f"{where}: the model has no module {head!r} for the delta's task head") from None
        for k, t in tensors.items():
            if k not in own or tuple(own[k].shape) != tuple(t.shape):
                got = tuple(own[k].shape) if k in own else "missing"
                raise ShapeMismatch(f"{where}: head tensor {head}.{k} has shape {tuple(t.shape)}, the model has {got}")


# --------------------------------------------------------------------------------------------------
# DeltaStack
# --------------------------------------------------------------------------------------------------
@dataclass
class _Entry:
    delta: Delta
    name: str | None  # attach mode: the part name on the DeltaLayers
    snapshot: _Snapshot
    heads: tuple[str, ...]


def _check_mode(mode: str) -> None:
    if mode not in ("attach", "merge"):
        raise ConfigError(f"compose mode must be 'attach' or 'merge', got {mode!r}")


class DeltaStack:
    """Deltas composed on one model, last in first out; :meth:`revert` restores the base bit for bit.

    * ``attach``: each pushed delta's parts are attached under their own part name (``compose0``,
      ``compose1``, …) and stay active together, so every forward sees ``W + Σ_t ΔW_t``.  The base
      tensors are never written; only task heads (which a delta carries whole) are copied first.
    * ``merge``: ``W ← W + ΔW_t`` in place.  Memory cost of the exact revert: a sparse part copies the
      ``k`` original values at its indices (``k`` × element size); any other part copies every direct
      parameter of the module it touches (e.g. one ``d_out × d_in`` weight plus bias per LoRA target), once
      per pushed delta; task heads are copied whole.  Copies live on the tensors' own device;
      :attr:`snapshot_bytes` reports the total.

    Fingerprints are checked against the base as it was before the stack touched it (unless
    ``force``), so a delta can be pushed onto merged ones.  Use as a context manager to revert on exit.
    """

    def __init__(self, model: nn.Module, mode: Mode = "attach", force: bool = False) -> None:
        _check_mode(mode)
        self.model, self.mode, self.force = model, mode, force
        self._entries: list[_Entry] = []
        self._fingerprints: dict[tuple[str, ...], dict[str, Any]] = {}

    # --- inspection ---------------------------------------------------------------------------
    @property
    def deltas(self) -> list[Delta]:
        return [e.delta for e in self._entries]

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def snapshot_bytes(self) -> int:
        """Bytes held to make :meth:`revert` exact."""
        return sum(e.snapshot.nbytes for e in self._entries)

    def _before(self, tensor: Tensor, current: _Snapshot, on_top: bool) -> Tensor:
        """The value ``tensor`` had before the delta being pushed wrote into it (``current``, its snapshot, undone)
        and, unless ``on_top``, before this stack wrote into it (every snapshot undone, latest first)."""
        value = tensor.detach().clone()
        current.restore_into(tensor, value)
        for entry in () if on_top else reversed(self._entries):
            entry.snapshot.restore_into(tensor, value)
        return value

    def _merge_part(self, part: Part, module: nn.Module, current: _Snapshot, on_top: bool) -> None:
        """``θ ← θ + Δθ``.  A base-dependent part's ``Δθ`` is computed from the module's tensors as they were
        before the stack (as attach mode computes it), not from what earlier merged deltas made of them; ``on_top``,
        as they were before this delta (a delta trained on the merged ones beneath it).  Either way never from what
        the delta's own earlier parts wrote: parts on modules that share one tied weight each read it unchanged, as
        the forward does (``current``: this delta's snapshot)."""
        if not part.base_dependent:
            part.merge_into(module)
            return
        own = dict(module.named_parameters(recurse=False))
        with self._added_tensors_hidden():  # a tensor the stack created (BitFit's bias on Llama) was not there before
            before = SimpleNamespace(**{n: self._before(p, current, on_top)
                                        for n, p in module.named_parameters(recurse=False)})
        with torch.no_grad():
            for name, delta in part.updates(before).items():
                p = own[name]
                write_in_place(p, p.detach().float() + delta.to(device=p.device, dtype=torch.float32))

    # --- push / pop ---------------------------------------------------------------------------
    def push(self, delta: Delta, where: str | None = None, mode: Mode | None = None, on_top: bool = False) -> None:
        """Compose ``delta`` on top of the stack (checks capabilities, fingerprint, shapes and heads first).

        ``mode``: this delta's own (default: the stack's).  ``on_top``: a base-dependent part (DoRA, (IA)³, SSF)
        computes its update from the weights as the stack has made them, not as they were before it — a delta
        trained on top of the merged deltas beneath it (:func:`deltatune.train.stacking.apply_stacked`); an
        attached part always reads the weights as they are."""
        where = where or f"delta #{len(self._entries)} ({delta.method})"
        mode = mode or self.mode
        _check_mode(mode)
        require_capability(delta, "additive", f"compose ({where})")
        heads = tuple(delta.heads)
        if not self.force and delta.fingerprint:
            actual = self._base_fingerprint(heads)
            if fingerprint_diff(delta.fingerprint, actual):
                raise FingerprintMismatch(
                    f"{where} was trained on another base model than the one being composed on: "
                    f"{describe_fingerprint_diff(delta.fingerprint, actual, where, 'the model')}. "
                    "Pass force=True to compose it anyway, or rebase it first (`deltatune rebase`)."
                )
        with self._added_tensors_hidden():  # a part fits the module as it was before the stack (attach mode's view)
            check_fits(delta, self.model, where)
        self._check_heads(delta, where)
        snap = _Snapshot()
        _snapshot_heads(self.model, heads, snap)
        name: str | None = None
        try:
            load_heads(self.model, delta, where)
            if mode == "merge":
                _snapshot_parts(self.model, delta.parts, snap)
                for module_name, part in delta.parts.items():
                    self._merge_part(part, get_module(self.model, module_name), snap, on_top)
            else:
                name = self._fresh_name()
                attach_parts(self.model, delta.parts, name)
        except BaseException:
            if name is not None:
                detach(self.model, name)
            snap.restore()
            raise
        self._entries.append(_Entry(delta, name, snap, heads))

    def pop(self) -> Delta:
        """Remove the last pushed delta, restoring the model exactly as it was before that push."""
        if not self._entries:
            raise ConfigError("pop() on an empty DeltaStack")
        entry = self._entries.pop()
        if entry.name is not None:
            detach(self.model, entry.name)
        entry.snapshot.restore()
        return entry.delta

    def revert(self) -> None:
        """Pop everything: the model is the base again, bit for bit."""
        while self._entries:
            self.pop()

    def __enter__(self) -> DeltaStack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.revert()

    # --- helpers ------------------------------------------------------------------------------
    def _fresh_name(self) -> str:
        used = {p for _, layer in delta_layers(self.model) for p in layer.parts}
        i = 0
        while f"compose{i}" in used:
            i += 1
        return f"compose{i}"

    def _base_fingerprint(self, heads: tuple[str, ...]) -> dict[str, Any]:
        """The fingerprint of the untouched base (heads excluded), computed with the stack undone if needed."""
        key = tuple(sorted(heads))
        if key not in self._fingerprints:
            if self._entries:
                current = _Snapshot()
                for e in self._entries:
                    for t, _ in e.snapshot.whole:
                        current.take_whole(t)
                    for t, idx, _ in e.snapshot.at:
                        current.take_at(t, idx)
                with self._added_tensors_hidden():  # restore() deletes them: put back after
                    for e in reversed(self._entries):
                        e.snapshot.restore()
                    try:
                        self._fingerprints[key] = fingerprint(self.model, exclude=key)
                    finally:
                        current.restore()
            else:
                self._fingerprints[key] = fingerprint(self.model, exclude=key)
        return self._fingerprints[key]

    @contextmanager
    def _added_tensors_hidden(self) -> Iterator[None]:
        """Within the block, the tensors merges of the stack created (a bias where a Llama Linear had none: BitFit)
        are off their modules, as before the stack; put back after."""
        added = [(m, n, getattr(m, n), getattr(m, ADDED_MARK, None))
                 for e in self._entries for m, n in e.snapshot.added]
        for module, name, _, _ in added:
            setattr(module, name, None)
        try:
            yield
        finally:
            for module, name, tensor, mark in added:
                setattr(module, name, tensor)
                if mark is not None:
                    setattr(module, ADDED_MARK, mark)

    def _check_heads(self, delta: Delta, where: str) -> None:
        """A head is task-specific and replaced whole: two composed deltas may share one only if equal."""
        for entry in self._entries:
            for head in set(entry.heads) & set(delta.heads):
                if not same_tensors(entry.delta.heads[head], delta.heads[head]):
                    raise ConfigError(
                        f"{where} and an earlier composed delta carry different task heads {head!r}; heads are "
                        "replaced, not summed, so they cannot be composed"
                    )


def compose(model: nn.Module, deltas: Sequence[Delta], mode: Mode = "attach", force: bool = False,
            names: Sequence[str] | None = None) -> DeltaStack:
    """Put every delta on ``model`` at once: ``θ = θ₀ + Σ_t Δ_t`` (attached or merged).

    On an error while pushing, what was already pushed is reverted before the error propagates.
    """
    if names is not None and len(names) != len(deltas):
        raise ConfigError(f"{len(names)} names for {len(deltas)} deltas")
    stack = DeltaStack(model, mode=mode, force=force)
    try:
        for i, d in enumerate(deltas):
            stack.push(d, where=names[i] if names is not None else None)
    except BaseException:
        stack.revert()
        raise
    return stack


def same_tensors(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return set(a) == set(b) and all(a[k].shape == b[k].shape and torch.equal(a[k].cpu(), b[k].cpu()) for k in a)
