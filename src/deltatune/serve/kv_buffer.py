"""A KV-cache layer that appends into spare capacity instead of concatenating.

transformers' ``DynamicLayer.update`` runs ``torch.cat([keys, new], dim=-2)`` at every decode step: each step
copies the whole history, so a generation of ``n`` tokens copies ``O(n²)`` key/value entries (at 300 positions
of the serving benchmark's model, ~190 MB per step).  :class:`GrowingLayer` keeps the keys and values in a
buffer with room to spare along the sequence axis and writes each step's new positions in place; when the room
runs out the buffer is reallocated at twice the length (amortised ``O(1)`` copies per position, as a Python list
grows).  ``keys``/``values`` stay the views of the filled length, so everything that reads a ``DynamicLayer`` —
attention, ``get_seq_length``, :class:`deltatune.serve.kv.BatchKV` — sees the same tensors as before.
"""

from __future__ import annotations

from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

#: Spare positions a fresh buffer starts with beyond what it holds.
MIN_SPARE = 64


class GrowingLayer(DynamicLayer):
    """A :class:`~transformers.cache_utils.DynamicLayer` whose ``update`` appends in place (see the module
    docstring); the views ``keys``/``values`` are what it holds."""

    def __init__(self) -> None:
        super().__init__()
        self._key_buffer: Tensor | None = None
        self._value_buffer: Tensor | None = None
        self._filled = 0

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self._filled + key_states.shape[-2]
        if self._key_buffer is None or end > self._key_buffer.shape[-2]:
            self._grow(end, key_states, value_states)
        self._key_buffer[..., self._filled:end, :] = key_states
        self._value_buffer[..., self._filled:end, :] = value_states
        self._filled = end
        self.keys = self._key_buffer[..., :end, :]
        self.values = self._value_buffer[..., :end, :]
        return self.keys, self.values

    def _grow(self, needed: int, key_states: Tensor, value_states: Tensor) -> None:
        """A buffer of ``max(2 × needed, needed + MIN_SPARE)`` positions shaped like the incoming states, holding
        what is filled so far."""
        length = max(2 * needed, needed + MIN_SPARE)
        keys = key_states.new_empty(*key_states.shape[:-2], length, key_states.shape[-1])
        values = value_states.new_empty(*value_states.shape[:-2], length, value_states.shape[-1])
        if self._filled:
            keys[..., :self._filled, :] = self.keys
            values[..., :self._filled, :] = self.values
        self._key_buffer, self._value_buffer = keys, values

    def _adopt(self) -> None:
        """After transformers replaced ``keys``/``values`` (a batch selection): they are the buffer, with no room
        to spare until the next update grows it."""
        held = self.keys is not None and self.keys.dim() == 4
        self._filled = self.keys.shape[-2] if held else 0
        self._key_buffer, self._value_buffer = (self.keys, self.values) if held else (None, None)

    def reset(self) -> None:
        self._key_buffer = self._value_buffer = None
        self._filled = 0
        super().reset()

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if self.is_initialized and self._key_buffer is not None:
            self._filled = self.keys.shape[-2]  # the views shrank; the buffer beyond them is spare again

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._adopt()

    def batch_select_indices(self, indices: Tensor) -> None:
        super().batch_select_indices(indices)
        self._adopt()


def growing_cache(data: list[tuple[Tensor, Tensor]], config, columns: int) -> DynamicCache:
    """A ``DynamicCache`` holding ``data`` (per layer ``(keys, values)``, ``(batch, heads, kept, head_dim)``) that
    covers ``columns`` positions, whose plain full-attention layers append in place (:class:`GrowingLayer`);
    sliding-window and other special layers stay as transformers builds them.

    A full layer keeps every column (``kept = columns``); a sliding-window layer keeps only the last
    ``kept = min(columns, window - 1)`` of them, and its mask and ``get_seq_length`` read its own count of the
    positions seen, ``cumulative_length``.  Replaying ``kept`` columns into a fresh layer would restart that count
    at ``kept``; it is set to ``columns`` instead (``cumulative_length = columns - kept`` before the replay, which
    adds ``kept``), so the rebuilt cache masks and positions the next steps as the original did."""
    cache = DynamicCache(config=config)
    layers = cache.layers
    for i, (keys, values) in enumerate(data):
        if i == len(layers):
            layers.append(GrowingLayer())
        elif type(layers[i]) is DynamicLayer:
            layers[i] = GrowingLayer()
        if hasattr(layers[i], "cumulative_length"):
            layers[i].cumulative_length = columns - keys.shape[-2]
        layers[i].update(keys, values)
    return cache
