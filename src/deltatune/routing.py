"""The routing context of a mixed batch: which delta each row (or token) uses, owned by the caller.

A batch whose rows use *different* deltas is described by a :class:`Routing` — the delta names, a delta id
per row (``(batch,)``) or per token (``(batch, seq)``), and a cache where part kinds keep the batched weights
they prepare (a LoRA kind stacks its ``A``/``B`` once per layer, not once per forward).  Layers *read* the
current routing; they never store it.  :func:`routed` makes a routing current for a block of code
(thread- and task-local, through a :class:`contextvars.ContextVar`), so two callers never see each other's.

``None`` as a name means the bare base model.  The serving engine, :func:`deltatune.model.mixed_batch` and
``predict``/``generate`` all use this one mechanism.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from deltatune.errors import ConfigError


@dataclass
class Routing:
    """``names[ids[i]]`` is the delta of row ``i`` (``ids`` of shape ``(batch,)``) or of token ``(i, t)``
    (``ids`` of shape ``(batch, seq)``); ``cache`` holds per-layer, per-kind prepared weights."""

    names: list[str | None]
    ids: Tensor
    cache: dict[Any, Any] = field(default_factory=dict)
    #: Each wrapped layer's parts under this routing, worked out on its first call (see ``DeltaLayer._routed``).
    plans: dict[int, Any] = field(default_factory=dict)
    #: The token count ``T`` of the last ``(batch, T, …)`` input a routed layer saw (:meth:`ids_for`): a layer fed
    #: the same activations flattened to ``(batch·T, …)`` (a mixture-of-experts block's router and experts) gets
    #: each row's id repeated ``T`` times.
    tokens: int | None = None
    #: :meth:`present_ids`, once found
    present: list[int] | None = None

    @classmethod
    def per_row(cls, row_names: Sequence[str | None]) -> Routing:
        """One delta name per row; rows with the same name share an id."""
        names = list(dict.fromkeys(row_names))
        return cls(names, torch.tensor([names.index(n) for n in row_names], dtype=torch.long))

    @classmethod
    def per_token(cls, token_names: Sequence[Sequence[str | None]]) -> Routing:
        """One delta name per token (rows of equal length)."""
        flat = [n for row in token_names for n in row]
        names = list(dict.fromkeys(flat))
        lengths = {len(row) for row in token_names}
        if len(lengths) != 1:
            raise ConfigError(f"per-token routing needs rows of one length, got lengths {sorted(lengths)}")
        ids = torch.tensor([[names.index(n) for n in row] for row in token_names], dtype=torch.long)
        return cls(names, ids)

    def present_ids(self) -> list[int]:
        """The ids some row (or token) uses, sorted; found once (the ids of a routing never change)."""
        if self.present is None:
            self.present = self.ids.unique().tolist()
        return self.present

    @property
    def per_token_ids(self) -> bool:
        return self.ids.dim() == 2

    def row_names(self) -> list[str | None]:
        """The delta of each row (per-row routing only)."""
        if self.per_token_ids:
            raise ConfigError("this routing assigns deltas per token, not per row")
        return [self.names[i] for i in self.ids.tolist()]

    def ids_for(self, x: Tensor) -> Tensor:
        """The ids on ``x``'s device, checked against ``x``'s leading dimensions: ``(batch, …)`` (per row) or
        ``(batch, seq, …)`` (per token), or the same activations flattened row-major to ``(batch·T, …)`` (``T``:
        :attr:`tokens`; ``view(-1, d)`` keeps each row's tokens together), where each row's id repeats ``T`` times
        (per token: the ids flattened alike).  A count of inputs that is neither is a :class:`ConfigError`."""
        ids = self.ids.to(x.device)
        if tuple(x.shape[: ids.dim()]) == tuple(ids.shape):
            if ids.dim() == 1 and x.dim() >= 3:
                self.tokens = int(x.shape[1])
            return ids
        if x.dim() == 2 and ids.dim() == 2 and x.shape[0] == ids.numel():
            return ids.reshape(-1)
        if x.dim() == 2 and ids.dim() == 1 and self.tokens is not None and x.shape[0] == ids.shape[0] * self.tokens:
            return ids.repeat_interleave(self.tokens)
        raise ConfigError(f"routing has ids of shape {tuple(ids.shape)} but a layer got input of shape "
                          f"{tuple(x.shape)}; the batch does not match the routing")


def row_index(row_ids: Tensor, n: int, cache: dict[Any, Any] | None = None) -> list[Tensor | None]:
    """For each id ``k < n``, the positions of the flattened ``row_ids`` equal to ``k`` (``None`` when there are
    none); kept in ``cache`` (the ids of a routing context never change)."""
    key = ("rows", n, row_ids.device)
    if cache is not None and key in cache:
        return cache[key]
    flat = row_ids.reshape(-1)
    found: list[Tensor | None] = []
    for k in range(n):
        idx = (flat == k).nonzero(as_tuple=True)[0]
        found.append(idx if idx.numel() else None)
    if cache is not None:
        cache[key] = found
    return found


_CURRENT: ContextVar[Routing | None] = ContextVar("deltatune_routing", default=None)


def current_routing() -> Routing | None:
    """The routing of the enclosing :func:`routed` block, or ``None`` (every layer uses its active parts)."""
    return _CURRENT.get()


@contextmanager
def routed(routing: Routing | None) -> Iterator[Routing | None]:
    """Make ``routing`` current inside the block (restoring the previous one after it)."""
    token = _CURRENT.set(routing)
    try:
        yield routing
    finally:
        _CURRENT.reset(token)


_OWN_ROWS: ContextVar[Tensor | None] = ContextVar("deltatune_own_rows", default=None)


def own_rows() -> Tensor | None:
    """Inside :func:`running_on`: which rows (tokens) of the batch a part running on the whole batch serves;
    ``None`` elsewhere (the part serves every row it sees)."""
    return _OWN_ROWS.get()


@contextmanager
def running_on(rows: Tensor) -> Iterator[None]:
    """A routed layer runs one delta's parts on the whole batch and keeps only ``rows`` (bool, the ids' shape) of
    their output: a part that gathers statistics over its input (MixLoRA's load balance) counts those rows only."""
    token = _OWN_ROWS.set(rows)
    try:
        yield
    finally:
        _OWN_ROWS.reset(token)
