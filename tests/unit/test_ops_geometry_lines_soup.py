"""SLERP, Model Stock, LiNeS, DELLA and soups against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from deltatune.errors import ConfigError
from deltatune.ops.della import della, della_keep_probabilities
from deltatune.ops.geometry import model_stock, slerp
from deltatune.ops.lines import count_layers, layer_index, lines_factor, lines_multitask_alpha
from deltatune.ops.soup import greedy_soup, uniform_soup

R2 = math.sqrt(2.0) / 2.0


# ---------------------------------------------------------------- SLERP
def test_slerp_endpoints_and_midpoint_of_orthogonal_vectors():
    v0, v1 = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 3.0])
    assert torch.allclose(slerp(v0, v1, 0.0), v0)
    assert torch.allclose(slerp(v0, v1, 1.0), v1)
    # Ω = π/2: coefficients sin(π/4)/sin(π/2) = √2/2 on the *unnormalised* tensors
    assert torch.allclose(slerp(v0, v1, 0.5), torch.tensor([2.0 * R2, 3.0 * R2]))
    # t = 1/3: sin(π/3), sin(π/6)
    assert torch.allclose(slerp(v0, v1, 1 / 3), torch.tensor([2.0 * math.sin(math.pi / 3), 3.0 * 0.5]))


def test_slerp_collinear_and_antipodal_fall_back_to_linear():
    v0, v1 = torch.tensor([1.0, 2.0]), torch.tensor([2.0, 4.0])
    assert torch.allclose(slerp(v0, v1, 0.25), torch.tensor([1.25, 2.5]))
    assert torch.allclose(slerp(torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 0.0]), 0.5), torch.zeros(2))
    # d = cos(0.01) ≈ 0.99995 > 0.9995 → linear (the chord midpoint, norm < 1)
    e1 = torch.tensor([1.0, 0.0])
    near = torch.tensor([math.cos(0.01), math.sin(0.01)])
    assert torch.allclose(slerp(e1, near, 0.5), (e1 + near) / 2)
    # d = cos(0.1) ≈ 0.995 < 0.9995 → spherical: both coefficients sin(0.05)/sin(0.1), result on the unit circle
    far = torch.tensor([math.cos(0.1), math.sin(0.1)])
    mid = slerp(e1, far, 0.5)
    assert torch.allclose(mid, (e1 + far) * (math.sin(0.05) / math.sin(0.1)))
    assert torch.allclose(mid, torch.tensor([math.cos(0.05), math.sin(0.05)]))


def test_slerp_treats_the_whole_tensor_as_one_vector_and_zero_norm_as_one():
    v0 = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    v1 = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    assert torch.allclose(slerp(v0, v1, 0.5), torch.tensor([[R2, 0.0], [0.0, R2]]))
    # ‖v0‖ = 0 < eps counts as 1 → d = 0 → Ω = π/2 (mergekit 0.1.5)
    assert torch.allclose(slerp(torch.zeros(2), torch.tensor([0.0, 1.0]), 0.5), torch.tensor([0.0, R2]))
    assert slerp(torch.ones(3), torch.ones(3), 0.3).dtype == torch.float32


def test_slerp_bad_inputs():
    with pytest.raises(ConfigError, match="t must be"):
        slerp(torch.ones(2), torch.ones(2), 1.5)
    with pytest.raises(ConfigError, match="t must be"):
        slerp(torch.ones(2), torch.ones(2), -0.1)
    with pytest.raises(ConfigError, match="shapes"):
        slerp(torch.ones(2), torch.ones(3), 0.5)
    with pytest.raises(ConfigError, match="NaN"):
        slerp(torch.tensor([float("nan"), 1.0]), torch.ones(2), 0.5)


# ---------------------------------------------------------------- Model Stock
BASE = torch.tensor([1.0, 1.0])


def test_model_stock_orthogonal_offsets_give_the_base_and_identical_offsets_the_finetune():
    assert torch.allclose(model_stock(BASE, [BASE + torch.tensor([1.0, 0.0]), BASE + torch.tensor([0.0, 1.0])]), BASE)
    ft = BASE + torch.tensor([1.0, 2.0])
    assert torch.allclose(model_stock(BASE, [ft, ft.clone()]), ft)


def test_model_stock_sixty_degrees_and_three_models():
    a = torch.tensor([1.0, 0.0])
    b = torch.tensor([0.5, math.sqrt(3.0) / 2.0])  # cos = 1/2 → t = 2·½/(1 + ½) = 2/3
    expected = (2 / 3) * (BASE + (a + b) / 2) + (1 / 3) * BASE
    assert torch.allclose(model_stock(BASE, [BASE + a, BASE + b]), expected)
    # N = 3, offsets e1, e1, e2: pairwise cosines 1, 0, 0 → mean 1/3 → t = 3·⅓/(1 + 2·⅓) = 0.6
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    mean_ft = BASE + (2 * e1 + e2) / 3
    assert torch.allclose(model_stock(BASE, [BASE + e1, BASE + e1, BASE + e2]), 0.6 * mean_ft + 0.4 * BASE)


def test_model_stock_singular_and_filter_wise():
    # cos = −1 with N = 2 → 1 + (N−1)cos = 0 → base
    assert torch.allclose(model_stock(BASE, [BASE + torch.tensor([1.0, 0.0]), BASE - torch.tensor([1.0, 0.0])]), BASE)
    base = torch.zeros(2, 2)
    ft1 = torch.tensor([[1.0, 2.0], [1.0, 0.0]])
    ft2 = torch.tensor([[1.0, 2.0], [0.0, 1.0]])
    # row 0: identical offsets → t=1 → [1, 2]; row 1: orthogonal → t=0 → base row
    assert torch.allclose(model_stock(base, [ft1, ft2], filter_wise=True), torch.tensor([[1.0, 2.0], [0.0, 0.0]]))
    # whole tensor: offsets [1,2,1,0] and [1,2,0,1]: cos = 5/(√6·√6) = 5/6 → t = (10/6)/(11/6) = 10/11
    t = 10 / 11
    assert torch.allclose(model_stock(base, [ft1, ft2]), t * (ft1 + ft2) / 2)


def test_model_stock_bad_inputs():
    with pytest.raises(ConfigError, match="at least 2"):
        model_stock(BASE, [BASE + 1])
    with pytest.raises(ConfigError, match="shapes"):
        model_stock(BASE, [BASE + 1, torch.ones(3)])
    with pytest.raises(ConfigError, match="NaN"):
        model_stock(BASE, [BASE + 1, torch.tensor([float("inf"), 0.0])])


# ---------------------------------------------------------------- LiNeS
def test_layer_index_from_names():
    assert layer_index("model.layers.3.mlp.down_proj.weight", 4) == 3
    assert layer_index("bert.encoder.layer.2.attention.self.query.weight", 4) == 2
    assert layer_index("transformer.h.1.attn.c_attn.weight", 4) == 1
    assert layer_index("encoder.block.2.layer.1.DenseReluDense.wi.weight", 4) == 2  # the T5 block, not the sub-layer
    assert layer_index("model.layers.3.mlp.experts.7.w1.weight", 4) == 3
    assert layer_index("blocks.0.attn.qkv.weight", 4) == 0
    assert layer_index("model.embed_tokens.weight", 4) is None
    assert layer_index("model.heads.3.weight", 4) is None  # "heads" is not "h"
    assert layer_index("lm_head.weight", 4) is None
    with pytest.raises(ConfigError, match="block 10"):
        layer_index("model.layers.10.mlp.weight", 4)


def test_count_layers():
    names = ["model.embed_tokens.weight", "model.layers.0.a.weight", "model.layers.3.b.weight", "model.norm.weight"]
    assert count_layers(names) == 4
    assert count_layers(["lm_head.weight"]) == 0


def test_lines_factors_for_four_blocks():
    alpha, beta = 0.2, 0.8
    assert [lines_factor(ell, 4, alpha, beta) for ell in range(4)] == pytest.approx([0.2, 0.2 + 0.8 / 3,
                                                                                      0.2 + 1.6 / 3, 1.0])
    assert lines_factor(None, 4, alpha, beta) == pytest.approx(0.2)
    assert lines_factor(0, 1, alpha, beta) == pytest.approx(1.0)  # L = 1: the only block is the deepest
    with pytest.raises(ConfigError, match="outside"):
        lines_factor(4, 4, alpha, beta)
    with pytest.raises(ConfigError, match="finite"):
        lines_factor(0, 4, float("nan"), beta)


def test_lines_multitask_alpha():
    assert lines_multitask_alpha(10.0, 10.0, 4) == pytest.approx(0.25)  # task arithmetic: 1/T
    assert lines_multitask_alpha(10.0, 5.0, 4) == pytest.approx(0.5)
    with pytest.raises(ConfigError, match="non-zero"):
        lines_multitask_alpha(1.0, 0.0, 2)
    with pytest.raises(ConfigError, match="num_tasks"):
        lines_multitask_alpha(1.0, 1.0, 0)


# ---------------------------------------------------------------- DELLA
def test_della_keep_probabilities_by_rank():
    # |τ| ranks ascending: 0.1 → 0, 0.2 → 1, 0.3 → 2; r̃ = [1, 0, .5]; p = 0.4 + 0.2·r̃
    p = della_keep_probabilities(torch.tensor([[0.3, -0.1, 0.2], [1.0, 3.0, 2.0]]), 0.5, 0.1)
    assert torch.allclose(p, torch.tensor([[0.6, 0.4, 0.5], [0.4, 0.6, 0.5]]))
    # a row of one: p = ρ (no 0/0)
    assert torch.allclose(della_keep_probabilities(torch.tensor([[5.0], [2.0]]), 0.5, 0.1), torch.full((2, 1), 0.5))
    assert torch.allclose(della_keep_probabilities(torch.tensor(5.0), 0.7, 0.2), torch.tensor(0.7))


def test_della_mask_rescale_and_reproducibility():
    tau = torch.tensor([[0.3, -0.1, 0.2], [1.0, 3.0, 2.0]])
    out = della(tau, 0.5, 0.1, generator=torch.Generator().manual_seed(7))
    u = torch.rand(tau.shape, generator=torch.Generator().manual_seed(7))
    p = torch.tensor([[0.6, 0.4, 0.5], [0.4, 0.6, 0.5]])
    assert torch.allclose(out, torch.where(u < p, tau / p, torch.zeros_like(tau)))
    l1 = della(tau, 0.5, 0.1, generator=torch.Generator().manual_seed(7), rescale="l1")
    assert torch.isclose(l1.abs().sum(), tau.abs().sum())
    assert torch.equal(l1 != 0, out != 0)  # same mask, different rescale


def test_della_keep_rate_and_unbiasedness_on_a_large_row():
    n = 40000
    tau = torch.linspace(0.5, 1.5, n)[torch.randperm(n, generator=torch.Generator().manual_seed(0))].unsqueeze(0)
    out = della(tau, 0.4, 0.2, generator=torch.Generator().manual_seed(1))
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.4) < 0.01
    # the smallest tenth is kept with p ≈ 0.2–0.24, the largest tenth with ≈ 0.56–0.6
    order = tau.abs().argsort(dim=-1).squeeze(0)
    assert abs(kept[0, order[: n // 10]].float().mean().item() - 0.22) < 0.02
    assert abs(kept[0, order[-n // 10:]].float().mean().item() - 0.58) < 0.02
    assert abs(out.sum().item() / tau.sum().item() - 1.0) < 0.02  # E[δ̂] = δ


def test_della_bad_params():
    tau = torch.ones(4)
    with pytest.raises(ConfigError, match="inside"):
        della(tau, 0.9, 0.15)
    with pytest.raises(ConfigError, match="inside"):
        della(tau, 0.1, 0.1)
    with pytest.raises(ConfigError, match="density"):
        della(tau, 0.0, 0.0)
    with pytest.raises(ConfigError, match="epsilon"):
        della(tau, 0.5, -0.1)
    with pytest.raises(ConfigError, match="rescale"):
        della(tau, 0.5, 0.1, rescale="l2")
    with pytest.raises(ConfigError, match="NaN"):
        della(torch.tensor([float("nan"), 1.0]), 0.5, 0.1)
    assert torch.equal(della(tau, 1.0, 0.0), tau)  # ε = 0, ρ = 1: keep everything


# ---------------------------------------------------------------- soups
def test_uniform_soup_is_the_mean():
    out = uniform_soup([torch.tensor([1.0, 2.0]), torch.tensor([3.0, -2.0]), torch.tensor([2.0, 3.0])])
    assert torch.allclose(out, torch.tensor([2.0, 1.0]))
    with pytest.raises(ConfigError, match="at least 1"):
        uniform_soup([])


def test_greedy_soup_accepts_only_strict_improvements():
    scores = {
        (0,): 0.5, (1,): 0.8, (2,): 0.7, (3,): 0.6,
        (1, 2): 0.85,  # better → accepted
        (1, 2, 3): 0.85,  # equal → rejected (strictly greater required)
        (0, 1, 2): 0.9,  # better → accepted
    }
    calls = []

    def evaluate(indices):
        calls.append(list(indices))
        return scores[tuple(sorted(indices))]

    chosen, log = greedy_soup(["a", "b", "c", "d"], evaluate)
    assert chosen == [1, 2, 0]
    assert calls == [[0], [1], [2], [3], [1, 2], [1, 2, 3], [1, 2, 0]]
    greedy = [e for e in log if e["phase"] == "greedy"]
    assert [(e["candidate"], e["accepted"], e["best"]) for e in greedy] == [
        (1, True, 0.8), (2, True, 0.85), (3, False, 0.85), (0, True, 0.9)]
    assert [e["step"] for e in log] == list(range(len(log)))


def test_greedy_soup_single_candidate_ties_and_errors():
    chosen, log = greedy_soup(["only"], lambda idx: 1.0)
    assert chosen == [0] and len(log) == 2
    # equal single scores keep the original order; nothing beats the first
    chosen, _ = greedy_soup([1, 2, 3], lambda idx: 0.5)
    assert chosen == [0]
    with pytest.raises(ConfigError, match="at least one"):
        greedy_soup([], lambda idx: 0.0)
    with pytest.raises(ConfigError, match="NaN"):
        greedy_soup([1, 2], lambda idx: float("nan"))
