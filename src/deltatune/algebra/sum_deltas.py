"""Sum deltas into one :class:`Delta`: ``Δ = Σ_t Δ_t`` per module, in the most compact exact form.

LoRA + LoRA concatenates ranks (exact), sparse + sparse unites the index sets, anything else becomes a
dense part (Ansell et al., ACL 2022, arXiv 2110.07560 compose sparse fine-tunings by summation).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from deltatune.algebra.compose import describe_fingerprint_diff, fingerprint_diff, same_tensors
from deltatune.delta import Delta
from deltatune.errors import ConfigError, FingerprintMismatch, ShapeMismatch
from deltatune.parts.base import Part
from deltatune.parts.dense import DensePart
from deltatune.parts.lora import LoRAPart
from deltatune.parts.sparse import SparsePart


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
            if head in heads and not same_tensors(heads[head], tensors):
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
