"""Sparse part: trainable values at sorted flat indices of the base weight (SpIEL).

``W_eff = W + scatter(values at indices)`` (Ansell et al., "Scaling Sparse Fine-Tuning to Large
Language Models", 2024).  The custom autograd function never stores a dense ``ΔW``: forward builds
``W_eff`` transiently and runs the base computation; backward rebuilds it and returns the input
gradient.  ``∂L/∂values = (∂L/∂W_eff)[indices]`` is computed on the support only
(:func:`sampled_weight_grad`: a sampled dense-dense matmul, SDDMM) or, on a support dense enough for
matmuls to be faster (:data:`SAMPLED_GRAD_MAX_DENSITY`), a block of rows at a time
(:func:`blocked_weight_grad`, at most :data:`GRAD_BLOCK_ENTRIES` entries of the gradient at once).  Only
an observer (SpIEL-AG's selection window) gets one layer's dense weight gradient.

Indices are stored sorted, as int32 when the weight has fewer than 2³¹ entries (int64 otherwise), like
SpIEL's ``SparseDelta``; older files with int64 indices load unchanged.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.weak import WeakTensorKeyDictionary

from deltatune.errors import DeltaFormatError, ShapeMismatch
from deltatune.parts.base import Part, base_layer_kind, promote_dtypes
from deltatune.parts.layers import LayerKind, functional_forward, input_grad, scaled_lookup, weight_grad
from deltatune.parts.meta_checks import check_keys, check_shape, check_state, meta_int, meta_layer

GradObserver = Callable[[Tensor], None]

#: Above this density (k / numel) the backward forms the weight gradient in row blocks and gathers from them
#: (:func:`blocked_weight_grad`) instead of the SDDMM.  Measured on CPU (``benchmarks/sparse_backward.py --rank 32``,
#: two threads, 512–640 tokens, ``sparse_backward_r32.md``), the SDDMM's time over the blocked path's: 0.78 and 0.88
#: at 9.4 % (Llama 1024×512, 512×1024), 0.81 and 1.19 at 10.4 % (MiniLM 1536×384, 384×1536), 0.91 at 12.5 % (Llama
#: 512²), 1.17 at 16.7 % (MiniLM 384²); at r = 8 (2.3–4.2 %) it costs 0.53–0.98× the unblocked ``gᵀx`` + gather
#: (``sparse_backward.md``).  Not measured on GPU.
SAMPLED_GRAD_MAX_DENSITY = 0.13
#: Above :data:`SAMPLED_GRAD_MAX_DENSITY` the weight gradient is formed this many entries at a time (a block of
#: rows, :func:`blocked_weight_grad`): 512 KiB in fp32 on CPU, never a layer's whole dense gradient (of a layer
#: larger than that); ``benchmarks/sparse_backward.py --rank 32`` times it against the unblocked ``gᵀx`` + gather
#: and the SDDMM.  On CUDA, where thin GEMMs waste the device, :data:`GRAD_BLOCK_ENTRIES_CUDA` (64 MiB; not
#: measured: no GPU was lent to this work).
GRAD_BLOCK_ENTRIES = 2**17
GRAD_BLOCK_ENTRIES_CUDA = 2**24


def index_dtype(numel: int) -> torch.dtype:
    """int32 when every flat position of a ``numel``-entry tensor fits (``numel < 2³¹``), else int64."""
    return torch.int32 if numel < 2**31 else torch.int64


def _flat_pair(x: Tensor, grad_out: Tensor) -> tuple[Tensor, Tensor]:
    """``(g, x)`` flattened to ``(tokens, features)`` and in fp32 (fp64 stays fp64), the dtype the weight gradient is
    computed in."""
    g2 = grad_out.reshape(-1, grad_out.shape[-1])
    dtype = g2.dtype if g2.dtype in (torch.float32, torch.float64) else torch.float32
    return g2.to(dtype), x.reshape(-1, x.shape[-1]).to(dtype)


def _rows_cols(x: Tensor, grad_out: Tensor, kind: LayerKind) -> tuple[Tensor, Tensor]:
    """``(A, B)`` with ``∂L/∂W = A @ B`` in the native layout: Linear ``gᵀ·x`` (out, in), Conv1D ``xᵀ·g``
    (in, out), from :func:`_flat_pair`."""
    g2, x2 = _flat_pair(x, grad_out)
    return (g2.t(), x2) if kind is LayerKind.LINEAR else (x2.t(), g2)


#: Columns per strip in :func:`token_major`'s two-pass transpose (16 fp32 entries: one 64-byte cache line).
TRANSPOSE_STRIP = 16


def token_major(m: Tensor, tokens: Tensor | None = None) -> Tensor:
    """``m[tokens]ᵀ``: the (tokens, features) matrix ``m`` as a contiguous (features, tokens) one, keeping only the
    rows ``tokens`` (all when ``None``), the layout the SDDMM reads (each entry one dot product of two contiguous
    token vectors).

    The rows are gathered first (whole rows, contiguous), then the transpose made in two passes through
    ``(features / 16, tokens, 16)`` strips: the first copies whole cache lines, the second transposes
    ``tokens × 16`` blocks.  ``benchmarks/sparse_backward.py`` times it (``transposes`` row) against
    ``m.t().contiguous()`` (``transposes_plain``), which walks the strided source one entry at a time: 0.40–0.77×
    its time on MiniLM's and the ~54M Llama's shapes (``sparse_backward.md``)."""
    if tokens is not None:
        m = m.index_select(0, tokens)
    n, d = m.shape
    if d % TRANSPOSE_STRIP or not m.is_contiguous():
        return m.t().contiguous()
    strips = _workspace(n * d, m.dtype, m.device).view(d // TRANSPOSE_STRIP, n, TRANSPOSE_STRIP)
    strips.copy_(m.view(n, d // TRANSPOSE_STRIP, TRANSPOSE_STRIP).transpose(0, 1))
    out = torch.empty(d, n, dtype=m.dtype, device=m.device)  # never a view of the scratch buffer
    out.view(d // TRANSPOSE_STRIP, TRANSPOSE_STRIP, n).copy_(strips.transpose(1, 2))
    return out


_WORKSPACE = threading.local()


def _workspace(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``n`` entries of scratch memory, one buffer per thread, dtype and device, grown to the largest ``n`` asked
    for and reused: :func:`token_major`'s intermediate strips.  A fresh multi-megabyte temporary per call can let
    glibc hand its pages back and fault them in again on the next one: before this buffer, the copies of one shape
    in ``benchmarks/sparse_backward.py`` took several times longer in some processes than in others."""
    buffers = _WORKSPACE.__dict__.setdefault("buffers", {})
    buf = buffers.get((dtype, device))
    if buf is None or buf.numel() < n:
        buf = buffers[(dtype, device)] = torch.empty(n, dtype=dtype, device=device)
    return buf[:n]


#: :func:`live_tokens` gathers only when at least this fraction of the tokens is dead: a causal LM's batch has one
#: (each row's last position, which predicts nothing), not worth a gather.
DEAD_TOKENS_MIN_FRACTION = 0.125


def live_tokens(g2: Tensor) -> Tensor | None:
    """The rows of the (tokens, features) output gradient ``g2`` that are not all zero, or ``None`` to keep every
    row (then nothing is gathered).

    ``∂L/∂W = Σ_t g_t x_tᵀ``: a token whose output gradient is exactly zero adds nothing, and a classifier's
    padding positions are such tokens in every layer (masked as keys, read by no query that reaches the loss):
    in ``benchmarks/train_step.py``'s SST-2 batches 63 % of the positions (``padded_fraction`` in
    ``benchmarks/results/sparse_backward.json``).  A first look at column 0 of 64 evenly
    spaced rows (a dead row is zero there) skips the whole-matrix check when fewer than
    :data:`DEAD_TOKENS_MIN_FRACTION` of them could be dead; a dead row it misses is only computed, never lost.
    CPU only: on an accelerator the count is a host synchronisation per layer.  A dead token's input is not read,
    so an inf or NaN there (``0 · inf``) does not reach the gradient, as it would through the dense ``gᵀx``."""
    n = g2.shape[0]
    if g2.device.type != "cpu" or not n:
        return None
    probe = g2[::max(1, n // 64), 0]
    if probe.numel() - int(torch.count_nonzero(probe)) < DEAD_TOKENS_MIN_FRACTION * probe.numel():
        return None
    live = (g2.amax(1) != 0) | (g2.amin(1) != 0)  # two reductions, no |g| copy; NaN rows stay live
    n_live = int(live.sum())
    return None if n - n_live < DEAD_TOKENS_MIN_FRACTION * n else live.nonzero().squeeze(1)


#: ``{activation x: (x's version, tokens, token_major(x, tokens))}`` while ``x`` lives: layers that read one input (q,
#: k and v; gate and up) transpose it once per backward.
_SHARED_INPUTS: WeakTensorKeyDictionary = WeakTensorKeyDictionary()


def _input_token_major(x: Tensor, x2: Tensor, tokens: Tensor | None) -> Tensor:
    """:func:`token_major` of ``x2`` (``x`` as (tokens, features) in the gradient's dtype) over ``tokens``, made once
    for every layer whose saved input is the same tensor ``x`` at the same version and the same live tokens, and
    dropped with ``x`` (a weak key: once the last of those layers' backward has freed it).

    Only an activation (``x.grad_fn`` set: a new tensor every forward) is shared.  A leaf input may be refilled in
    place between steps without a version change (``x.data.copy_``, a numpy buffer), and a copy that is a view of
    ``x`` itself (one token) would keep its own key alive; both are made afresh each time."""
    if x.grad_fn is None:
        return token_major(x2, tokens)
    hit = _SHARED_INPUTS.get(x)
    if (hit is not None and hit[0] == x._version and hit[2].dtype == x2.dtype
            and (hit[1] is None if tokens is None else hit[1] is not None and torch.equal(hit[1], tokens))):
        return hit[2]
    xt = token_major(x2, tokens)
    if xt.untyped_storage().data_ptr() != x.untyped_storage().data_ptr():
        _SHARED_INPUTS[x] = (x._version, tokens, xt)
    return xt


def _token_major_pair(x: Tensor, grad_out: Tensor, kind: LayerKind) -> tuple[Tensor, Tensor]:
    """``(A, B)``, both (·, live tokens) and contiguous, with ``∂L/∂W = A Bᵀ`` in the native layout (Linear
    ``A = gᵀ, B = xᵀ``; Conv1D ``A = xᵀ, B = gᵀ``): :func:`_rows_cols`'s operands made token-major
    (:func:`token_major`) over the :func:`live_tokens`, the input's shared between layers that read it."""
    g2, x2 = _flat_pair(x, grad_out)
    tokens = live_tokens(g2)
    gt, xt = token_major(g2, tokens), _input_token_major(x, x2, tokens)
    return (gt, xt) if kind is LayerKind.LINEAR else (xt, gt)


_ZEROS: dict[tuple[torch.dtype, torch.device], Tensor] = {}


def _shared_zeros(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``n`` zeros as a view of one buffer per dtype and device (grown to the largest ``n`` asked for; nothing
    writes to it), so a cached CSR pattern costs no values of its own."""
    buf = _ZEROS.get((dtype, device))
    if buf is None or buf.numel() < n:
        buf = _ZEROS[(dtype, device)] = torch.zeros(max(n, 2 * (buf.numel() if buf is not None else 0)),
                                                    dtype=dtype, device=device)
    return buf[:n]


class CsrSupport:
    """The sorted flat ``indices`` of a weight of ``shape`` as a CSR pattern of the ``(shape[0], rest)`` matrix:
    ``crow`` and ``col`` (in the indices' dtype; unpacks as ``crow, col``), and :meth:`pattern`, the sparse CSR
    tensor :func:`_sddmm` samples with, built once per dtype."""

    def __init__(self, crow: Tensor, col: Tensor, shape: tuple[int, int]) -> None:
        self.crow, self.col, self.shape = crow, col, shape
        self._patterns: dict[torch.dtype, Tensor] = {}

    def __iter__(self) -> Iterator[Tensor]:
        return iter((self.crow, self.col))

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles leave the patterns out (a sparse CSR tensor has no storage to copy); they are rebuilt
        on first use."""
        return {**self.__dict__, "_patterns": {}}

    def pattern(self, dtype: torch.dtype) -> Tensor:
        """The CSR tensor of the support with zero values of ``dtype`` (the SDDMM reads only its structure)."""
        cached = self._patterns.get(dtype)
        if cached is None:
            with warnings.catch_warnings():  # "sparse CSR support is in beta"
                warnings.simplefilter("ignore", UserWarning)
                zeros = _shared_zeros(self.col.numel(), dtype, self.col.device)
                cached = torch.sparse_csr_tensor(self.crow, self.col, zeros, self.shape, check_invariants=False)
            self._patterns[dtype] = cached
        return cached


def csr_support(indices: Tensor, shape: Sequence[int]) -> CsrSupport:
    """The :class:`CsrSupport` of the sorted flat ``indices`` of a weight of ``shape``."""
    cols = math.prod(shape[1:]) if len(shape) > 1 else 1
    r = torch.div(indices, cols, rounding_mode="floor")
    crow = torch.zeros(int(shape[0]) + 1, dtype=indices.dtype, device=indices.device)
    crow[1:] = torch.bincount(r, minlength=int(shape[0])).cumsum(0)
    return CsrSupport(crow, indices - r * cols, (int(shape[0]), cols))


def _sddmm(a: Tensor, b: Tensor, support: CsrSupport) -> Tensor:
    """``(a @ bᵀ)`` at the CSR ``support`` (:func:`csr_support`) without forming ``a @ bᵀ``: a sampled dense-dense
    matmul (``torch.sparse.sampled_addmm``; each entry is one dot product of a row of ``a`` with a row of ``b``, both
    contiguous when ``a`` and ``b`` are, as :func:`token_major` makes them, so the kernel copies nothing)."""
    if not a.shape[1]:  # no live token: the gradient is zero
        return torch.zeros(support.col.numel(), dtype=a.dtype, device=a.device)
    return torch.sparse.sampled_addmm(support.pattern(a.dtype), a, b.t(), beta=0.0).values()


def _embedding_sampled(x: Tensor, grad_out: Tensor, weight_shape: tuple[int, ...], indices: Tensor) -> Tensor:
    """Embedding ``∂L/∂W`` at ``indices`` from the looked-up rows only (``≤ tokens × dim``, not ``vocab × dim``):
    ``∂L/∂W[v, c] = Σ_{n: ids_n = v} g[n, c]`` (the same sum as :func:`weight_grad`)."""
    g2 = grad_out.reshape(-1, grad_out.shape[-1])
    dtype = g2.dtype if g2.dtype in (torch.float32, torch.float64) else torch.float32
    ids, inverse = torch.unique(x.reshape(-1), sorted=True, return_inverse=True)
    touched = torch.zeros(ids.numel(), weight_shape[1], dtype=dtype, device=g2.device)
    touched.index_add_(0, inverse, g2.to(dtype))
    idx = indices.long()
    r, c = idx // weight_shape[1], idx % weight_shape[1]
    pos = torch.searchsorted(ids, r).clamp_(max=max(ids.numel() - 1, 0))
    hit = ids[pos] == r if ids.numel() else torch.zeros_like(r, dtype=torch.bool)
    out = torch.zeros(idx.numel(), dtype=dtype, device=g2.device)
    out[hit] = touched[pos[hit], c[hit]]
    return out


def sampled_weight_grad(kind: LayerKind, x: Tensor, grad_out: Tensor, weight_shape: tuple[int, ...],
                        indices: Tensor, support: CsrSupport | None = None) -> Tensor:
    """``(∂L/∂W).flat[indices]`` computed on the support only, never the dense ``∂L/∂W``.

    Linear (``W`` is (out, in), flat ``i = r·in + c``): ``∂L/∂W.flat[i] = Σ_n g[n, r] · x[n, c]``;
    Conv1D (``W`` is (in, out), flat ``i = r·out + c``): ``Σ_n x[n, r] · g[n, c]``; both a sampled dense-dense
    matmul (SDDMM) over the ``tokens`` axis, on token-major copies of the live tokens only
    (:func:`_token_major_pair`).  Embedding: the looked-up rows' gradient, gathered.  The SpIEL
    backward (Ansell et al., 2024, §3) with the dense ``gᵀx`` replaced by its ``k`` needed entries.
    ``indices`` must be sorted (they are in every :class:`SparsePart`); ``support`` is their
    :func:`csr_support` when the caller keeps it (a :class:`SparsePart` caches it between reselections).
    Returns fp32 (fp64 for fp64 input)."""
    if not indices.numel():
        return torch.zeros(0, dtype=torch.float32, device=grad_out.device)
    if kind is LayerKind.EMBEDDING:
        return _embedding_sampled(x, grad_out, weight_shape, indices)
    a, b = _token_major_pair(x, grad_out, kind)
    return _sddmm(a, b, support if support is not None else csr_support(indices, weight_shape))


def blocked_weight_grad(kind: LayerKind, x: Tensor, grad_out: Tensor, weight_shape: tuple[int, ...],
                        indices: Tensor, block_entries: int | None = None) -> Tensor:
    """``(∂L/∂W).flat[indices]`` for a dense support, a block of rows at a time: ``∂L/∂W = A B``
    (:func:`_rows_cols`, ``weight_shape`` its native layout) is formed ``max(1, ⌊block_entries / cols⌋)`` rows at a
    time (one GEMM each) and the support's entries of those rows gathered (flat ``i`` of rows ``[r₀, r₁)`` sits at
    ``i − r₀·cols`` of the block), so at most ``max(block_entries, cols)`` entries of the layer's dense gradient
    exist at once (default :data:`GRAD_BLOCK_ENTRIES`, on CUDA :data:`GRAD_BLOCK_ENTRIES_CUDA`).  A matmul layer
    only; ``indices`` sorted.  Returns fp32 (fp64 for fp64 input)."""
    a, b = _rows_cols(x, grad_out, kind)
    rows, cols = a.shape[0], b.shape[1]
    default = GRAD_BLOCK_ENTRIES_CUDA if a.device.type == "cuda" else GRAD_BLOCK_ENTRIES
    step = max(1, (block_entries or default) // cols)
    starts = torch.arange(0, rows + step, step, device=indices.device).clamp_(max=rows) * cols
    bounds = torch.searchsorted(indices, starts.to(indices.dtype)).tolist()
    out = torch.empty(indices.numel(), dtype=a.dtype, device=a.device)
    for block, r0 in enumerate(range(0, rows, step)):
        lo, hi = bounds[block], bounds[block + 1]
        if lo == hi:
            continue
        torch.index_select(torch.mm(a[r0:r0 + step], b).view(-1), 0, indices[lo:hi] - r0 * cols, out=out[lo:hi])
    return out


def use_sampled_grad(kind: LayerKind, k: int, numel: int) -> bool:
    """Whether the backward should compute only the ``k`` entries (always for embeddings, whose dense gradient
    is ``vocab × dim``; for matmul layers while ``k / numel ≤`` :data:`SAMPLED_GRAD_MAX_DENSITY`)."""
    return kind is LayerKind.EMBEDDING or k <= SAMPLED_GRAD_MAX_DENSITY * numel


def scatter_delta(shape: torch.Size | tuple[int, ...], indices: Tensor, values: Tensor) -> Tensor:
    """Dense ``ΔW`` with ``ΔW.flat[indices] = values`` (fp32)."""
    dense = torch.zeros(int(torch.tensor(shape).prod()), dtype=torch.float32, device=values.device)
    return dense.index_add_(0, indices, values.float()).view(shape)


def effective_weight(weight: Tensor, indices: Tensor, values: Tensor) -> Tensor:
    """``W + scatter(values)`` as a fresh tensor in the weight's dtype (``W`` is untouched)."""
    flat = weight.detach().reshape(-1).clone()
    return flat.index_add_(0, indices, values.detach().to(weight.dtype)).view_as(weight)


@contextmanager
def patched_weight(weight: Tensor, indices: Tensor, values: Tensor) -> Iterator[Tensor]:
    """``W + scatter(values)`` for the duration of the block, written into ``W`` itself where that is safe.

    In place (a contiguous weight; the caller leaves out an embedding with ``max_norm``, whose lookup
    renormalises rows in place): the ``k`` entries ``W.flat[indices]`` are saved, ``values`` added (the same
    one rounding as :func:`effective_weight`), and the saved entries written back afterwards, so the base is
    restored bit for bit and no dense copy of ``W`` is made.  The change goes
    through ``.data`` (invisible to autograd's version counters) and lasts only for one kernel call of the
    training forward or backward; a forward without gradients (serving, evaluation) uses
    :func:`effective_weight`, so concurrent
    readers of the base never see it.  Otherwise a fresh :func:`effective_weight`."""
    if not weight.is_contiguous() or weight.is_inference():
        yield effective_weight(weight, indices, values)
        return
    flat = weight.data.view(-1)
    saved = flat.index_select(0, indices)
    flat.index_add_(0, indices, values.detach().to(weight.dtype))
    try:
        yield weight.data
    finally:
        flat.index_put_((indices,), saved)


class SparseDeltaFunction(torch.autograd.Function):
    """``y = f(x; W + scatter(values))`` saving ``x``, ``values``, ``indices`` and ``W`` by reference (no dense
    ``ΔW``, no ``W_eff``); an optional last argument is the part's cached :func:`csr_support`."""

    @staticmethod
    def forward(ctx, x: Tensor, values: Tensor, indices: Tensor, weight: Tensor, base: nn.Module,
                kind: LayerKind, observer: GradObserver | None, *support: CsrSupport | None) -> Tensor:
        ctx.save_for_backward(x, values, indices, weight)
        ctx.base, ctx.kind, ctx.observer = base, kind, observer
        ctx.n_support, ctx.support = len(support), support[0] if support else None
        in_place = kind is not LayerKind.EMBEDDING or getattr(base, "max_norm", None) is None
        with torch.no_grad():
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
        grad_x = None
        if ctx.needs_input_grad[0] and ctx.kind is not LayerKind.EMBEDDING:
            with patched_weight(weight, indices, values) as w_eff:
                grad_x = input_grad(ctx.kind, grad_out, w_eff)
            grad_x = None if grad_x is None else grad_x.to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_values = _values_grad(ctx, x, grad_out, indices, weight).to(values.dtype)
        else:
            grad_values = None
        return (grad_x, grad_values, None, None, None, None, None) + (None,) * ctx.n_support


def _values_grad(ctx: Any, x: Tensor, grad_out: Tensor, indices: Tensor, weight: Tensor) -> Tensor:
    """``∂L/∂values``: the dense ``∂L/∂W`` gathered only when the observer (a selection window) needs it; else the
    SDDMM on a sparse support, the row-blocked gather on a dense one."""
    if ctx.observer is None:
        if use_sampled_grad(ctx.kind, indices.numel(), weight.numel()):
            return sampled_weight_grad(ctx.kind, x, grad_out, tuple(weight.shape), indices, ctx.support)
        return blocked_weight_grad(ctx.kind, x, grad_out, tuple(weight.shape), indices)
    grad_w = weight_grad(ctx.kind, x, grad_out, weight.shape)
    ctx.observer(grad_w)
    return grad_w.reshape(-1).index_select(0, indices)


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
        self._support: tuple[Any, CsrSupport] | None = None

    def support(self) -> CsrSupport | None:
        """The :func:`csr_support` of the indices when the backward takes the sampled path (``None`` otherwise),
        cached until the indices change (a reselection writes them in place: their version moves on)."""
        if self.layer is LayerKind.EMBEDDING or not use_sampled_grad(self.layer, self.indices.numel(),
                                                                      self.numel_base):
            return None
        idx = self.indices
        key = (idx._version, idx.data_ptr(), idx.device, idx.numel())
        cached = getattr(self, "_support", None)
        if cached is None or cached[0] != key:
            cached = (key, csr_support(idx, self.weight_shape))
            self._support = cached
        return cached[1]

    @property
    def numel_base(self) -> int:
        return math.prod(self.weight_shape)

    def forward(self, x: Tensor, base: nn.Module) -> Tensor:
        if not torch.is_grad_enabled() or not self.values.requires_grad:
            return functional_forward(base, self.layer, x, effective_weight(base.weight, self.indices, self.values))
        return SparseDeltaFunction.apply(x, self.values, self.indices, base.weight, base, self.layer,
                                          self.grad_observer, self.support())

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
            flat.index_copy_(0, self.indices.long(), picked.to(w.dtype))  # index_copy_ takes int64 only

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
