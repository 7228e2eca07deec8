"""Method registry: ``@register_method`` adds a method; nothing central changes per method.

A method decides *which* modules get a part (targets), *how* parts are initialised, which training
hooks it needs (prune/regrow, phase switches) and which optimiser suits it.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, ClassVar

import torch
from torch import nn

from deltatune.config import parse_config
from deltatune.errors import ConfigError
from deltatune.parts.base import Part

METHODS: dict[str, Method] = {}

#: device types with torch's fused AdamW kernel that deltatune uses (torch ≥ 2.4 has the CPU one)
FUSED_ADAMW_DEVICES = ("cpu", "cuda")


def unwrap_optimizer(optimizer: Any) -> Any:
    """The optimizer itself, under any wrappers holding it as ``.optimizer`` (accelerate's AcceleratedOptimizer, which
    is itself a ``torch.optim.Optimizer`` subclass, so the test is on what it holds, not on what it is)."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def param_list(params: Any) -> list[Any]:
    """``params`` as a list that can be read twice: parameters, or parameter groups whose ``params`` (a generator
    such as ``model.parameters()``, a list or one tensor) become a list."""
    def group(item: Any) -> Any:
        if not isinstance(item, dict):
            return item
        inner = item["params"]
        return {**item, "params": [inner] if isinstance(inner, torch.Tensor) else list(inner)}
    return [group(item) for item in params]


def fused_adamw_ok(params: list[nn.Parameter] | list[dict[str, Any]]) -> bool:
    """Whether torch's fused AdamW kernel can run on ``params`` (a :func:`param_list`): every parameter a
    floating-point tensor on a device of :data:`FUSED_ADAMW_DEVICES`."""
    tensors = [p for item in params for p in (item["params"] if isinstance(item, dict) else [item])]
    return bool(tensors) and all(p.is_floating_point() and p.device.type in FUSED_ADAMW_DEVICES for p in tensors)


def adamw(params: Any, lr: float, weight_decay: float,
          cls: type[torch.optim.AdamW] = torch.optim.AdamW) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` (or its subclass ``cls``; Loshchilov & Hutter, 2019) over ``params`` (tensors or parameter
    groups), fused where
    :func:`fused_adamw_ok`: one kernel per tensor for ``m ← β₁m + (1−β₁)g``, ``v ← β₂v + (1−β₂)g²``,
    ``θ ← θ(1 − ηλ) − η·m̂/(√v̂ + ε)``, with no temporaries the size of the parameters.  The same update as the
    unfused loop up to the order of float operations (last-bit differences).  Measured in one paired run of
    ``benchmarks/train_step.py`` on CPU (2 cores, the ~54M Llama, LISA with 38M trainable), the fused kernel switched
    off and on by a temporary code change (outputs not kept): 0.76× the step time and 36 MB less peak RSS."""
    params = param_list(params)
    return cls(params, lr=lr, weight_decay=weight_decay, fused=fused_adamw_ok(params) or None)


class TrainHook:
    """Schedule hooks called by the training loop (and usable from a custom loop).

    ``step`` is the number of optimiser steps completed so far.
    """

    #: Whether the hook keeps nothing a resume needs (its :meth:`state_dict` is always empty): a checkpoint written
    #: before such a hook joined a method's list resumes without it (:func:`deltatune.train.checkpoint.hooks_for`).
    stateless: ClassVar[bool] = False

    def before_step(self, step: int) -> None:
        """Before the micro-batches of optimiser step ``step``."""

    def after_step(self, step: int) -> None:
        """After ``optimizer.step()``; ``step`` is the new count of completed steps."""

    def delta_is_final(self) -> bool:
        """Whether the delta's parts now have the form the run ends with, so that an evaluation may keep them as
        the run's ``best`` (False while a phase trains something else, e.g. LT-SFT's dense phase 1)."""
        return True

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (exact resume)."""

    def close(self) -> None:
        """After the last step, or when training stops early: give back what the hook took (the base's storage
        lent to in-place training, :class:`deltatune.methods.in_place.InPlaceTraining`)."""


class Method:
    name: ClassVar[str] = ""
    config_cls: ClassVar[type] = object
    summary: ClassVar[str] = ""
    default_lr: ClassVar[float] = 1e-3
    #: the part kinds this method creates; its capabilities are theirs (see :meth:`capabilities`)
    part_kinds: ClassVar[tuple[type[Part], ...]] = ()
    #: small configs ``{variant: mapping}`` valid on every supported architecture; the registry-driven contract
    #: tests (tests/methods/test_matrix.py) train each one on tiny Llama, GPT-2 and BERT models
    examples: ClassVar[dict[str, dict[str, Any]]] = {"": {}}
    #: whether the model's outputs are unchanged right after attaching (false for virtual tokens)
    identity_at_init: ClassVar[bool] = True

    @classmethod
    def capabilities(cls) -> dict[str, bool]:
        """The method's part capabilities: ``additive`` and ``mixed_rows`` when every part kind has them (a delta
        merges only if all its parts do), the others (``base_dependent``, ``has_aux_loss`` …) when any has."""
        from deltatune.parts.capabilities import CAPABILITIES

        every = ("additive", "mixed_rows")
        kinds = cls.part_kinds
        return {c: bool(kinds) and (all if c in every else any)(bool(getattr(k, c)) for k in kinds)
                for c in CAPABILITIES}

    def create_parts(self, model: nn.Module, config: Any, exclude: list[str]) -> dict[str, Part]:
        raise NotImplementedError

    def hooks(self, model: nn.Module, delta: Any, config: Any, optimizer: torch.optim.Optimizer,
              total_steps: int, grad_accum: int) -> list[TrainHook]:
        return []

    def optimizer(self, params: list[nn.Parameter], lr: float, weight_decay: float,
                  config: Any) -> torch.optim.Optimizer:
        """AdamW over the trainable parameters (:func:`adamw`); methods with per-entry state override it."""
        return adamw(params, lr, weight_decay)

    def config_dict(self, config: Any) -> dict[str, Any]:
        return asdict(config)

    def parse(self, mapping: dict[str, Any]) -> Any:
        return parse_config(self.config_cls, mapping, where=f"{self.name} config")


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: instantiate and register the method under ``cls.name``."""
    if not cls.name or cls.name in METHODS:
        raise ValueError(f"method name {cls.name!r} is empty or registered twice")
    METHODS[cls.name] = cls()
    return cls


def get_method(name: str) -> Method:
    from deltatune import methods  # noqa: F401  (registers the built-in methods)

    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; available: {sorted(METHODS)}") from None


def make_config(method: str, mapping: dict[str, Any] | None = None) -> Any:
    """Typed config for ``method`` from a (CLI/YAML) mapping."""
    return get_method(method).parse(dict(mapping or {}))
