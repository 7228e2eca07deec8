"""Per-tensor parity of deltatune's pure merge ops with mergekit 0.1.5 (``merge_tensors`` as the oracle).

mergekit computes ``τ_t = θ_t − θ₀`` itself, so every test builds full tensors ``θ_t = θ₀ + noise``
and feeds deltatune the same ``θ_t − θ₀``.  Deterministic methods (linear, task arithmetic, TIES)
must agree to 1e-5 in fp32; DARE draws its mask from a different RNG stream, so it is compared in
distribution (keep rate within a binomial tolerance, L1 norm preserved), and the sign-consensus half
of ``dare_ties`` is compared exactly on masks replayed from mergekit's own RNG stream.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import pytest
import torch
from torch import Tensor

os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest.importorskip("mergekit")
from mergekit.merge_methods import merge_tensors  # noqa: E402
from mergekit.sparsify import RescaleNorm, bernoulli, magnitude, magnitude_outliers  # noqa: E402

from deltatune.ops.breadcrumbs import breadcrumbs  # noqa: E402
from deltatune.ops.geometry import model_stock, slerp  # noqa: E402
from deltatune.ops.merge import disjoint_merge, elect_sign, task_arithmetic, ties  # noqa: E402
from deltatune.ops.sparsify import dare, magnitude_trim  # noqa: E402

TOL = 1e-5
SHAPES = [(7,), (16, 24), (3, 5, 8), (1,)]


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------
def _models(shape: Sequence[int], seed: int, n: int = 3,
            distinct: bool = True) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """``θ₀``, ``[θ_t]`` and ``[θ_t − θ₀]``; the fine-tunes differ in scale so that weights matter."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(*shape, generator=g)
    fts = [base + (0.5 + 0.5 * t) * torch.randn(*shape, generator=g) for t in range(n)]
    taus = [ft - base for ft in fts]
    for tau in taus if distinct else []:  # precondition: no two entries share a magnitude (top-k unambiguous)
        assert tau.abs().unique().numel() == tau.numel()
    return base, fts, taus


def _mk(base: Tensor, fts: Sequence[Tensor], method: str, **params) -> Tensor:
    return merge_tensors([base, *fts], method, base_index=0, parameters=params)


def _ties_general(taus: Sequence[Tensor], density: float, weights: Sequence[float], lam: float,
                  normalize: bool) -> Tensor:
    """mergekit-style TIES assembled from the primitives (``ties()`` always normalises)."""
    trimmed = torch.stack([magnitude_trim(t, density, exact=True) for t in taus])
    w = torch.tensor(weights).view(-1, *[1] * (trimmed.dim() - 1))
    sign = elect_sign(trimmed * w, zero="plus")
    return lam * disjoint_merge(trimmed, sign, weights, normalize=normalize, mask_weighted=True)


def _close(ours: Tensor, ref: Tensor) -> None:
    diff = (ours - ref).abs().max().item() if ours.numel() else 0.0
    assert ours.shape == ref.shape
    assert diff <= TOL, f"max abs diff {diff:.3g} > {TOL}"


# --------------------------------------------------------------------------------------------------
# linear and task arithmetic
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [0.3, 1.0, 2.5]])
def test_linear_is_weighted_average(shape, normalize, weights):
    base, fts, taus = _models(shape, seed=1)
    ref = merge_tensors(fts, "linear", parameters={"weight": weights, "normalize": normalize})
    # linear over full weights = task arithmetic with the θ_t themselves as "task vectors" ...
    _close(task_arithmetic(fts, weights, normalize=normalize), ref)
    if normalize:  # ... and, when normalised, θ₀ + the weighted mean of the deltas
        _close(base + task_arithmetic(taus, weights, normalize=True), ref)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("weights", "normalize", "lam"), [
    ([1.0, 1.0, 1.0], False, 1.0),
    ([1.0, -0.5, 0.7], False, 1.0),   # negation: only meaningful without normalisation
    ([1.0, -0.5, 0.7], False, 0.8),
    ([0.3, 1.0, 2.5], True, 1.7),
    ([0.3, 1.0, 2.5], False, 0.5),
])
def test_task_arithmetic(shape, weights, normalize, lam):
    base, fts, taus = _models(shape, seed=2)
    ref = _mk(base, fts, "task_arithmetic", weight=weights, normalize=normalize, **{"lambda": lam})
    _close(base + task_arithmetic(taus, weights, lam=lam, normalize=normalize), ref)


# --------------------------------------------------------------------------------------------------
# TIES
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
@pytest.mark.parametrize(("weights", "lam"), [([1.0, 1.0, 1.0], 1.0), ([0.3, 1.0, 2.5], 1.3)])
def test_ties_normalized(shape, density, weights, lam):
    base, fts, taus = _models(shape, seed=3)
    ref = _mk(base, fts, "ties", weight=weights, density=density, normalize=True, **{"lambda": lam})
    _close(base + ties(taus, density=density, weights=weights, lam=lam, preset="mergekit"), ref)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", [0.2, 0.5])
def test_ties_disjoint_sum(shape, density):
    """``normalize: false`` = weighted disjoint *sum* (the default of dare_ties / breadcrumbs_ties)."""
    base, fts, taus = _models(shape, seed=4)
    weights, lam = [0.3, 1.0, 2.5], 0.7
    ref = _mk(base, fts, "ties", weight=weights, density=density, normalize=False, **{"lambda": lam})
    _close(base + _ties_general(taus, density, weights, lam, normalize=False), ref)


def test_ties_int8_mask_is_only_a_memory_option():
    base, fts, taus = _models((16, 24), seed=5)
    ref = _mk(base, fts, "ties", weight=[1.0, 0.5, 2.0], density=0.2, int8_mask=True)
    _close(base + ties(taus, density=0.2, weights=[1.0, 0.5, 2.0]), ref)


def test_ties_zero_sum_resolves_to_plus():
    """Coordinate 0: weighted deltas +1, −1, 0 sum to 0 → γ = +1, only the +1 survives (mean 1)."""
    base = torch.zeros(3)
    taus = [torch.tensor([1.0, 2.0, -4.0]), torch.tensor([-1.0, 3.0, 5.0]), torch.tensor([0.0, -6.0, 1.0])]
    ref = _mk(base, [base + t for t in taus], "ties", weight=1.0, density=1.0)
    ours = ties(taus, density=1.0)
    _close(ours, ref)
    # hand-computed: γ = [+, −, +]; coord 1 keeps only −6; coord 2 keeps 5 and 1 → mean 3
    assert ours.tolist() == [1.0, -6.0, 3.0]


def test_magnitude_trim_matches_mergekit_magnitude():
    _, _, taus = _models((16, 24), seed=6)
    for tau in taus:
        for density in (0.01, 0.2, 0.5, 0.99):
            assert torch.equal(magnitude_trim(tau, density, exact=True), magnitude(tau, density))


def test_exact_topk_tie_breaking_is_implementation_defined():
    """With equal magnitudes at the threshold both keep exactly ``k`` entries, but not the same ones.

    mergekit picks among the tied entries by ``argsort`` order, deltatune by ``topk`` order; only
    the entries strictly above the threshold are guaranteed to agree.  Keep random test data free
    of exact ties (see ``_models``) when comparing element-wise.
    """
    tau = torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0, 1.0, 1.0, 1.0, 2.0, -1.0])
    ours, ref = magnitude_trim(tau, 0.3), magnitude(tau, 0.3)
    assert (ours != 0).sum() == (ref != 0).sum() == 3
    assert ours[8] == ref[8] == 2.0  # the unique maximum is kept by both
    tied = tau.abs() == 1.0
    assert (ours[tied] != 0).sum() == (ref[tied] != 0).sum() == 2
    # kept values are the original entries, unscaled
    assert torch.equal(ours[ours != 0], tau[ours != 0]) and torch.equal(ref[ref != 0], tau[ref != 0])


def test_ties_negative_weight_hand_computed():
    """mergekit weighs before the mask too: w·τ = [1, 2, −1] and [−1, 1, −3], γ = [+, +, −].  Coordinate 0
    keeps only input 0; coordinates 1 and 2 keep both, and the signed divisor Σ w·mask = 0 counts as 1."""
    base = torch.zeros(3)
    taus = [torch.tensor([1.0, 2.0, -1.0]), torch.tensor([1.0, -1.0, 3.0])]
    ref = _mk(base, [base + t for t in taus], "ties", weight=[1.0, -1.0], density=1.0)
    assert ref.tolist() == [1.0, 3.0, -4.0]
    _close(ties(taus, density=1.0, weights=[1.0, -1.0]), ref)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("normalize", [False, True])
def test_ties_negative_weight_random(shape, normalize):
    base, fts, taus = _models(shape, seed=20)
    weights, lam = [1.0, -0.5, 0.7], 1.1
    ref = _mk(base, fts, "ties", weight=weights, density=0.5, normalize=normalize, **{"lambda": lam})
    _close(base + _ties_general(taus, 0.5, weights, lam, normalize=normalize), ref)
    if normalize:
        _close(base + ties(taus, density=0.5, weights=weights, lam=lam), ref)


# --------------------------------------------------------------------------------------------------
# DARE (random masks: compared in distribution, and exactly on replayed masks)
# --------------------------------------------------------------------------------------------------
def _binomial_ok(kept: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(kept - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1


@pytest.mark.parametrize("density", [0.2, 0.5])
def test_dare_l1_single_model_distribution(density):
    base, fts, taus = _models((64, 64), seed=7, n=1, distinct=False)
    tau = taus[0]
    n = tau.numel()
    torch.manual_seed(0)
    ref = _mk(base, fts, "dare_linear", weight=1.0, density=density) - base
    ours = dare(tau, density, generator=torch.Generator().manual_seed(0), rescale="l1")
    for out in (ours, ref):
        keep = out != 0
        assert _binomial_ok(int(keep.sum()), n, density)
        assert out.abs().sum().item() == pytest.approx(tau.abs().sum().item(), rel=1e-5)
        # every survivor is τ times one common factor s = ‖τ‖₁/‖m⊙τ‖₁
        s = tau.abs().sum() / tau[keep].abs().sum()
        assert (out[keep] - s * tau[keep]).abs().max().item() <= 1e-4
        assert abs(s.item() - 1 / density) < 0.15 / density


def _same_rng_stream(shape: Sequence[int], density: float, seed: int) -> bool:
    """Whether ``bernoulli(full(ρ))`` after ``manual_seed(s)`` draws the mask ``rand(seed s) < ρ``."""
    torch.manual_seed(seed)
    theirs = torch.bernoulli(torch.full(shape, density)).bool()
    return torch.equal(theirs, torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < density)


@pytest.mark.parametrize("shape", [(64, 64), (3, 5, 8), (7,)])
@pytest.mark.parametrize("density", [0.2, 0.5, 0.9])
def test_dare_l1_exact_when_rng_streams_coincide(shape, density):
    """On CPU torch (checked: 2.13) both draw ``u ~ U[0,1)`` and keep ``u < ρ``, so one seed → one mask."""
    if not _same_rng_stream(shape, density, 21):
        pytest.skip("this torch build draws Bernoulli masks from a different stream than torch.rand")
    base, fts, taus = _models(shape, seed=10, n=1, distinct=False)
    torch.manual_seed(21)
    ref = _mk(base, fts, "dare_linear", weight=1.0, density=density)
    ours = dare(taus[0], density, generator=torch.Generator().manual_seed(21), rescale="l1")
    assert torch.equal(ours != 0, ref - base != 0)
    _close(base + ours, ref)


def _replay_mergekit_dare(taus: Sequence[Tensor], density: float, seed: int) -> list[Tensor]:
    """The DARE'd deltas mergekit draws after ``torch.manual_seed(seed)`` (same calls, same order)."""
    torch.manual_seed(seed)
    return [bernoulli(t, density, rescale_norm=RescaleNorm.l1) for t in taus]


@pytest.mark.parametrize("density", [0.2, 0.5])
def test_dare_linear_exact_on_replayed_masks_and_in_distribution(density):
    base, fts, taus = _models((32, 48), seed=8, distinct=False)
    weights = [1.0, 0.5, 2.0]
    torch.manual_seed(11)
    ref = _mk(base, fts, "dare_linear", weight=weights, density=density)
    dared = _replay_mergekit_dare(taus, density, 11)
    _close(base + task_arithmetic(dared, weights), ref)
    # ours with our own masks: same support statistics and L1 mass per model
    ours = [dare(t, density, generator=torch.Generator().manual_seed(i), rescale="l1") for i, t in enumerate(taus)]
    for o, r, t in zip(ours, dared, taus, strict=True):
        assert _binomial_ok(int((o != 0).sum()), t.numel(), density)
        assert o.abs().sum().item() == pytest.approx(r.abs().sum().item(), rel=1e-5)
    merged = task_arithmetic(ours, weights)
    union = 1 - (1 - density) ** 3
    assert _binomial_ok(int((merged != 0).sum()), merged.numel(), union)
    assert _binomial_ok(int((ref - base != 0).sum()), merged.numel(), union)


@pytest.mark.parametrize("density", [0.2, 0.5])
@pytest.mark.parametrize("normalize", [False, True])
def test_dare_ties_exact_on_replayed_masks_and_in_distribution(density, normalize):
    base, fts, taus = _models((32, 48), seed=9, distinct=False)
    weights, lam = [1.0, 0.5, 2.0], 1.2
    torch.manual_seed(12)
    ref = _mk(base, fts, "dare_ties", weight=weights, density=density, normalize=normalize, **{"lambda": lam})
    dared = _replay_mergekit_dare(taus, density, 12)
    w = torch.tensor(weights).view(-1, 1, 1)
    stacked = torch.stack(dared)
    sign = elect_sign(stacked * w, zero="plus")
    _close(base + lam * disjoint_merge(stacked, sign, weights, normalize=normalize, mask_weighted=True), ref)
    # with deltatune's own masks the merged support has the same expected size as mergekit's
    ours = torch.stack([dare(t, density, generator=torch.Generator().manual_seed(i), rescale="l1")
                        for i, t in enumerate(taus)])
    merged = lam * disjoint_merge(ours, elect_sign(ours * w), weights, normalize=normalize, mask_weighted=True)
    n_ours, n_ref = int((merged != 0).sum()), int((ref - base != 0).sum())
    assert abs(n_ours - n_ref) <= 6 * math.sqrt(merged.numel())
    l1_ours, l1_ref = merged.abs().sum().item(), (ref - base).abs().sum().item()
    assert l1_ours == pytest.approx(l1_ref, rel=0.1)


# --------------------------------------------------------------------------------------------------
# Breadcrumbs (mergekit scope: whole tensor, keep ranks [n_bot, n_bot + k) ascending by |τ|)
# --------------------------------------------------------------------------------------------------
CRUMBS = [(0.9, 0.01), (0.2, 0.1), (0.5, 0.05), (0.95, 0.1), (0.3, 0.0)]  # (density, gamma); 0.95+0.1 > 1


@pytest.mark.parametrize("shape", [(50,), (16, 24), (3, 5, 8), (1,)])
@pytest.mark.parametrize(("density", "gamma"), CRUMBS)
def test_breadcrumbs_tensor_scope_mask(shape, density, gamma):
    _, _, taus = _models(shape, seed=13)
    for tau in taus:
        ref = magnitude_outliers(tau, density, gamma=gamma)
        ours = breadcrumbs(tau, density, gamma, scope="tensor")
        assert torch.equal(ours != 0, ref != 0)
        assert torch.equal(ours, ref)


def test_breadcrumbs_small_gamma_keeps_density():
    """⌊γ·n⌋ = 0 removes no outlier (the pre-0.1.5 mergekit slice bug zeroed everything)."""
    tau = torch.linspace(0.01, 0.5, 50)
    ours = breadcrumbs(tau, 0.9, 0.01, scope="tensor")
    assert int((ours != 0).sum()) == int((magnitude_outliers(tau, 0.9, gamma=0.01) != 0).sum()) == 45
    assert torch.equal(ours[5:], tau[5:]) and not ours[:5].any()  # ranks 5..49 kept


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("normalize", [False, True])
def test_breadcrumbs_merge(method, normalize):
    base, fts, taus = _models((16, 24), seed=14)
    weights, lam, density, gamma = [0.3, 1.0, 2.5], 0.9, 0.3, 0.05
    ref = _mk(base, fts, method, weight=weights, density=density, gamma=gamma, normalize=normalize,
              **{"lambda": lam})
    crumbs = [breadcrumbs(t, density, gamma, scope="tensor") for t in taus]
    if method == "breadcrumbs":
        ours = task_arithmetic(crumbs, weights, lam=lam, normalize=normalize)
    else:
        stacked = torch.stack(crumbs)
        sign = elect_sign(stacked * torch.tensor(weights).view(-1, 1, 1), zero="plus")
        ours = lam * disjoint_merge(stacked, sign, weights, normalize=normalize, mask_weighted=True)
    _close(base + ours, ref)


# --------------------------------------------------------------------------------------------------
# SLERP and Model Stock (whole weights; the base is the t = 0 endpoint / the anchor)
# --------------------------------------------------------------------------------------------------
def _slerp_pairs() -> dict[str, tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(15)
    a = torch.randn(16, 24, generator=g)
    b = torch.randn(16, 24, generator=g)
    return {
        "generic": (a, b),
        "close": (a, a + 0.3 * b),                      # d ≈ 0.96: spherical branch, small angle
        "collinear": (a, 2.0 * a + 1e-4 * b),           # |d| > 0.9995: linear fallback
        "antipodal": (a, -a),                           # d = −1: linear fallback too
        "zero_norm": (torch.zeros(16, 24), b),          # ‖v₀‖ ≤ eps counts as 1
        "vector": (a[0], b[0]),
    }


@pytest.mark.parametrize("case", list(_slerp_pairs()))
@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
def test_slerp(case, t):
    v0, v1 = _slerp_pairs()[case]
    ref = merge_tensors([v0, v1], "slerp", base_index=0, parameters={"t": t})
    _close(slerp(v0, v1, t), ref)


@pytest.mark.parametrize("shape", [(16, 24), (3, 5, 8), (40,)])
@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock(shape, n, filter_wise):
    base, fts, _ = _models(shape, seed=16, n=n, distinct=False)
    # correlated fine-tunes (a shared direction) give an interior t, not just t ≈ 0
    shared = 0.5 * torch.randn(*shape, generator=torch.Generator().manual_seed(17))
    fts = [ft + shared for ft in fts]
    ref = merge_tensors([base, *fts], "model_stock", base_index=0, parameters={"filter_wise": filter_wise})
    _close(model_stock(base, fts, filter_wise=filter_wise), ref)


def test_model_stock_singular_returns_base():
    """Two opposite offsets: cos θ = −1, 1 + (N−1)·cos θ = 0 → the base (mergekit keeps θ₀ there)."""
    base = torch.randn(4, 6, generator=torch.Generator().manual_seed(18))
    d = torch.randn(4, 6, generator=torch.Generator().manual_seed(19))
    ref = merge_tensors([base, base + d, base - d], "model_stock", base_index=0)
    ours = model_stock(base, [base + d, base - d])
    _close(ours, ref)
    _close(ours, base)


def test_dare_l1_tiny_norm_guard():
    tau = torch.full((20,), 1e-9)  # ‖τ‖₁ = 2e-8 < 1e-7
    if not _same_rng_stream(tau.shape, 0.5, 0):
        pytest.skip("this torch build draws Bernoulli masks from a different stream than torch.rand")
    torch.manual_seed(0)
    ref = bernoulli(tau, 0.5, rescale_norm=RescaleNorm.l1)
    assert ref.abs().sum() < tau.abs().sum()  # mergekit left the survivors unscaled
    _close(dare(tau, 0.5, generator=torch.Generator().manual_seed(0), rescale="l1") * 1e9, ref * 1e9)


# --------------------------------------------------------------------------------------------------
# the engine's kernels under the mergekit preset: mergekit's defaults and its `rescale` option
# --------------------------------------------------------------------------------------------------
def _kernel(method: str, taus: Sequence[Tensor], per_input: dict, params: dict,
            weights: Sequence[float] = (0.3, 1.0, 2.5)) -> Tensor:
    """``method``'s engine kernel on one tensor, parameters resolved as a mergekit recipe's are (its preset)."""
    from deltatune.algebra.methods import TensorJob, get_merge_method
    from deltatune.algebra.options import coerce_param, resolve_params

    spec = get_merge_method(method)
    resolved, inputs = resolve_params(method, spec.params, "mergekit",
                                      {k: coerce_param(k, v, "test") for k, v in params.items()},
                                      [{**per_input, "weight": w} for w in weights])
    job = TensorJob("t", [t.clone() for t in taus], resolved, inputs, base=lambda: None,
                    generator=lambda i: torch.Generator().manual_seed(i))
    return spec.kernel(job)


@pytest.mark.parametrize("method", ["ties", "breadcrumbs", "breadcrumbs_ties", "task_arithmetic"])
@pytest.mark.parametrize("rescale", [None, True, False])
@pytest.mark.parametrize("shape", [(16, 24), (3, 5, 8)])
def test_rescale_and_mergekit_defaults_match_mergekit(method, rescale, shape):
    """mergekit's ``rescale: true`` L1-rescales each trimmed/banded task vector (TIES, Breadcrumbs) before the
    vote; its default per method (``false`` for these) is the preset's; ``task_arithmetic`` takes and ignores
    ``density`` and ``rescale`` (nothing is masked)."""
    base, fts, taus = _models(shape, seed=21)
    per_input = {"density": 0.3, **({"gamma": 0.05} if method.startswith("breadcrumbs") else {})}
    params = {} if rescale is None else {"rescale": rescale}
    ref = _mk(base, fts, method, weight=[0.3, 1.0, 2.5], **per_input, **params)
    ours = _kernel(method, taus, per_input, params)
    _close(base + ours, ref)
    if rescale and method != "task_arithmetic":  # not vacuous: the rescale changed the numbers
        assert (_kernel(method, taus, per_input, {"rescale": False}) - ours).abs().max() > 1e-3


@pytest.mark.parametrize("shape", [(16, 24), (37,), (3, 5, 8), (2, 3, 4, 5)])
def test_della_exact_on_one_rng_stream(shape):
    """DELLA ranks magnitudes along axis 1 as mergekit's ``della_magprune`` (``argsort(dim=1)``), so on one
    RNG stream both keep the same entries with the same L1 rescale, for conv-like tensors of ≥ 3 dims too."""
    from mergekit.sparsify import della_magprune

    from deltatune.ops.della import della

    if not _same_rng_stream(shape, 0.5, 7):
        pytest.skip("this torch build draws Bernoulli masks from a different stream than torch.rand")
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(22))
    torch.manual_seed(7)
    ref = della_magprune(x, 0.5, 0.1, RescaleNorm.l1)
    ours = della(x, 0.5, 0.1, torch.Generator().manual_seed(7), rescale="l1")
    assert torch.equal(ours != 0, ref != 0)
    _close(ours, ref)
