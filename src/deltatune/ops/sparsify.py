"""Sparsify one task vector ``τ = θ_ft − θ₀`` (per tensor).

* :func:`magnitude_trim` — keep the largest ``|τ|`` (TIES' trim, Yadav et al., NeurIPS 2023).
  ``exact=True`` keeps exactly ``k = max(1, ⌊ρ·n⌋)`` entries (mergekit 0.1.5); ``exact=False`` keeps
  ``|τ| ≥ t_k``, the k-th largest magnitude, so ties at the threshold keep extra entries (the
  authors' code).
* :func:`dare` — drop each entry with probability ``p = 1 − ρ`` and rescale the survivors
  (Yu et al., "Language Models are Super Mario", ICML 2024): by ``1/(1−p)`` (paper) or so that the
  L1 norm is unchanged (mergekit).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from deltatune.errors import ConfigError

L1_EPS = 1e-7


def _check_density(density: float) -> None:
    if not 0.0 < density <= 1.0:
        raise ConfigError(f"density must be in (0, 1], got {density}")


def keep_count(n: int, density: float) -> int:
    """``k = max(1, ⌊ρ·n⌋)`` entries kept out of ``n``."""
    _check_density(density)
    return max(1, int(density * n))


def magnitude_trim(tau: Tensor, density: float, exact: bool = True) -> Tensor:
    """``τ`` with all but the top-``k`` magnitudes zeroed (``kthvalue``, no full sort)."""
    return magnitude_trim_(tau.clone(), density, exact)


def magnitude_trim_(tau: Tensor, density: float, exact: bool = True) -> Tensor:
    """In-place :func:`magnitude_trim` (the streaming engine owns its task vectors; saves one copy).

    Threshold ``t_k`` = the k-th largest ``|τ|``; ``exact`` keeps everything above it and then the first
    entries equal to it in flat order until ``k`` are kept, otherwise every entry ``≥ t_k``.
    """
    k = keep_count(tau.numel(), density)
    if k >= tau.numel():
        return tau
    flat = tau.view(-1)
    mags = flat.abs()
    threshold = mags.kthvalue(flat.numel() - k + 1).values
    if exact:
        drop = mags <= threshold
        missing = k - (flat.numel() - int(drop.sum()))
        if missing > 0:
            drop[(mags == threshold).nonzero().squeeze(1)[:missing]] = False
    else:
        drop = mags < threshold
    del mags
    return flat.masked_fill_(drop, 0.0).view_as(tau)


def dare(tau: Tensor, density: float, generator: torch.Generator | None = None,
         rescale: Literal["inverse", "l1", "none"] = "inverse") -> Tensor:
    """Drop-and-rescale: ``τ̃ = m ⊙ τ · s`` with ``m ~ Bernoulli(ρ)``.

    ``s = 1/ρ`` (``inverse``, the paper: ``E[τ̃] = τ``), ``s = ‖τ‖₁ / ‖m⊙τ‖₁`` (``l1``, mergekit) or 1.
    The mask is drawn in fp32 on the CPU from ``generator`` so results do not depend on device or
    execution order when each tensor gets its own seeded generator.
    """
    _check_density(density)
    keep = torch.rand(tau.shape, generator=generator, dtype=torch.float32) < density
    kept = torch.where(keep.to(tau.device), tau, torch.zeros_like(tau))
    if rescale == "inverse":
        return kept / density
    if rescale == "l1":  # mergekit leaves near-zero updates unscaled (‖·‖₁ < 1e-7 on either side)
        kept_l1 = kept.float().abs().sum()
        if kept_l1 < L1_EPS or tau.float().abs().sum() < L1_EPS:
            return kept
        return (kept.float() * (tau.float().abs().sum() / kept_l1)).to(tau.dtype)
    return kept


def require_finite(tensor: Tensor, what: str) -> None:
    """Raise :class:`ConfigError` naming ``what`` when ``tensor`` holds NaN or ±Inf."""
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise ConfigError(f"{what} holds NaN or Inf")


def stack_task_vectors(taus: Sequence[Tensor], what: str = "task vectors", min_count: int = 1) -> Tensor:
    """Stack same-shape tensors into one fp32 ``(T, …)`` tensor, checking count, shapes and finiteness."""
    if len(taus) < min_count:
        raise ConfigError(f"need at least {min_count} {what}, got {len(taus)}")
    shapes = {tuple(t.shape) for t in taus}
    if len(shapes) != 1:
        raise ConfigError(f"{what} have different shapes {sorted(shapes)}")
    stacked = torch.stack([t.float() for t in taus])
    require_finite(stacked, f"one of the {what}")
    return stacked
