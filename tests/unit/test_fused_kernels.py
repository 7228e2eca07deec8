"""The engine's fused kernels equal the readable reference ops bit for bit.

* :func:`consensus_merge` = :func:`disjoint_merge` after :func:`elect_sign` (TIES' consensus);
* :func:`dare_` = a mask ``rand(τ.shape) < ρ`` drawn at once and applied with ``where``.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from deltatune.ops import topk
from deltatune.ops.merge import consensus_merge, disjoint_merge, elect_sign
from deltatune.ops.sparsify import L1_EPS, dare, dare_


def _task_vectors(n: int, count: int, seed: int = 0) -> list[torch.Tensor]:
    """Quarter-step values (exact sums, many exact cancellations), half zeros, some −0.0."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        x = (torch.randn(n, generator=g) * 4).round() / 4
        x[torch.rand(n, generator=g) < 0.5] = 0.0
        x[torch.rand(n, generator=g) < 0.05] = -0.0
        out.append(x)
    return out


WEIGHTS = {1: [[1.0], [0.3]], 2: [[1.0, 1.0], [0.7, 2.0], [1.0, -1.0]],
           3: [[1.0, 1.0, 1.0], [0.5, 2.0, 1.0], [1.0, -1.0, 0.7], [-0.3, 1.0, 1.0]]}


@pytest.mark.parametrize("count", [1, 2, 3])
def test_consensus_merge_equals_elect_sign_then_disjoint_merge(count: int) -> None:
    parts = _task_vectors(4000, count)
    for weights in WEIGHTS[count]:
        unit = all(w == 1.0 for w in weights)
        for fill, normalize, divide, weighted in itertools.product([1.0, -1.0], [True, False], ["weights", "count"],
                                                                    [True, False]):
            votes = parts if not weighted or unit else [p * w for p, w in zip(parts, weights, strict=True)]
            want = disjoint_merge(parts, elect_sign(votes, zero=fill), weights, normalize=normalize, divide=divide,
                                  mask_weighted=weighted)
            got = consensus_merge([p.clone() for p in parts], weights, fill, normalize, divide, weighted)
            assert torch.equal(got, want), (weights, fill, normalize, divide, weighted)


def test_consensus_merge_may_write_over_its_first_input() -> None:
    parts = _task_vectors(1000, 3, seed=1)
    want = consensus_merge(parts, [1.0, 2.0, 0.5], weighted_vote=True)
    first = parts[0].clone()
    got = consensus_merge([first, parts[1], parts[2]], [1.0, 2.0, 0.5], weighted_vote=True, out=first)
    assert got.data_ptr() == first.data_ptr() and torch.equal(got, want)


def test_consensus_of_an_exact_cancellation_follows_the_fill_sign() -> None:
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([-1.0, -3.0])
    assert consensus_merge([a, b], fill=1.0).tolist() == [1.0, -3.0]
    assert consensus_merge([a, b], fill=-1.0).tolist() == [-1.0, -3.0]


def _reference_dare(tau: torch.Tensor, density: float, seed: int, rescale: str) -> torch.Tensor:
    keep = torch.rand(tau.shape, generator=torch.Generator().manual_seed(seed)) < density
    kept = torch.where(keep, tau, torch.zeros_like(tau))
    if rescale == "inverse":
        return kept / density
    if rescale == "l1":
        before, after = tau.double().abs().sum(), kept.double().abs().sum()
        return kept if after < L1_EPS or before < L1_EPS else kept * float(before / after)
    return kept


@pytest.mark.parametrize("rescale", ["inverse", "none", "l1"])
@pytest.mark.parametrize("n", [1000, 3 * topk.CHUNK + 17])
def test_dare_in_chunks_equals_one_mask_drawn_at_once(rescale: str, n: int) -> None:
    tau = torch.randn(n, generator=torch.Generator().manual_seed(3)).reshape(-1, 1)
    got = dare(tau, 0.3, torch.Generator().manual_seed(9), rescale=rescale)
    want = _reference_dare(tau, 0.3, 9, rescale)
    assert torch.equal(got != 0, want != 0)
    if rescale == "l1":  # ‖·‖₁ is accumulated per chunk in fp64: the scale may differ in its last bit
        torch.testing.assert_close(got, want, rtol=2e-7, atol=0.0)
    else:
        assert torch.equal(got, want)


def test_dare_in_place_returns_its_input_and_leaves_tiny_updates_unscaled() -> None:
    tau = torch.full((100,), 1e-10)  # ‖τ‖₁ = 1e-8 < 1e-7: mergekit does not rescale
    assert dare_(tau, 0.5, torch.Generator().manual_seed(0), rescale="l1") is tau
    assert set(tau.unique().tolist()) == {0.0, float(torch.tensor(1e-10))}
