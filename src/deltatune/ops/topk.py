"""Exact top-k by magnitude of one large tensor, without sorting it or copying it whole.

:func:`kth_largest_abs` finds ``t_k``, the k-th largest ``|x|``, by sample bracketing (Floyd & Rivest,
"Expected time bounds for selection", CACM 1975): order statistics of a random sample of ``S``
entries give ``lo ≤ t_k ≤ hi`` with overwhelming probability (a window of ``4σ + 16`` sample ranks
around the sample quantile, ``σ = √(S·q(1−q))``); one chunked pass counts the entries above ``hi`` and
keeps those in ``[lo, hi]`` (about 3 % of the tensor), and a selection on that small set gives ``t_k``
exactly.  If the bracket misses (the rank falls outside it), ``kthvalue`` on ``|x|`` is the fallback,
so the result is exact either way; the sample's seed only affects speed.

:func:`trim_below_` then zeroes, chunk by chunk and in place, every entry under the threshold, keeping
either every entry equal to it or only the first ``m`` in flat order (exactly ``k`` kept).  It writes
its comparisons as float arithmetic: ``threshold(|x|, t, 0)`` keeps ``|x| > t`` and ``sign`` turns it
into a 0/1 factor, several times faster on CPU than a boolean mask and ``masked_fill``, with the same
values (a dropped entry becomes ``±0``).

Memory is one chunk plus the candidates, where ``kthvalue`` on ``|x|`` copies the tensor twice.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

CHUNK = 1 << 18
SAMPLE = 1 << 14
NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)


@dataclass(frozen=True)
class TopK:
    """``t_k``, ``#{|x| > t_k}`` and, per :data:`CHUNK`-sized chunk, ``#{|x| = t_k}``."""

    threshold: float
    above: int
    ties: tuple[int, ...]


def chunks(flat: Tensor, size: int = CHUNK) -> Iterator[Tensor]:
    """Consecutive views of ``size`` entries of the 1-D ``flat``."""
    for start in range(0, flat.numel(), size):
        yield flat[start:start + size]


def below(value: float, dtype: torch.dtype = torch.float32) -> float:
    """The largest ``dtype`` number under ``value``: ``x > below(v) ⇔ x ≥ v`` for ``x`` of that dtype."""
    v = torch.tensor(value, dtype=dtype)
    return float(torch.nextafter(v, torch.tensor(-math.inf, dtype=dtype)))


def _direct(flat: Tensor, k: int) -> TopK:
    mags = flat.abs()
    t = mags.kthvalue(flat.numel() - k + 1).values
    ties = tuple(int(torch.count_nonzero(c == t)) for c in chunks(mags))
    return TopK(float(t), int(torch.count_nonzero(mags > t)), ties)


def kth_largest_abs(flat: Tensor, k: int) -> TopK:
    """The k-th largest magnitude of the 1-D ``flat`` (``1 ≤ k ≤ n``) with the counts a trim needs.

    CPU float16/32/64 tensors take the bracketing pass in NumPy (zero-copy; its boolean masks,
    ``count_nonzero`` and ``extract`` are several times faster than torch's on CPU);
    other tensors, and brackets that miss, use ``kthvalue`` on ``|x|``.
    """
    n = flat.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k={k} outside [1, {n}]")
    if n <= 16 * SAMPLE or flat.device.type != "cpu" or flat.dtype not in NUMPY_FLOATS:
        return _direct(flat, k)
    values = flat.detach().numpy()
    rng = np.random.default_rng(n)
    sample = np.abs(values[rng.integers(0, n, SAMPLE)])
    q = (n - k) / n  # fraction of entries strictly below the target's ascending rank
    pos, spread = q * SAMPLE, 4.0 * math.sqrt(SAMPLE * q * (1.0 - q)) + 16.0
    lo_rank, hi_rank = max(0, math.floor(pos - spread)), min(SAMPLE - 1, math.ceil(pos + spread))
    sample.partition((lo_rank, hi_rank))
    lo, hi = sample[lo_rank], sample[hi_rank]
    above, kept = 0, []
    mags = np.empty(min(CHUNK, n), dtype=values.dtype)
    for start in range(0, n, CHUNK):
        chunk_mags = np.abs(values[start:start + CHUNK], out=mags[:min(CHUNK, n - start)])
        above += int(np.count_nonzero(chunk_mags > hi))
        kept.append(np.extract((chunk_mags >= lo) & (chunk_mags <= hi), chunk_mags))
    candidates = np.concatenate(kept)
    rank = (n - k) - (n - above - candidates.size)  # ascending 0-based rank inside the candidates
    if not 0 <= rank < candidates.size:
        return _direct(flat, k)
    # kthvalue, not np.partition: the latter degrades on heavily tied values (bf16 task vectors)
    t = float(torch.from_numpy(candidates).kthvalue(rank + 1).values)
    ties = tuple(int(np.count_nonzero(c == t)) for c in kept)
    return TopK(t, above + int(np.count_nonzero(candidates > t)), ties)


def trim_below_(flat: Tensor, threshold: float, keep_ties: int | None = None,
                ties: tuple[int, ...] | None = None) -> Tensor:
    """Zero (in place) every entry of the 1-D ``flat`` with ``|x| < threshold``.

    Entries with ``|x| = threshold`` all stay (``keep_ties=None``) or only the first ``keep_ties`` of them
    in flat order; ``ties`` (per-chunk counts of such entries, as :func:`kth_largest_abs` returns) saves
    counting them again.
    """
    if threshold <= 0.0:  # nothing is below; ties at 0 are zeros either way
        return flat
    remaining = keep_ties
    at_or_above = below(threshold, flat.dtype)
    scratch = torch.empty(min(CHUNK, flat.numel()), dtype=flat.dtype, device=flat.device)

    def keep_(chunk: Tensor, strictly_above: float) -> None:
        mags = torch.abs(chunk, out=scratch[:chunk.numel()])
        chunk.mul_(torch.threshold_(mags, strictly_above, 0.0).sign_())

    for i, chunk in enumerate(chunks(flat)):
        if remaining is None:
            keep_(chunk, at_or_above)
            continue
        n_ties = ties[i] if ties is not None else int(torch.count_nonzero(chunk.abs() == threshold))
        if n_ties <= remaining:
            remaining -= n_ties
            keep_(chunk, at_or_above)
        elif remaining == 0:
            keep_(chunk, threshold)
        else:
            mags = chunk.abs()
            drop = mags <= threshold
            drop[(mags == threshold).nonzero().squeeze(1)[:remaining]] = False
            chunk.masked_fill_(drop, 0.0)
            remaining = 0
    return flat
