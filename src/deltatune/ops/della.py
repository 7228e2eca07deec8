"""DELLA MagPrune: magnitude-ranked random drop of one task vector ``δ``.

Deep, Bhardwaj & Poria, "DELLA-Merging: Reducing Interference in Model Merging through
Magnitude-Based Sampling", arXiv 2406.11617 (repo declare-lab/della).  Ranked along axis 1 as mergekit 0.1.5's
``della_magprune`` ranks (``argsort(dim=1)``): the rows of a matrix, and for a tensor of 3 or more dims each
line along its second axis (a conv kernel's input channels, not its last spatial axis); a 1-D tensor is one
row, a 0-d tensor a row of one:

* rank ``|δ|`` ascending, ``r_i ∈ {0, …, n−1}``, ``r̃_i = r_i/(n − 1)`` (``r̃ = ½`` for a row of one, where
  the reference divides 0 by 0);
* keep probability ``p_i = (ρ − ε) + 2ε·r̃_i`` (mean ``ρ``; ``ε = 0`` is DARE);
* ``m_i ~ Bernoulli(p_i)``;
* rescale ``"inverse_p"``: ``δ̂_i = m_i δ_i / p_i`` (the authors' code, ``E[δ̂] = δ``), ``"l1"``:
  ``δ̂ = (m ⊙ δ)·‖δ‖₁/‖m ⊙ δ‖₁`` over the whole tensor (mergekit 0.1.5 ``della``), or ``"none"``: ``m ⊙ δ``
  (mergekit's ``rescale: false``).

Merging then runs TIES sign election + disjoint merge and ``θ = θ₀ + λ·τ_m`` (the caller's job).
The uniforms are drawn in fp32 on the CPU from ``generator`` (as :func:`deltatune.ops.sparsify.dare`),
so a per-tensor seeded generator makes the mask reproducible on any device.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from deltatune.errors import ConfigError
from deltatune.ops.sparsify import l1_norm, l1_rescale_, require_finite

#: the axis magnitudes are ranked along in a tensor of ≥ 2 dims (mergekit's ``argsort(magnitudes, dim=1)``)
RANK_AXIS = 1


def _check(density: float, epsilon: float) -> None:
    if not 0.0 < density <= 1.0:
        raise ConfigError(f"DELLA density must be in (0, 1], got {density}")
    if not (math.isfinite(epsilon) and epsilon >= 0.0):
        raise ConfigError(f"DELLA epsilon must be ≥ 0, got {epsilon}")
    if epsilon > 0 and not (density - epsilon > 0.0 and density + epsilon < 1.0):
        raise ConfigError(f"DELLA needs density ± epsilon inside (0, 1); got density={density}, epsilon={epsilon} "
                          f"→ [{density - epsilon:g}, {density + epsilon:g}]")


def della_keep_probabilities(tau: Tensor, density: float, epsilon: float) -> Tensor:
    """``p_i = (ρ − ε) + 2ε·r̃_i`` with ``r̃_i`` the normalised ascending rank of ``|τ_i|`` along
    :data:`RANK_AXIS` (fp32)."""
    _check(density, epsilon)
    require_finite(tau, "DELLA task vector")
    if tau.numel() == 0:
        return torch.empty(tau.shape, dtype=torch.float32)
    mags = tau.detach().abs().float()
    axis = RANK_AXIS if tau.dim() >= 2 else -1
    lines = mags.reshape(1) if tau.dim() == 0 else mags.movedim(axis, -1)
    width = lines.shape[-1]
    if width == 1:
        rank_norm = torch.full_like(lines, 0.5)
    else:
        rank_norm = lines.argsort(dim=-1).argsort(dim=-1).float() / (width - 1)
    probs = (density - epsilon) + 2 * epsilon * rank_norm
    return probs.reshape(tau.shape) if tau.dim() == 0 else probs.movedim(-1, axis).contiguous()


def della(tau: Tensor, density: float, epsilon: float, generator: torch.Generator | None = None,
          rescale: Literal["inverse_p", "l1", "none"] = "inverse_p") -> Tensor:
    """DELLA MagPrune of one tensor (fp32); see the module docstring for the formula and the three rescales."""
    if rescale not in ("inverse_p", "l1", "none"):
        raise ConfigError(f"DELLA rescale must be 'inverse_p', 'l1' or 'none', got {rescale!r}")
    probs = della_keep_probabilities(tau, density, epsilon)
    x = tau.float()
    if x.numel() == 0:
        return x.clone()
    uniform = torch.rand(x.shape, generator=generator, dtype=torch.float32).to(x.device)
    probs = probs.to(x.device)
    keep = uniform < probs
    kept = torch.where(keep, x, torch.zeros_like(x))
    if rescale == "inverse_p":
        return kept / probs
    if rescale == "none":
        return kept
    return l1_rescale_(kept, l1_norm(x))
