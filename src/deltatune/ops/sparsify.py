"""Sparsify one task vector ``τ = θ_ft − θ₀`` (per tensor).

* :func:`magnitude_trim` — keep the largest ``|τ|`` (TIES' trim, Yadav et al., NeurIPS 2023).
  ``exact=True`` keeps exactly ``k = max(1, ⌊ρ·n⌋)`` entries (mergekit 0.1.5); ``exact=False`` is the
  authors' ``kthvalue`` mask: keep ``|τ| ≥`` the ``(n − ⌊ρ·n⌋)``-th smallest magnitude, i.e. ``⌊ρ·n⌋ + 1``
  entries (:func:`threshold_count`), more where magnitudes tie at the threshold.
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
from deltatune.ops.topk import CHUNK, chunks, kth_largest_abs, trim_below_

L1_EPS = 1e-7


def _check_density(density: float) -> None:
    if not 0.0 < density <= 1.0:
        raise ConfigError(f"density must be in (0, 1], got {density}")


def keep_count(n: int, density: float) -> int:
    """``k = max(1, ⌊ρ·n⌋)`` entries kept out of ``n``."""
    _check_density(density)
    return max(1, int(density * n))


def threshold_count(n: int, density: float) -> int:
    """The rank from the top of the TIES reference's threshold (``kthvalue(n − ⌊ρ·n⌋)`` of ``|τ|``, 1-based from the
    bottom): ``min(n, ⌊ρ·n⌋ + 1)``; keeping ``|τ| ≥`` it keeps that many entries, more with ties."""
    _check_density(density)
    return min(n, int(density * n) + 1)


def magnitude_trim(tau: Tensor, density: float, exact: bool = True) -> Tensor:
    """``τ`` with all but the top-``k`` magnitudes zeroed (exact selection, no full sort)."""
    return magnitude_trim_(tau.clone(), density, exact)


def magnitude_trim_(tau: Tensor, density: float, exact: bool = True) -> Tensor:
    """In-place :func:`magnitude_trim` (the streaming engine owns its task vectors; saves one copy).

    Threshold ``t_k`` = the k-th largest ``|τ|`` (:func:`deltatune.ops.topk.kth_largest_abs`, exact,
    no sort); ``exact`` (``k = max(1, ⌊ρ·n⌋)``) keeps everything above it and then the first entries equal to it in
    flat order until ``k`` are kept; otherwise (``k`` = :func:`threshold_count`) every entry ``≥ t_k``.
    """
    k = keep_count(tau.numel(), density) if exact else threshold_count(tau.numel(), density)
    if k >= tau.numel():
        return tau
    flat = tau.view(-1)
    top = kth_largest_abs(flat, k)
    trim_below_(flat, top.threshold, keep_ties=k - top.above if exact else None, ties=top.ties)
    return tau


def dare(tau: Tensor, density: float, generator: torch.Generator | None = None,
         rescale: Literal["inverse", "l1", "none"] = "inverse") -> Tensor:
    """Drop-and-rescale: ``τ̃ = m ⊙ τ · s`` with ``m ~ Bernoulli(ρ)`` (a new tensor; see :func:`dare_`)."""
    return dare_(tau.clone(memory_format=torch.contiguous_format), density, generator, rescale)


def dare_(tau: Tensor, density: float, generator: torch.Generator | None = None,
          rescale: Literal["inverse", "l1", "none"] = "inverse") -> Tensor:
    """In-place drop-and-rescale of a contiguous ``τ``: ``τ ← m ⊙ τ · s``, ``m_i = [u_i < ρ]``, ``u ~ U[0, 1)``.

    ``s = 1/ρ`` (``inverse``, the paper: ``E[τ̃] = τ``), ``s = ‖τ‖₁ / ‖m⊙τ‖₁`` (``l1``, mergekit) or 1.
    ``u`` is drawn in fp32 on the CPU from ``generator``, chunk by chunk (the same stream as one
    ``torch.rand(τ.shape)``), so results do not depend on device or execution order when each tensor
    gets its own seeded generator.  The mask is applied as a 0/1 factor, so a dropped entry becomes
    ``±0``; ``‖·‖₁`` is summed per chunk while the chunk is in cache.
    """
    _check_density(density)
    flat = tau.view(-1)
    uniform = torch.empty(min(CHUNK, flat.numel()), dtype=torch.float32)
    before = after = 0.0
    for chunk in chunks(flat):
        u = torch.rand(chunk.numel(), generator=generator, out=uniform[:chunk.numel()])
        if rescale == "l1":
            before += float(chunk.abs().sum())
        chunk.mul_(torch.lt(u, density, out=u).to(chunk.device))  # u ← [u < ρ] as 0/1
        if rescale == "inverse":
            chunk.div_(density)
        elif rescale == "l1":
            after += float(chunk.abs().sum())
    return l1_rescale_(tau, before, after) if rescale == "l1" else tau


def l1_norm(tensor: Tensor) -> float:
    """``‖τ‖₁``, summed chunk by chunk (:func:`~deltatune.ops.topk.chunks`) into a Python float."""
    return sum(float(chunk.abs().sum()) for chunk in chunks(tensor.reshape(-1)))


def l1_rescale_(masked: Tensor, before: float, after: float | None = None) -> Tensor:
    """``m⊙τ ← (m⊙τ)·‖τ‖₁/‖m⊙τ‖₁`` in place, given ``before = ‖τ‖₁`` (``after`` computed when not given).

    mergekit's ``rescale: true`` (``rescaled_masked_tensor`` with ``RescaleNorm.l1``) after any of its masks
    (TIES' top-k, Breadcrumbs' band, DARE, DELLA): the sparsified task vector keeps the dense one's L1 norm,
    so the merged update does not shrink with the density.  Like mergekit, a tensor whose norm before or
    after the mask is below :data:`L1_EPS` is left unscaled (no blow-up of a near-zero update).
    """
    after = l1_norm(masked) if after is None else after
    if after >= L1_EPS and before >= L1_EPS:
        masked.mul_(before / after)
    return masked


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
