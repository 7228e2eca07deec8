"""The analysis primitives of ``deltatune inspect`` on hand-made matrices with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from deltatune.inspect.linalg import (
    alignment,
    count_intruders,
    effective_rank,
    intruder_similarity,
    numerical_rank,
    principal_cosines,
    stable_rank,
    svd,
)
from deltatune.inspect.metrics import canonical, energy_shares, locate, placement
from deltatune.inspect.pairwise import PairTotals, chance_jaccard, conflict_terms, pair_metrics, trim
from deltatune.inspect.summary import layer_summary, recommend_merge


def test_effective_rank_known_values():
    assert effective_rank(torch.ones(7)) == pytest.approx(7.0)
    assert effective_rank(torch.tensor([3.0, 0.0, 0.0])) == pytest.approx(1.0)
    p = torch.tensor([0.5, 0.25, 0.25])
    assert effective_rank(p * 8) == pytest.approx(math.exp(-(p * p.log()).sum().item()))
    assert effective_rank(torch.zeros(4)) == 0.0
    assert stable_rank(torch.tensor([2.0, 2.0, 0.0])) == pytest.approx(2.0)


def test_intruder_found_for_new_direction_and_not_for_a_rescaled_one():
    w = torch.diag(torch.arange(8, 0, -1).float())  # U0 = identity
    u = torch.ones(8) / math.sqrt(8)  # max |cos| with every e_i = 0.354
    base = svd(w, 64, 8)
    intruding = svd(w + 20 * torch.outer(u, u), 64, 8)
    cos = intruder_similarity(base.U, intruding.U, top_k=3)
    assert 1 / math.sqrt(8) - 1e-4 <= cos[0] < 0.5
    assert count_intruders(cos, 0.5) >= 1
    scaled = svd(w + 5 * torch.outer(torch.eye(8)[0], torch.eye(8)[0]), 64, 8)
    assert count_intruders(intruder_similarity(base.U, scaled.U, top_k=8), 0.5) == 0


def test_alignment_inside_and_outside_the_top_subspace():
    torch.manual_seed(0)
    w = torch.randn(12, 10)
    s = svd(w, 64, 10)
    inside = s.U[:, :3] @ torch.randn(3, 3) @ s.V[:, :3].mT
    outside = s.U[:, 5:] @ torch.randn(5, 5) @ s.V[:, 5:].mT
    assert alignment(inside, s.U, s.V, 3)[0] == pytest.approx(1.0, abs=1e-5)
    assert alignment(outside, s.U, s.V, 3)[0] == pytest.approx(0.0, abs=1e-5)
    assert alignment(inside, s.U, s.V, 3)[1] == pytest.approx(3 / math.sqrt(120))
    assert math.isnan(alignment(torch.zeros(12, 10), s.U, s.V, 3)[0])


def test_randomised_svd_matches_exact_on_a_low_rank_matrix():
    torch.manual_seed(1)
    low = torch.randn(300, 4) @ torch.randn(4, 200)
    exact, approx = svd(low, 1000, 16), svd(low, 50, 16)
    assert exact.exact and not approx.exact and approx.S.numel() == 16
    torch.testing.assert_close(approx.S[:4], exact.S[:4], rtol=1e-4, atol=1e-4)
    assert effective_rank(approx.S) == pytest.approx(effective_rank(exact.S), rel=1e-3)


def test_principal_cosines():
    q = torch.linalg.qr(torch.randn(10, 4)).Q
    torch.testing.assert_close(principal_cosines(q, q), torch.ones(4))
    e = torch.eye(10)
    torch.testing.assert_close(principal_cosines(e[:, :2], e[:, 2:5]), torch.zeros(2))


def test_ties_conflict_mass_by_hand():
    a, b = torch.tensor([1.0, -1.0, 0.0]), torch.tensor([-2.0, -1.0, 3.0])
    lost, total = conflict_terms([a, b])  # elected signs (−, −, +): only a[0] = +1 loses
    assert (lost, total) == (1.0, 8.0)
    t = trim(torch.tensor([0.1, -5.0, 3.0, 0.2, -0.3]), 0.4)  # keeps exactly ⌊0.4·5⌋ = 2 entries
    assert t.tolist() == [0.0, -5.0, 3.0, 0.0, 0.0]
    assert chance_jaccard(0.1, 0.1) == pytest.approx(0.01 / 0.19)


def test_energy_shares_and_placement_of_a_concentrated_update():
    d = torch.zeros(64, 32)
    d[8:16, :4] = torch.randn(8, 4)  # rows of head 1 (head_dim 8), 32 of 2048 entries (1.6 %)
    top1, top10 = energy_shares(d)
    assert top10 == pytest.approx(1.0)
    assert 0.5 < top1 < 1.0
    where = placement(d != 0, "model.layers.0.self_attn.q_proj.weight", head_dim=8)
    assert where["head_counts"][1] == 32 and where["head_max_share"] == 1.0
    assert where["rows_touched"] == pytest.approx(8 / 64) and where["cols_touched"] == pytest.approx(4 / 32)
    assert "head_counts" not in placement(d != 0, "model.layers.0.mlp.up_proj.weight", head_dim=8)
    dense = torch.randn(200, 200)
    assert energy_shares(dense)[1] == pytest.approx(0.439, abs=0.03)  # i.i.d. Gaussian: 2(zφ(z) + 1 − Φ(z)), z = 1.645


def test_names_and_conv1d_layout():
    assert locate("bert.encoder.layer.3.attention.self.query.weight") == (3, "attention.self.query.weight")
    assert locate("bert.embeddings.word_embeddings.weight") == (None, "bert.embeddings.word_embeddings.weight")
    w = torch.randn(4, 12)
    assert canonical("transformer.h.0.attn.c_attn.weight", w).shape == (12, 4)
    assert canonical("model.layers.0.mlp.up_proj.weight", w).shape == (4, 12)


def test_merge_suggestion_rules():
    dense = [{"density": 1.0}, {"density": 1.0}]
    sparse = [{"density": 0.01}, {"density": 0.01}]
    assert recommend_merge([], dense[:1])["method"] is None
    disjoint = {"cosine": 0.0, "conflict_mass": 0.0, "support_jaccard": 0.0}
    assert recommend_merge([disjoint], sparse)["rule"] == 2
    assert recommend_merge([{**disjoint, "cosine": 0.8, "support_jaccard": 1.0}], dense)["method"] == "linear"
    assert recommend_merge([{**disjoint, "conflict_mass": 0.3, "support_jaccard": 1.0}], dense)["method"] == "ties"
    assert recommend_merge([{**disjoint, "support_jaccard": 1.0}], dense)["rule"] == 5


def test_pair_totals_over_tensors_of_different_coverage():
    """A dense delta against one that is dense on tensor 1 and empty-ish on tensor 2: the chance Jaccard uses each
    tensor's own densities, and a tensor only one side changes counts in its norm and support."""
    totals = PairTotals()
    a1, b1 = torch.ones(10), -torch.ones(10)
    a2, b2 = torch.ones(10), torch.zeros(10)
    b2[0] = 1.0
    for a, b in ((a1, b1), (a2, b2)):
        pair_metrics("t", a, b, trim(a, 0.2), trim(b, 0.2), None, None, totals)
    alone = torch.ones(5)
    totals.add_alone(alone, trim(alone, 0.2), first=True)  # its top entry counts in the trimmed union and mass too
    s = totals.summary()
    assert s["support_jaccard"] == pytest.approx(11 / 25)
    assert s["support_jaccard_chance"] == pytest.approx((10 + 1) / (10 + 10 + 5))
    assert s["trimmed_jaccard_chance"] == pytest.approx((10 * 0.04 + 10 * 0.02) / (10 * 0.36 + 10 * 0.28 + 1))
    pairs = [(trim(a1, 0.2) != 0, trim(b1, 0.2) != 0), (trim(a2, 0.2) != 0, trim(b2, 0.2) != 0)]
    inter = sum(int((x & y).sum()) for x, y in pairs)
    union = sum(int((x | y).sum()) for x, y in pairs) + 1
    assert s["trimmed_jaccard"] == pytest.approx(inter / union)
    lost_1, mass_1 = conflict_terms([trim(a1, 0.2), trim(b1, 0.2)])
    lost_2, mass_2 = conflict_terms([trim(a2, 0.2), trim(b2, 0.2)])
    assert s["conflict_mass"] == pytest.approx((lost_1 + lost_2) / (mass_1 + mass_2 + 1.0))
    assert s["sign_agreement"] == pytest.approx(1 / 11)
    assert s["cosine"] == pytest.approx((-10 + 1) / math.sqrt(25 * 11))


def test_numerical_rank_matches_torch_matrix_rank():
    g = torch.Generator().manual_seed(0)
    for shape, r in (((12, 20), 3), ((20, 12), 12), ((9, 9), 0)):
        a = torch.randn(shape[0], max(r, 1), generator=g) @ torch.randn(max(r, 1), shape[1], generator=g) * (r > 0)
        s = torch.linalg.svdvals(a)
        assert numerical_rank(s, a.shape) == int(torch.linalg.matrix_rank(a)) == r


def test_layer_summary_averages_tensors_not_entries():
    """Mukherjee et al.'s per-layer sparsity: each tensor of the block counts once, whatever its size; an encoder's
    and a decoder's block 0 are two blocks."""
    rows = [{"input": "a", "key": "encoder.block.0.q.weight", "layer": 0, "density": 1.0, "density_tol": 1.0,
             "rank_fraction": 1.0},
            {"input": "a", "key": "encoder.block.0.norm.weight", "layer": 0, "density": 0.0, "density_tol": 0.0},
            {"input": "a", "key": "decoder.block.0.q.weight", "layer": 0, "density": 0.2, "density_tol": 0.1,
             "rank_fraction": None},
            {"input": "a", "key": "encoder.block.1.q.weight", "layer": 1, "density": 0.5, "density_tol": 0.25,
             "rank_fraction": 0.5},
            {"input": "a", "key": "shared.weight", "layer": None, "density": 0.9, "density_tol": 0.9},  # embeddings
            {"input": "b", "key": "encoder.block.0.q.weight", "layer": 0, "density": 0.2, "density_tol": 0.2}]
    assert layer_summary(rows, "a") == [
        {"input": "a", "block": "decoder.block.0", "layer": 0, "tensors": 1, "density": 0.2, "density_tol": 0.1,
         "rank_fraction": None},
        {"input": "a", "block": "encoder.block.0", "layer": 0, "tensors": 2, "density": 0.5, "density_tol": 0.5,
         "rank_fraction": 1.0},
        {"input": "a", "block": "encoder.block.1", "layer": 1, "tensors": 1, "density": 0.5, "density_tol": 0.25,
         "rank_fraction": 0.5}]


def test_a_subspace_inside_another_overlaps_fully_whatever_the_ranks():
    """Mean cos² over the min(p, q) principal angles: an r=2 subspace inside an r=8 one is 1 (it read 2/8)."""
    q = torch.linalg.qr(torch.randn(32, 8, generator=torch.Generator().manual_seed(0))).Q
    a, b = torch.randn(32, 32), torch.randn(32, 32)
    row = pair_metrics("t", a, b, a, b, q[:, :2], q, PairTotals())
    assert row["subspace_overlap"] == pytest.approx(1.0)
    assert pair_metrics("t", a, b, a, b, q[:, :2], q[:, 2:4], PairTotals())["subspace_overlap"] == pytest.approx(0.0,
                                                                                                               abs=1e-6)


def test_stable_rank_from_a_randomised_svd_counts_the_whole_frobenius_norm():
    from deltatune.inspect.metrics import tensor_metrics
    from deltatune.inspect.options import InspectOptions

    m = torch.randn(120, 80, generator=torch.Generator().manual_seed(3))
    exact, _ = tensor_metrics("model.layers.0.mlp.up_proj.weight", "x", m, None, None, InspectOptions())
    approx, _ = tensor_metrics("model.layers.0.mlp.up_proj.weight", "x", m, None, None,
                               InspectOptions(svd_full_max=16, svd_rank=8))
    assert exact["svd_exact"] and not approx["svd_exact"]
    assert approx["stable_rank"] == pytest.approx(exact["stable_rank"], rel=0.05)  # σ₁ from 8 values, ‖ΔW‖_F whole


def test_the_json_report_is_strict_json_with_nulls_for_undefined_numbers():
    import json

    from deltatune.inspect.report import report_json

    text = report_json({"rel_norm": float("nan"), "rows": [{"x": float("inf")}, 1.5]})
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c}")) == {"rel_norm": None,
                                                                                   "rows": [{"x": None}, 1.5]}
