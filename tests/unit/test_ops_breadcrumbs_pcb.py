"""Breadcrumbs (both scopes) and PCB-Merging kernels against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from deltatune.errors import ConfigError
from deltatune.ops.breadcrumbs import breadcrumbs, breadcrumbs_mask
from deltatune.ops.pcb import pcb, pcb_clip, pcb_clip_bounds, pcb_merge, pcb_score_threshold, pcb_scores

# |τ| ascending: 0.05(6) 0.1(0) 0.2(4) 0.3(2) 0.4(7) 0.5(3) 0.6(9) 0.7(8) 0.8(5) 0.9(1)
ROW = torch.tensor([[0.1, -0.9, 0.3, 0.5, -0.2, 0.8, 0.05, -0.4, 0.7, 0.6]])


def _kept(mask: torch.Tensor) -> set[int]:
    return set(torch.nonzero(mask.reshape(-1)).reshape(-1).tolist())


def test_breadcrumbs_row_1x10_drops_outliers_then_keeps_top():
    # γ·n = 2 outliers removed (0.9, 0.8); β·n = 3 largest of the rest kept (0.7, 0.6, 0.5)
    assert _kept(breadcrumbs_mask(ROW, 0.3, 0.2, "row")) == {8, 9, 3}
    out = breadcrumbs(ROW, 0.3, 0.2, "row")
    assert torch.equal(out, torch.tensor([[0.0, 0.0, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.7, 0.6]]))


def test_breadcrumbs_tensor_1x10_mergekit_ranks():
    # n=10, k=3, n_top=2, n_bot=5 → ascending ranks [5, 8) = 0.5, 0.6, 0.7
    assert _kept(breadcrumbs_mask(ROW, 0.3, 0.2, "tensor")) == {3, 9, 8}


def test_breadcrumbs_gamma_floor_zero_keeps_the_top_instead_of_zeroing_everything():
    # γ·n = 0.5 → 0 outliers: both scopes keep the plain top-3 (the pre-0.1.5 mergekit bug zeroed all)
    for scope in ("row", "tensor"):
        assert _kept(breadcrumbs_mask(ROW, 0.3, 0.05, scope)) == {1, 5, 8}
    assert breadcrumbs(ROW, 0.3, 0.0, "tensor").abs().sum() > 0


def test_breadcrumbs_negative_n_bot_removes_fewer_outliers_to_meet_density():
    # tensor: k=9, n_top=2, n_bot=max(0, 10−9−2)=0 → ranks [0, 9): only the single largest (0.9) goes
    assert _kept(breadcrumbs_mask(ROW, 0.9, 0.2, "tensor")) == set(range(10)) - {1}
    # row (paper): both outliers go; ⌊0.9·10⌋ = 9 > 8 survivors, so all 8 survivors are kept
    assert _kept(breadcrumbs_mask(ROW, 0.9, 0.2, "row")) == set(range(10)) - {1, 5}


def test_breadcrumbs_row_vs_tensor_scope_on_a_matrix():
    tau = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0], [0.5, -0.4, 0.3, 0.2, 0.1]])
    # row: per row drop ⌊0.2·5⌋=1, keep ⌊0.4·5⌋=2
    assert torch.equal(breadcrumbs(tau, 0.4, 0.2, "row"), torch.tensor([[0.0, 4.0, 3.0, 0.0, 0.0],
                                                                         [0.0, -0.4, 0.3, 0.0, 0.0]]))
    # tensor: n=10, k=4, n_top=2, n_bot=4 → drop 5 and 4, keep 3, 2, 1, 0.5
    assert torch.equal(breadcrumbs(tau, 0.4, 0.2, "tensor"), torch.tensor([[0.0, 0.0, 3.0, 2.0, 1.0],
                                                                            [0.5, 0.0, 0.0, 0.0, 0.0]]))


def test_breadcrumbs_scalar_and_vector_edge_cases():
    scalar = torch.tensor(3.0)
    assert breadcrumbs(scalar, 0.5, 0.1, "row").item() == 3.0  # 0-d untouched (authors' code)
    assert breadcrumbs(scalar, 0.5, 0.1, "tensor").item() == 0.0  # ⌊0.5·1⌋ = 0 kept (mergekit)
    assert breadcrumbs(torch.tensor([2.0, -1.0]), 0.5, 0.0, "row").tolist() == [2.0, 0.0]
    assert breadcrumbs(ROW, 1.0, 0.0, "tensor").tolist() == ROW.tolist()


def test_breadcrumbs_against_a_sort_based_reference_on_random_tensors():
    g = torch.Generator().manual_seed(0)
    tau = torch.randn(3, 4, 50, generator=g)
    density, gamma = 0.3, 0.1
    # row: per last-dim row, descending order; drop the first 5, keep the next 15
    mask = breadcrumbs_mask(tau, density, gamma, "row")
    order = tau.abs().argsort(dim=-1, descending=True)
    expected = torch.zeros_like(mask)
    expected.scatter_(-1, order[..., 5:20], True)
    assert torch.equal(mask, expected)
    # tensor: ascending ranks [n_bot, n_bot + k) with n=600, k=180, n_top=60, n_bot=360
    mask = breadcrumbs_mask(tau, density, gamma, "tensor").reshape(-1)
    asc = tau.abs().reshape(-1).argsort()
    expected = torch.zeros_like(mask)
    expected[asc[360:540]] = True
    assert torch.equal(mask, expected)


@pytest.mark.parametrize(("density", "gamma", "scope", "match"), [
    (0.0, 0.1, "row", "density"), (1.5, 0.1, "row", "density"), (float("nan"), 0.1, "tensor", "density"),
    (0.5, -0.1, "row", "gamma"), (0.5, 1.0, "tensor", "gamma"), (0.5, 0.1, "column", "scope"),
])
def test_breadcrumbs_bad_params(density, gamma, scope, match):
    with pytest.raises(ConfigError, match=match):
        breadcrumbs(ROW, density, gamma, scope)


def test_breadcrumbs_rejects_nan():
    with pytest.raises(ConfigError, match="NaN"):
        breadcrumbs(torch.tensor([1.0, float("inf")]), 0.5, 0.0)


# ---------------------------------------------------------------- PCB
T1 = torch.tensor([3.0, -1.0, 2.0, 1.0])
T2 = torch.tensor([1.0, 2.0, -4.0, 3.0])
E = math.exp
th = math.tanh


def _pcb_hand(lambdas):
    """The 2-task, 4-element example worked step by step (κ = T = 2, no clipping, r = 0.75)."""
    # Σ_j τ_j = [4, 1, −2, 4]; τ1 ⊙ Σ = [12, −1, −4, 4]; τ2 ⊙ Σ = [4, 2, 8, 12]
    # |τ1| = [3,1,2,1] → N = [1, 0, .5, 0]; |τ2| = [1,2,4,3] → N = [0, 1/3, 1, 2/3]
    b1 = [E(2) * th(12), -th(1), -E(0.5) * th(4), th(4)]
    b2 = [th(4), E(2 / 9) * th(2), E(2) * th(8), E(8 / 9) * th(12)]
    # threshold: ascending index int(4·0.25) = 1 (2nd smallest); max = largest
    q1, m1 = -th(1), E(2) * th(12)
    q2, m2 = E(2 / 9) * th(2), E(2) * th(8)
    w1 = [max(0.0, (b - q1) / (m1 - q1)) for b in b1]  # [1, 0, 0, (tanh4+tanh1)/(e²tanh12+tanh1)]
    w2 = [max(0.0, (b - q2) / (m2 - q2)) for b in b2]  # [0, 0, 1, …]
    l1, l2 = lambdas
    out = []
    for i in range(4):
        den = max(w1[i] + w2[i], 1e-12)
        out.append((l1 * w1[i] * T1[i].item() + l2 * w2[i] * T2[i].item()) / den)
    return b1, b2, out


def test_pcb_two_tasks_four_elements_by_hand():
    b1, b2, expected = _pcb_hand((1.0, 1.0))
    stacked = torch.stack([T1, T2])
    scores = pcb_scores(stacked, torch.tensor([1.0, 1.0]), torch.tensor([3.0, 4.0]), inter="raw")
    assert torch.allclose(scores, torch.tensor([b1, b2]), atol=1e-6)
    out = pcb([T1, T2], ratio=0.75, clip_quantiles=(0.0, 1.0))
    assert torch.allclose(out, torch.tensor(expected), atol=1e-6)
    assert out[0].item() == pytest.approx(3.0) and out[1].item() == 0.0 and out[2].item() == pytest.approx(-4.0)
    _, _, weighted = _pcb_hand((2.0, 1.0))
    out = pcb([T1, T2], ratio=0.75, lambdas=[2.0, 1.0], clip_quantiles=(0.0, 1.0))
    assert torch.allclose(out, torch.tensor(weighted), atol=1e-6)
    assert out[0].item() == pytest.approx(6.0)  # λ multiplies the numerator only


def test_pcb_inter_variants_and_temperature_by_hand():
    stacked = torch.stack([T1, T2])
    lo, hi = torch.tensor([1.0, 1.0]), torch.tensor([3.0, 4.0])
    # ñ1 = [1, −0, .5, 0], ñ2 = [0, 1/3, −1, 2/3]; normalized: β_inter,t = Σ_j tanh(ñ_t ñ_j)
    norm = pcb_scores(stacked, lo, hi, inter="normalized")
    expected = [[E(2) * th(1), 0.0, E(0.5) * (th(0.25) + th(-0.5)), 0.0],
                [0.0, E(2 / 9) * th(1 / 9), E(2) * (th(-0.5) + th(1.0)), E(8 / 9) * th(4 / 9)]]
    assert torch.allclose(norm, torch.tensor(expected), atol=1e-6)
    # vision: tanh(τ_t ⊙ Σ_j ñ_j), Σ_j ñ_j = [1, 1/3, −.5, 2/3]
    vis = pcb_scores(stacked, lo, hi, inter="vision")
    assert torch.allclose(vis[0], torch.tensor([E(2) * th(3), -th(1 / 3), -E(0.5) * th(1), th(2 / 3)]), atol=1e-6)
    # κ = 0 switches intra-balancing off; κ defaults to the number of tasks
    flat = pcb_scores(stacked, lo, hi, temperature=0.0, inter="raw")
    assert torch.allclose(flat[0], torch.tanh(torch.tensor([12.0, -1.0, -4.0, 4.0])))
    assert torch.allclose(pcb_scores(stacked, lo, hi, temperature=2.0), pcb_scores(stacked, lo, hi))


def test_pcb_clip_scalar_and_per_task_bounds():
    assert pcb_clip(torch.tensor([0.5, -3.0, 1.0, -0.1]), 0.2, 2.0).tolist() == pytest.approx([0.5, -2.0, 1.0, -0.2])
    stacked = torch.tensor([[1.0, -5.0], [0.1, -0.2]])
    out = pcb_clip(stacked, torch.tensor([2.0, 0.15]), torch.tensor([3.0, 0.3]))
    assert torch.allclose(out, torch.tensor([[2.0, -3.0], [0.15, -0.2]]))


def test_pcb_clip_bounds_follow_the_reference_indexing():
    values = torch.arange(1.0, 10001.0)
    assert pcb_clip_bounds(values) == (2.0, 9999.0)  # ascending indices 1 and int(10000·0.9999 − 1) = 9998
    assert pcb_clip_bounds(torch.tensor([4.0, 1.0, 3.0, 2.0])) == (1.0, 3.0)  # tiny n: the max is still clipped
    assert pcb_clip_bounds(torch.tensor([4.0, 1.0, 3.0, 2.0]), 0.0, 1.0) == (1.0, 4.0)
    assert pcb_score_threshold(torch.tensor([0.3, 0.1, 0.4, 0.2]), 0.75) == pytest.approx(0.2)


def test_pcb_merge_drop_rescale_by_hand():
    clipped = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    scores = torch.tensor([[0.0, 1.0, 3.0], [2.0, 2.0, 2.0]])
    # task 1: q=1, M=3 → β̂ = [0, 0, 1]; task 2: M = q = 2 (degenerate) → β̂ = 1 where β ≥ q
    out = pcb_merge(clipped, scores, torch.tensor([1.0, 2.0]), torch.tensor([3.0, 2.0]), [1.0, 0.5])
    assert out.tolist() == pytest.approx([0.5 * 4.0, 0.5 * 5.0, (3.0 + 0.5 * 6.0) / 2.0])


def test_pcb_streaming_split_with_global_statistics_equals_whole_tensor():
    g = torch.Generator().manual_seed(1)
    taus = [torch.randn(4, 16, generator=g) * 0.01 for _ in range(3)]
    whole = pcb(taus, ratio=0.2, clip_quantiles=(0.05, 0.95), inter="vision")
    stacked = torch.stack(taus)
    bounds = [pcb_clip_bounds(t.abs(), 0.05, 0.95) for t in taus]
    lo, hi = torch.tensor([b[0] for b in bounds]), torch.tensor([b[1] for b in bounds])
    halves = [stacked[:, :2], stacked[:, 2:]]
    clipped = [pcb_clip(h, lo, hi) for h in halves]
    scores = [pcb_scores(c, lo, hi, inter="vision", unclipped=h) for c, h in zip(clipped, halves, strict=True)]
    all_scores = torch.cat([s.reshape(3, -1) for s in scores], dim=1)
    thr = torch.tensor([pcb_score_threshold(row, 0.2) for row in all_scores])
    top = all_scores.max(dim=1).values
    parts = [pcb_merge(c, s, thr, top, [1.0] * 3) for c, s in zip(clipped, scores, strict=True)]
    assert torch.allclose(torch.cat(parts), whole, atol=1e-7)


def test_pcb_constant_magnitudes_do_not_produce_nan():
    ones = torch.ones(4)
    out = pcb([ones, ones], ratio=0.5)
    assert torch.isfinite(out).all() and out.tolist() == pytest.approx([1.0] * 4)


def test_pcb_bad_inputs():
    with pytest.raises(ConfigError, match="ratio"):
        pcb([T1, T2], ratio=0.0)
    with pytest.raises(ConfigError, match="ratio"):
        pcb([T1, T2], ratio=1.5)
    with pytest.raises(ConfigError, match="lambdas"):
        pcb([T1, T2], ratio=0.5, lambdas=[1.0])
    with pytest.raises(ConfigError, match="NaN"):
        pcb([T1, torch.tensor([0.0, float("nan"), 0.0, 0.0])], ratio=0.5)
    with pytest.raises(ConfigError, match="shapes"):
        pcb([T1, torch.ones(3)], ratio=0.5)
    with pytest.raises(ConfigError, match="at least 1"):
        pcb([], ratio=0.5)
    with pytest.raises(ConfigError, match="quantiles"):
        pcb([T1, T2], ratio=0.5, clip_quantiles=(0.6, 0.4))
    with pytest.raises(ConfigError, match="inter"):
        pcb_scores(torch.stack([T1, T2]), [1.0, 1.0], [3.0, 4.0], inter="cosine")
    with pytest.raises(ConfigError, match="one value per task"):
        pcb_scores(torch.stack([T1, T2]), [1.0, 1.0, 1.0], [3.0, 4.0])
    with pytest.raises(ConfigError, match="share"):
        pcb_merge(torch.stack([T1, T2]), torch.ones(2, 3), [0.0, 0.0], [1.0, 1.0])
    with pytest.raises(ConfigError, match="q_low"):
        pcb_clip(T1, 2.0, 1.0)
