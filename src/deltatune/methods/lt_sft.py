"""LT-SFT: Lottery-Ticket Sparse Fine-Tuning (Ansell, Ponti, Korhonen, Vulić, "Composable Sparse Fine-Tuning for
Cross-Lingual Transfer", ACL 2022, arXiv 2110.07560), in one training run of three phases:

1. **full fine-tuning** of the target weights for ``full_steps`` optimiser steps: a dense part per target holds
   ``Δ = θ − θ₀`` (the base ``θ₀`` stays frozen, so no copy of it is kept: the delta *is* ``θ − θ₀``);
2. **selection and rewind**: the ``K`` entries with the largest ``|θ − θ₀| = |Δ|`` over all targets at once
   (:func:`top_k_positions`, exact, ties broken by module order then flat position) become the support; every
   value is rewound to ``θ₀`` (``Δ = 0``), the dense parts are replaced by sparse parts on that support, and the
   optimiser starts afresh (the reference builds a new optimiser for each phase);
3. **masked fine-tuning** of those ``K`` entries only (a sparse part: values at sorted flat indices, optimiser
   state only for them, so AdamW's weight decay never moves an entry outside the support).

``K`` is ``num_tunable`` or ``⌊density · Σ numel(target weights)⌋`` (the reference's ``ft_params_proportion`` of
the maskable parameters).  Optional L1 pull toward ``θ₀`` (reference ``full_l1_reg`` / ``sparse_l1_reg``):
``L = λ · Σ |θ − θ₀| / N`` with ``N`` the target entries, added once per optimiser step as its subgradient
``λ · sign(Δ) / N`` (:class:`LTSFTAdamW`).  Task heads train densely in both phases and are not rewound.
The saved delta holds only sparse parts (exactly ``K`` entries).  The learning-rate schedule is the run's one
schedule over both phases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from deltatune.algebra.quantile import RadixSelect
from deltatune.config import require
from deltatune.errors import ConfigError, DeltaFormatError
from deltatune.methods.registry import Method, TrainHook, register_method
from deltatune.methods.targets import select_modules
from deltatune.model import attach_parts, delta_layers, detach, get_module
from deltatune.parts.dense import DensePart
from deltatune.parts.layers import layer_kind
from deltatune.parts.sparse import SparsePart


@dataclass
class LTSFTConfig:
    method: ClassVar[str] = "lt-sft"
    density: float = field(default=0.01, metadata={"help": "K as a fraction of the target weights' entries"})
    num_tunable: int | None = field(default=None, metadata={"help": "K as an exact count (overrides density)"})
    targets: list[str] = field(default_factory=lambda: ["all-linear"],
                               metadata={"help": "module-name patterns (all-linear, type:Embedding, …)"})
    full_steps: int | None = field(default=None, metadata={"help": "phase-1 (full fine-tuning) optimiser steps "
                                                                   "(default: full_fraction of the run)"})
    full_fraction: float = field(default=0.5, metadata={"help": "phase-1 share of the run's steps, in (0, 1)"})
    l1_full: float = field(default=0.0, metadata={"help": "L1 pull toward the base in phase 1 (λ)"})
    l1_sparse: float = field(default=0.0, metadata={"help": "L1 pull toward the base in phase 3 (λ)"})

    def __post_init__(self) -> None:
        require(isinstance(self.density, float | int) and 0.0 < self.density <= 1.0,
                f"lt-sft config.density must be in (0, 1], got {self.density}")
        require(self.num_tunable is None or self.num_tunable > 0,
                f"lt-sft config.num_tunable must be > 0, got {self.num_tunable}")
        require(self.full_steps is None or self.full_steps >= 1,
                f"lt-sft config.full_steps must be ≥ 1, got {self.full_steps}")
        require(0.0 < self.full_fraction < 1.0, f"lt-sft config.full_fraction must be in (0, 1), got "
                                                f"{self.full_fraction}")
        require(self.l1_full >= 0 and self.l1_sparse >= 0,
                f"lt-sft config.l1_full and l1_sparse must be ≥ 0, got {self.l1_full} and {self.l1_sparse}")
        require(len(self.targets) > 0, "lt-sft config.targets is empty")


def budget(config: Any, entries: int, what: str = "lt-sft") -> int:
    """``K``: ``num_tunable``, else ``⌊density · entries⌋`` (at least 1); :class:`ConfigError` when it exceeds
    ``entries``, the number of target entries."""
    k = config.num_tunable if config.num_tunable is not None else max(1, int(config.density * entries))
    if k > entries:
        raise ConfigError(f"{what} config asks for K = {k} trainable entries but the targets hold only {entries}")
    return k


def phase_one_steps(config: LTSFTConfig, total_steps: int) -> int:
    """Optimiser steps of full fine-tuning; at least one masked step must follow (:class:`ConfigError`)."""
    steps = config.full_steps if config.full_steps is not None else max(1, round(config.full_fraction * total_steps))
    if steps >= total_steps:
        raise ConfigError(f"lt-sft config: phase 1 takes {steps} of the run's {total_steps} optimiser steps, leaving "
                          "none for the masked phase; lower full_steps/full_fraction or train longer")
    return steps


@torch.no_grad()
def top_k_positions(tensors: dict[str, Tensor], k: int) -> dict[str, Tensor]:
    """Sorted flat positions (int64) of exactly ``k`` entries with the largest ``|x|`` over all ``tensors`` at once.

    The threshold ``t`` (the ``k``-th largest ``|x|``) comes from an exact two-pass radix selection over the
    stream of tensors (:class:`~deltatune.algebra.quantile.RadixSelect`: no concatenated copy); every entry with
    ``|x| > t`` is kept, and entries equal to ``t`` fill the rest in ``tensors`` order, then flat order."""
    total = sum(t.numel() for t in tensors.values())
    if not 0 < k <= total:
        raise ConfigError(f"top-k selection of {k} entries out of {total}")
    sel = RadixSelect(nonnegative=True)
    for t in tensors.values():  # the selector counts on the CPU: one tensor's |x| moves there at a time
        sel.feed(t.detach().abs().cpu())
    sel.resolve([total - k])  # ascending rank of the k-th largest
    for t in tensors.values():
        sel.feed(t.detach().abs().cpu())
    threshold = sel.values()[0]
    ties_left = k - sum(int(torch.count_nonzero(t.detach().float().abs() > threshold)) for t in tensors.values())
    out = {}
    for n, t in tensors.items():  # one tensor's |x| at a time
        m = t.detach().reshape(-1).float().abs()
        idx = (m > threshold).nonzero().reshape(-1)
        if ties_left > 0:
            ties = (m == threshold).nonzero().reshape(-1)[:ties_left]
            ties_left -= ties.numel()
            idx = torch.cat([idx, ties]).sort().values
        out[n] = idx
    return out


class LTSFTAdamW(torch.optim.AdamW):
    """AdamW with LT-SFT's L1 pull toward the base: before each step, ``grad += λ/N · sign(Δ)`` for the delta
    tensors in :attr:`l1_params` (the subgradient of ``λ Σ |θ − θ₀| / N``, once per optimiser step).  The phase
    hook sets :attr:`l1_weight` (``λ/N``) and :attr:`l1_params`."""

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.0) -> None:
        super().__init__(params, lr=lr, weight_decay=weight_decay)
        self.l1_weight = 0.0
        self.l1_params: set[int] = set()

    @torch.no_grad()
    def step(self, closure=None):
        if self.l1_weight:
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None and id(p) in self.l1_params:
                        p.grad.add_(torch.sign(p).to(p.grad.dtype), alpha=self.l1_weight)
        return super().step(closure)


def _attached_name(model: nn.Module, parts: dict[str, nn.Module]) -> str:
    """The part name the delta's parts are attached under (``attach`` uses ``default``)."""
    wanted = {id(p) for p in parts.values()}
    for _, layer in delta_layers(model):
        for name, part in layer.parts.items():
            if id(part) in wanted:
                return name
    raise ConfigError("lt-sft: the delta's parts are not attached to the model being trained")


class LTSFTPhases(TrainHook):
    """The phase switch: after ``switch_at`` completed steps, select the top-``K`` of ``|Δ|``, rewind, and continue
    on sparse parts (the model's layers, ``delta.parts`` and the optimiser's parameter list are updated in place)."""

    def __init__(self, model: nn.Module, delta: Any, config: LTSFTConfig, optimizer: torch.optim.Optimizer,
                 total_steps: int) -> None:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise ConfigError("lt-sft swaps its trainable tensors at the phase switch, which DistributedDataParallel "
                              "cannot follow; train lt-sft on one process")
        self.model, self.delta, self.config, self.optimizer = model, delta, config, optimizer
        self.switch_at = phase_one_steps(config, total_steps)
        self.entries = sum(p.delta_for("weight").numel() for p in delta.parts.values())
        self.k = budget(config, self.entries)
        self.phase = 1
        self.events: list[dict[str, Any]] = []
        self._set_l1(config.l1_full)

    def _set_l1(self, lam: float) -> None:
        if isinstance(self.optimizer, LTSFTAdamW):
            self.optimizer.l1_weight = lam / self.entries
            self.optimizer.l1_params = {id(p) for part in self.delta.parts.values() for p in part.parameters()}

    def after_step(self, step: int) -> None:
        if self.phase == 1 and step >= self.switch_at:
            dense = {n: p.delta_for("weight") for n, p in self.delta.parts.items()}
            chosen = top_k_positions(dense, self.k)
            self.events.append({"step": step, "k": self.k, "entries": self.entries})
            self.switch(chosen)

    @torch.no_grad()
    def switch(self, chosen: dict[str, Tensor]) -> None:
        """Replace the dense parts by sparse parts at ``chosen`` flat positions, values 0 (rewound to ``θ₀``)."""
        old = dict(self.delta.parts)
        name = _attached_name(self.model, old)
        new: dict[str, SparsePart] = {}
        for module_name in old:
            idx = chosen.get(module_name)
            if idx is not None and idx.numel():
                module = get_module(self.model, module_name)
                part = SparsePart(tuple(module.weight.shape), idx.to(module.weight.device), layer_kind(module),
                                  dtype=old[module_name].delta_for("weight").dtype)
                new[module_name] = part
        detach(self.model, name)
        attach_parts(self.model, new, name)
        self.delta.parts.clear()
        self.delta.parts.update(new)
        self._swap_optimizer_params(old, new)
        self.phase = 2
        self._set_l1(self.config.l1_sparse)

    def _swap_optimizer_params(self, old: dict[str, Any], new: dict[str, SparsePart]) -> None:
        gone = {id(p) for part in old.values() for p in part.parameters()}
        fresh = [part.values for _, part in sorted(new.items())]
        placed = False
        for group in self.optimizer.param_groups:
            kept = [p for p in group["params"] if id(p) not in gone]
            if len(kept) != len(group["params"]) and not placed:
                kept, placed = kept + fresh, True
            group["params"] = kept
        if not placed:
            self.optimizer.param_groups[0]["params"].extend(fresh)
        self.optimizer.state.clear()  # a fresh optimiser for the new phase (reference: one per phase)

    def state_dict(self) -> dict[str, Any]:
        indices = None if self.phase == 1 else {n: p.indices.detach().cpu() for n, p in self.delta.parts.items()}
        return {"phase": self.phase, "events": list(self.events), "indices": indices}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.events = list(state["events"])
        if state["phase"] == 2 and self.phase == 1:
            indices = state["indices"]
            if not isinstance(indices, dict) or set(indices) - set(self.delta.parts):
                raise DeltaFormatError("lt-sft hook state: the phase-2 support names modules this run has no part for")
            self.switch({n: t.to(torch.int64) for n, t in indices.items()})


@register_method
class LTSFT(Method):
    name = "lt-sft"
    config_cls = LTSFTConfig
    summary = "Lottery-Ticket Sparse FT: full FT, keep the top-K of |θ−θ₀| and rewind, then masked FT of those K"
    part_kinds = (DensePart, SparsePart)
    examples = {"": {"num_tunable": 777, "full_steps": 1},
                "l1": {"density": 0.05, "full_steps": 1, "l1_full": 0.1, "l1_sparse": 0.1}}
    default_lr = 5e-4

    def create_parts(self, model: nn.Module, config: LTSFTConfig, exclude: list[str]) -> dict[str, DensePart]:
        parts, seen = {}, set()
        for name in select_modules(model, config.targets, exclude):
            module = get_module(model, name)
            if id(module.weight) in seen:  # a tied weight gets the earlier module's part as an alias on attach
                continue
            seen.add(id(module.weight))
            parts[name] = DensePart.for_module(module, names=["weight"])
        budget(config, sum(math.prod(p.shapes["weight"]) for p in parts.values()))
        return parts

    def optimizer(self, params, lr, weight_decay, config):
        return LTSFTAdamW(params, lr=lr, weight_decay=weight_decay)

    def hooks(self, model, delta, config: LTSFTConfig, optimizer, total_steps, grad_accum) -> list[TrainHook]:
        return [LTSFTPhases(model, delta, config, optimizer, total_steps)]
