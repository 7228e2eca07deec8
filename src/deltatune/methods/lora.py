"""LoRA / rsLoRA (Hu et al., ICLR 2022; Kalajdzievski, 2023): ``ΔW = s · B A`` on target modules.

Defaults follow PEFT (``r=8, α=8``, dropout 0, kaiming-uniform ``A``, zero ``B``); ``rslora`` uses
``s = α/√r``.  Works on ``nn.Linear``, GPT-2 ``Conv1D`` and ``nn.Embedding`` targets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from torch import nn

from deltatune.config import require
from deltatune.methods.registry import Method, register_method
from deltatune.methods.targets import select_modules
from deltatune.model import get_module
from deltatune.parts.layers import in_out_features, layer_kind
from deltatune.parts.lora import LoRAPart, lora_scale


@dataclass
class LoRAConfig:
    method: ClassVar[str] = "lora"
    r: int = field(default=8, metadata={"help": "rank of B·A"})
    alpha: float = field(default=8.0, metadata={"help": "scaling numerator: s = alpha/r (alpha/sqrt(r) with rslora)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA branch input"})
    targets: list[str] = field(default_factory=lambda: ["all-linear"],
                               metadata={"help": "module-name patterns, or all-linear"})
    rslora: bool = field(default=False, metadata={"help": "rank-stabilised scaling alpha/sqrt(r)"})
    init: Literal["kaiming", "gaussian"] = field(default="kaiming", metadata={"help": "initialisation of A"})

    def __post_init__(self) -> None:
        require(self.r >= 1, f"lora config.r must be ≥ 1, got {self.r}")
        require(self.alpha > 0, f"lora config.alpha must be > 0, got {self.alpha}")
        require(0.0 <= self.dropout < 1.0, f"lora config.dropout must be in [0, 1), got {self.dropout}")
        require(len(self.targets) > 0, "lora config.targets is empty")
        require(self.init in ("kaiming", "gaussian"),
                f"lora config.init must be kaiming or gaussian, got {self.init!r}")

    @property
    def scale(self) -> float:
        return lora_scale(self.alpha, self.r, self.rslora)


@register_method
class LoRA(Method):
    name = "lora"
    config_cls = LoRAConfig
    summary = "low-rank B·A update on target Linear/Conv1D/Embedding modules (LoRA, rsLoRA)"
    part_kinds = (LoRAPart,)
    examples = {"": {"r": 2, "alpha": 4.0}, "rslora": {"r": 4, "alpha": 4.0, "rslora": True},
                "embedding": {"r": 2, "alpha": 4.0, "targets": ["type:Embedding"]}}
    default_lr = 5e-4

    def create_parts(self, model: nn.Module, config: LoRAConfig, exclude: list[str]) -> dict[str, LoRAPart]:
        parts = {}
        for name in select_modules(model, config.targets, exclude):
            module = get_module(model, name)
            d_in, d_out = in_out_features(module)
            ref = module.weight
            parts[name] = LoRAPart(d_in, d_out, config.r, config.scale, layer=layer_kind(module),
                                   dropout=config.dropout, init=config.init,
                                   dtype=ref.dtype if ref.dtype.is_floating_point else None, device=ref.device)
        return parts
