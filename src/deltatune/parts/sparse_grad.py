"""The ``k`` needed entries of a weight gradient, ``(∂L/∂W).flat[indices]``, without the dense ``∂L/∂W``: the backward
of a :class:`~deltatune.parts.sparse.SparsePart` (SpIEL, Ansell et al., 2024, §3, with the dense ``gᵀx`` replaced by
its needed entries).

* :func:`sampled_weight_grad` — a sampled dense-dense matmul (SDDMM, ``torch.sparse.sampled_addmm``) on token-major
  copies (:func:`token_major`) of the live tokens (:func:`live_tokens`), for supports up to
  :data:`SAMPLED_GRAD_MAX_DENSITY`; embeddings from the looked-up rows only;
* :func:`blocked_weight_grad` — denser supports: the gradient a block of rows at a time, gathered.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.utils.weak import WeakTensorKeyDictionary

from deltatune.parts.layers import LayerKind

#: Above this density (k / numel) the backward forms the weight gradient in row blocks and gathers from them
#: (:func:`blocked_weight_grad`) instead of the SDDMM.  Measured on CPU (``benchmarks/sparse_backward.py --rank 32``,
#: two threads, 512–640 tokens, none padded, the blocks' bounds kept as a part keeps them, ``sparse_backward_r32.md``;
#: three runs), the SDDMM's time over the blocked path's: 0.79–0.82 and 0.91–0.92 at 9.4 % (Llama 1024×512,
#: 512×1024), 0.75–0.80 and 1.12–1.15 at 10.4 % (MiniLM 1536×384, 384×1536: 0.95 for the pair), 1.10 at 12.5 %
#: (Llama 512²), 1.39–1.44 at 16.7 % (MiniLM 384²); at r = 8 (2.3–4.2 %) it costs 0.53–0.98× the unblocked ``gᵀx`` +
#: gather (``sparse_backward.md``).  A padded batch favours the SDDMM, which leaves out the all-zero tokens
#: (:func:`live_tokens`).  Not measured on GPU.
SAMPLED_GRAD_MAX_DENSITY = 0.11
#: Above :data:`SAMPLED_GRAD_MAX_DENSITY` the weight gradient is formed this many entries at a time (a block of
#: rows, :func:`blocked_weight_grad`): 512 KiB in fp32 on CPU, never a layer's whole dense gradient (of a layer
#: larger than that); ``benchmarks/sparse_backward.py --rank 32`` times it against the unblocked ``gᵀx`` + gather
#: and the SDDMM.  On CUDA, where thin GEMMs waste the device, :data:`GRAD_BLOCK_ENTRIES_CUDA` (64 MiB; not
#: measured: no GPU was lent to this work).
GRAD_BLOCK_ENTRIES = 2**17
GRAD_BLOCK_ENTRIES_CUDA = 2**24


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
    strips = scratch("strips", n * d, m.dtype, m.device).view(d // TRANSPOSE_STRIP, n, TRANSPOSE_STRIP)
    strips.copy_(m.view(n, d // TRANSPOSE_STRIP, TRANSPOSE_STRIP).transpose(0, 1))
    out = torch.empty(d, n, dtype=m.dtype, device=m.device)  # never a view of the scratch buffer
    out.view(d // TRANSPOSE_STRIP, TRANSPOSE_STRIP, n).copy_(strips.transpose(1, 2))
    return out


def _reused(store: dict[tuple[torch.dtype, torch.device], Tensor], n: int, dtype: torch.dtype,
            device: torch.device, fill: Callable[..., Tensor]) -> Tensor:
    """The first ``n`` entries of ``store``'s buffer for ``dtype`` and ``device``, made by ``fill`` (``torch.empty``,
    ``torch.zeros``) and grown to ``max(n, twice its size)`` when too small."""
    buf = store.get((dtype, device))
    if buf is None or buf.numel() < n:
        buf = store[(dtype, device)] = fill(max(n, 2 * buf.numel() if buf is not None else n), dtype=dtype,
                                            device=device)
    return buf[:n]


#: ``{(role, thread): {(dtype, device): buffer}}``: the reused scratch buffers of the backward (:func:`scratch`)
_SCRATCH: dict[tuple[str, int], dict[tuple[torch.dtype, torch.device], Tensor]] = {}
#: the roles of SpIEL-AG's selection windows: a layer's dense weight gradient and its magnitudes
WINDOW_ROLES = ("grad", "abs")


def scratch(role: str, n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``n`` entries of one reused buffer per ``role``, backward thread, dtype and device, grown to hold the largest
    request seen: :func:`token_major`'s intermediate strips (``"strips"``), and in a selection window every layer's
    dense weight gradient and its magnitudes (:data:`WINDOW_ROLES`: one buffer serves every layer in turn, never a
    dense gradient of all layers at once).  A fresh multi-megabyte temporary per call can let glibc hand its pages
    back and fault them in again on the next one, or keep them: before these buffers, the copies of one shape in
    ``benchmarks/sparse_backward.py`` took several times longer in some processes than in others, and in
    ``benchmarks/train_step.py``'s ~54M Llama SpIEL's peak RSS rose by ~50 MB in the windows (an ad hoc probe of RSS
    per step)."""
    return _reused(_SCRATCH.setdefault((role, threading.get_ident()), {}), n, dtype, device, torch.empty)


def release_scratch(roles: Sequence[str]) -> None:
    """Drop the :func:`scratch` buffers of ``roles`` in every thread (a window closed: no dense gradient is needed
    until the next)."""
    for key in [key for key in _SCRATCH if key[0] in roles]:
        del _SCRATCH[key]


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
    live = ((g2.amax(1) != 0) | (g2.amin(1) != 0)).nonzero().squeeze(1)  # no |g| copy; NaN rows stay live
    return None if n - live.numel() < DEAD_TOKENS_MIN_FRACTION * n else live


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
    if hit is not None and hit[0] == x._version and hit[2].dtype == x2.dtype and _same_tokens(hit[1], tokens):
        return hit[2]
    xt = token_major(x2, tokens)
    if xt.untyped_storage().data_ptr() != x.untyped_storage().data_ptr():
        _SHARED_INPUTS[x] = (x._version, tokens, xt)
    return xt


def _same_tokens(a: Tensor | None, b: Tensor | None) -> bool:
    """Whether two :func:`live_tokens` results name the same rows (``None``: all of them)."""
    return a is None and b is None or a is not None and b is not None and torch.equal(a, b)


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
    """``n`` zeros as a view of one buffer per dtype and device that nothing writes to, so a cached CSR pattern
    costs no values of its own."""
    return _reused(_ZEROS, n, dtype, device, torch.zeros)


class CsrSupport:
    """The sorted flat ``indices`` of a weight of ``shape`` as a CSR pattern of the ``(shape[0], rest)`` matrix:
    ``crow`` and ``col`` (in the indices' dtype), and :meth:`pattern`, the sparse CSR
    tensor :func:`_sddmm` samples with, built once per dtype."""

    def __init__(self, crow: Tensor, col: Tensor, shape: tuple[int, int]) -> None:
        self.crow, self.col, self.shape = crow, col, shape
        self._patterns: dict[torch.dtype, Tensor] = {}

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


def lookup_sorted(keys: Tensor, queries: Tensor) -> tuple[Tensor, Tensor]:
    """Where each of ``queries`` sits in the sorted, distinct ``keys``: ``(pos, hit)`` with ``keys[pos[hit]] ==
    queries[hit]`` and ``hit`` false where a query is not a key (a binary search each: ``O(q log k)``, no sort)."""
    if not keys.numel():
        return torch.zeros_like(queries, dtype=torch.long), torch.zeros_like(queries, dtype=torch.bool)
    pos = torch.searchsorted(keys, queries).clamp_(max=keys.numel() - 1)
    return pos, keys[pos] == queries


def _embedding_rows(x: Tensor, grad_out: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """The looked-up rows of an embedding's ``∂L/∂W`` (``≤ tokens × dim``, not ``vocab × dim``): their sorted ids and
    ``∂L/∂W[v] = Σ_{n: ids_n = v} g[n]`` (the same sum as :func:`weight_grad`)."""
    g2 = grad_out.reshape(-1, grad_out.shape[-1])
    dtype = g2.dtype if g2.dtype in (torch.float32, torch.float64) else torch.float32
    ids, inverse = torch.unique(x.reshape(-1), sorted=True, return_inverse=True)
    touched = torch.zeros(ids.numel(), dim, dtype=dtype, device=g2.device)
    return ids, touched.index_add_(0, inverse, g2.to(dtype))


def _gather_rows(ids: Tensor, touched: Tensor, dim: int, indices: Tensor) -> Tensor:
    """``∂L/∂W.flat[indices]`` from :func:`_embedding_rows` (zero in rows nothing looked up)."""
    idx = indices.long()
    r, c = idx // dim, idx % dim
    pos, hit = lookup_sorted(ids, r)
    out = torch.zeros(idx.numel(), dtype=touched.dtype, device=touched.device)
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
    return sampled_weight_grads(kind, x, grad_out, weight_shape, [(indices, support)])[0]


def sampled_weight_grads(kind: LayerKind, x: Tensor, grad_out: Tensor, weight_shape: tuple[int, ...],
                         sets: Sequence[tuple[Tensor, CsrSupport | None]]) -> list[Tensor]:
    """:func:`sampled_weight_grad` at each ``(sorted indices, support or None)`` of ``sets``, the token-major copies
    made once for all of them (a selection window's candidates beside a part's own entries)."""
    if kind is LayerKind.EMBEDDING:
        ids, touched = _embedding_rows(x, grad_out, weight_shape[1])
        return [_gather_rows(ids, touched, weight_shape[1], indices) for indices, _ in sets]
    if not any(indices.numel() for indices, _ in sets):
        return [torch.zeros(0, dtype=torch.float32, device=grad_out.device) for _ in sets]
    a, b = _token_major_pair(x, grad_out, kind)
    return [_sddmm(a, b, support if support is not None else csr_support(indices, weight_shape))
            if indices.numel() else torch.zeros(0, dtype=a.dtype, device=a.device) for indices, support in sets]


class RowBlocks(NamedTuple):
    """The row blocks of :func:`blocked_weight_grad` for one sorted support: ``step`` rows a block, and ``bounds``,
    where each block's entries start in the indices (host integers: found once per support, not once per backward,
    which on CUDA would be a host synchronisation per layer and step)."""

    step: int
    bounds: list[int]


def row_blocks(indices: Tensor, weight_shape: Sequence[int], block_entries: int | None = None) -> RowBlocks:
    """:class:`RowBlocks` of the sorted flat ``indices`` of a weight of ``weight_shape`` (native layout): blocks of
    ``max(1, ⌊block_entries / cols⌋)`` rows (default :data:`GRAD_BLOCK_ENTRIES`, on CUDA
    :data:`GRAD_BLOCK_ENTRIES_CUDA`)."""
    rows, cols = int(weight_shape[0]), math.prod(weight_shape[1:])
    default = GRAD_BLOCK_ENTRIES_CUDA if indices.device.type == "cuda" else GRAD_BLOCK_ENTRIES
    step = max(1, (block_entries or default) // cols)
    starts = torch.arange(0, rows + step, step, device=indices.device).clamp_(max=rows) * cols
    return RowBlocks(step, torch.searchsorted(indices, starts.to(indices.dtype)).tolist())


def blocked_weight_grad(kind: LayerKind, x: Tensor, grad_out: Tensor, weight_shape: tuple[int, ...],
                        indices: Tensor, block_entries: int | None = None, blocks: RowBlocks | None = None
                        ) -> Tensor:
    """``(∂L/∂W).flat[indices]`` for a dense support, a block of rows at a time: ``∂L/∂W = A B``
    (:func:`_rows_cols`, ``weight_shape`` its native layout) is formed ``max(1, ⌊block_entries / cols⌋)`` rows at a
    time (one GEMM each) and the support's entries of those rows gathered (flat ``i`` of rows ``[r₀, r₁)`` sits at
    ``i − r₀·cols`` of the block), so at most ``max(block_entries, cols)`` entries of the layer's dense gradient
    exist at once (default :data:`GRAD_BLOCK_ENTRIES`, on CUDA :data:`GRAD_BLOCK_ENTRIES_CUDA`).  ``blocks``: the
    support's :func:`row_blocks` when the caller keeps them (a :class:`SparsePart` caches them between
    reselections); else they are found here.  A matmul layer only; ``indices`` sorted.  Returns fp32 (fp64 for
    fp64 input)."""
    a, b = _rows_cols(x, grad_out, kind)
    rows, cols = a.shape[0], b.shape[1]
    if blocks is None:
        blocks = row_blocks(indices, weight_shape, block_entries)
    step, bounds = blocks.step, blocks.bounds
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
