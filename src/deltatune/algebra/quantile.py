"""Exact order statistics of a value stream too large to hold: two-pass radix selection.

Global scopes (TIES' per-task top-k over the whole model, PCB's quantiles) need the k-th largest of
``|τ|`` over every tensor of a model.  The reference code concatenates the model into one vector; here
each fp32 value is mapped to an order-preserving 32-bit key and the stream is read twice:

1. histogram of the key's high 16 bits (65,536 bins) → the bin holding each wanted rank;
2. histogram of the low 16 bits of the values in those bins → the exact key, hence the exact value.

Non-negative inputs (magnitudes) use the float's own bit pattern as the key, in int32; signed inputs
flip the bits of negatives.  Small tensors are batched into chunks of ~1 M values before counting.
Memory is two 65,536-entry histograms per rank plus one chunk; the result equals ``torch.kthvalue`` on
the concatenation (tested).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

CHUNK = 1 << 20
BINS = 1 << 16


def order_key(values: Tensor, nonnegative: bool = False) -> Tensor:
    """fp32 → key in ``[0, 2³²)`` with ``a < b ⇔ key(a) < key(b)`` (int32 for non-negative input,
    else int64; −0.0 sorts just below +0.0)."""
    bits = values.detach().to(torch.float32).contiguous().view(torch.int32)
    if nonnegative:
        return bits
    bits = bits.to(torch.int64) & 0xFFFFFFFF
    return torch.where(bits >= 0x80000000, 0xFFFFFFFF - bits, bits + 0x80000000)


def key_to_float(key: int) -> float:
    bits = key - 0x80000000 if key >= 0x80000000 else 0xFFFFFFFF - key
    as_int32 = bits - (1 << 32) if bits >= 0x80000000 else bits
    return float(torch.tensor([as_int32], dtype=torch.int32).view(torch.float32)[0])


class RadixSelect:
    """Order statistics (0-based ascending ranks) of everything passed to :meth:`feed` in two passes.

    Feed every value once (pass 1), call :meth:`resolve` with the wanted ranks (the count ``n`` is known
    by then), feed the same values again (pass 2), then read :meth:`values`.  ``nonnegative`` promises
    that every value is ≥ 0 (magnitudes), which allows a cheaper key.
    """

    def __init__(self, nonnegative: bool = False) -> None:
        self.nonnegative = nonnegative
        self._counted = 0
        self._high = torch.zeros(BINS, dtype=torch.int64)
        self._targets: list[tuple[int, int]] = []   # (high bin, rank within the bin)
        self._low: dict[int, Tensor] = {}
        self._pass = 1
        self._pending: list[Tensor] = []
        self._pending_n = 0

    def feed(self, values: Tensor) -> None:
        flat = values.detach().reshape(-1).float()
        if flat.numel() >= CHUNK:
            for start in range(0, flat.numel(), CHUNK):
                self._count(flat[start:start + CHUNK])
            return
        self._pending.append(flat)
        self._pending_n += flat.numel()
        if self._pending_n >= CHUNK:
            self._flush()

    @property
    def count(self) -> int:
        """Values fed in pass 1 (including those still batched)."""
        return self._counted + (self._pending_n if self._pass == 1 else 0)

    def _flush(self) -> None:
        if self._pending:
            self._count(torch.cat(self._pending))
        self._pending, self._pending_n = [], 0

    def _count(self, chunk: Tensor) -> None:
        key = order_key(chunk, self.nonnegative)
        if self._pass == 1:
            self._counted += key.numel()
            self._high += torch.bincount((key >> 16).to(torch.int64), minlength=BINS)
            return
        high = key >> 16
        for b, hist in self._low.items():
            inside = key[high == b]
            if inside.numel():
                hist += torch.bincount((inside & 0xFFFF).to(torch.int64), minlength=BINS)

    def resolve(self, ranks: Sequence[int]) -> None:
        self._flush()
        if self.count == 0:
            raise ValueError("no values were fed")
        cumulative = self._high.cumsum(0)
        self._targets = []
        for r in ranks:
            if not 0 <= r < self.count:
                raise ValueError(f"rank {r} outside [0, {self.count})")
            b = int(torch.searchsorted(cumulative, torch.tensor(r), right=True))
            before = int(cumulative[b - 1]) if b > 0 else 0
            self._targets.append((b, r - before))
            self._low.setdefault(b, torch.zeros(BINS, dtype=torch.int64))
        self._pass = 2

    def values(self) -> list[float]:
        self._flush()
        out = []
        for b, r in self._targets:
            low = int(torch.searchsorted(self._low[b].cumsum(0), torch.tensor(r), right=True))
            key = (b << 16) | low
            if self.nonnegative:
                out.append(float(torch.tensor([key], dtype=torch.int32).view(torch.float32)[0]))
            else:
                out.append(key_to_float(key))
        return out
