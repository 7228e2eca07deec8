"""SpIEL-style sparse fine-tuning (Ansell et al., "Scaling Sparse Fine-Tuning to LLMs", 2024).

``k = density × (all base parameters)`` (or an exact ``num_tunable``) trainable scalars, split over
the target matrices in proportion to their size, ``k_l = ⌊K·n_l/Σn⌋`` (the remainder goes to the
largest fractional shares so ``Σk_l = K`` exactly).  The support starts random with values 0; every
``reselection_steps`` steps the :class:`~deltatune.methods.spiel_selector.SpIELSelector` drops the
smallest-|value| entries and regrows by accumulated gradient (``regrow_by="grad"``, SpIEL-AG) or by SM3
row/column accumulators of the active entries' squared gradients (``regrow_by="momentum"``, SpIEL-MA).
Optimiser state lives only on the active values (:class:`SparseAdamW`, per-element age for bias correction, SftAdamW's
``eps = 1e-6``).  SpIEL-MA here takes MA's growth criterion only: its values still train with :class:`SparseAdamW`
(two moments and an age per entry), where the reference trains MA with SM3, whose state is the row/column
accumulators alone — so MA's smaller optimiser state is not reproduced (it saves the selection window instead).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import nn

from deltatune.config import require, seed_option
from deltatune.errors import ConfigError
from deltatune.fingerprint import base_parameters
from deltatune.methods.in_place import InPlaceTraining
from deltatune.methods.registry import Method, TrainHook, register_method
from deltatune.methods.sparse_optim import SparseAdamW
from deltatune.methods.targets import one_per_weight, select_modules
from deltatune.model import get_module
from deltatune.parts.layers import layer_kind
from deltatune.parts.sparse import SparsePart

#: Adam's ε in SpIEL's ``SftAdamW`` (AlanAnsell/peft), larger than torch's 1e-8: it bounds the first steps of an entry
#: grown with a small second moment
SPIEL_EPS = 1e-6


@dataclass
class SparseConfig:
    method: ClassVar[str] = "sparse"
    density: float = field(default=0.01, metadata={"help": "trainable fraction of ALL base parameters"})
    num_tunable: int | None = field(default=None, metadata={"help": "exact trainable count (overrides density)"})
    targets: list[str] = field(default_factory=lambda: ["all-linear"], metadata={"help": "module-name patterns"})
    regrow: bool = field(default=True, metadata={"help": "drop/regrow during training"})
    regrow_by: Literal["grad", "momentum"] = field(default="grad", metadata={
        "help": "growth criterion: grad (accumulated gradients, SpIEL-AG) or momentum (SM3 row/column "
                "accumulators, SpIEL-MA: O(d_in + d_out) memory, no dense gradient)"})
    reselection_steps: int = field(default=20, metadata={"help": "R: steps between drop/regrow events"})
    accumulation_steps: int = field(default=5, metadata={"help": "A: steps of gradient accumulation per event"})
    initial_reselection_rate: float = field(default=0.2, metadata={"help": "rho0: fraction replaced at an event"})
    schedule: Literal["linear", "cosine"] = field(default="linear", metadata={"help": "decay of the rate"})
    seed: int = seed_option("seed of the random initial support")
    in_place: bool = field(default=True, metadata={"help": "keep W + ΔW in the base's own weight while training "
                                                           "(rewritten once per step, not patched in every call)"})

    def __post_init__(self) -> None:
        require(0.0 < self.density <= 1.0, f"sparse config.density must be in (0, 1], got {self.density}")
        require(self.num_tunable is None or self.num_tunable > 0,
                f"sparse config.num_tunable must be > 0, got {self.num_tunable}")
        require(self.reselection_steps > self.accumulation_steps >= 1,
                "sparse config needs reselection_steps > accumulation_steps ≥ 1, got "
                f"{self.reselection_steps} and {self.accumulation_steps}")
        require(0.0 <= self.initial_reselection_rate <= 1.0,
                f"sparse config.initial_reselection_rate must be in [0, 1], got {self.initial_reselection_rate}")
        require(self.schedule in ("linear", "cosine"), "sparse config.schedule must be linear or cosine")
        require(self.regrow_by in ("grad", "momentum"),
                f"sparse config.regrow_by must be grad or momentum, got {self.regrow_by!r}")


def allocate(total: int, sizes: list[int]) -> list[int]:
    """Split ``total`` over ``sizes`` proportionally (largest remainders), exact sum, each ≤ its size."""
    n = sum(sizes)
    shares = [total * s / n for s in sizes]
    counts = [min(math.floor(x), s) for x, s in zip(shares, sizes, strict=True)]
    order = sorted(range(len(sizes)), key=lambda i: shares[i] - math.floor(shares[i]), reverse=True)
    left = total - sum(counts)
    while left > 0:
        progressed = False
        for i in order:
            if left and counts[i] < sizes[i]:
                counts[i] += 1
                left -= 1
                progressed = True
        if not progressed:
            break
    return counts


@register_method
class Sparse(Method):
    name = "sparse"
    config_cls = SparseConfig
    summary = "SpIEL sparse fine-tuning: values at sorted indices, drop/regrow by gradient or SM3 momentum"
    part_kinds = (SparsePart,)
    examples = {"": {"num_tunable": 777, "regrow": False},
                "embedding": {"num_tunable": 777, "regrow": False, "targets": ["type:Embedding"]},
                "regrow": {"num_tunable": 777, "reselection_steps": 2, "accumulation_steps": 1},
                "momentum": {"num_tunable": 777, "reselection_steps": 2, "accumulation_steps": 1,
                             "regrow_by": "momentum"}}
    default_lr = 5e-4

    def create_parts(self, model: nn.Module, config: SparseConfig, exclude: list[str]) -> dict[str, SparsePart]:
        """One part per target weight *tensor* (a tied weight's other modules see it as an alias:
        :func:`~deltatune.methods.targets.one_per_weight`), ``K`` allocated over those distinct tensors; ``density``
        counts each base tensor once."""
        names = one_per_weight(model, select_modules(model, config.targets, exclude))
        sizes = [get_module(model, n).weight.numel() for n in names]
        if config.num_tunable is not None:
            total, asked = config.num_tunable, f"num_tunable {config.num_tunable}"
        else:
            n_base = sum(t.numel() for t in {id(t): t for _, t in base_parameters(model, exclude)}.values())
            total = int(config.density * n_base)
            asked = f"density {config.density} of {n_base} base parameters = {total} trainable values"
            if total < 1:
                raise ConfigError(f"{config.method} config.density: {asked}; give a larger density or num_tunable")
        if total > sum(sizes):
            raise ConfigError(f"{config.method} config asks for {asked} but the targets hold only {sum(sizes)} "
                              f"({len(names)} module(s) matching {config.targets})")
        gen = torch.Generator().manual_seed(config.seed)
        parts = {}
        for name, size, k in zip(names, sizes, allocate(total, sizes), strict=True):
            if k == 0:
                continue
            module = get_module(model, name)
            idx = torch.randperm(size, generator=gen)[:k].to(module.weight.device)
            parts[name] = SparsePart(tuple(module.weight.shape), idx, layer_kind(module))
        return parts

    def optimizer(self, params, lr, weight_decay, config):
        """:class:`SparseAdamW` with SpIEL's ``SftAdamW`` defaults: betas (0.9, 0.999), ``eps = 1e-6``."""
        return SparseAdamW(params, lr=lr, weight_decay=weight_decay, eps=SPIEL_EPS)

    def hooks(self, model, delta, config: SparseConfig, optimizer, total_steps, grad_accum) -> list[TrainHook]:
        """In-place training (:meth:`SparsePart.bind`) and, with ``regrow``, SpIEL's drop/regrow events."""
        from deltatune.methods.spiel_selector import MomentumSelector, SpIELSelector

        hooks: list[TrainHook] = [InPlaceTraining(model, delta, optimizer)] if config.in_place else []
        if config.regrow:
            selector = MomentumSelector if config.regrow_by == "momentum" else SpIELSelector
            hooks.append(selector(delta.parts, optimizer, config, total_steps, grad_accum))
        return hooks
