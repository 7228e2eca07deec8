"""Compress one task vector ``τ`` (pure tensor functions; the Delta-level driver is
:mod:`deltatune.algebra.compress`).

* :func:`compeft` — ComPEFT (Yadav et al., "ComPEFT: Compression for Communicating Parameter
  Efficient Updates via Sparsification and Quantization", arXiv 2311.13171):
  ``τ̂ = α·σ·sgn(τ)·1[|τ| ≥ t_k]`` with ``σ = std(τ)`` of the *dense* update (Bessel-corrected, as the
  authors' ``tensor.std()``) and ``t_k`` the k-th largest ``|τ|``, ``k = max(1, ⌊ρ·n⌋)``.
* :func:`dare_q` — DAREx-q (Deng et al., "DARE the Extreme", ICLR 2025, arXiv 2410.09344):
  ``τ̂ = m ⊙ τ / q`` with ``m ~ Bernoulli(ρ)``; ``q = ρ`` is DARE's ``1/(1−p)`` rescale, ``q > ρ``
  trades a little bias for much less output variance.  :func:`choose_q` picks ``q`` by a score.
* :func:`quantize_int8` / :func:`dequantize_int8` — symmetric absmax int8, per tensor or per row:
  ``s = max|τ| / 127``, ``q = clamp(round(τ/s), −127, 127)``, ``τ̂ = q·s`` (``|τ̂ − τ| ≤ s/2``).
* :func:`lowrank_factorize` — rank-r SVD ``ΔW ≈ U_r S_r V_rᵀ`` split as ``A = √S_r V_rᵀ``,
  ``B = U_r √S_r`` (mergekit-extract-lora's distribute-scale), exact or randomized (Halko et al.).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from deltatune.errors import ConfigError
from deltatune.ops import topk
from deltatune.ops.sparsify import dare, keep_count

INT8_MAX = 127
FLOAT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# --------------------------------------------------------------------------------------------------
# parameter checks and seeds
# --------------------------------------------------------------------------------------------------
def check_density(density: float | None, what: str = "density") -> float:
    if density is None or isinstance(density, bool) or not 0.0 < float(density) <= 1.0:
        raise ConfigError(f"{what} must be in (0, 1], got {density!r}")
    return float(density)


def check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not math.isfinite(float(alpha)) or float(alpha) <= 0:
        raise ConfigError(f"alpha must be a finite number > 0, got {alpha!r}")
    return float(alpha)


def check_q(q: float) -> float:
    if isinstance(q, bool) or not 0.0 < float(q) <= 1.0:
        raise ConfigError(f"q must be in (0, 1] (rescale 1/q; q = density is plain DARE), got {q!r}")
    return float(q)


def check_rank(rank: int | None) -> int:
    if rank is None or isinstance(rank, bool) or int(rank) != rank or int(rank) < 1:
        raise ConfigError(f"rank must be an integer ≥ 1, got {rank!r}")
    return int(rank)


def stable_seed(seed: int, name: str) -> int:
    """A 63-bit seed for ``(seed, tensor name)`` from BLAKE2b (never Python's salted ``hash``)."""
    digest = hashlib.blake2b(f"{int(seed)}\x00{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def generator_for(seed: int, name: str) -> torch.Generator:
    """A CPU generator seeded by :func:`stable_seed`: masks do not depend on tensor order."""
    return torch.Generator().manual_seed(stable_seed(seed, name))


# --------------------------------------------------------------------------------------------------
# ComPEFT
# --------------------------------------------------------------------------------------------------
def sample_std(values: Tensor) -> float:
    """``σ = sqrt(Σ(x − x̄)² / (n − 1))`` in fp64 (0 for fewer than two entries)."""
    n = values.numel()
    if n < 2:
        return 0.0
    return float(values.detach().double().std())


def kth_largest_abs(values: Tensor, k: int) -> float:
    """The k-th largest ``|x|`` (``1 ≤ k ≤ n``), by :func:`deltatune.ops.topk.kth_largest_abs`."""
    flat = values.detach().reshape(-1).float()
    if not 1 <= k <= flat.numel():
        raise ConfigError(f"k must be in [1, {flat.numel()}], got {k}")
    return topk.kth_largest_abs(flat, k).threshold


def compeft(tau_values: Tensor, density: float, alpha: float, sigma: float | None = None,
            threshold: float | None = None) -> Tensor:
    """ComPEFT: ``τ̂ = α·σ·sgn(τ)`` where ``|τ| ≥ t_k`` (and ``τ ≠ 0``), else 0.

    ``σ`` is the standard deviation of the dense ``τ`` computed *before* sparsification; ``t_k`` the
    k-th largest magnitude with ``k = max(1, ⌊ρ·n⌋)`` (ties at the threshold keep extra entries, as
    the authors' ``kthvalue`` mask; their code keeps ``⌊ρ·n⌋ + 1`` entries, one more than here).  The
    paper computes both globally over the whole update: pass the global ``sigma`` and ``threshold``
    (the Delta-level API does), else they are computed on this tensor.  Every kept entry has the same
    magnitude ``α·σ`` (rounded once to the tensor's dtype), so it stores as sign bits + one scale.
    """
    density = check_density(density)
    alpha = check_alpha(alpha)
    flat = tau_values.detach()
    if flat.numel() == 0:
        return flat.clone()
    sigma = sample_std(flat) if sigma is None else float(sigma)
    if threshold is None:
        threshold = kth_largest_abs(flat, keep_count(flat.numel(), density))
    mags = flat.abs().float()
    keep = (mags >= threshold) & (flat != 0)
    scale = torch.tensor(alpha * sigma, dtype=torch.float32).to(flat.dtype)
    signed = torch.where(flat > 0, scale, -scale).to(flat.dtype)
    return torch.where(keep, signed, torch.zeros((), dtype=flat.dtype))


# --------------------------------------------------------------------------------------------------
# DARE / DAREx-q
# --------------------------------------------------------------------------------------------------
def dare_q(tau: Tensor, density: float, q: float, generator: torch.Generator | None = None) -> Tensor:
    """DAREx-q: ``τ̂ = m ⊙ τ / q`` with ``m ~ Bernoulli(ρ)`` drawn as :func:`deltatune.ops.sparsify.dare`."""
    q = check_q(q)
    kept = dare(tau, density, generator, rescale="none")
    return (kept.float() / q).to(tau.dtype)


def q_grid(density: float, steps: int = 10) -> list[float]:
    """``steps`` values evenly spaced on ``[ρ, 1]``: from DARE's ``1/ρ`` rescale to no rescale."""
    density = check_density(density)
    if steps < 2 or density == 1.0:
        return [density]
    return [round(density + (1.0 - density) * i / (steps - 1), 12) for i in range(steps)]


class QChoice(NamedTuple):
    """The chosen ``q`` and every candidate's score (lower is better)."""

    q: float
    scores: dict[float, float]


def choose_q(candidates: Sequence[float], score_fn: Callable[[float], float]) -> QChoice:
    """``argmin_q score_fn(q)`` over ``candidates`` (first wins ties).

    The DAREx-q proxy (Deng et al., ICLR 2025) is the mean ``|Δ|`` of the last layer's outputs between
    the fine-tuned and the pruned model on one unlabelled batch; pass ``lambda q: −metric(q)`` to pick
    by a validation metric instead.  NaN scores never win.
    """
    if not candidates:
        raise ConfigError("choose_q needs at least one candidate q")
    scores: dict[float, float] = {}
    best: float | None = None
    for q in candidates:
        q = check_q(q)
        score = float(score_fn(q))
        scores[q] = score
        if not math.isnan(score) and (best is None or score < scores[best]):
            best = q
    if best is None:
        raise ConfigError(f"every candidate q scored NaN: {scores}")
    return QChoice(best, scores)


# --------------------------------------------------------------------------------------------------
# quantisation
# --------------------------------------------------------------------------------------------------
def quantize_int8(t: Tensor, per_row: bool = False) -> tuple[Tensor, Tensor]:
    """Symmetric absmax int8: ``s = max|t| / 127``, ``q = clamp(round(t / s), −127, 127)``.

    ``per_row`` (tensors of ≥ 2 dims) uses one scale per index of dim 0 (``s`` of shape ``(rows,)``),
    else one scale (shape ``()``).  An all-zero tensor/row gets ``s = 0`` and ``q = 0``.  Computed in fp32.
    """
    x = t.detach().float()
    if per_row and x.dim() >= 2:
        absmax = x.abs().reshape(x.shape[0], -1).amax(dim=1) if x.numel() else torch.zeros(x.shape[0])
        scale = absmax / INT8_MAX
        shaped = scale.reshape(-1, *([1] * (x.dim() - 1)))
    else:
        scale = (x.abs().max() if x.numel() else torch.tensor(0.0)) / INT8_MAX
        shaped = scale
    safe = torch.where(shaped > 0, shaped, torch.ones_like(shaped))
    q = torch.round(x / safe).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale.to(torch.float32)


def dequantize_int8(q: Tensor, scale: Tensor) -> Tensor:
    """``q · s`` in fp32 (``s`` a scalar or one value per row of ``q``)."""
    s = scale.float()
    if s.dim() == 1 and q.dim() >= 1:
        s = s.reshape(-1, *([1] * (q.dim() - 1)))
    return q.float() * s


def cast_values(t: Tensor, dtype: str) -> Tensor:
    """``t`` rounded to ``bf16``/``fp16``/``fp32`` (round to nearest even)."""
    if dtype not in FLOAT_DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(FLOAT_DTYPES)} (or int8 via quantize_int8), got {dtype!r}")
    target = FLOAT_DTYPES[dtype]
    if target is torch.float16:
        limit = torch.finfo(torch.float16).max
        if t.numel() and float(t.detach().abs().max()) > limit:
            raise ConfigError(f"values up to {float(t.abs().max()):.4g} overflow fp16 (max {limit}); use bf16")
    return t.detach().to(target)


# --------------------------------------------------------------------------------------------------
# low rank
# --------------------------------------------------------------------------------------------------
def _split_sqrt(u: Tensor, s: Tensor, vh: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    root = s[:rank].clamp_min(0).sqrt()
    return root[:, None] * vh[:rank], u[:, :rank] * root[None, :]


def lowrank_factorize(delta_w: Tensor, rank: int, method: Literal["randomized", "exact"] = "randomized",
                      niter: int = 4, seed: int = 0, oversample: int = 8) -> tuple[Tensor, Tensor]:
    """``ΔW (out, in) ≈ B A`` with ``A = √S_r V_rᵀ`` ``(r, in)`` and ``B = U_r √S_r`` ``(out, r)``.

    ``exact``: thin SVD (``torch.linalg.svd``), the best rank-r approximation (Eckart–Young).
    ``randomized``: ``torch.svd_lowrank`` with ``r + oversample`` probe columns and ``niter`` power
    iterations, its Gaussian probes drawn from a generator seeded by ``seed`` (deterministic).
    ``r`` is capped at ``min(out, in)``; computed in fp32.
    """
    rank = check_rank(rank)
    if delta_w.dim() != 2:
        raise ConfigError(f"lowrank_factorize needs a 2-D (out, in) matrix, got shape {tuple(delta_w.shape)}")
    w = delta_w.detach().float()
    r = min(rank, *w.shape)
    if method == "exact":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return _split_sqrt(u, s, vh, r)
    if method != "randomized":
        raise ConfigError(f"lowrank method must be 'randomized' or 'exact', got {method!r}")
    probes = min(r + max(0, oversample), *w.shape)
    devices = [w.device] if w.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        u, s, v = torch.svd_lowrank(w, q=probes, niter=niter)
    return _split_sqrt(u, s, v.t(), r)


def lowrank_refactor(a: Tensor, b: Tensor, scale: float, rank: int) -> tuple[Tensor, Tensor]:
    """Best rank-r factors of ``ΔW = s·B A`` without forming ``ΔW``: QR of both factors, SVD of the
    small core ``s·R_B R_Aᵀ = U S Vᵀ``, then ``A' = √S_r (Q_A V_r)ᵀ``, ``B' = Q_B U_r √S_r``."""
    rank = check_rank(rank)
    qb, rb = torch.linalg.qr(b.detach().float())
    qa, ra = torch.linalg.qr(a.detach().float().t())
    u, s, vh = torch.linalg.svd(float(scale) * (rb @ ra.t()), full_matrices=False)
    r = min(rank, s.numel())
    new_a, new_b = _split_sqrt(u, s, vh, r)
    return new_a @ qa.t(), qb @ new_b


def factor_norm_sq(a: Tensor, b: Tensor, scale: float = 1.0) -> float:
    """``‖s·B A‖²_F = s²·Σ (BᵀB) ⊙ (A Aᵀ)`` without forming the product."""
    a64, b64 = a.detach().double(), b.detach().double()
    return float(scale) ** 2 * float(((b64.t() @ b64) * (a64 @ a64.t())).sum())
