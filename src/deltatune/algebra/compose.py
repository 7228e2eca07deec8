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
* :func:`compose_deltas` sums deltas into a single :class:`Delta` (LoRA ranks concatenated, sparse
  index sets united, anything else densified).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from deltatune.delta import Delta
from deltatune.errors import ConfigError, FingerprintMismatch, ShapeMismatch, TargetError
from deltatune.fingerprint import fingerprint
from deltatune.model import attach_parts, delta_layers, detach, get_module, load_heads, tied_aliases
from deltatune.parts.base import Part
from deltatune.parts.dense import DensePart
from deltatune.parts.layers import layer_kind
from deltatune.parts.lora import LoRAPart
from deltatune.parts.sparse import SparsePart

Mode = Literal["attach", "merge"]
FINGERPRINT_KEYS = ("model_type", "num_params", "shapes", "values")


# --------------------------------------------------------------------------------------------------
# Snapshots: what a merge will overwrite, copied before it happens
# --------------------------------------------------------------------------------------------------
@dataclass
class _Snapshot:
    """Original values of the tensors one delta touches: whole tensors, or values at flat indices."""

    whole: list[tuple[Tensor, Tensor]] = field(default_factory=list)  # (live tensor, copy)
    at: list[tuple[Tensor, Tensor, Tensor]] = field(default_factory=list)  # (live tensor, flat indices, copy)

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
                tensor.data.view(-1).index_copy_(0, idx, values)
            for tensor, copy in self.whole:
                tensor.data.copy_(copy)

    @property
    def nbytes(self) -> int:
        return (sum(c.numel() * c.element_size() for _, c in self.whole)
                + sum(v.numel() * v.element_size() for _, _, v in self.at))


def _snapshot_parts(model: nn.Module, parts: dict[str, Part], snap: _Snapshot) -> None:
    """A sparse part saves only ``W.flat[indices]``; any other part saves every direct parameter of its module."""
    for name, part in parts.items():
        base = get_module(model, name)
        if isinstance(part, SparsePart):
            snap.take_at(base.weight, part.indices)
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
    """Fields (of ``model_type, num_params, shapes, values``) on which two fingerprints differ."""
    return [k for k in FINGERPRINT_KEYS if a.get(k) != b.get(k)]


def describe_fingerprint_diff(a: dict[str, Any], b: dict[str, Any], a_name: str, b_name: str) -> str:
    """``"same architecture, different weights (values: A has …, B has …)"``-style explanation."""
    diffs = fingerprint_diff(a, b)
    what = ("same architecture, different weights" if diffs == ["values"] else "different architectures")
    detail = ", ".join(f"{k}: {a_name} has {a.get(k)!r}, {b_name} has {b.get(k)!r}" for k in diffs)
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


def _summable(part: Part, base: nn.Module) -> bool:
    """Can ``DeltaLayer`` sum this part with others through ``delta_weight()``?  (Linear/Conv1D/Embedding
    weight only: a dense delta of a bias or of a LayerNorm has no place in that sum.)"""
    if layer_kind(base) is None:
        return False
    if isinstance(part, DensePart):
        return set(part.shapes) == {"weight"}
    return True


def _untied_groups(model: nn.Module, parts: dict[str, Part]) -> list[dict[str, Part]]:
    """Split parts so that no group holds two modules sharing one weight (GPT-2 ``wte`` / ``lm_head``).

    ``attach_parts`` gives every tied module an alias of the part under the same part name, which would
    replace a second real part of that name on the tied module; separate names keep both active.
    """
    groups: list[dict[str, Part]] = []
    for name, part in parts.items():
        tied = set(tied_aliases(model, name))
        group = next((g for g in groups if not tied & set(g)), None)
        if group is None:
            groups.append({name: part})
        else:
            group[name] = part
    return groups


# --------------------------------------------------------------------------------------------------
# DeltaStack
# --------------------------------------------------------------------------------------------------
@dataclass
class _Entry:
    delta: Delta
    names: list[str]  # attach mode: the part names on the DeltaLayers (several when the delta has tied parts)
    snapshot: _Snapshot
    heads: tuple[str, ...]


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
        if mode not in ("attach", "merge"):
            raise ConfigError(f"compose mode must be 'attach' or 'merge', got {mode!r}")
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

    # --- push / pop ---------------------------------------------------------------------------
    def push(self, delta: Delta, where: str | None = None) -> None:
        """Compose ``delta`` on top of the stack (checks fingerprint, shapes and heads first)."""
        where = where or f"delta #{len(self._entries)} ({delta.method})"
        heads = tuple(delta.heads)
        if not self.force and delta.fingerprint:
            actual = self._base_fingerprint(heads)
            if fingerprint_diff(delta.fingerprint, actual):
                raise FingerprintMismatch(
                    f"{where} was trained on another base model than the one being composed on: "
                    f"{describe_fingerprint_diff(delta.fingerprint, actual, where, 'the model')}. "
                    "Pass force=True to compose it anyway, or rebase it first (`deltatune rebase`)."
                )
        check_fits(delta, self.model, where)
        self._check_heads(delta, where)
        if self.mode == "attach":
            self._check_summable(delta, where)
        snap = _Snapshot()
        _snapshot_heads(self.model, heads, snap)
        names: list[str] = []
        try:
            load_heads(self.model, delta, where)
            if self.mode == "merge":
                _snapshot_parts(self.model, delta.parts, snap)
                for module_name, part in delta.parts.items():
                    part.merge_into(get_module(self.model, module_name))
            else:
                for group in _untied_groups(self.model, delta.parts):
                    names.append(self._fresh_name())
                    attach_parts(self.model, group, names[-1])
        except BaseException:
            for name in names:
                detach(self.model, name)
            snap.restore()
            raise
        self._entries.append(_Entry(delta, names, snap, heads))

    def pop(self) -> Delta:
        """Remove the last pushed delta, restoring the model exactly as it was before that push."""
        if not self._entries:
            raise ConfigError("pop() on an empty DeltaStack")
        entry = self._entries.pop()
        for name in entry.names:
            detach(self.model, name)
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
                for e in reversed(self._entries):
                    e.snapshot.restore()
                try:
                    self._fingerprints[key] = fingerprint(self.model, exclude=key)
                finally:
                    current.restore()
            else:
                self._fingerprints[key] = fingerprint(self.model, exclude=key)
        return self._fingerprints[key]

    def _check_heads(self, delta: Delta, where: str) -> None:
        """A head is task-specific and replaced whole: two composed deltas may share one only if equal."""
        for entry in self._entries:
            for head in set(entry.heads) & set(delta.heads):
                if not _same_tensors(entry.delta.heads[head], delta.heads[head]):
                    raise ConfigError(
                        f"{where} and an earlier composed delta carry different task heads {head!r}; heads are "
                        "replaced, not summed, so they cannot be composed"
                    )

    def _check_summable(self, delta: Delta, where: str) -> None:
        """In attach mode a module with several active parts sums their ``delta_weight()``; refuse parts
        that cannot enter that sum (dense deltas of biases / LayerNorms) rather than drop them silently."""
        active: dict[str, list[Part]] = {}
        for name, layer in delta_layers(self.model):
            active[name] = [layer.parts[n] for n in layer.active]
        for module_name, part in delta.parts.items():
            names = [module_name, *tied_aliases(self.model, module_name)]
            for name in names:
                others = active.get(name, [])
                if not others:
                    continue
                base = get_module(self.model, name)
                if not all(_summable(p, base) for p in [part, *others]):
                    raise ConfigError(
                        f"{where}: module {name!r} already has an active part, and a dense delta of a bias or of a "
                        f"non-Linear/Conv1D/Embedding module cannot be summed with it in attach mode; use "
                        f"mode='merge' or compose_deltas()"
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


# --------------------------------------------------------------------------------------------------
# compose_deltas: one Delta that is the sum
# --------------------------------------------------------------------------------------------------
def _same_tensors(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return set(a) == set(b) and all(a[k].shape == b[k].shape and torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


def _promote(tensors: Sequence[Tensor]) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def sum_lora(parts: Sequence[LoRAPart], where: str) -> LoRAPart:
    """``Σ_t s_t B_t A_t = B A`` with ``A = [A_1; …; A_n]`` (ranks stacked) and ``B = [s_1 B_1 | … | s_n B_n]``,
    scale 1 — exact, rank ``Σ r_t``.  When every scale is the same ``s``, ``B = [B_1 | … | B_n]`` keeps ``s``."""
    ref = parts[0]
    for p in parts[1:]:
        if (p.layer, p.in_features, p.out_features) != (ref.layer, ref.in_features, ref.out_features):
            raise ShapeMismatch(f"{where}: LoRA parts for a {ref.layer} {ref.in_features}→{ref.out_features} and a "
                                f"{p.layer} {p.in_features}→{p.out_features} cannot be summed")
    dtype = _promote([t for p in parts for t in (p.lora_A, p.lora_B)])
    same_scale = all(p.scale == ref.scale for p in parts)
    a = torch.cat([p.lora_A.detach().to(dtype) for p in parts], dim=0)
    if same_scale:
        b = torch.cat([p.lora_B.detach().to(dtype) for p in parts], dim=1)
        scale = ref.scale
    else:
        b = torch.cat([(p.lora_B.detach().float() * p.scale).to(dtype) for p in parts], dim=1)
        scale = 1.0
    dropout = ref.dropout_p if all(p.dropout_p == ref.dropout_p for p in parts) else 0.0
    out = LoRAPart(ref.in_features, ref.out_features, a.shape[0], scale, layer=ref.layer, dropout=dropout,
                   dtype=dtype, device=a.device)
    with torch.no_grad():
        out.lora_A.copy_(a)
        out.lora_B.copy_(b)
    return out


def sum_sparse(parts: Sequence[SparsePart], where: str) -> SparsePart:
    """Union of the index sets; values at a shared index are added (in the promoted dtype)."""
    ref = parts[0]
    for p in parts[1:]:
        if (p.weight_shape, p.layer) != (ref.weight_shape, ref.layer):
            raise ShapeMismatch(f"{where}: sparse parts for weights {ref.weight_shape} ({ref.layer}) and "
                                f"{p.weight_shape} ({p.layer}) cannot be summed")
    dtype = _promote([p.values for p in parts])
    device = ref.values.device
    idx = torch.cat([p.indices.to(device) for p in parts])
    vals = torch.cat([p.values.detach().to(device=device, dtype=dtype) for p in parts])
    uniq, inverse = torch.unique(idx, sorted=True, return_inverse=True)
    summed = torch.zeros(uniq.numel(), dtype=dtype, device=device).index_add_(0, inverse, vals)
    out = SparsePart(ref.weight_shape, uniq, ref.layer, dtype=dtype)
    with torch.no_grad():
        out.values.copy_(summed)
    return out


def _dense_tensors(part: Part, where: str) -> dict[str, Tensor]:
    if isinstance(part, DensePart):
        return {k: part.delta_for(k).detach() for k in part.shapes}
    try:
        return {"weight": part.delta_weight().detach()}
    except NotImplementedError:
        raise ConfigError(f"{where}: a {part.kind} part has no additive weight update, so it cannot be "
                          "summed") from None


def sum_dense(parts: Sequence[Part], where: str) -> DensePart:
    """``Δθ = Σ_t Δθ_t`` per parameter (LoRA/sparse parts contribute their dense ``ΔW``), summed in fp32."""
    per_param: dict[str, list[Tensor]] = {}
    for p in parts:
        for k, t in _dense_tensors(p, where).items():
            per_param.setdefault(k, []).append(t)
    shapes: dict[str, tuple[int, ...]] = {}
    for k, ts in per_param.items():
        if any(t.shape != ts[0].shape for t in ts):
            raise ShapeMismatch(f"{where}.{k}: deltas of shapes {[tuple(t.shape) for t in ts]} cannot be summed")
        shapes[k] = tuple(ts[0].shape)
    dtype = _promote([t for ts in per_param.values() for t in ts])
    device = next(iter(per_param.values()))[0].device
    out = DensePart(shapes, dtype=dtype, device=device)
    with torch.no_grad():
        for k, ts in per_param.items():
            total = torch.zeros(shapes[k], dtype=torch.float32, device=device)
            for t in ts:
                total += t.to(device=device, dtype=torch.float32)
            out.delta_for(k).copy_(total.to(dtype))
    return out


def sum_parts(parts: Sequence[Part], where: str) -> Part:
    """The sum of several parts on one module, in the most compact exact form."""
    if all(isinstance(p, LoRAPart) for p in parts):
        return sum_lora(parts, where)  # type: ignore[arg-type]
    if all(isinstance(p, SparsePart) for p in parts):
        return sum_sparse(parts, where)  # type: ignore[arg-type]
    return sum_dense(parts, where)


def clone_part(part: Part) -> Part:
    """An independent copy of ``part`` (fresh tensors, same kind, metadata and values)."""
    state = {k: v.detach().clone() for k, v in part.state().items()}
    clone = type(part).from_state(state, part.meta())
    device = next(iter(state.values())).device if state else None
    return clone.to(device) if device is not None else clone


def _check_fingerprints(deltas: Sequence[Delta], names: Sequence[str]) -> dict[str, Any] | None:
    """Raise :class:`FingerprintMismatch` naming two deltas whose bases differ; return the sum's fingerprint.

    A fingerprint excludes the delta's own task heads, so two fingerprints taken with different head sets
    are compared on ``model_type`` only.  The sum carries the union of the heads: its fingerprint is that of a
    delta carrying exactly that union (``None`` if there is none).
    """
    first: dict[frozenset[str], int] = {}
    known = [i for i, d in enumerate(deltas) if d.fingerprint]
    for i in known:
        j = first.setdefault(frozenset(deltas[i].heads), i)
        same_heads = not fingerprint_diff(deltas[j].fingerprint, deltas[i].fingerprint)
        if same_heads and deltas[known[0]].fingerprint.get("model_type") == deltas[i].fingerprint.get("model_type"):
            continue
        j = j if not same_heads else known[0]
        a, b = deltas[j].fingerprint, deltas[i].fingerprint
        raise FingerprintMismatch(
            f"{names[j]} and {names[i]} were trained on different base models: "
            f"{describe_fingerprint_diff(a, b, names[j], names[i])}; rebase one of them first (`deltatune rebase`)"
        )
    union = frozenset(h for d in deltas for h in d.heads)
    return dict(deltas[first[union]].fingerprint) if union in first else None


def compose_deltas(deltas: Sequence[Delta], names: Sequence[str] | None = None) -> Delta:
    """One :class:`Delta` equal to ``Σ_t Δ_t``; applying it equals composing the inputs.

    Per module: LoRA + LoRA → ranks concatenated (exact); sparse + sparse → index union with summed values;
    any other mix → a dense part.  All known fingerprints must agree (:class:`FingerprintMismatch` naming
    the two deltas; a ``None`` fingerprint, e.g. from a PEFT import, is unknown and not compared), LoRA and
    sparse geometry must agree (:class:`ShapeMismatch`), and a task head carried by several deltas must be
    identical (:class:`ConfigError`).
    """
    if not deltas:
        raise ConfigError("compose_deltas needs at least one delta")
    names = list(names) if names is not None else [f"delta #{i} ({d.method})" for i, d in enumerate(deltas)]
    if len(names) != len(deltas):
        raise ConfigError(f"{len(names)} names for {len(deltas)} deltas")
    fp = _check_fingerprints(deltas, names)
    heads: dict[str, dict[str, Tensor]] = {}
    head_owner: dict[str, str] = {}
    for name, d in zip(names, deltas, strict=True):
        for head, tensors in d.heads.items():
            if head in heads and not _same_tensors(heads[head], tensors):
                raise ConfigError(f"{head_owner[head]} and {name} carry different task heads {head!r}; heads are "
                                  "replaced, not summed, so they cannot be composed")
            heads.setdefault(head, {k: v.detach().clone() for k, v in tensors.items()})
            head_owner.setdefault(head, name)
    grouped: dict[str, list[Part]] = {}
    for d in deltas:
        for module_name, part in d.parts.items():
            grouped.setdefault(module_name, []).append(part)
    parts = {m: clone_part(ps[0]) if len(ps) == 1 else sum_parts(ps, m) for m, ps in grouped.items()}
    return Delta(
        method="compose",
        config={"inputs": [{"method": d.method, "config": d.config} for d in deltas]},
        parts=parts,
        heads=heads,
        fingerprint=fp,
        metrics={"composed_from": list(names)},
    )
