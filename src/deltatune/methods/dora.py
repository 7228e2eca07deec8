"""DoRA (Liu et al., ICML 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation"): a learned magnitude per output
channel times a LoRA-updated direction, ``W' = m ⊙ (W + s·BA) / ‖W + s·BA‖_c``, on target modules.

Defaults follow PEFT's ``LoraConfig(use_dora=True)`` (``r=8, α=8``, dropout 0, kaiming-uniform ``A``, zero ``B``,
``m = ‖W‖_c``); ``rslora`` uses ``s = α/√r``.  Works on ``nn.Linear``, GPT-2 ``Conv1D`` and ``nn.Embedding``
targets (PEFT 0.21 supports DoRA on all three).  The part kind is :class:`~deltatune.parts.dora.DoRAPart`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from torch import nn

from deltatune.config import require
from deltatune.methods.registry import Method, register_method
from deltatune.methods.targets import select_modules
from deltatune.parts.dora import DoRAPart
from deltatune.parts.layers import in_out_features, layer_kind
from deltatune.parts.lora import lora_scale


@dataclass
class DoRAConfig:
    method: ClassVar[str] = "dora"
    r: int = field(default=8, metadata={"help": "rank of the direction update B·A"})
    alpha: float = field(default=8.0, metadata={"help": "scaling numerator: s = alpha/r (alpha/sqrt(r) with rslora)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the input of the low-rank branch"})
    targets: list[str] = field(default_factory=lambda: ["all-linear"],
                               metadata={"help": "module-name patterns, type:Class, role:…, or all-linear"})
    rslora: bool = field(default=False, metadata={"help": "rank-stabilised scaling alpha/sqrt(r)"})
    init: Literal["kaiming", "gaussian"] = field(default="kaiming", metadata={"help": "initialisation of A"})

    def __post_init__(self) -> None:
        require(self.r >= 1, f"dora config.r must be ≥ 1, got {self.r}")
        require(self.alpha > 0, f"dora config.alpha must be > 0, got {self.alpha}")
        require(0.0 <= self.dropout < 1.0, f"dora config.dropout must be in [0, 1), got {self.dropout}")
        require(len(self.targets) > 0, "dora config.targets is empty")
        require(self.init in ("kaiming", "gaussian"),
                f"dora config.init must be kaiming or gaussian, got {self.init!r}")

    @property
    def scale(self) -> float:
        return lora_scale(self.alpha, self.r, self.rslora)


@register_method
class DoRA(Method):
    name = "dora"
    config_cls = DoRAConfig
    summary = "weight-decomposed LoRA: learned per-channel magnitude × LoRA-updated direction (DoRA)"
    part_kinds = (DoRAPart,)
    default_lr = 5e-4
    #: small configs that work on the tiny Llama, GPT-2 and BERT models (the registry-driven contract matrix)
    examples: ClassVar[dict[str, dict]] = {
        "": {"r": 2, "alpha": 4.0},
        "rslora": {"r": 4, "alpha": 4.0, "rslora": True},
        "attention": {"r": 2, "alpha": 4.0, "targets": [r".*\.(q_proj|v_proj|c_attn|query|value)"]},
    }

    def create_parts(self, model: nn.Module, config: DoRAConfig, exclude: list[str]) -> dict[str, DoRAPart]:
        from deltatune.model import get_module

        parts = {}
        for name in select_modules(model, config.targets, exclude):
            module = get_module(model, name)
            d_in, d_out = in_out_features(module)
            ref = module.weight
            part = DoRAPart(d_in, d_out, config.r, config.scale, layer=layer_kind(module), dropout=config.dropout,
                            init=config.init, dtype=ref.dtype if ref.dtype.is_floating_point else None,
                            device=ref.device)
            part.init_from_base(module)
            parts[name] = part
        return parts
