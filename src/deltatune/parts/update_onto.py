"""A batch's rows of additive parts applied onto the base output computed once for the whole batch: each part's row
gets ``x ΔWᵀ + Δb`` from its update prepared once (CSR where sparse, dense otherwise) — the routed forward's
batched pass for Linear/Conv1D modules (:class:`deltatune.layer.DeltaLayer` picks it per part family)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltatune.errors import DeltaTuneError
from deltatune.parts.base import Part, route_rows
from deltatune.parts.layers import LayerKind, layer_kind
from deltatune.routing import row_index

#: Updates at most this dense are applied as a sparse (CSR) matrix, denser ones as a dense one.
CSR_MAX_DENSITY = 0.25


def update_onto(x: Tensor, out: Tensor, base: nn.Module, parts: Sequence[Part | None], row_ids: Tensor,
                cache: dict[Any, Any]) -> Tensor:
    """``out`` with each part's rows given ``x ΔWᵀ + Δb`` (its :meth:`~deltatune.parts.base.Part.updates`, prepared
    once and kept on the part, :meth:`~deltatune.parts.base.Part.prepared`: a CSR matrix when at most
    :data:`CSR_MAX_DENSITY` of it is non-zero — a 1 % sparse delta then costs ~1 % of a weight read per step instead
    of a merged copy of the weight — else dense), rows of ``None`` unchanged.  With a gradient to compute, each
    part runs its own forward on its rows."""
    def each_part_on_its_rows() -> Tensor:
        return route_rows(x, out, row_ids, [None if p is None else (lambda sub, p=p: p(sub, base)) for p in parts])

    if torch.is_grad_enabled() and any(t.requires_grad for p in parts if p is not None for t in p.parameters()):
        return each_part_on_its_rows()
    key = ("updates", out.dtype)
    steps = cache.get(key)
    if steps is None:  # per routing context: (rows, ΔW, Δb) of each part with rows here
        prepared = [None if p is None else _kept_update(p, base, out.dtype) for p in parts]
        rows = row_index(row_ids, len(parts), cache)
        dense = all(u is not None for p, u in zip(parts, prepared, strict=True) if p is not None)
        steps = cache[key] = [(rows[k], *u) for k, u in enumerate(prepared) if u is not None and rows[k] is not None] \
            if dense else False
    if steps is False:  # a part's update touches more than weight and bias
        return each_part_on_its_rows()
    lead = row_ids.dim()
    flat = out.reshape(-1, *out.shape[lead:])
    xs = x.reshape(-1, *x.shape[lead:])
    for rows, weight, bias in steps:
        if weight is None:
            delta = bias.expand(rows.numel(), *flat.shape[1:])
        else:
            sub = xs.index_select(0, rows)
            inner = sub.reshape(-1, sub.shape[-1]).to(out.dtype)
            delta = (weight @ inner.t()).t() if weight.layout == torch.sparse_csr else F.linear(inner, weight)
            if bias is not None:
                delta = delta + bias
            delta = delta.reshape(*sub.shape[:-1], delta.shape[-1])
        # out is this forward's own fresh output: added to in place unless autograd needs it as it is
        add = flat.index_add if flat.requires_grad else flat.index_add_
        flat = add(0, rows, delta.to(flat.dtype))
    return flat.reshape(out.shape)


def _kept_update(part: Part, base: nn.Module, dtype: torch.dtype) -> tuple[Tensor | None, Tensor | None] | None:
    """:func:`_prepared_update`, kept on the part across routing contexts (rebuilt when the part — or, for a
    base-dependent kind, the base module's tensors — change)."""
    depends = tuple(base.parameters(recurse=False)) if part.base_dependent else ()
    return part.prepared(("update", dtype, id(base)), lambda: _prepared_update(part, base, dtype), *depends)


def _prepared_update(part: Part, base: nn.Module, dtype: torch.dtype) -> tuple[Tensor | None, Tensor | None] | None:
    """``(ΔW (out, in) — CSR or dense — or None, Δb or None)`` of ``part`` on ``base`` in ``dtype``; ``None`` when it
    has no dense update here or its update touches other tensors."""
    with torch.no_grad():
        try:
            updates = part.updates(base)
        except (NotImplementedError, DeltaTuneError):  # no dense update here: the part runs its own forward
            return None
        if not updates or not set(updates) <= {"weight", "bias"}:
            return None
        weight = updates.get("weight")
        if weight is None:
            bias = updates["bias"].to(dtype)
            return None, bias
        if layer_kind(base) is LayerKind.CONV1D:
            weight = weight.t()
        weight = weight.to(dtype).contiguous()
        if int(torch.count_nonzero(weight)) <= CSR_MAX_DENSITY * weight.numel():
            with warnings.catch_warnings():  # "sparse CSR support is in beta": the product used here is exact
                warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
                weight = weight.to_sparse_csr()
        bias = updates.get("bias")
        return weight, None if bias is None else bias.to(dtype)
