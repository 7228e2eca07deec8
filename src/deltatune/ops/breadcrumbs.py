"""Model Breadcrumbs: drop the largest outliers *and* the small tail of one task vector ``τ``.

Davari & Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks",
ECCV 2024, arXiv 2312.06795.  Two scopes exist and both are offered:

* ``scope="row"`` — the paper / authors' code: masks along the **last dimension** (each row of a
  matrix, the whole vector of a 1-D tensor; a 0-d tensor is left untouched).  In a row of length
  ``n``: zero the ``⌊γ·n⌋`` entries of largest ``|τ|``, then keep the ``⌊β·n⌋`` largest of what
  remains (``β`` = ``density``).  When ``⌊β·n⌋`` exceeds what remains, every remaining entry is kept
  (fewer than ``β·n``); when ``⌊β·n⌋ = 0`` the whole row is zeroed — both exactly as the authors' code.
* ``scope="tensor"`` — mergekit 0.1.5 ``magnitude_outliers``: the flattened tensor, ranks ascending
  by ``|τ|``; ``k = ⌊ρ·n⌋`` kept, ``n_top = ⌊γ·n⌋``, ``n_bot = max(0, n − k − n_top)`` smallest removed,
  ranks ``[n_bot, n_bot + k)`` kept.  So ``density`` is always met, and fewer than ``n_top`` outliers
  are removed when ``ρ + γ > 1``.  ``⌊γ·n⌋ = 0`` removes no outlier (the pre-0.1.5 mergekit bug
  zeroed everything there).  Like mergekit, no "keep at least one" floor: ``⌊ρ·n⌋ = 0`` zeroes all.

Both use ``topk`` (no full sort of the tensor).  Ties in ``|τ|`` are broken by ``topk``'s order.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from deltatune.errors import ConfigError
from deltatune.ops.sparsify import require_finite

Scope = Literal["row", "tensor"]


def _check(tau: Tensor, density: float, gamma: float, scope: str) -> None:
    if not 0.0 < density <= 1.0:
        raise ConfigError(f"breadcrumbs density (fraction kept) must be in (0, 1], got {density}")
    if not 0.0 <= gamma < 1.0:
        raise ConfigError(f"breadcrumbs gamma (fraction of largest |τ| removed) must be in [0, 1), got {gamma}")
    if scope not in ("row", "tensor"):
        raise ConfigError(f"breadcrumbs scope must be 'row' or 'tensor', got {scope!r}")
    require_finite(tau, "breadcrumbs task vector")


def _middle_mask(mags: Tensor, n_remove: int, n_keep: int) -> Tensor:
    """Per row of ``mags`` (``(rows, n)``, values ≥ 0): drop the ``n_remove`` largest, keep the ``n_keep``
    largest of the rest (two unsorted ``topk`` calls)."""
    keep = torch.zeros_like(mags, dtype=torch.bool)
    n_keep = min(n_keep, mags.shape[-1] - n_remove)
    if n_keep <= 0:
        return keep
    work = mags
    if n_remove > 0:
        work = mags.clone()
        outliers = work.topk(n_remove, dim=-1, sorted=False).indices
        work.scatter_(-1, outliers, -1.0)  # magnitudes are ≥ 0, so removed entries rank below every survivor
    keep.scatter_(-1, work.topk(n_keep, dim=-1, sorted=False).indices, True)
    return keep


def _row_mask(mags: Tensor, density: float, gamma: float) -> Tensor:
    """Paper: per row of length ``n`` drop ``⌊γ·n⌋``, keep ``⌊β·n⌋`` of the rest."""
    n = mags.shape[-1]
    return _middle_mask(mags, math.floor(gamma * n), math.floor(density * n))


def _tensor_mask(mags: Tensor, density: float, gamma: float) -> Tensor:
    """mergekit 0.1.5 on flat magnitudes: ascending ranks ``[n_bot, n_bot + k)`` kept, i.e. the
    ``n − n_bot − k`` largest dropped and the next ``k`` kept."""
    n = mags.numel()
    k = math.floor(density * n)
    n_top = math.floor(gamma * n)
    n_bot = max(0, n - k - n_top)
    return _middle_mask(mags.view(1, -1), n - n_bot - k, k).view(-1)


def breadcrumbs_mask(tau: Tensor, density: float, gamma: float, scope: Scope = "row") -> Tensor:
    """Boolean mask (shape of ``tau``) of the entries Breadcrumbs keeps; see the module docstring."""
    _check(tau, density, gamma, scope)
    if tau.numel() == 0:
        return torch.zeros_like(tau, dtype=torch.bool)
    mags = tau.detach().abs().float()
    if scope == "tensor":
        return _tensor_mask(mags.reshape(-1), density, gamma).view(tau.shape)
    if tau.dim() == 0:
        return torch.ones_like(tau, dtype=torch.bool)
    rows = mags.reshape(-1, tau.shape[-1])
    return _row_mask(rows, density, gamma).view(tau.shape)


def breadcrumbs(tau: Tensor, density: float, gamma: float, scope: Scope = "row") -> Tensor:
    """``τ ⊙ m`` with ``m = breadcrumbs_mask(τ, ρ, γ, scope)`` (fp32).  Merging then sums the masked
    task vectors (``θ = θ₀ + α·Σ_t τ̂_t``, paper) or runs TIES' sign election on them (mergekit
    ``breadcrumbs_ties``); that is the caller's job."""
    mask = breadcrumbs_mask(tau, density, gamma, scope)
    tau = tau.float()
    return torch.where(mask, tau, torch.zeros_like(tau))
