"""Spectral primitives of the delta analyses: SVD (exact or randomised), effective rank, intruder dimensions,
alignment with the base's top singular directions and principal angles.  Pure functions on fp32 tensors."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Svd:
    """A thin SVD ``A ≈ U diag(S) Vᵀ`` (``U``: m×q, ``S``: q, ``V``: n×q); ``exact`` is False for a randomised
    rank-q approximation (then ``S`` holds only the top q singular values)."""

    U: Tensor
    S: Tensor
    V: Tensor
    exact: bool


def svd(matrix: Tensor, full_max: int, rank: int, seed: int = 0) -> Svd:
    """The SVD of ``matrix``: exact (``torch.linalg.svd``) when ``min(m, n) ≤ full_max``, else randomised
    (``torch.svd_lowrank``, Halko, Martinsson & Tropp 2011, with ``q = rank`` and 4 power iterations).

    The randomised factorisation seeds torch's global generator from ``seed`` and restores its state after."""
    a = matrix.float()
    if min(a.shape) <= full_max:
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        return Svd(u, s, vh.mT, True)
    q = min(rank, *a.shape)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(a, q=q, niter=4)
    finally:
        torch.random.set_rng_state(state)
    return Svd(u, s, v, False)


def effective_rank(singular_values: Tensor) -> float:
    """Effective rank (Roy & Vetterli, EUSIPCO 2007): ``erank = exp(H(p))`` with ``p_i = σ_i / Σ_j σ_j`` and
    ``H(p) = −Σ_i p_i log p_i`` (``0 log 0 = 0``); 0 for a zero matrix.  Between 1 and the rank; from a
    randomised SVD it is the effective rank of the rank-q approximation (a lower bound)."""
    s = singular_values.double().clamp_min(0)
    total = float(s.sum())
    if total <= 0 or not math.isfinite(total):
        return 0.0
    p = s[s > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def numerical_rank(singular_values: Tensor, shape: tuple[int, ...] | list[int]) -> int:
    """``rank(A)`` as ``torch.linalg.matrix_rank`` counts it for an fp32 matrix: the singular values above
    ``σ_max · max(m, n) · eps_fp32`` (Mukherjee et al. 2025 measure the rank of RL updates this way); needs
    the whole spectrum (an exact SVD)."""
    s = singular_values.float()
    if not s.numel() or float(s.max()) <= 0:
        return 0
    tol = float(s.max()) * max(shape) * torch.finfo(torch.float32).eps
    return int((s > tol).sum())


def stable_rank(singular_values: Tensor, frobenius: float | None = None) -> float:
    """Stable rank ``‖A‖_F² / ‖A‖₂² = Σ σ_i² / σ_1²`` (Rudelson & Vershynin 2007); 0 for a zero matrix.  From a
    truncated (randomised) SVD pass ``frobenius`` = ``‖A‖_F``: the top singular values alone undercount it."""
    s = singular_values.double()
    top = float(s.max()) if s.numel() else 0.0
    energy = frobenius ** 2 if frobenius is not None else float((s * s).sum())
    return energy / (top * top) if top > 0 else 0.0


def intruder_similarity(base_u: Tensor, tuned_u: Tensor, top_k: int) -> Tensor:
    """``c_j = max_i |cos(u_j, u⁰_i)|`` for the top-``k`` left singular vectors ``u_j`` of ``W + ΔW`` against
    every left singular vector ``u⁰_i`` of ``W`` (Shuttleworth et al., "LoRA vs Full Fine-tuning: An Illusion of
    Equivalence", arXiv 2410.21228, Algorithm 1; PEFT's ``reduce_intruder_dimension`` uses the thin SVDs the
    same way).  Singular vectors have unit norm, so the cosine is the dot product."""
    k = min(top_k, tuned_u.shape[1])
    return (tuned_u[:, :k].mT @ base_u).abs().amax(dim=1)


def count_intruders(similarity: Tensor, epsilon: float) -> int:
    """Intruder dimensions among the examined vectors: ``#{j : c_j < ε}`` (the paper's Algorithm 1)."""
    return int((similarity < epsilon).sum())


def alignment(delta: Tensor, base_u: Tensor, base_v: Tensor, k: int) -> tuple[float, float]:
    """``(‖U_kᵀ ΔW V_k‖_F / ‖ΔW‖_F, k / √(m·n))``: the share of the update's norm inside the span of ``W``'s top-k
    left and right singular vectors, and its expectation for an isotropic random ``ΔW`` (``E‖U_kᵀGV_k‖² = k²σ²``
    against ``E‖G‖² = mnσ²``) — a chance level to compare with.  ``(nan, ·)`` for a zero update."""
    k = min(k, base_u.shape[1], base_v.shape[1])
    m, n = delta.shape
    chance = k / math.sqrt(m * n)
    norm = float(delta.norm())
    if norm == 0:
        return float("nan"), chance
    inner = base_u[:, :k].mT @ delta @ base_v[:, :k]
    return float(inner.norm()) / norm, chance


def principal_cosines(a: Tensor, b: Tensor) -> Tensor:
    """Cosines of the principal angles between the column spans of orthonormal ``a`` (m×p) and ``b`` (m×q):
    the singular values of ``aᵀb`` (Björck & Golub 1973), clamped to [0, 1], in descending order."""
    if a.shape[1] == 0 or b.shape[1] == 0:
        return torch.zeros(0)
    return torch.linalg.svdvals(a.mT @ b).clamp(0, 1)
