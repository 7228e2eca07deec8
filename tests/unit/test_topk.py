"""Exact top-k by magnitude (``deltatune.ops.topk``) and the trims built on it, against ``kthvalue``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deltatune.ops import topk
from deltatune.ops.sparsify import keep_count, magnitude_trim, magnitude_trim_

LARGE = 16 * topk.SAMPLE + 12_345  # above the size where the bracketing pass starts


def _reference_trim(tau: torch.Tensor, density: float, exact: bool) -> torch.Tensor:
    """``kthvalue`` on ``|τ|`` and boolean masks: exactly ``k`` (mergekit), or the TIES authors' ``topk_values_mask``
    (``kthvalue(n − int(n·ρ))``, keep ``|τ| ≥`` it: ``int(n·ρ) + 1`` entries and ties)."""
    flat = tau.clone().view(-1)
    if not exact:
        mags = flat.abs()
        threshold = mags.kthvalue(flat.numel() - int(flat.numel() * density)).values
        return flat.masked_fill_(mags < threshold, 0.0).view_as(tau)
    k = keep_count(tau.numel(), density)
    if k >= flat.numel():
        return flat.view_as(tau)
    mags = flat.abs()
    threshold = mags.kthvalue(flat.numel() - k + 1).values
    if exact:
        drop = mags <= threshold
        missing = k - (flat.numel() - int(drop.sum()))
        if missing > 0:
            drop[(mags == threshold).nonzero().squeeze(1)[:missing]] = False
    else:
        drop = mags < threshold
    return flat.masked_fill_(drop, 0.0).view_as(tau)


def _values(kind: str, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(n % 1000 + len(kind))
    x = torch.randn(n, generator=g, dtype=torch.float64)
    if kind == "quantised":  # heavy ties at every value
        x = (x * 4).round() / 4
    elif kind == "mostly_zero":
        x[torch.rand(n, generator=g) < 0.9] = 0.0
    elif kind == "half_zero":
        x[torch.rand(n, generator=g) < 0.5] = 0.0
    elif kind == "constant":
        x = torch.full((n,), -0.5, dtype=torch.float64)
    elif kind == "bf16_diff":  # a bf16 fine-tune minus its base: few distinct magnitudes near the threshold
        base = x.to(torch.bfloat16)
        x = (base.double() + torch.randn(n, generator=g, dtype=torch.float64) * 1e-2).to(torch.bfloat16).double() \
            - base.double()
    elif kind == "negative_zeros":
        x[::3] = -0.0
    return x.to(dtype)


KINDS = ["randn", "quantised", "mostly_zero", "half_zero", "constant", "bf16_diff", "negative_zeros"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [7, 5000, LARGE])
def test_kth_largest_abs_equals_kthvalue(kind: str, n: int) -> None:
    x = _values(kind, n)
    mags = x.abs()
    for k in sorted({1, max(1, n // 50), n // 5 or 1, n // 2 or 1, n}):
        top = topk.kth_largest_abs(x, k)
        want = float(mags.kthvalue(n - k + 1).values)
        assert top.threshold == want, (kind, n, k)
        assert top.above == int((mags > want).sum())
        assert sum(top.ties) == int((mags == want).sum())
        assert len(top.ties) == len(list(topk.chunks(x)))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_kth_largest_abs_in_other_dtypes(dtype: torch.dtype) -> None:
    x = _values("randn", LARGE, dtype)
    k = LARGE // 5
    assert topk.kth_largest_abs(x, k).threshold == float(x.abs().kthvalue(LARGE - k + 1).values)


def test_a_bracket_that_misses_falls_back_to_an_exact_selection(monkeypatch) -> None:
    """A sample that says nothing about the tensor (every draw is entry 0) still gives the exact value."""

    class Degenerate:
        def integers(self, low: int, high: int, size: int) -> np.ndarray:
            return np.zeros(size, dtype=np.int64)

    calls = []
    direct = topk._direct
    monkeypatch.setattr(topk.np.random, "default_rng", lambda seed: Degenerate())
    monkeypatch.setattr(topk, "_direct", lambda flat, k: calls.append(k) or direct(flat, k))
    x = _values("randn", LARGE)
    x[0] = 0.5  # the whole "sample": lo = hi = 0.5, far from the 80th percentile of |N(0, 1)|
    k = LARGE // 5
    assert topk.kth_largest_abs(x, k).threshold == float(x.abs().kthvalue(LARGE - k + 1).values)
    assert calls == [k]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [5000, LARGE])
@pytest.mark.parametrize("exact", [True, False])
def test_magnitude_trim_equals_the_kthvalue_implementation(kind: str, n: int, exact: bool) -> None:
    x = _values(kind, n)
    for density in (0.01, 0.2, 0.45, 0.97):
        ours = magnitude_trim(x, density, exact=exact)
        assert torch.equal(ours, _reference_trim(x, density, exact)), (kind, n, density, exact)
        if exact and kind == "randn":  # kept zeros would not show as non-zero
            assert int((ours != 0).sum()) == keep_count(n, density)


def test_exact_trim_keeps_the_first_ties_in_flat_order() -> None:
    x = torch.tensor([3.0, -1.0, 1.0, 0.5, 1.0, -1.0, 2.0])  # k = ⌊0.58·7⌋ = 4: 3, 2 and two of four |x| = 1
    assert magnitude_trim(x, 0.58, exact=True).tolist() == [3.0, -1.0, 1.0, 0.0, 0.0, 0.0, 2.0]
    assert magnitude_trim(x, 0.58, exact=False).tolist() == [3.0, -1.0, 1.0, 0.0, 1.0, -1.0, 2.0]


def test_trim_below_keeps_ties_across_chunks(monkeypatch) -> None:
    """The tie quota runs out inside a later chunk: earlier ties stay, later ones go."""
    monkeypatch.setattr(topk, "CHUNK", 4)
    x = torch.tensor([1.0, 0.1, 1.0, 0.2, 1.0, 5.0, 1.0, 0.3, 1.0, 1.0, 0.0, 1.0])
    out = topk.trim_below_(x.clone(), 1.0, keep_ties=4)
    assert out.tolist() == [1.0, 0.0, 1.0, 0.0, 1.0, 5.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert topk.trim_below_(x.clone(), 1.0).tolist() == [1.0, 0, 1.0, 0, 1.0, 5.0, 1.0, 0, 1.0, 1.0, 0, 1.0]


def test_in_place_trim_returns_its_input() -> None:
    x = _values("randn", 1000)
    assert magnitude_trim_(x, 0.3) is x


def test_below_is_the_next_smaller_number() -> None:
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        v = torch.tensor(0.37, dtype=dtype)
        b = torch.tensor(topk.below(float(v), dtype), dtype=dtype)
        assert b < v and torch.nextafter(b, torch.tensor(1.0, dtype=dtype)) == v
