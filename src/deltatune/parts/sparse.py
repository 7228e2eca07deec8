"""Sparse part: trainable values at sorted flat indices of the base weight (SpIEL).

``W_eff = W + scatter(values at indices)`` (Ansell et al., "Scaling Sparse Fine-Tuning to Large
Language Models", 2024).  The custom autograd function never stores a dense ``ΔW``: forward builds
``W_eff`` transiently and runs the base computation; backward rebuilds it, returns the input
gradient and gathers ``∂L/∂values = (∂L/∂W_eff)[indices]`` from the transient dense weight gradient,
which lives for one layer at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from deltatune.errors import DeltaFormatError, ShapeMismatch
from deltatune.parts.base import Part, base_layer_kind, promote_dtypes
from deltatune.parts.layers import LayerKind, functional_forward, input_grad, weight_grad
from deltatune.parts.meta_checks import check_keys, check_shape, check_state, meta_int, meta_layer

GradObserver = Callable[[Tensor], None]


def scatter_delta(shape: torch.Size | tuple[int, ...], indices: Tensor, values: Tensor) -> Tensor:
    """Dense ``ΔW`` with ``ΔW.flat[indices] = values`` (fp32)."""
    dense = torch.zeros(int(torch.tensor(shape).prod()), dtype=torch.float32, device=values.device)
    return dense.index_add_(0, indices, values.float()).view(shape)


def effective_weight(weight: Tensor, indices: Tensor, values: Tensor) -> Tensor:
    """``W + scatter(values)`` as a fresh tensor in the weight's dtype (``W`` is untouched)."""
    flat = weight.detach().reshape(-1).clone()
    return flat.index_add_(0, indices, values.detach().to(weight.dtype)).view_as(weight)


class _SparseDeltaFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, values: Tensor, indices: Tensor, weight: Tensor, base: nn.Module,
                kind: LayerKind, observer: GradObserver | None) -> Tensor:
        ctx.save_for_backward(x, values, indices, weight)
        ctx.base, ctx.kind, ctx.observer = base, kind, observer
        with torch.no_grad():
            return functional_forward(base, kind, x, effective_weight(weight, indices, values))

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, values, indices, weight = ctx.saved_tensors
        grad_out = grad_out.to(weight.dtype)  # under autocast the output (and its gradient) is low precision
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = input_grad(ctx.kind, grad_out, effective_weight(weight, indices, values))
            grad_x = None if grad_x is None else grad_x.to(x.dtype)
        grad_w = weight_grad(ctx.kind, x, grad_out, weight.shape)
        if ctx.observer is not None:
            ctx.observer(grad_w)
        grad_values = grad_w.reshape(-1).index_select(0, indices).to(values.dtype)
        return grad_x, grad_values, None, None, None, None, None


def check_indices(indices: Tensor, numel: int, what: str, require_sorted: bool) -> None:
    """Raise :class:`ShapeMismatch` unless ``indices`` is a 1-D integer tensor of distinct positions in
    ``[0, numel)`` (and, with ``require_sorted``, strictly increasing).

    The one rule every path relies on: the forward pass sums duplicate positions while a merge keeps the
    last, so duplicates are refused rather than resolved, and stored indices are never silently re-sorted."""
    if indices.dtype not in (torch.int32, torch.int64) or indices.dim() != 1:
        raise ShapeMismatch(f"{what} must be a 1-D int32/int64 tensor, got {indices.dtype}{list(indices.shape)}")
    if not indices.numel():
        return
    lo, hi = int(indices.min()), int(indices.max())
    if lo < 0 or hi >= numel:
        raise ShapeMismatch(f"{what}: index {lo if lo < 0 else hi} is out of range for a weight of {numel} entries")
    idx = indices.to(torch.int64)
    step = idx[1:] - idx[:-1]
    if require_sorted and bool((step < 0).any()):
        pos = int((step < 0).nonzero()[0]) + 1
        raise ShapeMismatch(f"{what} are not sorted: position {pos} holds {int(idx[pos])} after {int(idx[pos - 1])}")
    ordered = idx if require_sorted else idx.sort().values
    dup = (ordered[1:] == ordered[:-1]).nonzero()
    if dup.numel():
        raise ShapeMismatch(f"{what}: index {int(ordered[int(dup[0])])} occurs more than once")


class SparsePart(Part):
    """``values`` (trainable, fp32) at ``indices`` (sorted int64 buffer) into the native weight.

    Construction takes any order of *distinct* in-range positions (values start at zero, so sorting them
    is harmless); :meth:`from_state` takes stored indices only strictly increasing.  Duplicates and
    out-of-range positions raise :class:`ShapeMismatch` on both paths."""

    kind = "sparse"
    additive, base_dependent, mixed_rows, has_aux_loss = True, False, True, False

    def __init__(self, weight_shape: tuple[int, ...], indices: Tensor, layer: LayerKind = LayerKind.LINEAR,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.weight_shape = tuple(int(s) for s in weight_shape)
        self.layer = LayerKind(layer)
        indices = indices.sort().values  # sorted once; the check then needs no sort of its own
        check_indices(indices, self.numel_base, "sparse indices", require_sorted=True)
        self.register_buffer("indices", indices.to(torch.int64))
        self.values = nn.Parameter(torch.zeros(indices.numel(), dtype=dtype, device=indices.device))
        self.grad_observer: GradObserver | None = None

    @property
    def numel_base(self) -> int:
        return math.prod(self.weight_shape)

    def forward(self, x: Tensor, base: nn.Module) -> Tensor:
        if not torch.is_grad_enabled() or not self.values.requires_grad:
            return functional_forward(base, self.layer, x, effective_weight(base.weight, self.indices, self.values))
        return _SparseDeltaFunction.apply(x, self.values, self.indices, base.weight, base, self.layer,
                                          self.grad_observer)

    def delta_weight(self) -> Tensor:
        return scatter_delta(self.weight_shape, self.indices, self.values)

    # --- algebra ---------------------------------------------------------------------------
    def updates(self, base: nn.Module | None = None) -> dict[str, Tensor]:
        """``{"weight": ΔW}`` with ``ΔW.flat[indices] = values`` (dense, fp32; the base is not needed)."""
        return {"weight": self.delta_weight()}

    def update_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"weight": self.weight_shape}

    def layer_kind(self) -> LayerKind | None:
        return self.layer

    def merge_sites(self) -> dict[str, Tensor] | None:
        """A merge writes only ``W.flat[indices]``."""
        return {"weight": self.indices}

    def index_layout(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """``values`` sit at the flat ``indices`` of the weight."""
        return {"values": ("indices", self.weight_shape)}

    def values_view(self, product: bool = False) -> dict[str, Tensor]:
        """``{"": values}`` (the same with or without ``product``)."""
        return {"": self.values.detach()}

    def with_values(self, values: dict[str, Tensor], product: bool = False, where: str = "sparse") -> Part:
        """The same index set with new ``values``; entries that became exactly 0 are dropped."""
        vals = values[""].reshape(-1)
        keep = vals != 0
        with torch.no_grad():
            out = SparsePart(self.weight_shape, self.indices[keep], self.layer, dtype=vals.dtype)
            out.values.copy_(vals[keep])
        return out

    def sum_same_class(self, parts: Sequence[Part], where: str) -> Part | None:
        """Union of the index sets (:func:`sum_sparse`, exact)."""
        return sum_sparse(parts, where)  # type: ignore[arg-type]

    def merge_into(self, base: nn.Module) -> None:
        """``W.flat[indices] += values`` without forming a dense ``ΔW``."""
        self._scatter(base, 1.0)

    def unmerge_from(self, base: nn.Module) -> None:
        self._scatter(base, -1.0)

    def _scatter(self, base: nn.Module, sign: float) -> None:
        w = base.weight
        if tuple(w.shape) != self.weight_shape:
            raise ShapeMismatch(f"sparse delta for weight {self.weight_shape} applied to {tuple(w.shape)}")
        with torch.no_grad():
            flat = w.data.view(-1)
            picked = flat.index_select(0, self.indices).float() + sign * self.values.float()
            flat.index_copy_(0, self.indices, picked.to(w.dtype))

    def meta(self) -> dict[str, Any]:
        return {"weight_shape": list(self.weight_shape), "layer": str(self.layer), "k": int(self.indices.numel())}

    @classmethod
    def expected_state(cls, meta: Any) -> dict[str, tuple[int, ...]]:
        meta = check_keys(meta, {"weight_shape", "layer", "k"})
        shape = check_shape(meta["weight_shape"], "meta field 'weight_shape'", min_dim=1)
        meta_layer(meta)
        k = meta_int(meta, "k", minimum=0)
        if k > math.prod(shape):
            raise DeltaFormatError(f"meta field 'k' is {k}, more than the {math.prod(shape)} entries of the weight "
                                   f"{list(shape)}")
        return {"indices": (k,), "values": (k,)}

    @classmethod
    def from_state(cls, state: dict[str, Tensor], meta: dict[str, Any]) -> SparsePart:
        """Rebuild from stored indices, which must be strictly increasing and inside the weight."""
        check_state(state, cls.expected_state(meta), cls.kind, int_tensors=frozenset({"indices"}))
        shape = tuple(meta["weight_shape"])
        idx = state["indices"]
        check_indices(idx, math.prod(shape), "sparse indices", require_sorted=True)
        part = cls(shape, idx, LayerKind(meta["layer"]), dtype=state["values"].dtype)
        part.load_tensors({"indices": idx.to(torch.int64), "values": state["values"]}, "sparse")
        return part

    def check_base(self, base: nn.Module, where: str) -> None:
        base_layer_kind(base, where)
        if tuple(base.weight.shape) != self.weight_shape:
            raise ShapeMismatch(f"{where}: sparse part for weight {self.weight_shape}, base has "
                                f"{tuple(base.weight.shape)}")


def sparse_from_dense(delta: Tensor, layer: LayerKind) -> SparsePart:
    """A :class:`SparsePart` holding the non-zero entries of the native-layout ``ΔW`` (``delta``)."""
    values = delta.reshape(-1)
    keep = values != 0
    with torch.no_grad():
        out = SparsePart(tuple(delta.shape), keep.nonzero().reshape(-1), layer, dtype=values.dtype)
        out.values.copy_(values[keep])
    return out


def sum_sparse(parts: Sequence[SparsePart], where: str) -> SparsePart:
    """Union of the index sets; values at a shared index are added (in the promoted dtype)."""
    ref = parts[0]
    for p in parts[1:]:
        if (p.weight_shape, p.layer) != (ref.weight_shape, ref.layer):
            raise ShapeMismatch(f"{where}: sparse parts for weights {ref.weight_shape} ({ref.layer}) and "
                                f"{p.weight_shape} ({p.layer}) cannot be summed")
    dtype = promote_dtypes([p.values for p in parts])
    device = ref.values.device
    idx = torch.cat([p.indices.to(device) for p in parts])
    vals = torch.cat([p.values.detach().to(device=device, dtype=dtype) for p in parts])
    uniq, inverse = torch.unique(idx, sorted=True, return_inverse=True)
    summed = torch.zeros(uniq.numel(), dtype=dtype, device=device).index_add_(0, inverse, vals)
    out = SparsePart(ref.weight_shape, uniq, ref.layer, dtype=dtype)
    with torch.no_grad():
        out.values.copy_(summed)
    return out
