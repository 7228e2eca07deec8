"""PCB-Merging: Parameter Competition Balancing (Du et al., NeurIPS 2024, arXiv 2410.02396).

The reference code (duguodong7/pcb-merging) flattens the whole model per task; here the steps are
split so a streaming engine can compute the per-task global statistics in passes and call the
kernels tensor by tensor.  ``T`` tasks, ``τ_t`` one parameter of task ``t``:

1. :func:`pcb_clip` — ``τ̃_t = sgn(τ_t)·clamp(|τ_t|, lo_t, hi_t)``; ``lo_t``/``hi_t`` are order
   statistics of ``|τ_t|`` (:func:`pcb_clip_bounds`: 0.01 % / 99.99 % in the root script, 1 % / 99 %
   in the vision script).
2. :func:`pcb_scores` — ``β_t = β_intra,t ⊙ β_inter,t`` with ``a = |τ̃_t|``,
   ``N(a) = (a − lo_t)/(hi_t − lo_t)`` (per-task min-max over the model) and

   * intra-balancing ``β_intra,t = exp(κ · N(a)²)``.  The paper and both reference scripts use the
     **number of tasks** as ``κ`` ("temperature"); ``temperature=None`` does that, a float overrides.
     Note the code squares the normalised magnitude, ``N(a)²``, not ``N(a²)``.
   * inter-balancing, three variants (``ñ_j = sgn(τ̃_j)·N(|τ̃_j|)``):
     ``"raw"`` ``tanh(τ_t ⊙ Σ_j τ_j)`` (root ``pcb-merging.py``, on the *unclipped* deltas);
     ``"normalized"`` ``Σ_j tanh(ñ_t ⊙ ñ_j)`` (the paper's per-pair form with tanh, on normalised
     magnitudes so the tanh is not stuck in its linear range);
     ``"vision"`` ``tanh(τ_t ⊙ Σ_j ñ_j)`` (what ``vision_source_code/pcb.py`` actually computes).
     Without the unclipped deltas, ``τ̃`` stands in for ``τ`` (this changes the score maximum).
3. :func:`pcb_merge` — drop + rescale: with ``q_t`` the per-task ``(1 − r)`` quantile of the scores
   (:func:`pcb_score_threshold`) and ``M_t`` their per-task maximum,
   ``β̂_t = clamp((β_t − q_t)/(M_t − q_t), 0, 1)`` (scores at or below ``q_t`` → 0, the top → 1), then
   ``τ_m = Σ_t λ_t β̂_t ⊙ τ̃_t / max(Σ_t β̂_t, 1e-12)`` and ``θ = θ₀ + τ_m``.

:func:`pcb` runs all three with the statistics taken over the one tensor (a per-tensor mode).
Degenerate ranges, which give 0/0 = NaN in the reference code, are guarded: ``hi_t = lo_t`` → ``N = 0``
(like scikit-learn's min-max scaler); ``M_t = q_t`` → ``β̂ = 1`` where ``β_t ≥ q_t``, else 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from deltatune.errors import ConfigError
from deltatune.ops.sparsify import require_finite, stack_task_vectors

Inter = Literal["normalized", "raw", "vision"]
_INTER = ("normalized", "raw", "vision")


def _per_task(value: float | Tensor | Sequence[float], like: Tensor, what: str) -> Tensor:
    """A scalar or one value per leading index of ``like``, shaped to broadcast against it."""
    v = torch.as_tensor(value, dtype=torch.float32)
    require_finite(v, what)
    if v.dim() == 0:
        return v
    if v.dim() != 1 or like.dim() == 0 or v.shape[0] != like.shape[0]:
        raise ConfigError(f"{what} must be a scalar or hold one value per task ({like.shape[0] if like.dim() else 1}),"
                          f" got shape {tuple(v.shape)}")
    return v.view(-1, *[1] * (like.dim() - 1))


def pcb_clip_bounds(abs_values: Tensor, q_low: float = 1e-4, q_high: float = 1 - 1e-4) -> tuple[float, float]:
    """Order statistics of the flattened ``|τ|`` used as clip bounds, indexed as the reference code:
    ascending index ``⌊n·q_low⌋`` for ``lo`` and ``int(n·q_high − 1)`` for ``hi`` (so with ``n·(1−q_high) < 1``
    the single largest value is still clipped to the second largest).  ``kthvalue``, no sort."""
    if not 0.0 <= q_low <= q_high <= 1.0:
        raise ConfigError(f"PCB clip quantiles must satisfy 0 ≤ q_low ≤ q_high ≤ 1, got ({q_low}, {q_high})")
    flat = abs_values.reshape(-1).float()
    n = flat.numel()
    if n == 0:
        raise ConfigError("PCB clip bounds of an empty tensor")
    require_finite(flat, "PCB magnitudes")
    lo_idx = min(max(int(n * q_low), 0), n - 1)
    hi_idx = min(max(int(n * q_high - 1), 0), n - 1)
    lo = float(flat.kthvalue(lo_idx + 1).values)
    hi = float(flat.kthvalue(hi_idx + 1).values)
    return lo, hi


def pcb_clip(tau: Tensor, q_low: float | Tensor, q_high: float | Tensor) -> Tensor:
    """``sgn(τ)·clamp(|τ|, q_low, q_high)`` (fp32).  ``q_low``/``q_high`` are magnitudes: scalars, or one
    per leading index when ``tau`` is a stacked ``(T, …)`` tensor."""
    require_finite(tau, "PCB task vector")
    tau = tau.float()
    lo = _per_task(q_low, tau, "PCB q_low")
    hi = _per_task(q_high, tau, "PCB q_high")
    if (lo < 0).any() or (hi < lo).any():
        raise ConfigError("PCB clip bounds must satisfy 0 ≤ q_low ≤ q_high")
    return torch.sign(tau) * torch.minimum(torch.maximum(tau.abs(), lo), hi)


def _normalised(mags: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    rng = hi - lo
    safe = torch.where(rng > 0, rng, torch.ones_like(rng))
    return torch.where(rng > 0, ((mags - lo) / safe).clamp(0.0, 1.0), torch.zeros_like(mags))


def pcb_scores(clipped: Tensor, norm_lo: Tensor | Sequence[float], norm_hi: Tensor | Sequence[float],
               temperature: float | None = None, inter: Inter = "raw", unclipped: Tensor | None = None) -> Tensor:
    """Balancing scores ``β = exp(κ·N(|τ̃|)²) ⊙ β_inter`` for stacked clipped task vectors ``(T, …)``.

    ``norm_lo``/``norm_hi`` (shape ``(T,)``): per-task min/max of ``|τ̃|`` over the merge scope (the clip
    bounds).  ``temperature`` κ defaults to ``T``, the number of tasks (paper and reference code).
    ``inter`` picks the inter-balancing variant (module docstring).  ``unclipped`` (same shape, optional):
    the task vectors before clipping; the reference scripts multiply those (not ``τ̃``) in the ``"raw"``
    and ``"vision"`` inter terms, which moves the per-task score maximum, so pass them for parity.
    """
    if clipped.dim() < 1 or clipped.shape[0] < 1:
        raise ConfigError("pcb_scores needs stacked task vectors of shape (T, ...) with T ≥ 1")
    if inter not in _INTER:
        raise ConfigError(f"PCB inter must be one of {_INTER}, got {inter!r}")
    require_finite(clipped, "PCB clipped task vectors")
    x = clipped.float()
    n_tasks = x.shape[0]
    kappa = float(n_tasks) if temperature is None else float(temperature)
    if not math.isfinite(kappa):
        raise ConfigError(f"PCB temperature must be finite, got {temperature}")
    lo = _per_task(norm_lo, x, "PCB norm_lo")
    hi = _per_task(norm_hi, x, "PCB norm_hi")
    raw = x
    if unclipped is not None:
        if unclipped.shape != clipped.shape:
            raise ConfigError(f"PCB unclipped {tuple(unclipped.shape)} and clipped {tuple(clipped.shape)} differ")
        require_finite(unclipped, "PCB unclipped task vectors")
        raw = unclipped.float()
    norm = _normalised(x.abs(), lo, hi)
    intra = torch.exp(kappa * norm.square())
    if inter == "raw":
        cross = torch.tanh(raw * raw.sum(0))
    else:
        signed = torch.sign(x) * norm
        if inter == "vision":
            cross = torch.tanh(raw * signed.sum(0))
        else:
            cross = torch.zeros_like(x)
            for j in range(n_tasks):  # Σ_j tanh(ñ_t ⊙ ñ_j), O(T·d) memory
                cross += torch.tanh(signed * signed[j])
    return intra * cross


def pcb_score_threshold(scores: Tensor, ratio: float) -> float:
    """The drop threshold of one task: ascending order statistic at index ``int(n·(1 − r))`` of its scores
    (reference ``clamp(β, 1 − r, 0)``), ``r`` = fraction kept.  Scores ``≤`` it are dropped."""
    _check_ratio(ratio)
    flat = scores.reshape(-1).float()
    if flat.numel() == 0:
        raise ConfigError("PCB score threshold of an empty tensor")
    require_finite(flat, "PCB scores")
    idx = min(int(flat.numel() * (1 - ratio)), flat.numel() - 1)
    return float(flat.kthvalue(idx + 1).values)


def _check_ratio(ratio: float) -> None:
    if not 0.0 < ratio <= 1.0:
        raise ConfigError(f"PCB ratio (fraction of parameters kept per task) must be in (0, 1], got {ratio}")


def pcb_merge(clipped: Tensor, scores: Tensor, score_threshold: Tensor | Sequence[float],
              score_max: Tensor | Sequence[float], lambdas: Sequence[float] | None = None) -> Tensor:
    """``τ_m = Σ_t λ_t β̂_t τ̃_t / max(Σ_t β̂_t, 1e-12)`` with ``β̂_t = clamp((β_t − q_t)/(M_t − q_t), 0, 1)``.

    ``score_threshold`` ``q_t`` and ``score_max`` ``M_t`` (shape ``(T,)``) are per-task statistics over
    the merge scope; ``λ_t`` default 1 (the paper searches them in [0.8, 1.3]; the vision script uses 1.2).
    """
    if clipped.shape != scores.shape or clipped.dim() < 1:
        raise ConfigError(f"PCB clipped {tuple(clipped.shape)} and scores {tuple(scores.shape)} must share a "
                          "(T, ...) shape")
    require_finite(clipped, "PCB clipped task vectors")
    require_finite(scores, "PCB scores")
    x, s = clipped.float(), scores.float()
    n_tasks = x.shape[0]
    lam = [1.0] * n_tasks if lambdas is None else [float(v) for v in lambdas]
    if len(lam) != n_tasks:
        raise ConfigError(f"{len(lam)} PCB lambdas for {n_tasks} task vectors")
    thr = _per_task(score_threshold, x, "PCB score_threshold")
    top = _per_task(score_max, x, "PCB score_max")
    rng = top - thr
    safe = torch.where(rng > 0, rng, torch.ones_like(rng))
    weight = torch.where(rng > 0, ((s - thr) / safe).clamp(0.0, 1.0), (s >= thr).float())
    lam_t = _per_task(lam, x, "PCB lambdas")
    merged = (lam_t * weight * x).sum(0)
    return merged / weight.sum(0).clamp(min=1e-12)


def pcb(taus: Sequence[Tensor], ratio: float, temperature: float | None = None,
        lambdas: Sequence[float] | None = None, clip_quantiles: tuple[float, float] = (1e-4, 1 - 1e-4),
        inter: Inter = "raw") -> Tensor:
    """PCB-Merging of one tensor with every statistic taken over that tensor (per-tensor scope).

    Returns the merged task vector ``τ_m`` (``λ`` folded in); ``θ = θ₀ + τ_m``.  With the whole model
    flattened into one tensor this is the reference ``PCB_merge`` (``inter="raw"``).
    """
    _check_ratio(ratio)
    stacked = stack_task_vectors(taus, "PCB task vectors")
    n_tasks = stacked.shape[0]
    if stacked[0].numel() == 0:
        return torch.zeros_like(stacked[0])
    flat = stacked.reshape(n_tasks, -1)
    bounds = [pcb_clip_bounds(row.abs(), *clip_quantiles) for row in flat]
    lo = torch.tensor([b[0] for b in bounds])
    hi = torch.tensor([b[1] for b in bounds])
    clipped = pcb_clip(stacked, lo, hi)
    scores = pcb_scores(clipped, lo, hi, temperature, inter, unclipped=stacked)
    flat_scores = scores.reshape(n_tasks, -1)
    thr = torch.tensor([pcb_score_threshold(row, ratio) for row in flat_scores])
    top = flat_scores.max(dim=1).values
    return pcb_merge(clipped, scores, thr, top, lambdas)
