"""SaRA: progressive Sparse low-Rank Adaptation (Hu et al., "SaRA: High-Efficient Diffusion Model Fine-tuning
with Progressive Sparse Low-Rank Adaptation", ICLR 2025).

The trained entries of each target matrix are its "ineffective" ones: ``|W₀| < threshold``, or the smallest
``fraction`` of ``|W₀|`` (then ``threshold_l`` is the largest chosen ``|W₀|``).  The delta is a sparse part at
those entries (values 0 at init); the optimiser (:class:`SparseAdamW`) holds state only for them.

* **Nuclear-norm penalty:** each step one target matrix (drawn among those whose short side is greater than
  ``nuclear_min_dim``, the reference's 64) adds ``λ‖W ⊙ M‖_*`` to the loss through the part's auxiliary loss: the
  nuclear norm of the masked *weights* ``W₀ + ΔW`` on the trained entries ``M``, as the reference code computes it
  (not of ``ΔW``, which is 0 at the start, where the SVD's subgradient ``U Vᵀ`` would be an arbitrary identity).
  Its gradient reaches only the trained values: ``λ·(U Vᵀ)[M]``.
* **Progressive reselection:** after ``progressive_step`` steps the mask is recomputed on the current weights:
  entries whose ``|W₀ + ΔW|`` grew past ``threshold_l`` stop training (their trained value stays in the delta);
  the others keep training and keep their Adam moments (the reference re-creates the optimiser and skips that
  step; per-element ages make that unnecessary here).

Differences of scope from the reference (diffusion U-Nets): the targets are every linear weight by default (the
reference takes every tensor handed to its optimiser; ``targets`` widens it, e.g. to convolutions); the selection
defaults to the smallest ``fraction = 0.01`` of each matrix, since SaRA's ``threshold = 2e-3`` was set for diffusion
weights' scales (give ``threshold`` for the reference's rule); the default LR is a fixed 5e-4, the reference's
``1e-3·exp(−350·threshold)`` at its 2e-3, not recomputed for another threshold; weight decay is the run's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from deltatune.config import require, seed_option
from deltatune.errors import ConfigError
from deltatune.methods.lift import require_sparse_adamw
from deltatune.methods.registry import Method, TrainHook, register_method
from deltatune.methods.sparse_optim import SparseAdamW
from deltatune.methods.targets import one_per_weight, select_modules
from deltatune.model import get_module
from deltatune.parts.layers import LayerKind, layer_kind
from deltatune.parts.sparse import SparsePart


@dataclass
class SaraConfig:
    method: ClassVar[str] = "sara"
    targets: list[str] = field(default_factory=lambda: ["all-linear"], metadata={"help": "module-name patterns"})
    fraction: float = field(default=0.01, metadata={"help": "train the smallest fraction of |W| of each matrix "
                                                            "(ignored when threshold is set)"})
    threshold: float | None = field(default=None, metadata={"help": "train the entries with |W| < threshold "
                                                                    "(SaRA's 2e-3 for diffusion models)"})
    nuclear_weight: float = field(default=5e-4, metadata={"help": "λ of the nuclear-norm penalty λ‖W ⊙ M‖_* "
                                                                  "(0: off)"})
    nuclear_min_dim: int = field(default=64, metadata={"help": "penalise only matrices whose short side is > this"})
    progressive_step: int = field(default=2500, metadata={"help": "reselect the trained entries after this many "
                                                                  "steps (0: never)"})
    seed: int = seed_option("seed of the per-step draw of the penalised matrix")

    def __post_init__(self) -> None:
        require(0.0 < self.fraction <= 1.0, f"sara config.fraction must be in (0, 1], got {self.fraction}")
        require(self.threshold is None or (math.isfinite(self.threshold) and self.threshold > 0),
                f"sara config.threshold must be > 0, got {self.threshold}")
        require(math.isfinite(self.nuclear_weight) and self.nuclear_weight >= 0,
                f"sara config.nuclear_weight must be ≥ 0, got {self.nuclear_weight}")
        require(self.nuclear_min_dim >= 1, f"sara config.nuclear_min_dim must be ≥ 1, got {self.nuclear_min_dim}")
        require(self.progressive_step >= 0, f"sara config.progressive_step must be ≥ 0, got {self.progressive_step}")


def nuclear_norm(matrix: Tensor) -> Tensor:
    """``‖X‖_* = Σ σᵢ(X)`` of a weight-shaped ``X`` as a ``(shape[0], rest)`` matrix (fp32; differentiable, with the
    subgradient ``U Vᵀ`` at rank-deficient points)."""
    return torch.linalg.matrix_norm(matrix.float().reshape(matrix.shape[0], -1), ord="nuc")


def small_entries(weight: Tensor, fraction: float, threshold: float | None) -> tuple[Tensor, float]:
    """``(sorted flat indices, threshold_l)`` of the "ineffective" entries of ``weight``: ``|w| < threshold``,
    or the ``max(1, ⌊fraction·n⌋)`` smallest ``|w|`` with ``threshold_l`` the largest of them."""
    mags = weight.detach().reshape(-1).abs().float()
    if threshold is not None:
        return (mags < threshold).nonzero().reshape(-1), float(threshold)
    k = max(1, math.floor(fraction * mags.numel()))
    picked = mags.topk(k, largest=False)
    return picked.indices.sort().values, float(picked.values.max())


class SaRAPart(SparsePart):
    """A sparse part that, while training, may add ``λ‖W ⊙ M‖_*`` as its auxiliary loss (when its schedule
    draws it for the step and hands it ``W₀`` at its entries, :attr:`masked_base`).  Saved, merged and composed
    exactly like a sparse part."""

    kind = "sara"
    has_aux_loss = True
    sum_family = SparsePart  # stored as a sparse part is (indices, values): sums with sparse parts into one

    def __init__(self, weight_shape: tuple[int, ...], indices: Tensor, layer: LayerKind = LayerKind.LINEAR,
                 dtype: torch.dtype = torch.float32, nuclear_weight: float = 0.0) -> None:
        super().__init__(weight_shape, indices, layer, dtype)
        self.nuclear_weight = nuclear_weight
        self.penalize = False  # set per step by the schedule (SaraSchedule)
        #: the positions in :attr:`values` of the entries still trained (the mask ``M``), ``None``: all of them;
        #: set by the schedule with :attr:`penalize`
        self.trained: Tensor | None = None
        #: ``W₀.flat`` at the trained entries (fp32) while :attr:`penalize` is set; ``None`` otherwise
        self.masked_base: Tensor | None = None

    def aux_loss(self) -> Tensor | None:
        """``λ‖W ⊙ M‖_*`` with ``W = W₀ + ΔW`` and ``M`` the entries still trained: after the progressive
        reselection, only those that stayed small (SaRA's ``current_mask``), not those frozen since."""
        if not (self.penalize and self.nuclear_weight and self.training and torch.is_grad_enabled()):
            return None
        if self.masked_base is None:
            raise ConfigError("sara part: the penalty needs the base weight at its entries (SaraSchedule sets it)")
        indices, values = self.indices, self.values
        if self.trained is not None:
            indices, values = indices.index_select(0, self.trained), values.index_select(0, self.trained)
        flat = torch.zeros(self.numel_base, dtype=torch.float32, device=self.values.device)
        masked = flat.index_add(0, indices, self.masked_base + values.float()).view(self.weight_shape)
        return self.nuclear_weight * nuclear_norm(masked)


@register_method
class Sara(Method):
    name = "sara"
    config_cls = SaraConfig
    summary = "SaRA: train the smallest-|W| entries, nuclear-norm penalty on W ⊙ M, progressive reselection"
    part_kinds = (SaRAPart,)
    examples = {"": {"fraction": 0.05, "progressive_step": 2, "nuclear_weight": 1e-3},
                "threshold": {"threshold": 0.01, "progressive_step": 0}}
    default_lr = 5e-4  # SaRA's 1e-3·exp(−350·threshold) at threshold 2e-3

    def create_parts(self, model: nn.Module, config: SaraConfig, exclude: list[str]) -> dict[str, SaRAPart]:
        parts = {}
        for name in one_per_weight(model, select_modules(model, config.targets, exclude)):  # one part per tensor
            module = get_module(model, name)
            indices, _ = small_entries(module.weight, config.fraction, config.threshold)
            if indices.numel():
                parts[name] = SaRAPart(tuple(module.weight.shape), indices, layer_kind(module),
                                       nuclear_weight=config.nuclear_weight)
        if not parts:
            raise ConfigError(f"sara config.threshold {config.threshold} selects no entry of the targets "
                              f"{config.targets}")
        return parts

    def optimizer(self, params, lr, weight_decay, config):
        return SparseAdamW(params, lr=lr, weight_decay=weight_decay)

    def hooks(self, model, delta, config: SaraConfig, optimizer, total_steps, grad_accum) -> list[TrainHook]:
        return [SaraSchedule(model, delta.parts, optimizer, config)]


class SaraSchedule(TrainHook):
    """Draws the penalised matrix of each step; reselects the trained entries after ``progressive_step`` steps."""

    def __init__(self, model: nn.Module, parts: dict[str, SaRAPart], optimizer: Any, config: SaraConfig) -> None:
        self.model, self.parts, self.config = model, dict(parts), config
        self.optimizer = require_sparse_adamw(optimizer, "sara")
        self.eligible = [n for n, p in self.parts.items()
                         if min(p.weight_shape[0], math.prod(p.weight_shape[1:])) > config.nuclear_min_dim]
        self.limits = {n: small_entries(get_module(model, n).weight, config.fraction, config.threshold)[1]
                       for n in self.parts}
        self.active: dict[str, Tensor] | None = None

    def before_step(self, step: int) -> None:
        chosen = None
        if self.eligible and self.config.nuclear_weight:
            gen = torch.Generator().manual_seed(self.config.seed * 1_000_003 + step)
            chosen = self.eligible[int(torch.randint(len(self.eligible), (1,), generator=gen))]
        for name, part in self.parts.items():
            part.penalize = name == chosen
            part.masked_base = part.trained = None
        if chosen is not None:
            part = self.parts[chosen]
            part.trained = None if self.active is None else self.active[chosen]
            indices = part.indices if part.trained is None else part.indices.index_select(0, part.trained)
            weight = get_module(self.model, chosen).weight.detach()
            part.masked_base = weight.reshape(-1).index_select(0, indices).float()

    def after_step(self, step: int) -> None:
        if self.config.progressive_step and step == self.config.progressive_step:
            self.reselect()

    @torch.no_grad()
    def reselect(self) -> None:
        """Keep training only the entries whose current ``|W₀ + ΔW|`` is still within their matrix's threshold."""
        strict = self.config.threshold is not None
        self.active = {}
        for name, part in self.parts.items():
            w = get_module(self.model, name).weight.detach().reshape(-1).index_select(0, part.indices).float()
            mags = (w + part.values.detach().float()).abs()
            small = mags < self.limits[name] if strict else mags <= self.limits[name]
            self.active[name] = small.nonzero().reshape(-1)
            self.optimizer.set_active(part.values, self.active[name])

    def state_dict(self) -> dict[str, Any]:
        return {"active": None if self.active is None else {n: a.cpu() for n, a in self.active.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["active"] is None:
            self.active = None
            return
        self.active = {}
        for name, positions in state["active"].items():
            part = self.parts[name]
            self.active[name] = positions.to(part.values.device, torch.int64)
            self.optimizer.forget(part.values)
            self.optimizer.set_active(part.values, self.active[name])
