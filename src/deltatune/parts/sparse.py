"""Sparse part: trainable values at sorted flat indices of the base weight (SpIEL).

``W_eff = W + scatter(values at indices)`` (Ansell et al., "Scaling Sparse Fine-Tuning to Large
Language Models", 2024).  The custom autograd function never stores a dense ``ΔW``: forward builds
``W_eff`` transiently and runs the base computation; backward rebuilds it and returns the input
gradient.  ``∂L/∂values = (∂L/∂W_eff)[indices]`` is computed by :mod:`deltatune.parts.sparse_grad`, never as a
layer's dense weight gradient; only an observer (SpIEL-AG's selection window) gets that.  In deltatune's training
loop a part is bound instead (:meth:`SparsePart.bind`, :mod:`deltatune.parts.sparse_binding`): the weight holds
``W_eff`` for the run and the autograd function uses it as it is.

Indices are stored sorted, as int32 when the weight has fewer than 2³¹ entries (int64 otherwise), like
SpIEL's ``SparseDelta``; older files with int64 indices load unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from deltatune.errors import DeltaFormatError, ShapeMismatch
from deltatune.parts.base import Part, base_layer_kind, exact_sum_dtype, writable
from deltatune.parts.layers import LayerKind, functional_forward, input_grad, scaled_lookup, weight_grad
from deltatune.parts.meta_checks import check_keys, check_shape, check_state, meta_int, meta_layer
from deltatune.parts.sparse_binding import SparseBinding, added
from deltatune.parts.sparse_grad import (
    CsrSupport,
    RowBlocks,
    blocked_weight_grad,
    csr_support,
    row_blocks,
    sampled_weight_grad,
    sampled_weight_grads,
    scratch,
    use_sampled_grad,
)


class GradObserver(Protocol):
    """A selection window's hold on one layer's weight gradient (SpIEL-AG's, :mod:`deltatune.methods.spiel_selector`).

    Until it has chosen its candidate positions, ``wanted`` is ``None`` and the backward hands :meth:`observe` the
    layer's dense ``∂L/∂W`` (a shared :func:`scratch` buffer, overwritten by the next layer's: the observer keeps no
    reference to it, and may itself write to it).  Then ``wanted`` is the candidates' sorted flat positions and
    their :class:`CsrSupport` (``None``: built when needed), and the backward hands :meth:`observe_at` only
    ``(∂L/∂W).flat[positions]``: sampled beside the part's own entries without the dense gradient
    (:func:`sampled_weight_grads`) when both together fit the sampled path (:func:`use_sampled_grad`), else
    gathered from the dense gradient."""

    wanted: tuple[Tensor, CsrSupport | None] | None

    def observe(self, grad_w: Tensor) -> None: ...

    def observe_at(self, grad_at: Tensor) -> None: ...


def index_dtype(numel: int) -> torch.dtype:
    """int32 when every flat position of a ``numel``-entry tensor fits (``numel < 2³¹``), else int64."""
    return torch.int32 if numel < 2**31 else torch.int64


def scatter_delta(shape: torch.Size | tuple[int, ...], indices: Tensor, values: Tensor) -> Tensor:
    """Dense ``ΔW`` with ``ΔW.flat[indices] = values`` (fp32)."""
    dense = torch.zeros(int(torch.tensor(shape).prod()), dtype=torch.float32, device=values.device)
    return dense.index_add_(0, indices, values.float()).view(shape)


def effective_weight(weight: Tensor, indices: Tensor, values: Tensor) -> Tensor:
    """``W + scatter(values)`` as a fresh tensor in the weight's dtype (``W`` is untouched; :func:`added`)."""
    flat = weight.detach().reshape(-1).clone()
    return flat.scatter_(0, indices.long(), added(flat.index_select(0, indices), values)).view_as(weight)


@contextmanager
def patched_weight(weight: Tensor, indices: Tensor, values: Tensor) -> Iterator[Tensor]:
    """``W + scatter(values)`` for the duration of the block, written into ``W`` itself where that is safe.

    In place (a contiguous weight; the caller leaves out an embedding with ``max_norm``, whose lookup
    renormalises rows in place): the ``k`` entries ``W.flat[indices]`` are saved, ``values`` added (the same
    one rounding as :func:`effective_weight`, :func:`~deltatune.parts.sparse_binding.added`), and the saved entries
    written back afterwards, so the base is restored bit for bit and no dense copy of ``W`` is made.  The change goes
    through ``.data`` (invisible to autograd's version counters) and lasts only for one kernel call of the
    training forward or backward; a forward without gradients (serving, evaluation) uses
    :func:`effective_weight`, so concurrent
    readers of the base never see it.  Otherwise a fresh :func:`effective_weight`."""
    if not weight.is_contiguous() or weight.is_inference():
        yield effective_weight(weight, indices, values)
        return
    flat, positions = weight.data.view(-1), indices.long()  # scatter_ takes int64 positions only
    saved = flat.index_select(0, indices)
    flat.scatter_(0, positions, added(saved, values))
    try:
        yield weight.data
    finally:
        flat.scatter_(0, positions, saved)


class SparseDeltaFunction(torch.autograd.Function):
    """``y = f(x; W + scatter(values))`` saving ``x``, ``values``, ``indices`` and ``W`` by reference (no dense
    ``ΔW``, no ``W_eff``); an optional last argument is the part's cached layout of its indices
    (:meth:`SparsePart.support`).  With ``bound`` the weight already holds ``W + scatter(values)``
    (:meth:`SparsePart.bind`) and is used as it is."""

    @staticmethod
    def forward(ctx, x: Tensor, values: Tensor, indices: Tensor, weight: Tensor, base: nn.Module,
                kind: LayerKind, observer: GradObserver | None, bound: bool,
                *support: CsrSupport | RowBlocks | None) -> Tensor:
        ctx.save_for_backward(x, values, indices, weight)
        ctx.base, ctx.kind, ctx.observer, ctx.bound = base, kind, observer, bound
        ctx.n_support, ctx.support = len(support), support[0] if support else None
        in_place = kind is not LayerKind.EMBEDDING or getattr(base, "max_norm", None) is None
        with torch.no_grad():
            if bound:
                return functional_forward(base, kind, x, weight)
            if not in_place:
                return functional_forward(base, kind, x, effective_weight(weight, indices, values))
            with patched_weight(weight, indices, values) as w_eff:
                return functional_forward(base, kind, x, w_eff)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, values, indices, weight = ctx.saved_tensors
        grad_out = grad_out.to(weight.dtype)  # under autocast the output (and its gradient) is low precision
        if ctx.kind is LayerKind.EMBEDDING:  # y = c·W[ids] for a scaled embedding (Gemma): ∂L/∂W = c·Σ g
            grad_out = scaled_lookup(grad_out, ctx.base)
            pad = getattr(ctx.base, "padding_idx", None)
            if pad is not None:  # as F.embedding's backward: the padding row gets no gradient
                grad_out = grad_out.masked_fill((x == pad).unsqueeze(-1), 0)
        grad_x = None
        if ctx.needs_input_grad[0] and ctx.kind is not LayerKind.EMBEDDING:
            if ctx.bound:
                grad_x = input_grad(ctx.kind, grad_out, weight)
            else:
                with patched_weight(weight, indices, values) as w_eff:
                    grad_x = input_grad(ctx.kind, grad_out, w_eff)
            grad_x = None if grad_x is None else grad_x.to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_values = _values_grad(ctx, x, grad_out, indices, weight).to(values.dtype)
        else:
            grad_values = None
        return (grad_x, grad_values, None, None, None, None, None, None) + (None,) * ctx.n_support


def _values_grad(ctx: Any, x: Tensor, grad_out: Tensor, indices: Tensor, weight: Tensor) -> Tensor:
    """``∂L/∂values``: the SDDMM on a sparse support, the row-blocked gather on a dense one.  A selection window's
    observer (:class:`GradObserver`) gets the dense ``∂L/∂W`` (in a :func:`scratch` buffer) until it has chosen its
    candidates, then the gradient at those, sampled with the values' own when both fit the sampled path."""
    observer, shape, numel, k = ctx.observer, tuple(weight.shape), weight.numel(), indices.numel()
    csr = ctx.support if isinstance(ctx.support, CsrSupport) else None
    if observer is None:
        if use_sampled_grad(ctx.kind, k, numel):
            return sampled_weight_grad(ctx.kind, x, grad_out, shape, indices, csr)
        blocks = ctx.support if isinstance(ctx.support, RowBlocks) else None
        return blocked_weight_grad(ctx.kind, x, grad_out, shape, indices, blocks=blocks)
    wanted = observer.wanted
    if wanted is not None and use_sampled_grad(ctx.kind, k + wanted[0].numel(), numel):
        grad_values, grad_wanted = sampled_weight_grads(ctx.kind, x, grad_out, shape, [(indices, csr), wanted])
        observer.observe_at(grad_wanted)
        return grad_values
    buffer = scratch("grad", numel, grad_out.dtype, grad_out.device).view(weight.shape)
    grad_w = weight_grad(ctx.kind, x, grad_out, weight.shape, out=buffer)
    grad_values = grad_w.reshape(-1).index_select(0, indices)
    if wanted is None:
        observer.observe(grad_w)  # after the gather: the observer may use the buffer as scratch
    else:
        observer.observe_at(grad_w.reshape(-1).index_select(0, wanted[0]))
    return grad_values


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
    """``values`` (trainable, fp32) at ``indices`` (sorted buffer, :func:`index_dtype`: int32 below 2³¹ entries)
    into the native weight.

    Construction takes any order of *distinct* in-range positions (values start at zero, so sorting them
    is harmless); :meth:`from_state` takes stored indices only strictly increasing.  Duplicates and
    out-of-range positions raise :class:`ShapeMismatch` on both paths."""

    kind = "sparse"
    additive, base_dependent, mixed_rows, has_aux_loss = True, False, True, False
    bound_trains_base = False

    def __init__(self, weight_shape: tuple[int, ...], indices: Tensor, layer: LayerKind = LayerKind.LINEAR,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.weight_shape = tuple(int(s) for s in weight_shape)
        self.layer = LayerKind(layer)
        indices = indices.sort().values  # sorted once; the check then needs no sort of its own
        check_indices(indices, self.numel_base, "sparse indices", require_sorted=True)
        self.register_buffer("indices", indices.to(index_dtype(self.numel_base)))
        self.values = nn.Parameter(torch.zeros(indices.numel(), dtype=dtype, device=indices.device))
        self.grad_observer: GradObserver | None = None
        self._support: tuple[Tensor, int, CsrSupport | RowBlocks] | None = None
        self._binding: SparseBinding | None = None

    def support(self) -> CsrSupport | RowBlocks | None:
        """What the backward needs of the indices' layout, cached until the indices change (a reselection writes
        them in place: their version moves on): their :func:`csr_support` on the sampled path, their
        :func:`row_blocks` on the blocked one (``None`` for an embedding)."""
        if self.layer is LayerKind.EMBEDDING:
            return None
        idx = self.indices
        cached = getattr(self, "_support", None)
        if cached is None or cached[0] is not idx or cached[1] != idx._version:
            sampled = use_sampled_grad(self.layer, idx.numel(), self.numel_base)
            layout = csr_support(idx, self.weight_shape) if sampled else row_blocks(idx, self.weight_shape)
            cached = (idx, idx._version, layout)  # the tensor itself: a freed one's address may be reused
            self._support = cached
        return cached[2]

    @property
    def numel_base(self) -> int:
        return math.prod(self.weight_shape)

    def forward(self, x: Tensor, base: nn.Module) -> Tensor:
        return self._compute(base, self.layer, x, alias=False)

    def forward_shared(self, base: nn.Module, kind: LayerKind, x: Tensor) -> Tensor:
        """A tied alias of a bound part's weight computes with it as it is (it holds ``W + ΔW`` already)."""
        if self._binding is None:
            return super().forward_shared(base, kind, x)
        return self._compute(base, kind, x, alias=True)

    def _compute(self, base: nn.Module, kind: LayerKind, x: Tensor, alias: bool) -> Tensor:
        """The module's output with ``W + scatter(values)``; for a tied ``alias`` (another module sharing the weight)
        the gradient reaches the values, but no selection window samples it (as unbound, through the dense ``ΔW``)."""
        bound = self.bound
        if bound:
            self._binding.sync(self.indices, self.values)
        if not torch.is_grad_enabled() or not self.values.requires_grad:
            weight = base.weight if bound else effective_weight(base.weight, self.indices, self.values)
            return functional_forward(base, kind, x, weight)
        return SparseDeltaFunction.apply(x, self.values, self.indices, base.weight, base, kind,
                                          None if alias else self.grad_observer, bound,
                                          self.support() if kind is self.layer else None)

    # --- in-place training ------------------------------------------------------------------
    def bind(self, base: nn.Module, spill: Any) -> bool:
        """Keep ``W + scatter(values)`` in ``base``'s weight while training (:class:`SparseBinding`): the forward and
        backward then compute with the weight as it is, with no ``k``-entry patch in and out per call.

        The values stay this part's own parameter (its optimiser state, weight decay and state are unchanged); only
        ``W₀``'s ``k`` entries are kept aside (``spill`` is not needed).  While bound, ``base`` computes with ``W +
        ΔW``: it is no longer the base for anything else (training only).  Refused (``False``) when bound already,
        for a weight of another shape or device, not contiguous, an inference tensor, or an embedding with
        ``max_norm`` (its lookup renormalises rows in place)."""
        w = getattr(base, "weight", None)
        if (self._binding is not None or not isinstance(w, Tensor) or tuple(w.shape) != self.weight_shape
                or w.device != self.values.device or not w.is_contiguous() or w.is_inference()
                or self.layer is LayerKind.EMBEDDING and getattr(base, "max_norm", None) is not None):
            return False
        self._binding = SparseBinding(base)
        self._binding.sync(self.indices, self.values)
        return True

    @property
    def bound(self) -> bool:
        return self._binding is not None

    def unbind(self) -> None:
        """Give the base its own ``k`` entries back (bit for bit)."""
        if self._binding is not None:
            self._binding.release()
            self._binding = None

    def delta_weight(self) -> Tensor:
        return scatter_delta(self.weight_shape, self.indices, self.values)

    # --- algebra ---------------------------------------------------------------------------
    def updates(self, base: nn.Module | None = None) -> dict[str, Tensor]:
        """``{"weight": ΔW}`` with ``ΔW.flat[indices] = values`` (dense, fp32; the base is not needed)."""
        return {"weight": self.delta_weight()}

    def forward_updates(self, base: nn.Module) -> dict[str, Tensor]:
        """While bound, ``ΔW − ΔW.detach()``: the weight holds ``W + ΔW`` already, so the term adds zero and carries
        only the values' gradient."""
        if self._binding is None:
            return self.updates(base)
        delta = self.delta_weight()
        return {"weight": delta - delta.detach()}

    def update_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"weight": self.weight_shape}

    def layer_kind(self) -> LayerKind | None:
        return self.layer

    def merge_sites(self) -> dict[str, Tensor] | None:
        """A merge writes only ``W.flat[indices]`` (as int64, which ``index_copy_`` needs)."""
        return {"weight": self.indices.long()}

    def index_layout(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """``values`` sit at the flat ``indices`` of the weight."""
        return {"values": ("indices", self.weight_shape)}

    def values_view(self, product: bool = False) -> dict[str, Tensor]:
        """``{"": values}`` (the same with or without ``product``)."""
        return {"": self.values.detach()}

    def values_domain(self, product: bool = False) -> dict[str, int]:
        """The values stand for every entry of the weight."""
        return {"": self.numel_base}

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
        """``W.flat[indices] += values`` without forming a dense ``ΔW`` (a bound part gives the base back first)."""
        self.unbind()
        self._scatter(base, 1.0)

    def unmerge_from(self, base: nn.Module) -> None:
        self.unbind()
        self._scatter(base, -1.0)

    def _scatter(self, base: nn.Module, sign: float) -> None:
        w = base.weight
        if tuple(w.shape) != self.weight_shape:
            raise ShapeMismatch(f"sparse delta for weight {self.weight_shape} applied to {tuple(w.shape)}")
        with torch.no_grad():
            flat = writable(w).view(-1)
            flat.scatter_(0, self.indices.long(), added(flat.index_select(0, self.indices), sign * self.values))

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
        part.load_tensors({"indices": idx, "values": state["values"]}, "sparse")  # int64 files load as well
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
    """Union of the index sets; values at a shared index are added (:func:`exact_sum_dtype`: in fp32 where
    half-precision values share an index, not rounded back to half precision)."""
    ref = parts[0]
    for p in parts[1:]:
        if (p.weight_shape, p.layer) != (ref.weight_shape, ref.layer):
            raise ShapeMismatch(f"{where}: sparse parts for weights {ref.weight_shape} ({ref.layer}) and "
                                f"{p.weight_shape} ({p.layer}) cannot be summed")
    device = ref.values.device
    idx = torch.cat([p.indices.to(device) for p in parts])
    uniq, inverse = torch.unique(idx, sorted=True, return_inverse=True)
    dtype = exact_sum_dtype([p.values for p in parts], overlapping=uniq.numel() < idx.numel())
    vals = torch.cat([p.values.detach().to(device=device, dtype=dtype) for p in parts])
    summed = torch.zeros(uniq.numel(), dtype=dtype, device=device).index_add_(0, inverse, vals)
    out = SparsePart(ref.weight_shape, uniq, ref.layer, dtype=dtype)
    with torch.no_grad():
        out.values.copy_(summed)
    return out
