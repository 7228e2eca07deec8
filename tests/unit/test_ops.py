"""Sparsify/merge primitives against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from deltatune.errors import ConfigError
from deltatune.ops.merge import disjoint_merge, elect_sign, task_arithmetic, ties
from deltatune.ops.sparsify import dare, keep_count, magnitude_trim


def test_keep_count_and_density_range():
    assert keep_count(10, 0.2) == 2
    assert keep_count(10, 0.01) == 1  # at least one entry survives
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ConfigError, match="density"):
            keep_count(10, bad)


def test_magnitude_trim_exact_vs_threshold_ties():
    tau = torch.tensor([0.5, -3.0, 1.0, -1.0, 0.2])
    assert magnitude_trim(tau, 0.4).tolist() == [0.0, -3.0, 1.0, 0.0, 0.0] or \
        magnitude_trim(tau, 0.4).tolist() == [0.0, -3.0, 0.0, -1.0, 0.0]
    # threshold semantics keep both entries tied at |τ| = 1
    assert magnitude_trim(tau, 0.4, exact=False).tolist() == [0.0, -3.0, 1.0, -1.0, 0.0]


def test_dare_inverse_rescale_is_unbiased_and_l1_preserves_norm():
    tau = torch.ones(20000)
    g = torch.Generator().manual_seed(0)
    out = dare(tau, 0.1, generator=g)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.1) < 0.01
    assert torch.allclose(out[kept], torch.full_like(out[kept], 10.0))
    assert abs(out.mean().item() - 1.0) < 0.1
    same = dare(tau, 0.1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, same)  # a seeded generator per tensor makes the mask reproducible


def test_dare_l1_rescale_matches_norm_exactly():
    tau = torch.tensor([1.0, -2.0, 3.0, -4.0])
    out = dare(tau, 0.5, generator=torch.Generator().manual_seed(3), rescale="l1")
    assert torch.isclose(out.abs().sum(), tau.abs().sum())


def test_task_arithmetic_weights_lambda_normalize_and_negation():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -2.0])
    assert task_arithmetic([a, b], lam=0.5).tolist() == [2.0, 0.0]
    assert task_arithmetic([a, b], weights=[1.0, 3.0], normalize=True).tolist() == [2.5, -1.0]
    assert task_arithmetic([a], weights=[-1.0]).tolist() == [-1.0, -2.0]
    with pytest.raises(ConfigError, match="sum to 0"):
        task_arithmetic([a, b], weights=[1.0, -1.0], normalize=True)
    with pytest.raises(ConfigError, match="NaN"):
        task_arithmetic([a, torch.tensor([float("nan"), 0.0])])


def test_sign_election_zero_rule():
    stacked = torch.tensor([[1.0, -2.0, 1.0], [-1.0, -1.0, 1.0]])
    assert elect_sign(stacked, "plus").tolist() == [1.0, -1.0, 1.0]
    neg = torch.tensor([[1.0, -2.0, -1.0], [-1.0, -1.0, -1.0]])
    assert elect_sign(neg, "majority").tolist() == [-1.0, -1.0, -1.0]


def test_disjoint_merge_hand_computed():
    stacked = torch.tensor([[2.0, -1.0, 0.0], [4.0, 3.0, 0.0], [-6.0, 5.0, 0.0]])
    sign = torch.tensor([1.0, 1.0, 1.0])
    # coord0: agree {2,4} → 3; coord1: agree {3,5} → 4; coord2: nobody → 0
    assert disjoint_merge(stacked, sign).tolist() == [3.0, 4.0, 0.0]
    assert disjoint_merge(stacked, sign, normalize=False).tolist() == [6.0, 8.0, 0.0]
    assert disjoint_merge(stacked, sign, weights=[1.0, 3.0, 1.0]).tolist() == [3.5, 3.5, 0.0]


def test_ties_mergekit_preset_hand_computed():
    t1 = torch.tensor([4.0, -1.0, 0.1, 2.0])
    t2 = torch.tensor([-3.0, 2.0, 0.2, 1.0])
    # density 0.5 keeps 2 per tensor: t1 → [4, 0, 0, 2]; t2 → [-3, 2, 0, 0]
    # signs of the sum: [+1(4−3), +1, +1(0 → plus), +1]; disjoint mean: [4, 2, 0, 2]
    out = ties([t1, t2], density=0.5)
    assert out.tolist() == [4.0, 2.0, 0.0, 2.0]
    # a heavier weight on t2 flips the vote on coordinate 0 (weights act before the vote in mergekit)
    assert ties([t1, t2], density=0.5, weights=[1.0, 2.0])[0].item() == -3.0
    # the paper preset ignores weights in the vote
    assert ties([t1, t2], density=0.5, weights=[1.0, 2.0], preset="paper")[0].item() == 4.0
