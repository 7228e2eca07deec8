"""The running batch's KV cache: one ``DynamicCache`` whose rows are left-padded to a common length.

Rows have different histories, so row ``i`` holds ``lengths[i]`` real positions at the *right* end of the cache
and padding before them; the attention mask hides the padding and every row gets its own position ids.  The
cache grows by one column per decode step inside the model's forward, written into spare room
(:class:`~deltatune.serve.kv_buffer.GrowingLayer`: no copy of the history); it is rebuilt
only when rows join (their prefilled cache is left-padded to the batch's length, or the batch to theirs) or
leave (their rows are dropped and the columns that became padding for every row are trimmed).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers import DynamicCache

from deltatune.parts.prompt import config_context
from deltatune.serve.kv_buffer import growing_cache


def _layers(cache: DynamicCache) -> list[tuple[Tensor, Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _columns(cache: DynamicCache) -> int:
    """How many positions (columns, padding included) ``cache`` covers: a full-attention layer's key count.  A
    sliding-window layer keeps only its last ``window - 1`` columns, so its key count is not the width; with no
    full layer (every layer sliding, as Mistral), the sliding layers' own count of positions seen
    (``cumulative_length``, which :func:`~deltatune.serve.kv_buffer.growing_cache` keeps across rebuilds)."""
    layers = [layer for layer in cache.layers if getattr(layer, "is_initialized", False)]
    full = [layer for layer in layers if not getattr(layer, "is_sliding", False)]
    return (full or layers)[0].get_seq_length() if layers else 0


def _tail(t: Tensor, columns: int) -> Tensor:
    """The last ``min(kept, columns)`` columns of a layer's ``t`` (``kept`` of them): a cache cut to its last
    ``columns`` columns.  A full layer (``kept`` = the width) drops its first ``width − columns``; a sliding layer
    drops only what falls outside ``columns`` (its kept columns are the last ones already)."""
    return t[..., max(0, t.shape[-2] - columns):, :]


def _rows_tail(cache: DynamicCache, rows: Tensor, columns: int) -> list[tuple[Tensor, Tensor]]:
    """Per layer, the ``(keys, values)`` of ``rows`` cut to their last ``columns`` columns (:func:`_tail`)."""
    return [(_tail(k.index_select(0, rows), columns), _tail(v.index_select(0, rows), columns))
            for k, v in _layers(cache)]


def _left_pad(t: Tensor, width: int) -> Tensor:
    if width == 0:
        return t
    pad = t.new_zeros(*t.shape[:-2], width, t.shape[-1])
    return torch.cat([pad, t], dim=-2)


class BatchKV:
    """Left-padded KV cache of the decode batch, with each row's real length.

    The cache covers :attr:`width` columns; row ``i``'s ``lengths[i]`` real positions are the last ones.  A full
    layer holds all ``width`` columns, a sliding-window layer only the last ``min(width, window − 1)``: joining
    left-pads each layer of both sides to the larger kept count of the two (the columns a shorter side lacks are
    padding for all its rows), and leaving keeps each layer's last ``min(kept, new width)`` columns."""

    def __init__(self, config) -> None:
        self.config = config
        self.cache: DynamicCache | None = None
        self.lengths: list[int] = []

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def width(self) -> int:
        """Columns of the batch cache, padding included (:func:`_columns`)."""
        return 0 if self.cache is None else _columns(self.cache)

    def add(self, new: DynamicCache, lengths: list[int], rows: list[int] | None = None) -> None:
        """Append prefilled rows: ``new`` is a left-padded cache whose row ``i`` holds ``lengths[i]`` real positions
        (``rows``: only those rows of it, in that order)."""
        incoming = _columns(new)
        if rows is not None:
            index = torch.tensor(rows, dtype=torch.long, device=new.layers[0].keys.device)
            lengths = [lengths[i] for i in rows]
            incoming = max(lengths, default=0)
            data = _rows_tail(new, index, incoming)
        else:
            data = _layers(new)
        if not lengths:
            return
        if self.cache is None:
            self.cache, self.lengths = growing_cache(data, self.config, incoming), list(lengths)
            return
        width = max(self.width, incoming)
        merged = []
        for (ok, ov), (nk, nv) in zip(_layers(self.cache), data, strict=True):
            kept = max(ok.shape[-2], nk.shape[-2])
            merged.append((torch.cat([_left_pad(ok, kept - ok.shape[-2]), _left_pad(nk, kept - nk.shape[-2])]),
                           torch.cat([_left_pad(ov, kept - ov.shape[-2]), _left_pad(nv, kept - nv.shape[-2])])))
        self.cache = growing_cache(merged, self.config, width)
        self.lengths += list(lengths)

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in that order) and trim the columns that are now padding for all of them."""
        if not rows:
            self.cache, self.lengths = None, []
            return
        assert self.cache is not None
        lengths = [self.lengths[i] for i in rows]
        width = max(lengths)
        index = torch.tensor(rows, dtype=torch.long, device=self.cache.layers[0].keys.device)
        data = _rows_tail(self.cache, index, width)
        self.cache, self.lengths = growing_cache(data, self.config, width), lengths

    def step_inputs(self) -> tuple[Tensor, Tensor]:
        """``(attention_mask (rows, width + 1), position_ids (rows, 1))`` for the next decode step."""
        width = self.width
        lengths = torch.tensor(self.lengths, dtype=torch.long)
        columns = torch.arange(width + 1)
        mask = (columns[None, :] >= (width - lengths)[:, None]).long()
        return mask, lengths[:, None]

    def advance(self) -> None:
        """Every row gained the position the last step wrote."""
        self.lengths = [n + 1 for n in self.lengths]


def context_length(config: Any) -> int | None:
    """The model's context in positions, under whichever name its config uses
    (:func:`deltatune.parts.prompt.config_context`; ``None``: it records none)."""
    found = config_context(config)
    return found[0] if found is not None else None
