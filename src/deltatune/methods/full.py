"""Full fine-tuning as a dense delta: every parameter of the base (heads aside) is trainable.

The delta is exactly ``θ_trained − θ_base``.  By default ``θ`` trains in the base's own storage with ``θ₀`` kept in
a temporary file for the run (:mod:`deltatune.methods.in_place`: native full fine-tuning's memory and time); with
``in_place`` false, or with weight decay, a separate ``Δθ`` trains beside the untouched base (the same gradients).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from torch import nn

from deltatune.config import require
from deltatune.methods.in_place import InPlaceTraining
from deltatune.methods.registry import Method, TrainHook, register_method
from deltatune.methods.targets import modules_with_parameters, narrow_names
from deltatune.model import get_module
from deltatune.parts.dense import DensePart


@dataclass
class FullConfig:
    method: ClassVar[str] = "full"
    targets: list[str] = field(default_factory=lambda: ["all"],
                               metadata={"help": "module-name patterns, or all (every module with parameters)"})
    in_place: bool = field(default=True, metadata={"help": "train θ in the base's own storage, θ₀ in a temporary "
                                                           "file (no second copy of the model); false: a separate Δθ"})

    def __post_init__(self) -> None:
        require(len(self.targets) > 0, "full config.targets is empty")


@register_method
class Full(Method):
    name = "full"
    config_cls = FullConfig
    summary = "full fine-tuning: a dense delta on every parameter (the quality ceiling)"
    part_kinds = (DensePart,)
    examples = {"": {}}
    default_lr = 5e-5

    def create_parts(self, model: nn.Module, config: FullConfig, exclude: list[str]) -> dict[str, DensePart]:
        names = modules_with_parameters(model, exclude)
        names = narrow_names(names, config.targets, "module with parameters")
        parts, seen = {}, set()
        for n in names:
            module = get_module(model, n)
            own = [k for k, p in module.named_parameters(recurse=False) if id(p) not in seen]
            seen.update(id(p) for p in module.parameters(recurse=False))
            if own:  # a module whose weight is tied to an earlier one gets that part as an alias on attach
                parts[n] = DensePart.for_module(module, names=own)
        return parts

    def hooks(self, model, delta, config: FullConfig, optimizer, total_steps, grad_accum) -> list[TrainHook]:
        return [InPlaceTraining(model, delta, optimizer, config.in_place)]
