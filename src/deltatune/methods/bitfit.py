"""BitFit: train only the bias terms (Ben Zaken, Ravfogel, Goldberg, "BitFit: Simple Parameter-efficient
Fine-tuning for Transformer-based Masked Language-models", ACL 2022), plus the task head.

Every module with a bias of its own (Linear, GPT-2 Conv1D, LayerNorm) gets a :class:`~deltatune.parts.bias.BiasPart`
(``b' = b + Δb``, merged exactly into that bias).  Llama-family layers have no biases, so with ``add_missing`` the
Linear/Conv1D layers without one (the LM head aside) get an *added* bias, as the reference notes BitFit needs there;
merging creates the bias parameter (and the last revert removes it).  ``targets`` narrows the set by module-name
pattern (e.g. the paper's query-bias + second-MLP-bias variant: ``query, output.dense``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from torch import nn

from deltatune.config import require
from deltatune.errors import TargetError
from deltatune.methods.registry import Method, register_method
from deltatune.methods.targets import (
    modules_with_parameters,
    narrow_names,
    output_layer_names,
)
from deltatune.model import get_module
from deltatune.parts.bias import BiasPart, has_bias, output_features
from deltatune.parts.layers import LayerKind, layer_kind


@dataclass
class BitFitConfig:
    method: ClassVar[str] = "bitfit"
    targets: list[str] = field(default_factory=lambda: ["all"],
                               metadata={"help": "module-name patterns, or all (every module with a bias)"})
    add_missing: bool = field(default=True, metadata={"help": "add a bias to Linear/Conv1D layers without one "
                                                              "(Llama); merging then creates the bias"})

    def __post_init__(self) -> None:
        require(len(self.targets) > 0, "bitfit config.targets is empty")


def bias_sites(model: nn.Module, add_missing: bool, exclude: list[str]) -> list[str]:
    """Modules whose output a bias shifts: those with a bias parameter, and (``add_missing``) bias-free
    Linear/Conv1D layers other than the LM head, in model order."""
    skip = output_layer_names(model)
    names = []
    for name in modules_with_parameters(model, exclude):
        module = get_module(model, name)
        if output_features(module) is None:
            continue
        if has_bias(module) or (add_missing and layer_kind(module) in (LayerKind.LINEAR, LayerKind.CONV1D)
                                and name not in skip):
            names.append(name)
    return names


@register_method
class BitFit(Method):
    name = "bitfit"
    config_cls = BitFitConfig
    summary = "BitFit: train only the bias terms (a bias added where a layer has none, e.g. Llama)"
    part_kinds = (BiasPart,)
    examples = {"": {}, "attention": {"targets": [r".*(query|q_proj|c_attn)"]}}
    default_lr = 1e-3

    def create_parts(self, model: nn.Module, config: BitFitConfig, exclude: list[str]) -> dict[str, BiasPart]:
        names = bias_sites(model, config.add_missing, exclude)
        if not names:
            raise TargetError("bitfit: the model has no module with a bias (set add_missing=true to add biases to "
                              "its Linear layers)")
        names = narrow_names(names, config.targets, "module with a bias", who="bitfit target")
        parts = {}
        for name in names:
            module = get_module(model, name)
            ref = module.weight
            parts[name] = BiasPart(output_features(module), has_bias(module), dtype=ref.dtype, device=ref.device)
        return parts
