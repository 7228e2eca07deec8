"""SSF (Lian et al., "Scaling & Shifting Your Features", NeurIPS 2022): ``y = γ ⊙ out + β`` per output channel
after the linear layers and the LayerNorms, re-parameterised into their weights and biases on merge.

Targets default to every Linear/Conv1D module (``all-linear``: task heads and the LM head excluded) and every
LayerNorm/RMSNorm module computing ``w ⊙ n(x) (+ b)`` (Gemma's ``(1 + w) ⊙ n(x)`` norms are left out of the
default: a scale does not fold into their weight).  Name patterns, ``type:LayerNorm`` / ``type:RMSNorm`` targets
and predicates select other sets; each selected module must be a Linear, a Conv1D or a norm computing
``w ⊙ n(x) (+ b)``.  A module without a bias (Llama's Linear layers, RMSNorm) gets only the scale ``γ``: a shift
there could not be merged.

Init: ``γ = 1, β = 0`` (the output is unchanged at attach time).  The paper's ``γ ~ N(1, σ²)``,
``β ~ N(0, σ²)`` with ``σ = 0.02`` is ``init_std=0.02``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from deltatune.config import require, seed_option
from deltatune.errors import TargetError
from deltatune.methods.registry import Method, register_method
from deltatune.methods.targets import select_modules
from deltatune.parts.ssf import SSFPart, norm_features, norm_is_affine_in_weight, site_of

ALL_LINEAR = "all-linear"


def is_norm(name: str, module: nn.Module) -> bool:
    """A LayerNorm/RMSNorm module with an affine weight (SSF's default norm targets)."""
    return norm_features(module) is not None


@dataclass
class SSFConfig:
    method: ClassVar[str] = "ssf"
    targets: list[str] | None = field(
        default=None, metadata={"help": "module-name patterns, all-linear, type:LayerNorm / type:RMSNorm …; unset: "
                                        "every Linear/Conv1D and every LayerNorm/RMSNorm module"})
    shift: bool = field(default=True, metadata={"help": "learn the shift β where the module has a bias (a module "
                                                        "without one holds only the scale γ)"})
    init_std: float = field(default=0.0, metadata={"help": "σ of the init γ ~ N(1, σ²), β ~ N(0, σ²); 0 keeps the "
                                                           "output unchanged at attach (the paper uses 0.02)"})
    seed: int = seed_option("seed of the init noise (init_std > 0)")

    def __post_init__(self) -> None:
        require(self.targets is None or len(self.targets) > 0,
                "ssf config.targets is empty (leave it unset for every linear and norm module)")
        require(self.targets is None or all(isinstance(t, str) and t for t in self.targets),
                f"ssf config.targets must be a list of non-empty patterns, got {self.targets!r}")
        require(0.0 <= self.init_std <= 1.0, f"ssf config.init_std must be in [0, 1], got {self.init_std}")


def ssf_modules(model: nn.Module, targets: list[str] | None, exclude: list[str]) -> list[str]:
    """The modules SSF attaches to, in model order (see the module docstring)."""
    from deltatune.model import get_module, logical_modules

    order = {n: i for i, (n, _) in enumerate(logical_modules(model))}
    if targets is None:
        norms = select_modules(model, [is_norm], exclude, kinds=None)
        chosen = set(select_modules(model, [ALL_LINEAR], exclude)) | {
            n for n in norms if norm_is_affine_in_weight(get_module(model, n))}
    else:
        others = [t for t in targets if t != ALL_LINEAR]
        chosen = set(select_modules(model, [ALL_LINEAR], exclude)) if ALL_LINEAR in targets else set()
        chosen |= set(select_modules(model, others, exclude, kinds=None)) if others else set()
    names = sorted(chosen, key=order.__getitem__)
    for name in names:
        module = get_module(model, name)
        found = site_of(module)
        if found is None:
            raise TargetError(f"ssf target module {name!r} is a {type(module).__name__}; SSF attaches to Linear, "
                              "Conv1D, LayerNorm and RMSNorm modules (with an affine weight)")
        if found[0] == "norm" and not norm_is_affine_in_weight(module):
            raise TargetError(f"ssf target module {name!r} ({type(module).__name__}) does not compute "
                              "w ⊙ norm(x) (+ b), so a scale cannot be folded into its weight")
    return names


@register_method
class SSF(Method):
    name = "ssf"
    config_cls = SSFConfig
    summary = "SSF: per-channel scale γ and shift β of Linear/Conv1D and LayerNorm/RMSNorm outputs (mergeable)"
    part_kinds = (SSFPart,)
    default_lr = 5e-3
    examples: ClassVar[dict[str, dict]] = {
        "": {},
        "linear": {"targets": ["all-linear"]},
    }

    def create_parts(self, model: nn.Module, config: SSFConfig, exclude: list[str]) -> dict[str, SSFPart]:
        from deltatune.model import get_module

        gen = torch.Generator().manual_seed(config.seed)
        parts = {}
        for name in ssf_modules(model, config.targets, exclude):
            module = get_module(model, name)
            site, n, d_in = site_of(module)  # type: ignore[misc]
            ref = module.weight
            has_bias = getattr(module, "bias", None) is not None
            part = SSFPart(n, site, d_in, bias=has_bias, shift=config.shift and has_bias,  # type: ignore[arg-type]
                           dtype=ref.dtype if ref.dtype.is_floating_point else None)
            if config.init_std > 0:
                part.reset_parameters(config.init_std, generator=gen)
            parts[name] = part.to(ref.device)
        return parts
