"""Geometric merges of whole weights: SLERP (mergekit) and Model Stock (Jang et al.).

* :func:`slerp` — spherical linear interpolation as mergekit 0.1.5 ``slerp`` does it: the whole tensor
  is one vector; ``u_i = v_i/‖v_i‖`` (a norm ``≤ eps`` counts as 1), ``d = clamp(⟨u₀,u₁⟩, −1, 1)``;
  ``|d| > dot_threshold`` → linear ``(1−t)·v₀ + t·v₁``; else ``Ω = arccos d`` and
  ``sin((1−t)Ω)/sin Ω · v₀ + sin(tΩ)/sin Ω · v₁`` — the coefficients multiply the **unnormalised**
  tensors, so norms are interpolated too.  In a merge the base model is the ``t = 0`` endpoint.
  (Shoemake, "Animating rotation with quaternion curves", SIGGRAPH 1985.)
* :func:`model_stock` — Jang, Yun & Han, "Model Stock: All we need is just a few fine-tuned models",
  ECCV 2024, arXiv 2403.19522: with offsets ``δ_i = w_i − w₀`` of ``N ≥ 2`` fine-tuned weights,
  ``cos θ`` their angle (mean of the pairwise cosines for ``N > 2``, as mergekit 0.1.5),
  ``t = N·cos θ / (1 + (N−1)·cos θ)`` and ``w_H = t·w̄ + (1−t)·w₀`` with ``w̄`` the mean fine-tuned weight.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from deltatune.errors import ConfigError
from deltatune.ops.sparsify import require_finite, stack_task_vectors


def slerp(v0: Tensor, v1: Tensor, t: float, eps: float = 1e-8, dot_threshold: float = 0.9995) -> Tensor:
    """SLERP between ``v0`` (``t = 0``, the base) and ``v1`` (``t = 1``), whole tensor as one vector, fp32
    (fp64 when an input is fp64).  See the module docstring for the formula and the linear fallback."""
    if v0.shape != v1.shape:
        raise ConfigError(f"slerp endpoints have different shapes {tuple(v0.shape)} and {tuple(v1.shape)}")
    if not 0.0 <= t <= 1.0:
        raise ConfigError(f"slerp t must be in [0, 1], got {t}")
    if not 0.0 <= dot_threshold <= 1.0:
        raise ConfigError(f"slerp dot_threshold must be in [0, 1], got {dot_threshold}")
    require_finite(v0, "slerp v0")
    require_finite(v1, "slerp v1")
    dtype = torch.float64 if torch.float64 in (v0.dtype, v1.dtype) else torch.float32
    a, b = v0.to(dtype), v1.to(dtype)
    if a.numel() == 0:
        return (1 - t) * a + t * b
    norm_a = float(torch.linalg.vector_norm(a))
    norm_b = float(torch.linalg.vector_norm(b))
    norm_a = norm_a if norm_a > eps else 1.0
    norm_b = norm_b if norm_b > eps else 1.0
    dot = float(((a / norm_a) * (b / norm_b)).sum())
    dot = min(1.0, max(-1.0, dot))
    if abs(dot) > dot_threshold:
        return (1 - t) * a + t * b
    omega = math.acos(dot)
    sin_omega = math.sin(omega)
    return (math.sin((1 - t) * omega) / sin_omega) * a + (math.sin(t * omega) / sin_omega) * b


def model_stock(base: Tensor, finetuned: Sequence[Tensor], filter_wise: bool = False) -> Tensor:
    """Model Stock merge of one tensor: ``w_H = t·w̄ + (1−t)·w₀``, ``t = N cos θ / (1 + (N−1) cos θ)`` (fp32).

    ``filter_wise=False``: one ``cos θ`` for the flattened tensor.  ``True``: one per row along the last
    dimension (a 1-D or 0-d tensor is one row).  Each pairwise cosine is ``⟨δ_a, δ_b⟩ / max(‖δ_a‖‖δ_b‖, 1e-6)``
    clamped to ``[−1, 1]`` (a zero offset gives ``cos = 0``, hence the base); where
    ``|1 + (N−1)·cos θ| < 1e-6`` there is no finite estimate and the base is returned (mergekit 0.1.5).
    """
    if len(finetuned) < 2:
        raise ConfigError(f"model_stock needs at least 2 fine-tuned tensors, got {len(finetuned)}")
    stacked = stack_task_vectors([base, *finetuned], "model_stock tensors (base + fine-tuned)")
    w0, ws = stacked[0], stacked[1:]
    count = ws.shape[0]
    if filter_wise:
        width = w0.shape[-1] if w0.dim() >= 1 else 1
        rows0 = w0.reshape(-1, width)
        rows = ws.reshape(count, -1, width)
    else:
        rows0 = w0.reshape(1, -1)
        rows = ws.reshape(count, 1, -1)
    offsets = rows - rows0
    norms = torch.linalg.vector_norm(offsets, dim=-1)
    cosines = []
    for i in range(count):
        for j in range(i + 1, count):
            dot = (offsets[i] * offsets[j]).sum(-1)
            cosines.append((dot / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1.0, 1.0))
    cos = torch.stack(cosines).mean(0).unsqueeze(-1)
    denom = 1 + (count - 1) * cos
    singular = denom.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos), count * cos / torch.where(singular, torch.ones_like(denom), denom))
    merged = t * rows.mean(0) + (1 - t) * rows0
    return merged.reshape(w0.shape)
