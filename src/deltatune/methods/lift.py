"""LIFT: Low-rank Informed sparse Fine-Tuning (Liu et al., "LIFT the Veil for the Truth: Principal Weights
Emerge after Rank Reduction for Reasoning-Focused SFT", ICML 2025).

For each target matrix ``W`` (``d_out × d_in``) the trained entries ("Principal Weights") are the top-``k`` of
``|W'|``, where ``W' = U_r Σ_r V_rᵀ`` is the rank-``r`` (``filter_rank``) approximation of the *current*
effective weight ``W + ΔW``; ``k = min((d_out + d_in)·lora_rank, d_out·d_in)`` matches a rank-``lora_rank``
LoRA (or ``k = density·d_out·d_in``).  Every ``update_interval`` steps the mask is recomputed.

The delta is a sparse part over every entry that was ever in the mask: an entry that leaves the mask keeps its
trained value (in LIFT the weights are updated in place) but stops training.  The optimiser
(:class:`SparseAdamW`) holds moments only for the entries of the current mask; an entry that enters later
starts at age 0, so its bias correction is its own (LIFT's reference code keeps a global step instead).
Defaults are scaled for small models: LIFT's LLM scripts use ``k = (m + n)·128``, a filter rank of 64–128 and a
refresh every 400 steps; on MiniLM (384-wide matrices) a rank-128 budget would train two thirds of each matrix, so
``lora_rank`` and ``filter_rank`` default to 8 and the refresh to every 100 steps.  The learning rate defaults to
5e-4, as SpIEL's, not the scripts' 1e-4–2e-4: at 2e-4 the entries barely move in a few hundred steps on MiniLM
(SST-2 at LoRA r=8's count, 300 steps, seed 0: 0.768 at 2e-4, 0.806 at 5e-4, 0.821 at 1e-3;
``benchmarks/results/glue_lr_probe.runs.jsonl``).  On an LLM, pass the scripts' rate with ``--lr``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from deltatune.config import require
from deltatune.errors import ConfigError
from deltatune.methods.registry import Method, TrainHook, register_method, unwrap_optimizer
from deltatune.methods.sparse_optim import SparseAdamW
from deltatune.methods.targets import one_per_weight, select_modules
from deltatune.model import get_module
from deltatune.parts.layers import LayerKind, layer_kind
from deltatune.parts.sparse import SparsePart, effective_weight


@dataclass
class LiftConfig:
    method: ClassVar[str] = "lift"
    targets: list[str] = field(default_factory=lambda: ["all-linear"],
                               metadata={"help": "module-name patterns (Linear/Conv1D; default every block Linear)"})
    lora_rank: int = field(default=8, metadata={"help": "budget: k = (d_out + d_in)·lora_rank entries per matrix"})
    density: float | None = field(default=None, metadata={"help": "budget as a fraction of each matrix (overrides "
                                                                  "lora_rank)"})
    filter_rank: int = field(default=8, metadata={"help": "r: rank of the approximation whose top-|·| entries "
                                                          "are trained"})
    update_interval: int = field(default=100, metadata={"help": "steps between mask refreshes (0: never)"})
    svd: Literal["auto", "full", "randomized"] = field(default="auto", metadata={
        "help": "full SVD, randomized (svd_lowrank, q = 2r), or auto (full up to 2048 on the short side)"})
    niter: int = field(default=2, metadata={"help": "power iterations of the randomized SVD"})
    betas: tuple[float, float] = field(default=(0.9, 0.95), metadata={"help": "Adam betas (LIFT's defaults)"})
    eps: float = field(default=1e-6, metadata={"help": "Adam epsilon"})

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)
        require(self.lora_rank >= 1, f"lift config.lora_rank must be ≥ 1, got {self.lora_rank}")
        require(self.density is None or 0.0 < self.density <= 1.0,
                f"lift config.density must be in (0, 1], got {self.density}")
        require(self.filter_rank >= 1, f"lift config.filter_rank must be ≥ 1, got {self.filter_rank}")
        require(self.update_interval >= 0, f"lift config.update_interval must be ≥ 0, got {self.update_interval}")
        require(self.svd in ("auto", "full", "randomized"), f"lift config.svd must be auto, full or randomized, "
                                                           f"got {self.svd!r}")
        require(self.niter >= 0, f"lift config.niter must be ≥ 0, got {self.niter}")
        require(len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas),
                f"lift config.betas must be two numbers in [0, 1), got {self.betas}")
        require(self.eps > 0, f"lift config.eps must be > 0, got {self.eps}")


def lowrank_approx(w: Tensor, rank: int, svd: str = "auto", niter: int = 2) -> Tensor:
    """``W' = U_r Σ_r V_rᵀ``, the rank-``r`` truncated SVD of the 2-D ``w`` in fp32 (LIFT, Liu et al. 2025, §3).

    ``svd="randomized"`` uses ``torch.svd_lowrank`` with ``q = min(2r, min(shape))`` and ``niter`` power
    iterations (LIFT's "rand" masks); ``"auto"`` takes the exact SVD while the short side is ≤ 2048."""
    w = w.float()
    r = min(rank, min(w.shape))
    if svd == "randomized" or (svd == "auto" and min(w.shape) > 2048):
        u, s, v = torch.svd_lowrank(w, q=min(2 * r, min(w.shape)), niter=niter)
        return (u[:, :r] * s[:r]) @ v[:, :r].T
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r]


def principal_mask(w: Tensor, k: int, rank: int, svd: str = "auto", niter: int = 2) -> Tensor:
    """Sorted flat indices (int64) of the ``k`` entries of largest ``|W'|``, ``W'`` the rank-``r`` approximation
    of ``w`` (any layout: the approximation of ``Wᵀ`` is ``W'ᵀ``, so the chosen entries are the same)."""
    flat = lowrank_approx(w.reshape(w.shape[0], -1), rank, svd, niter).reshape(-1).abs()
    return flat.topk(k, sorted=False).indices.sort().values


def budget(shape: tuple[int, ...], config: LiftConfig) -> int:
    """``k = min((d_out + d_in)·lora_rank, d_out·d_in)``, or ``max(1, ⌊density·d_out·d_in⌋)``."""
    numel = math.prod(shape)
    if config.density is not None:
        return max(1, math.floor(config.density * numel))
    return min((shape[0] + math.prod(shape[1:])) * config.lora_rank, numel)


@register_method
class Lift(Method):
    name = "lift"
    config_cls = LiftConfig
    summary = "LIFT: train the top-k entries of a rank-r approximation of W, mask refreshed every N steps"
    part_kinds = (SparsePart,)
    examples = {"": {"lora_rank": 2, "filter_rank": 2, "update_interval": 2},
                "density": {"density": 0.05, "filter_rank": 4, "update_interval": 0, "svd": "randomized"}}
    default_lr = 5e-4  # not the LLM scripts' 2e-4: see the module docstring

    def create_parts(self, model: nn.Module, config: LiftConfig, exclude: list[str]) -> dict[str, SparsePart]:
        names = select_modules(model, config.targets, exclude, kinds=(LayerKind.LINEAR, LayerKind.CONV1D))
        names = one_per_weight(model, names)  # a tied weight: one part, seen by its other modules as an alias
        parts = {}
        for name in names:
            module = get_module(model, name)
            shape = tuple(module.weight.shape)
            with torch.no_grad():
                mask = principal_mask(module.weight.detach(), budget(shape, config), config.filter_rank, config.svd,
                                      config.niter)
            parts[name] = SparsePart(shape, mask, layer_kind(module))
        return parts

    def optimizer(self, params, lr, weight_decay, config: LiftConfig):
        return SparseAdamW(params, lr=lr, betas=config.betas, eps=config.eps, weight_decay=weight_decay)

    def hooks(self, model, delta, config: LiftConfig, optimizer, total_steps, grad_accum) -> list[TrainHook]:
        if not config.update_interval:
            return []
        return [LiftRefresh(model, delta.parts, optimizer, config, total_steps)]


def require_single_process(method: str) -> None:
    """Refuse a multi-process run: the method re-lays out trainable tensors, which DDP's buckets cannot follow."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise ConfigError(f"{method}: its trainable tensors change shape during training, which DDP does not "
                          "support; run it on one process")


def require_sparse_adamw(optimizer: Any, method: str) -> SparseAdamW:
    optimizer = unwrap_optimizer(optimizer)
    if not isinstance(optimizer, SparseAdamW):
        raise ConfigError(f"{method} needs its own optimizer (SparseAdamW: state only for trained entries), got "
                          f"{type(optimizer).__name__}")
    return optimizer


def swap_values(part: SparsePart, values: Tensor, optimizer: SparseAdamW) -> None:
    """Give ``part`` a new ``values`` leaf holding ``values`` (any length), in the old one's place in ``optimizer``
    (state and active positions kept)."""
    old = part.values
    part.values = nn.Parameter(values, requires_grad=old.requires_grad)
    optimizer.replace_param(old, part.values)


class LiftRefresh(TrainHook):
    """Recompute every part's mask after each ``update_interval`` completed steps (not after the last one)."""

    def __init__(self, model: nn.Module, parts: dict[str, SparsePart], optimizer: Any, config: LiftConfig,
                 total_steps: int) -> None:
        require_single_process("lift")
        self.model, self.parts, self.config = model, dict(parts), config
        self.optimizer = require_sparse_adamw(optimizer, "lift")
        self.total = max(1, total_steps)
        #: ``{part: sorted flat weight indices}`` of the entries trained now
        self.mask = {n: p.indices.detach().long() for n, p in self.parts.items()}
        self.refreshes = 0

    def after_step(self, step: int) -> None:
        if step % self.config.update_interval == 0 and step < self.total:
            self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        cfg = self.config
        for name, part in self.parts.items():
            weight = get_module(self.model, name).weight
            w_eff = effective_weight(weight, part.indices, part.values).float()
            mask = principal_mask(w_eff, budget(part.weight_shape, cfg), cfg.filter_rank, cfg.svd, cfg.niter)
            self._relayout(part, torch.unique(torch.cat([part.indices.long(), mask])), mask, name)
        self.refreshes += 1

    def _relayout(self, part: SparsePart, indices: Tensor, mask: Tensor, name: str) -> None:
        """``part`` over the sorted ``indices`` (a superset of its own; values kept, new ones 0), training ``mask``."""
        values = torch.zeros(indices.numel(), dtype=part.values.dtype, device=part.values.device)
        values[torch.searchsorted(indices, part.indices.long())] = part.values.detach()
        part.indices = indices.to(part.indices.device, part.indices.dtype)  # the part's index dtype (int32/int64)
        swap_values(part, values, self.optimizer)
        self.optimizer.set_active(part.values, torch.searchsorted(indices, mask), old_keys=self.mask[name],
                                  new_keys=mask)
        self.mask[name] = mask

    # --- exact resume ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"refreshes": self.refreshes, "indices": {n: p.indices.detach().cpu() for n, p in self.parts.items()},
                "mask": {n: m.cpu() for n, m in self.mask.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Re-lay out the parts as they were (before the trainable tensors and the optimizer are restored)."""
        self.refreshes = int(state["refreshes"])
        for name, part in self.parts.items():
            indices = state["indices"][name].to(part.indices.device, torch.int64)
            mask = state["mask"][name].to(part.indices.device, torch.int64)
            part.indices = indices.to(part.indices.dtype)
            self.optimizer.forget(part.values)
            swap_values(part, torch.zeros(indices.numel(), dtype=part.values.dtype, device=part.values.device),
                        self.optimizer)
            self.optimizer.set_active(part.values, torch.searchsorted(indices, mask))
            self.mask[name] = mask
