"""(IA)³ (Liu et al., NeurIPS 2022, T-Few): learned vectors, initialised to 1, that rescale attention keys and
values (module outputs) and the FFN's intermediate activation (the input of its down-projection).

Defaults follow PEFT 0.21.2 (``TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING`` and
``..._FEEDFORWARD_MODULES_MAPPING`` in ``peft/utils/constants.py``): with ``targets`` unset, the model's
``config.model_type`` picks the modules from :data:`IA3_TARGETS`, and modules matching :data:`IA3_FEEDFORWARD`
are scaled at their input.  PEFT's table (kept here for parity) scales queries rather than keys for some model
types (``q_proj, v_proj`` for qwen2/3, gemma/gemma2, phi, gptj, gpt_neo, bart; ``q_proj, k_proj`` for opt), unlike
the paper's keys and values; give ``targets`` for the paper's choice.  As in PEFT, BERT's ``output.dense`` pattern
also matches the attention output projection (``attention.output.dense``), so both are input-scaled.  Works on
``nn.Linear`` and GPT-2 ``Conv1D`` modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from torch import nn

from deltatune.config import require
from deltatune.errors import ConfigError, TargetError
from deltatune.methods.registry import Method, register_method
from deltatune.methods.targets import pattern_matches, select_modules, summarise_names
from deltatune.parts.ia3 import IA3Part
from deltatune.parts.layers import LayerKind, in_out_features, layer_kind

#: model_type → target modules (after PEFT 0.21.2's IA3 target mapping)
IA3_TARGETS: dict[str, tuple[str, ...]] = {
    "t5": ("k", "v", "wo"),
    "mt5": ("k", "v", "wi_1"),
    "gpt2": ("c_attn", "mlp.c_proj"),
    "bloom": ("query_key_value", "mlp.dense_4h_to_h"),
    "roberta": ("key", "value", "output.dense"),
    "opt": ("q_proj", "k_proj", "fc2"),
    "gptj": ("q_proj", "v_proj", "fc_out"),
    "gpt_neox": ("query_key_value", "dense_4h_to_h"),
    "gpt_neo": ("q_proj", "v_proj", "c_proj"),
    "bart": ("q_proj", "v_proj", "fc2"),
    "gpt_bigcode": ("c_attn", "mlp.c_proj"),
    "llama": ("k_proj", "v_proj", "down_proj"),
    "mistral": ("k_proj", "v_proj", "down_proj"),
    "mixtral": ("k_proj", "v_proj", "w2"),
    "bert": ("key", "value", "output.dense"),
    "deberta-v2": ("key_proj", "value_proj", "output.dense"),
    "falcon": ("query_key_value", "dense_4h_to_h"),
    "phi": ("q_proj", "v_proj", "fc2"),
    "gemma": ("q_proj", "v_proj", "down_proj"),
    "gemma2": ("q_proj", "v_proj", "down_proj"),
    "qwen2": ("q_proj", "v_proj", "down_proj"),
    "qwen3": ("q_proj", "v_proj", "down_proj"),
}
#: model_type → the targets scaled at their input (PEFT's "feedforward" modules)
IA3_FEEDFORWARD: dict[str, tuple[str, ...]] = {
    "t5": ("wo",),
    "mt5": (),
    "gpt2": ("mlp.c_proj",),
    "bloom": ("mlp.dense_4h_to_h",),
    "roberta": ("output.dense",),
    "opt": ("fc2",),
    "gptj": ("fc_out",),
    "gpt_neox": ("dense_4h_to_h",),
    "gpt_neo": ("c_proj",),
    "bart": ("fc2",),
    "gpt_bigcode": ("mlp.c_proj",),
    "llama": ("down_proj",),
    "mistral": ("down_proj",),
    "mixtral": ("w2",),
    "bert": ("output.dense",),
    "deberta-v2": ("output.dense",),
    "falcon": ("dense_4h_to_h",),
    "phi": ("fc2",),
    "gemma": ("down_proj",),
    "gemma2": ("down_proj",),
    "qwen2": ("down_proj",),
    "qwen3": ("down_proj",),
}


@dataclass
class IA3Config:
    method: ClassVar[str] = "ia3"
    targets: list[str] | None = field(
        default=None, metadata={"help": "module-name patterns (or type:/role: targets, all-linear); unset: the "
                                        "model type's keys, values and FFN down-projection, as PEFT"})
    feedforward: list[str] | None = field(
        default=None, metadata={"help": "targets scaled at their input (y = (x ⊙ l) Wᵀ + b) instead of their output; "
                                        "unset: the model type's FFN down-projection, as PEFT"})

    def __post_init__(self) -> None:
        require(self.targets is None or len(self.targets) > 0, "ia3 config.targets is empty (leave it unset for "
                                                               "the model type's defaults)")
        for name in ("targets", "feedforward"):
            value = getattr(self, name)
            require(value is None or all(isinstance(t, str) and t for t in value),
                    f"ia3 config.{name} must be a list of non-empty module-name patterns, got {value!r}")


def model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def default_patterns(model: nn.Module, table: dict[str, tuple[str, ...]], what: str) -> list[str]:
    """The model type's entry of ``table`` (:class:`ConfigError` naming the known types when it has none)."""
    mtype = model_type(model)
    if mtype not in table:
        raise ConfigError(f"ia3 has no default {what} for model type {mtype!r}; set config.{what} (known model "
                          f"types: {sorted(table)})")
    return list(table[mtype])


def input_scaled(names: list[str], feedforward: list[str], explicit: bool) -> set[str]:
    """The selected modules that match a ``feedforward`` pattern.  Explicit patterns must each match a selected
    module (:class:`TargetError` otherwise); the model type's defaults apply where they match."""
    chosen: set[str] = set()
    for pattern in feedforward:
        hits = {n for n in names if pattern_matches(pattern, n)}
        if explicit and not hits:
            raise TargetError(f"ia3 feedforward pattern {pattern!r} matches none of the targeted modules; "
                              f"targeted: {summarise_names(names)}")
        chosen |= hits
    return chosen


@register_method
class IA3(Method):
    name = "ia3"
    config_cls = IA3Config
    summary = "(IA)³: learned vectors (init 1) scaling keys, values (outputs) and the FFN input"
    part_kinds = (IA3Part,)
    default_lr = 3e-3
    examples: ClassVar[dict[str, dict]] = {
        "": {},
        "all-linear-output": {"targets": ["all-linear"], "feedforward": []},
    }

    def create_parts(self, model: nn.Module, config: IA3Config, exclude: list[str]) -> dict[str, IA3Part]:
        from deltatune.model import get_module

        targets = config.targets if config.targets is not None else default_patterns(model, IA3_TARGETS, "targets")
        explicit = config.feedforward is not None
        feedforward = config.feedforward if explicit else (
            list(IA3_FEEDFORWARD.get(model_type(model) or "", ())) if config.targets is not None
            else default_patterns(model, IA3_FEEDFORWARD, "feedforward"))
        names = select_modules(model, targets, exclude, kinds=(LayerKind.LINEAR, LayerKind.CONV1D))
        at_input = input_scaled(names, feedforward, explicit)
        parts = {}
        for name in names:
            module = get_module(model, name)
            d_in, d_out = in_out_features(module)
            ref = module.weight
            parts[name] = IA3Part(d_in, d_out, "input" if name in at_input else "output", layer_kind(module),
                                  bias=getattr(module, "bias", None) is not None,
                                  dtype=ref.dtype if ref.dtype.is_floating_point else None, device=ref.device)
        return parts
