"""Merge task vectors ``τ_t`` of one tensor (pure functions; streaming planners call them per tensor).

* :func:`task_arithmetic` — ``τ = λ·Σ_t w_t τ_t`` (÷ ``Σ w_t`` with ``normalize``); Ilharco et al.,
  ICLR 2023.  Negation is a negative weight.
* :func:`elect_sign` — ``γ = sgn(Σ_t w_t τ_t)`` (TIES "mass" rule); coordinates whose sum is exactly 0
  get ``+1`` (mergekit) or the majority sign of the tensor (the TIES authors resolve it globally).
* :func:`disjoint_merge` — per coordinate, average (weighted, over the agreeing models only) the
  entries whose sign equals ``γ``; ``normalize=False`` sums them.
* :func:`consensus_merge` — the two above fused into float arithmetic (the streaming engine's kernel).
* :func:`ties` — trim (:func:`magnitude_trim`) → elect → disjoint merge → ``λ``; Yadav et al.,
  NeurIPS 2023.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from deltatune.errors import ConfigError
from deltatune.ops.sparsify import magnitude_trim, stack_task_vectors


def _weights(n: int, weights: Sequence[float] | None) -> list[float]:
    if weights is None:
        return [1.0] * n
    if len(weights) != n:
        raise ConfigError(f"{len(weights)} weights for {n} task vectors")
    return [float(w) for w in weights]


def task_arithmetic(taus: Sequence[Tensor], weights: Sequence[float] | None = None, lam: float = 1.0,
                    normalize: bool = False) -> Tensor:
    stacked = stack_task_vectors(taus)
    w = torch.tensor(_weights(len(taus), weights)).view(-1, *[1] * (stacked.dim() - 1))
    total = (w * stacked).sum(0)
    if normalize:
        denom = float(w.sum())
        if denom == 0:
            raise ConfigError("normalize=True but the weights sum to 0")
        total = total / denom
    return lam * total


def _tie_fill(sign: Tensor, rule: str) -> float:
    if rule == "plus":
        return 1.0
    return -1.0 if float(sign.sum()) < 0 else 1.0


def elect_sign(weighted: Tensor | Sequence[Tensor], zero: Literal["plus", "majority"] | float = "plus") -> Tensor:
    """``γ`` from the (stacked or listed) weighted task vectors; values in {−1, +1}.

    ``zero`` fills coordinates whose sum is exactly 0: ``plus`` (+1, mergekit), ``majority`` (the
    majority sign of this tensor) or a given sign (the model-wide majority from a streaming pass).
    """
    total = torch.zeros_like(weighted[0], dtype=torch.float32)
    for t in weighted:
        total.add_(t)
    sign = torch.sign(total)
    fill = float(zero) if not isinstance(zero, str) else _tie_fill(sign, zero)
    return sign.masked_fill_(sign == 0, fill)


def disjoint_merge(stacked: Tensor | Sequence[Tensor], sign: Tensor, weights: Sequence[float] | None = None,
                   normalize: bool = True, divide: Literal["weights", "count"] = "weights",
                   mask_weighted: bool = False) -> Tensor:
    """``Σ_{t∈A} w_t τ_t / D`` over ``A = {t : sgn(τ_t) = γ, τ_t ≠ 0}``.

    ``D = Σ_{t∈A} w_t`` (``divide="weights"``; no division when ``normalize`` is false) or ``|A|``
    (``"count"``, PEFT); ``D = 0`` divides by 1.  ``mask_weighted`` tests ``sgn(w_t τ_t)`` instead of
    ``sgn(τ_t)`` (mergekit weighs before voting, so a negative weight flips membership).  Accumulates
    task by task: temporaries stay at a few copies of one tensor.
    """
    w = _weights(len(stacked), weights)
    total = torch.zeros_like(stacked[0], dtype=torch.float32)
    denom = torch.zeros_like(total)
    for wt, t in zip(w, stacked, strict=True):
        signed = torch.sign(t) if not (mask_weighted and wt < 0) else -torch.sign(t)
        agree = (signed == sign).to(total.dtype)  # sign is ±1, so zeros never agree
        total.addcmul_(t, agree, value=wt)
        denom.add_(agree, alpha=1.0 if divide == "count" else wt)
    if divide == "weights" and not normalize:
        return total
    return total.div_(denom.masked_fill_(denom == 0, 1.0))


def consensus_merge(parts: Sequence[Tensor], weights: Sequence[float] | None = None, fill: float = 1.0,
                    normalize: bool = True, divide: Literal["weights", "count"] = "weights",
                    weighted_vote: bool = False, out: Tensor | None = None) -> Tensor:
    """:func:`elect_sign` then :func:`disjoint_merge`, fused, with the same values (tested bit for bit).

    ``γ = sgn(Σ_t v_t)`` with ``v_t = w_t τ_t`` (``weighted_vote``, mergekit) or ``τ_t``, and zero sums
    filled with ``fill``; then ``y_t = max(γ·v_t, 0)`` is ``|v_t|`` exactly where ``t`` agrees, so
    ``Σ_{t∈A} w_t τ_t = γ·Σ_t (y_t or w_t·y_t)`` and ``|A|`` or ``Σ_{t∈A} w_t`` accumulate ``sgn(y_t)``.
    Only float arithmetic (no boolean masks, which are several times slower on CPU); the result goes
    to ``out`` when given (it may alias ``parts[0]``, which is read first).
    """
    w = _weights(len(parts), weights)
    votes = parts if not weighted_vote or all(x == 1.0 for x in w) else [p * x for p, x in zip(parts, w, strict=True)]
    sign = votes[0] + votes[1] if len(votes) > 1 else votes[0].float().clone()
    for v in votes[2:]:
        sign.add_(v)
    sign.sign_()
    sign.add_(sign.abs().sub_(1.0).mul_(-float(fill)))  # zero sums → fill
    total = torch.zeros_like(sign)
    denom = torch.zeros_like(sign)
    for p, v, wt in zip(parts, votes, w, strict=True):
        agreeing = (v if weighted_vote else p) * sign
        agreeing.clamp_(min=0.0)
        denom.add_(agreeing.sign(), alpha=1.0 if divide == "count" else wt)
        total.add_(agreeing if weighted_vote or wt == 1.0 else agreeing.mul_(wt))
    if divide == "weights" and not normalize:
        result = total.mul_(sign)
        return result if out is None else out.copy_(result)
    denom.add_(denom.sign().abs_().sub_(1.0).neg_())  # D = 0 → 1
    return torch.div(total, denom, out=out).mul_(sign)


def ties(taus: Sequence[Tensor], density: float = 0.2, weights: Sequence[float] | None = None,
         lam: float = 1.0, preset: Literal["mergekit", "paper"] = "mergekit") -> Tensor:
    """TIES on one tensor.

    ``mergekit``: exact top-k per tensor, weights applied before the sign vote, zero sums → +1,
    weighted disjoint mean.  ``paper``: threshold trim (ties keep extra entries), unweighted vote,
    zero sums → the majority sign, plain disjoint mean (the authors trim and resolve signs over the
    whole model; the streaming engine supplies that scope).
    """
    stacked = stack_task_vectors(taus)
    exact = preset == "mergekit"
    trimmed = torch.stack([magnitude_trim(t, density, exact=exact) for t in stacked])
    w = _weights(len(taus), weights if preset == "mergekit" else None)
    wv = torch.tensor(w).view(-1, *[1] * (stacked.dim() - 1))
    sign = elect_sign(trimmed * wv, zero="plus" if preset == "mergekit" else "majority")
    return lam * disjoint_merge(trimmed, sign, w, normalize=True, mask_weighted=exact)
