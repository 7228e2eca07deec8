"""Parity with PEFT 0.21.2's adapter merging (``LoraModel.add_weighted_adapter``, ``peft.utils.merge_utils``).

* Kernels: PEFT's ``ties`` / ``magnitude_prune`` / ``dare_linear`` / ``dare_ties`` on random tensors
  against deltatune's ops with PEFT's semantics (exact top-k, unweighted sign vote, zero sum → +1,
  weighted values divided by the *count* of agreeing inputs, DARE rescaled by ``1/ρ``).  PEFT draws
  DARE masks with ``torch.bernoulli`` from the global RNG; on CPU torch that is the stream of
  ``torch.rand(generator) < ρ``, so one seed gives the same masks and DARE compares exactly.
* Adapters: two LoRA adapters on a tiny Llama (random non-zero ``B``, different ranks and alphas),
  merged by PEFT with the combination types that work on ``ΔW = B·A·scale`` (``cat``, ``svd`` and
  ``ties_svd`` / ``magnitude_prune_svd`` at full SVD rank, ``dare_linear_svd`` in distribution) and by
  deltatune from the adapters loaded with :func:`load_peft_adapter`.  ``svd`` factors are unique only
  up to rotation, so the products ``B·A`` are compared (fp32, ≤ 1e-5).
PEFT's non-SVD variants (``linear``, ``ties``, … on the A and B factors separately) only approximate a
merge of the ``ΔW`` products; they are covered at the kernel level.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import pytest
import torch
from torch import Tensor

os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest.importorskip("peft")
from conftest import tiny_llama  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.utils import merge_utils as pmu  # noqa: E402

from deltatune.algebra import merge  # noqa: E402
from deltatune.io.peft_format import load_peft_adapter  # noqa: E402
from deltatune.ops.merge import disjoint_merge, elect_sign, task_arithmetic  # noqa: E402
from deltatune.ops.sparsify import dare, magnitude_trim  # noqa: E402

TOL = 1e-5
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def _close(ours: Tensor, ref: Tensor, tol: float = TOL) -> float:
    assert ours.shape == ref.shape
    diff = (ours - ref).abs().max().item()
    assert diff <= tol, f"max abs diff {diff:.3g} > {tol}"
    return diff


# --------------------------------------------------------------------------------------------------
# kernels (peft.utils.merge_utils) vs deltatune ops with PEFT semantics
# --------------------------------------------------------------------------------------------------
def _taus(shape: tuple[int, ...], seed: int, n: int = 3) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    taus = [(0.5 + 0.5 * t) * torch.randn(*shape, generator=g) for t in range(n)]
    for tau in taus:  # no equal magnitudes: top-k is unambiguous
        assert tau.abs().unique().numel() == tau.numel()
    return taus


def _peft_ties(taus: list[Tensor], weights: list[float], density: float) -> Tensor:
    """deltatune ops with PEFT's rule: unweighted vote and mask, ``Σ_{t∈A} w_t τ̂_t / |A|``."""
    trimmed = torch.stack([magnitude_trim(t, density, exact=True) for t in taus])
    return disjoint_merge(trimmed, elect_sign(trimmed, zero="plus"), weights, divide="count")


@pytest.mark.parametrize("shape", [(16, 24), (3, 5, 8), (40,)])
@pytest.mark.parametrize("density", [0.2, 0.5])
@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [0.3, 1.0, 2.5], [1.0, -0.5, 0.7]])
def test_ties_kernel(shape, density, weights):
    taus = _taus(shape, seed=1)
    ref = pmu.ties(taus, torch.tensor(weights), density, majority_sign_method="total")
    _close(_peft_ties(taus, weights, density), ref)


def test_ties_kernel_divides_by_count_not_weights():
    """Hand-computed: both inputs agree at coord 0 → (2·1 + 1·3)/2 = 2.5 (a weighted mean would be 5/3)."""
    taus = [torch.tensor([1.0, -2.0]), torch.tensor([3.0, 1.0])]
    ref = pmu.ties(taus, torch.tensor([2.0, 1.0]), 1.0)
    assert ref.tolist() == pytest.approx([2.5, -4.0])
    _close(_peft_ties(taus, [2.0, 1.0], 1.0), ref)


@pytest.mark.parametrize("density", [0.2, 0.5])
def test_magnitude_prune_kernel(density):
    taus = _taus((16, 24), seed=2)
    weights = [0.3, 1.0, 2.5]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = pmu.magnitude_prune(taus, torch.tensor(weights), density)
    _close(task_arithmetic([magnitude_trim(t, density) for t in taus], weights), ref)


def _same_rng_stream(shape: tuple[int, ...], density: float, seed: int) -> bool:
    torch.manual_seed(seed)
    theirs = torch.bernoulli(torch.full(shape, density)).bool()
    return torch.equal(theirs, torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < density)


@pytest.mark.parametrize("density", [0.2, 0.5])
@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_kernels_exact_on_one_rng_stream(density, method):
    shape = (33, 17)
    if not _same_rng_stream(shape, density, 3):
        pytest.skip("this torch build draws Bernoulli masks from a different stream than torch.rand")
    taus = _taus(shape, seed=3)
    weights = [1.0, 0.5, 2.0]
    torch.manual_seed(3)
    ref = getattr(pmu, method)(taus, torch.tensor(weights), density)
    g = torch.Generator().manual_seed(3)  # PEFT draws the three masks one after another from one stream
    dared = [dare(t, density, generator=g, rescale="inverse") for t in taus]
    if method == "dare_linear":
        ours = task_arithmetic(dared, weights)
    else:
        stacked = torch.stack(dared)
        ours = disjoint_merge(stacked, elect_sign(stacked), weights, divide="count")
    _close(ours, ref)
    kept = dared[0] != 0
    assert torch.allclose(dared[0][kept], taus[0][kept] / density)  # paper rescale 1/ρ, not L1 matching


# --------------------------------------------------------------------------------------------------
# adapters: add_weighted_adapter vs deltatune on the loaded deltas
# --------------------------------------------------------------------------------------------------
ADAPTERS = {"a": {"r": 4, "lora_alpha": 8, "seed": 11}, "b": {"r": 2, "lora_alpha": 2, "seed": 12}}


def _save_adapter(root: Path, name: str, r: int, lora_alpha: int, seed: int) -> Path:
    model = get_peft_model(tiny_llama(), LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=TARGETS))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "lora_" in pname:  # A keeps PEFT's init; B gets random non-zero values
                p.copy_(torch.randn(p.shape, generator=g) * (0.05 if "lora_B" in pname else 1.0))
    out = root / name
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: _save_adapter(root, name, **spec) for name, spec in ADAPTERS.items()}


def _peft_combined(adapters: dict[str, Path], weights: list[float], combination: str, **kw) -> dict[str, Tensor]:
    """``{module: ΔW}`` of the adapter ``add_weighted_adapter`` builds (scale α/r of the new adapter included)."""
    model = PeftModel.from_pretrained(tiny_llama(), str(adapters["a"]), adapter_name="a")
    model.load_adapter(str(adapters["b"]), adapter_name="b")
    model.add_weighted_adapter(["a", "b"], weights, "m", combination_type=combination, **kw)
    prefix = "base_model.model."
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "get_delta_weight") and "m" in getattr(module, "lora_A", {}):
            out[name.removeprefix(prefix)] = module.get_delta_weight("m").detach()
    assert len(out) == 2 * len(TARGETS)
    return out


def _deltatune_dense(adapters: dict[str, Path]) -> list[dict[str, Tensor]]:
    deltas = [load_peft_adapter(adapters[n]) for n in ("a", "b")]
    return [{m: p.delta_weight().detach().float() for m, p in d.parts.items()} for d in deltas]


@pytest.mark.parametrize("weights", [[1.0, 1.0], [0.7, -1.3]])
def test_cat_is_the_weighted_sum_of_delta_weights(adapters, weights):
    ref = _peft_combined(adapters, weights, "cat")
    dense = _deltatune_dense(adapters)
    assert set(dense[0]) == set(ref)
    for module, dw in ref.items():
        _close(task_arithmetic([dense[0][module], dense[1][module]], weights), dw)


@pytest.mark.parametrize("weights", [[1.0, 1.0], [0.7, -1.3]])
def test_svd_at_summed_rank_is_exact(adapters, weights):
    ranks = sum(spec["r"] for spec in ADAPTERS.values())
    ref = _peft_combined(adapters, weights, "svd", svd_rank=ranks)
    dense = _deltatune_dense(adapters)
    for module, dw in ref.items():
        _close(task_arithmetic([dense[0][module], dense[1][module]], weights), dw)


@pytest.mark.parametrize("density", [0.2, 0.5])
@pytest.mark.parametrize("weights", [[0.7, 1.3], [0.7, -1.3]])
def test_ties_svd_at_full_rank(adapters, density, weights):
    """PEFT's TIES on the ΔW products (vote unweighted, ÷ count), re-factorised at full rank = exact."""
    ref = _peft_combined(adapters, weights, "ties_svd", svd_rank=64, density=density,
                         svd_full_matrices=False)
    dense = _deltatune_dense(adapters)
    for module, dw in ref.items():
        _close(_peft_ties([dense[0][module], dense[1][module]], weights, density), dw)


def test_magnitude_prune_svd_at_full_rank(adapters):
    weights, density = [0.7, 1.3], 0.3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = _peft_combined(adapters, weights, "magnitude_prune_svd", svd_rank=64, density=density,
                         svd_full_matrices=False)
    dense = _deltatune_dense(adapters)
    for module, dw in ref.items():
        ours = task_arithmetic([magnitude_trim(dense[i][module], density) for i in (0, 1)], weights)
        _close(ours, dw)


def test_dare_linear_svd_in_distribution(adapters):
    """Random masks drawn module after module from PEFT's global RNG: compare support size and mass."""
    weights, density = [1.0, 1.0], 0.3
    torch.manual_seed(0)
    ref = _peft_combined(adapters, weights, "dare_linear_svd", svd_rank=64, density=density,
                         svd_full_matrices=False)
    dense = _deltatune_dense(adapters)
    union = 1 - (1 - density) ** 2
    for k, (module, dw) in enumerate(sorted(ref.items())):
        g = torch.Generator().manual_seed(100 + k)
        ours = task_arithmetic([dare(dense[i][module], density, generator=g) for i in (0, 1)], weights)
        n = dw.numel()
        tol = 6 * math.sqrt(n * union * (1 - union))
        # the SVD re-factorisation blurs exact zeros to ~1e-7: count entries above numerical noise
        assert abs(int((dw.abs() > 1e-5).sum()) - n * union) <= tol
        assert abs(int((ours != 0).sum()) - n * union) <= tol
        # E[dare(τ)] = τ: both merged deltas estimate the same ΔW (relative error of the mean ~ √((1−ρ)/(ρ n)))
        target = dense[0][module] + dense[1][module]
        for out in (ours, dw):
            assert (out.sum() - target.sum()).abs() <= 8 * target.abs().sum() * math.sqrt((1 - density) / (density * n))


# --------------------------------------------------------------------------------------------------
# the engine: deltatune.algebra.merge on the two adapter folders, preset "peft"
# --------------------------------------------------------------------------------------------------
def _engine(adapters: dict[str, Path], method: str, weights: list[float], density: float | None = None,
            **kw) -> dict[str, Tensor]:
    input_params = [{"density": density}] * 2 if density is not None else None
    delta = merge([adapters["a"], adapters["b"]], method, weights=weights, input_params=input_params,
                  preset="peft", **kw)
    return {m: part.delta_weight().detach().float() for m, part in delta.parts.items()}


@pytest.mark.parametrize("weights", [[1.0, 1.0], [0.7, -1.3]])
def test_engine_task_arithmetic_equals_cat(adapters, weights):
    ref = _peft_combined(adapters, weights, "cat")
    ours = _engine(adapters, "task_arithmetic", weights)
    assert set(ours) == set(ref)
    for module, dw in ref.items():
        _close(ours[module], dw)


def test_engine_linear_is_cat_with_normalized_weights(adapters):
    weights = [0.7, 1.3]
    ref = _peft_combined(adapters, [w / sum(weights) for w in weights], "cat")
    ours = _engine(adapters, "linear", weights)
    for module, dw in ref.items():
        _close(ours[module], dw)


@pytest.mark.parametrize("density", [0.2, 0.5])
@pytest.mark.parametrize("weights", [[0.7, 1.3], [0.7, -1.3]])
def test_engine_ties_peft_preset_equals_ties_svd(adapters, density, weights):
    ref = _peft_combined(adapters, weights, "ties_svd", svd_rank=64, density=density, svd_full_matrices=False)
    ours = _engine(adapters, "ties", weights, density)
    assert set(ours) == set(ref)
    for module, dw in ref.items():
        _close(ours[module], dw)


def test_engine_dare_linear_peft_preset(adapters):
    """Every merged entry is one of 0, w₁τ₁/ρ, w₂τ₂/ρ, (w₁τ₁ + w₂τ₂)/ρ (PEFT's 1/ρ rescale), and the
    support size matches PEFT's ``dare_linear_svd`` in distribution."""
    weights, density = [0.7, 1.3], 0.3
    torch.manual_seed(0)
    ref = _peft_combined(adapters, weights, "dare_linear_svd", svd_rank=64, density=density,
                         svd_full_matrices=False)
    ours = _engine(adapters, "dare_linear", weights, density)
    dense = _deltatune_dense(adapters)
    union = 1 - (1 - density) ** 2
    for module, dw in ref.items():
        t0, t1 = weights[0] * dense[0][module] / density, weights[1] * dense[1][module] / density
        out = ours[module]
        candidates = torch.stack([torch.zeros_like(t0), t0, t1, t0 + t1])
        assert ((candidates - out).abs().min(0).values <= 1e-6).all(), module
        n = out.numel()
        tol = 6 * math.sqrt(n * union * (1 - union))
        assert abs(int((out != 0).sum()) - n * union) <= tol
        assert abs(int((dw.abs() > 1e-5).sum()) - n * union) <= tol


def test_engine_lowrank_reproduces_svd(adapters, tmp_path):
    weights = [0.7, -1.3]
    ranks = sum(spec["r"] for spec in ADAPTERS.values())
    tiny_llama().save_pretrained(tmp_path / "base")
    ref = _peft_combined(adapters, weights, "svd", svd_rank=ranks)
    ours = _engine(adapters, "task_arithmetic", weights, output="lowrank", rank=ranks, base=tmp_path / "base")
    for module, dw in ref.items():
        _close(ours[module], dw)
