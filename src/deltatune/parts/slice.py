"""Slice part: a trainable dense block of whole rows or whole columns of a weight (S2FT).

In the ``(out, in)`` convention of a map ``y = x Wᵀ``, with ``I`` a sorted set of ``k`` channel indices:

* ``axis="out"`` — output channels (rows of ``W``): ``ΔW[I, :] = S``, ``S ∈ R^{k×d_in}``, and
  ``y[..., I] += x Sᵀ`` (S2FT's trainable ``v``/``up`` rows);
* ``axis="in"`` — input channels (columns of ``W``): ``ΔW[:, I] = S``, ``S ∈ R^{d_out×k}``, and
  ``y += x[..., I] Sᵀ`` (S2FT's trainable ``o``/``down`` columns).

(Yang et al., "S2FT: Efficient, Scalable and Generalizable LLM Fine-tuning by Structured Sparsity", NeurIPS
2024.)  The names say which axis of the *map* the slice indexes, whatever the native layout is: a GPT-2
``Conv1D`` stores ``Wᵀ``, so its ``out`` slice is a block of native columns.  Equivalently ``ΔW = Pᵀ S`` (out)
or ``S Q`` (in) with one-hot selectors ``P``, ``Q``: the part is additive, merges exactly by writing only the
block, and is served unmerged (also per row of a mixed batch).

Partial back-propagation: the input-slice forward is a custom autograd function that saves only the input
slice ``x[..., I]`` (not ``x``) and returns ``∂L/∂S = gᵀ x_I`` and ``∂L/∂x`` only on the columns ``I``; the
output slice needs the whole input for ``∂L/∂S = g_Iᵀ x``, which the base layer's input already is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from deltatune.errors import DeltaFormatError, ShapeMismatch
from deltatune.parts.base import Part, base_layer_kind, exact_sum_dtype, promote_dtypes
from deltatune.parts.layers import LayerKind, in_out_features, is_transposed
from deltatune.parts.meta_checks import check_keys, check_shape, check_state, meta_int, meta_layer, short
from deltatune.parts.sparse import check_indices

Axis = Literal["out", "in"]
AXES = ("out", "in")


def slice_block_shape(axis: Axis, d_in: int, d_out: int, k: int) -> tuple[int, int]:
    """Shape of the trainable block ``S``: ``(k, d_in)`` for output rows, ``(d_out, k)`` for input columns."""
    return (k, d_in) if axis == "out" else (d_out, k)


def slice_delta(axis: Axis, d_in: int, d_out: int, indices: Tensor, block: Tensor) -> Tensor:
    """Dense ``ΔW`` in the ``(out, in)`` convention: ``ΔW[I, :] = S`` (out) or ``ΔW[:, I] = S`` (in), fp32."""
    dense = torch.zeros(d_out, d_in, dtype=torch.float32, device=block.device)
    dim = 0 if axis == "out" else 1
    return dense.index_copy_(dim, indices, block.float())


def native_dim(axis: Axis, layer: LayerKind) -> int:
    """The dimension of the *native* weight that ``indices`` index (Conv1D stores ``(in, out)``)."""
    out_dim = 1 if is_transposed(layer) else 0
    return out_dim if axis == "out" else 1 - out_dim


class _InputSliceLinear(torch.autograd.Function):
    """``x[..., I] Sᵀ`` saving only ``x[..., I]`` for the backward (S2FT's partial back-propagation).

    Backward: ``∂L/∂S = gᵀ x_I`` (summed over the leading dims) and ``∂L/∂x = scatter_I(g S)`` (zero outside
    the columns ``I``, the base layer adds its own input gradient)."""

    @staticmethod
    def forward(ctx, x: Tensor, block: Tensor, indices: Tensor) -> Tensor:
        xs = x.index_select(-1, indices)
        ctx.save_for_backward(xs, block, indices)
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        return xs @ block.t().to(xs.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        xs, block, indices = ctx.saved_tensors
        dtype = promote_dtypes([grad_out, xs])
        g2 = grad_out.reshape(-1, grad_out.shape[-1]).to(dtype)
        grad_block = None
        if ctx.needs_input_grad[1]:
            grad_block = (g2.t() @ xs.reshape(-1, xs.shape[-1]).to(dtype)).to(block.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            part = (grad_out.to(dtype) @ block.to(dtype)).to(ctx.x_dtype)
            grad_x = torch.zeros(ctx.x_shape, dtype=ctx.x_dtype, device=grad_out.device).index_copy_(-1, indices,
                                                                                                     part)
        return grad_x, grad_block, None


class SlicePart(Part):
    """A trainable block ``S`` (zero-initialised) over the rows (``axis="out"``) or columns (``axis="in"``)
    ``indices`` of a Linear/Conv1D weight; see the module docstring for the math."""

    kind = "slice"
    additive, base_dependent, mixed_rows, has_aux_loss = True, False, True, False

    def __init__(self, d_in: int, d_out: int, axis: Axis, indices: Tensor, layer: LayerKind = LayerKind.LINEAR,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        if axis not in AXES:
            raise ShapeMismatch(f"slice axis must be one of {AXES}, got {axis!r}")
        if LayerKind(layer) is LayerKind.EMBEDDING:
            raise ShapeMismatch("slice parts attach to Linear or Conv1D modules, not an Embedding")
        self.d_in, self.d_out, self.axis, self.layer = int(d_in), int(d_out), axis, LayerKind(layer)
        indices = indices.to(device=device).sort().values
        check_indices(indices, self.d_out if axis == "out" else self.d_in, f"slice {axis} indices",
                      require_sorted=True)
        self.register_buffer("indices", indices.to(torch.int64))
        shape = slice_block_shape(axis, self.d_in, self.d_out, indices.numel())
        self.block = nn.Parameter(torch.zeros(shape, dtype=dtype, device=device))

    @property
    def k(self) -> int:
        return int(self.indices.numel())

    @property
    def weight_shape(self) -> tuple[int, int]:
        return (self.d_in, self.d_out) if is_transposed(self.layer) else (self.d_out, self.d_in)

    # --- computation -------------------------------------------------------------------
    def forward(self, x: Tensor, base: nn.Module) -> Tensor:
        out = base(x)
        if self.axis == "out":
            rows = x @ self.block.t().to(x.dtype)
            return out.index_add(-1, self.indices, rows.to(out.dtype))
        return out + _InputSliceLinear.apply(x, self.block, self.indices).to(out.dtype)

    def delta_weight(self) -> Tensor:
        dense = slice_delta(self.axis, self.d_in, self.d_out, self.indices, self.block.detach())
        return dense.t() if is_transposed(self.layer) else dense

    # --- algebra ---------------------------------------------------------------------------
    def updates(self, base: nn.Module | None = None) -> dict[str, Tensor]:
        """``{"weight": ΔW}`` (dense, native layout, fp32; the base is not needed).  Differentiable in the block:
        the layer sums several additive parts through it."""
        dense = slice_delta(self.axis, self.d_in, self.d_out, self.indices, self.block)
        return {"weight": dense.t() if is_transposed(self.layer) else dense}

    def update_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"weight": self.weight_shape}

    def layer_kind(self) -> LayerKind | None:
        return self.layer

    def native_block(self) -> Tensor:
        """``S`` laid out like the native weight's sub-block ``W.index_select(native_dim, I)``."""
        return self.block.t() if is_transposed(self.layer) else self.block

    def merge_sites(self) -> dict[str, Tensor] | None:
        """A merge writes only the block's entries: their flat indices in the native weight."""
        rows, cols = self.weight_shape
        idx = self.indices
        if native_dim(self.axis, self.layer) == 0:
            flat = (idx[:, None] * cols + torch.arange(cols, device=idx.device)[None, :])
        else:
            flat = (torch.arange(rows, device=idx.device)[:, None] * cols + idx[None, :])
        return {"weight": flat.reshape(-1).sort().values}

    def values_view(self, product: bool = False) -> dict[str, Tensor]:
        """``{"": S}`` (the same with or without ``product``: the block is the update's only non-zero part)."""
        return {"": self.block.detach()}

    def values_domain(self, product: bool = False) -> dict[str, int]:
        """The block stands for the whole weight's update (zero outside its rows or columns), as a sparse part's
        values do."""
        return {"": self.d_in * self.d_out}

    def with_values(self, values: dict[str, Tensor], product: bool = False, where: str = "slice") -> Part:
        """The same rows/columns with a new block."""
        block = values[""]
        shape = tuple(self.block.shape)
        if tuple(block.shape) != shape:
            raise ShapeMismatch(f"{where}: block of shape {tuple(block.shape)}, expected {shape}")
        out = SlicePart(self.d_in, self.d_out, self.axis, self.indices, self.layer, dtype=block.dtype,
                        device=block.device)
        with torch.no_grad():
            out.block.copy_(block)
        return out

    def sum_same_class(self, parts: Sequence[Part], where: str) -> Part | None:
        """Union of the index sets (same axis and weight), blocks added where they overlap (exact); slices of one
        weight on different axes (rows and columns) are no slice of either: ``None``, summed densely."""
        if len({p.axis for p in parts}) > 1:  # type: ignore[attr-defined]
            return None
        return sum_slices(parts, where)  # type: ignore[arg-type]

    # --- merging -------------------------------------------------------------------------
    def merge_into(self, base: nn.Module) -> None:
        """``W[I, :] += S`` (or ``W[:, I] += S``) in the native layout, fp32 then cast; nothing else is written."""
        self._add(base, 1.0)

    def unmerge_from(self, base: nn.Module) -> None:
        self._add(base, -1.0)

    def _add(self, base: nn.Module, sign: float) -> None:
        w = base.weight
        if tuple(w.shape) != self.weight_shape:
            raise ShapeMismatch(f"slice delta for weight {self.weight_shape} applied to {tuple(w.shape)}")
        dim = native_dim(self.axis, self.layer)
        idx = self.indices.to(w.device)
        with torch.no_grad():
            picked = w.data.index_select(dim, idx).float() + sign * self.native_block().detach().float().to(w.device)
            w.data.index_copy_(dim, idx, picked.to(w.dtype))

    # --- serialisation -------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        return {"d_in": self.d_in, "d_out": self.d_out, "axis": self.axis, "layer": str(self.layer), "k": self.k}

    @classmethod
    def expected_state(cls, meta: Any) -> dict[str, tuple[int, ...]]:
        meta = check_keys(meta, {"d_in", "d_out", "axis", "layer", "k"})
        d_in, d_out = meta_int(meta, "d_in"), meta_int(meta, "d_out")
        check_shape([d_in, d_out], "meta fields 'd_in'/'d_out'", min_dim=1)
        if meta["axis"] not in AXES:
            raise DeltaFormatError(f"meta field 'axis' is {short(meta['axis'])}; known: {list(AXES)}")
        if meta_layer(meta) is LayerKind.EMBEDDING:
            raise DeltaFormatError("meta field 'layer' is embedding; slice parts are for linear or conv1d layers")
        k = meta_int(meta, "k", minimum=0)
        span = d_out if meta["axis"] == "out" else d_in
        if k > span:
            raise DeltaFormatError(f"meta field 'k' is {k}, more than the {span} {meta['axis']} channels")
        return {"indices": (k,), "block": slice_block_shape(meta["axis"], d_in, d_out, k)}

    @classmethod
    def from_state(cls, state: dict[str, Tensor], meta: dict[str, Any]) -> SlicePart:
        """Rebuild from stored indices, which must be strictly increasing and inside the axis."""
        check_state(state, cls.expected_state(meta), cls.kind, int_tensors=frozenset({"indices"}))
        idx = state["indices"]
        span = meta["d_out"] if meta["axis"] == "out" else meta["d_in"]
        check_indices(idx, span, "slice indices", require_sorted=True)
        part = cls(meta["d_in"], meta["d_out"], meta["axis"], idx, LayerKind(meta["layer"]),
                   dtype=state["block"].dtype)
        part.load_tensors({"indices": idx.to(torch.int64), "block": state["block"]}, "slice")
        return part

    def check_base(self, base: nn.Module, where: str) -> None:
        kind = base_layer_kind(base, where)
        if kind is not self.layer or in_out_features(base) != (self.d_in, self.d_out):
            d_in, d_out = in_out_features(base)
            raise ShapeMismatch(f"{where}: slice part for a {self.layer} map {self.d_in}→{self.d_out}, base is a "
                                f"{kind} map {d_in}→{d_out}")


def sum_slices(parts: Sequence[SlicePart], where: str) -> SlicePart:
    """``Σ ΔW`` of slice parts over the same axis of the same weight as one slice part (union of indices), in fp32
    where half-precision blocks share a channel (:func:`exact_sum_dtype`)."""
    ref = parts[0]
    for p in parts[1:]:
        if (p.d_in, p.d_out, p.axis, p.layer) != (ref.d_in, ref.d_out, ref.axis, ref.layer):
            raise ShapeMismatch(f"{where}: slice parts {ref.axis}/{ref.d_in}→{ref.d_out} ({ref.layer}) and "
                                f"{p.axis}/{p.d_in}→{p.d_out} ({p.layer}) cannot be summed")
    device = ref.block.device
    every = torch.cat([p.indices.to(device) for p in parts])
    union = torch.unique(every, sorted=True)
    dtype = exact_sum_dtype([p.block for p in parts], overlapping=union.numel() < every.numel())
    out = SlicePart(ref.d_in, ref.d_out, ref.axis, union, ref.layer, dtype=dtype, device=device)
    dim = 0 if ref.axis == "out" else 1
    with torch.no_grad():
        for p in parts:
            pos = torch.searchsorted(union, p.indices.to(device))
            out.block.index_add_(dim, pos, p.block.detach().to(device=device, dtype=dtype))
    return out


def block_numel(axis: Axis, d_in: int, d_out: int, k: int) -> int:
    """Trainable scalars of a slice of ``k`` channels."""
    return math.prod(slice_block_shape(axis, d_in, d_out, k))
