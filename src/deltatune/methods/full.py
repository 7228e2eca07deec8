"""Full fine-tuning as a dense delta: every parameter of the base (heads aside) is trainable.

The delta is exactly ``θ_trained − θ_base``; training updates ``Δθ`` (gradients are identical to
updating ``θ`` directly), so the base is never modified and saving needs no copy of the original.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from torch import nn

from deltatune.config import require
from deltatune.methods.registry import Method, register_method
from deltatune.methods.targets import modules_with_parameters, narrow_names
from deltatune.model import get_module
from deltatune.parts.dense import DensePart


@dataclass
class FullConfig:
    method: ClassVar[str] = "full"
    targets: list[str] = field(default_factory=lambda: ["all"],
                               metadata={"help": "module-name patterns, or all (every module with parameters)"})

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
