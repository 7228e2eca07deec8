"""A sparse part trained with ``W + scatter(values)`` kept in the base weight itself (in-place training).

Unbound, every training forward and backward of a :class:`~deltatune.parts.sparse.SparsePart` writes its ``k``
values into the base weight and takes them out again (:func:`~deltatune.parts.sparse.patched_weight`): a gather,
an add and two scatters of ``k`` entries, twice per layer and step.  Bound (:meth:`SparsePart.bind`, lent by
:class:`~deltatune.methods.in_place.InPlaceTraining` for a training run), the weight holds
``W_eff = W₀ + scatter(values)`` throughout: :class:`SparseBinding` rewrites the ``k`` entries once per forward
(one add and one scatter, whoever changed the values: any optimiser, a reselection, a resumed checkpoint) and gathers
``W₀`` afresh only where the indices changed.  ``W₀``'s ``k`` entries wait in memory (``k`` values and a copy of
the indices: 8 bytes per entry with int32 indices; ``scatter_``'s int64 positions are made per call), and
:meth:`SparseBinding.release` writes them back, so the base is restored bit for bit.  ``W_eff`` is rounded exactly as
the patched weight and a merge are (:func:`added`: ``W₀ + values`` summed in fp32, rounded once to the weight's
dtype), so bound and unbound training and the merged model compute the same numbers.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def added(base_at: Tensor, values: Tensor) -> Tensor:
    """``W.flat[indices] + values`` from ``base_at = W.flat[indices]``, summed in fp32 (fp64 where either is) and
    rounded once to the weight's dtype.  Every path that writes ``W + scatter(values)`` — the training forward
    (:func:`~deltatune.parts.sparse.effective_weight`, :func:`~deltatune.parts.sparse.patched_weight`, a bound
    part), a merge and an unmerge — rounds this one way, so on a bf16 or fp16 base the merged model is the model that
    was trained and evaluated (in fp32 it is the plain sum)."""
    dtype = torch.promote_types(torch.promote_types(base_at.dtype, values.dtype), torch.float32)
    return (base_at.to(dtype) + values.detach().to(dtype)).to(base_at.dtype)


class SparseBinding:
    """The ``k`` base entries a bound sparse part has overwritten: their positions (a copy of the part's indices, so
    they are never an alias of them) and ``W₀`` there."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.indices: Tensor | None = None  # a copy of the indices written
        self.theta0: Tensor | None = None  # W₀ at those positions
        self.seen: tuple[Tensor, int, int] | None = None  # the part's indices tensor, its version and storage then

    def _flat(self) -> Tensor:
        return self.module.weight.data.view(-1)

    def sync(self, indices: Tensor, values: Tensor) -> None:
        """Make the weight ``W₀ + scatter(values at indices)``.

        The values are written every time (comparing them would cost as much as writing them, and no version counter
        moves under every optimiser: torch's fused AdamW writes without one).  ``W₀`` is gathered again only when
        ``indices`` differ from the ones written (after the old entries are restored); they are compared only when
        the tensor is another one or was written in place since (its autograd version moved on, as every write
        through it does: a reselection, a loaded checkpoint), so a forward costs no host synchronisation."""
        flat = self._flat()
        with torch.no_grad():
            seen = (indices, indices._version, indices.data_ptr())
            if self.seen is None or self.seen[0] is not indices or self.seen[1:] != seen[1:]:
                if (self.indices is None or self.indices.dtype != indices.dtype
                        or not torch.equal(self.indices, indices)):
                    self.release()
                    self.indices = indices.clone()
                    self.theta0 = flat.index_select(0, self.indices)
                self.seen = seen  # holds the tensor: its id is not reused while compared
            flat.scatter_(0, self.indices.long(), added(self.theta0, values))  # one rounding, as a merge

    def release(self) -> None:
        """Write ``W₀`` back at the positions written (nothing when nothing was)."""
        if self.indices is not None:
            with torch.no_grad():
                self._flat().scatter_(0, self.indices.long(), self.theta0)
        self.indices = self.theta0 = self.seen = None
