"""Attach, apply, merge and detach deltas on a live ``transformers`` model.

* :func:`attach` wraps target modules in :class:`DeltaLayer`, freezes the base and makes the parts
  (and task heads) trainable;
* :func:`apply_delta` checks the fingerprint and attaches a loaded delta (or merges it);
* :func:`merge_delta` / :func:`revert_delta` fold a delta into the base weights and out again,
  explicitly, never as a side effect of ``train()``/``eval()``;
* :func:`detach` restores the original modules.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from deltatune.delta import Delta
from deltatune.errors import DeltaFormatError, ShapeMismatch, TargetError
from deltatune.fingerprint import check_fingerprint, fingerprint
from deltatune.layer import DeltaLayer
from deltatune.parts.base import Part
from deltatune.parts.capabilities import require_capability
from deltatune.parts.tied import TiedAlias

DEFAULT = "default"


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The module at ``name``, seen through any ``DeltaLayer`` wrapper (its ``base``)."""
    module = model.get_submodule(name) if name else model
    return module.base if isinstance(module, DeltaLayer) else module


def _wrapper(model: nn.Module, name: str) -> DeltaLayer:
    module = model.get_submodule(name)
    if isinstance(module, DeltaLayer):
        return module
    layer = DeltaLayer(module)
    model.set_submodule(name, layer)
    return layer


def delta_layers(model: nn.Module) -> Iterator[tuple[str, DeltaLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, DeltaLayer):
            yield name, module


TIED_SUFFIX = "@tied:"


def attach_parts(model: nn.Module, parts: dict[str, Part], name: str = DEFAULT, activate: bool = True) -> None:
    """Wrap each target module and add its part under ``name``, on the base module's device."""
    for module_name, part in parts.items():
        try:
            base = get_module(model, module_name)
        except AttributeError:
            raise TargetError(
                f"the delta has a part for {module_name!r}, which is not a module of this model"
            ) from None
        part.check_base(base, module_name)
        ref = next(base.parameters())
        part.to(ref.device)
        _wrapper(model, module_name).add(name, part, activate)
        for alias in tied_aliases(model, module_name):
            # a tied module with a part of its own keeps it and sees this one too, under its own name
            alias_name = name if alias not in parts else f"{name}{TIED_SUFFIX}{module_name.replace('.', '_')}"
            _wrapper(model, alias).add(alias_name, TiedAlias(part, module_name), activate)


def tied_aliases(model: nn.Module, name: str) -> list[str]:
    """Other modules whose ``weight`` is the very tensor of module ``name`` (tied embeddings)."""
    weight = getattr(get_module(model, name), "weight", None)
    if weight is None:
        return []
    return [n for n, m in logical_modules(model) if n != name and getattr(m, "weight", None) is weight]


def logical_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` of the base model, seeing through ``DeltaLayer`` wrappers."""
    wrapped = {id(m.base) for _, m in delta_layers(model)}
    for n, m in model.named_modules():
        if isinstance(m, DeltaLayer):
            yield n, m.base
        elif id(m) not in wrapped:
            yield n, m


def freeze_base(model: nn.Module, trainable_heads: Iterable[str] = ()) -> None:
    """Base tensors frozen; every attached part and every named head module trainable."""
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in delta_layers(model):
        for part in layer.parts.values():
            for p in part.parameters():
                p.requires_grad_(True)
    for head in trainable_heads:
        for p in model.get_submodule(head).parameters():
            p.requires_grad_(True)


def attach(model: nn.Module, config, heads: Sequence[str] | None = None, name: str = DEFAULT) -> Delta:
    """Create a method's parts on ``model`` and return the live :class:`Delta`.

    ``heads`` are task-head modules trained densely and saved whole; by default the model's
    classifier/score head if it has one (see :func:`default_heads`).
    """
    from deltatune.methods.registry import get_method

    heads = list(default_heads(model) if heads is None else heads)
    method = get_method(config.method)
    fp = fingerprint(model, exclude=heads)
    parts = method.create_parts(model, config, exclude=heads)
    attach_parts(model, parts, name)
    freeze_base(model, heads)
    delta = Delta(method=config.method, config=method.config_dict(config), parts=parts, fingerprint=fp,
                  heads={h: {} for h in heads})
    delta.snapshot_heads(model)
    return delta


def default_heads(model: nn.Module) -> list[str]:
    """Task heads a ``*ForSequenceClassification`` model creates fresh: ``classifier`` / ``score``."""
    names = dict(model.named_children())
    arch = type(model).__name__
    if "ForSequenceClassification" in arch or "ForTokenClassification" in arch:
        return [n for n in ("classifier", "score") if n in names]
    return []


def load_heads(model: nn.Module, delta: Delta, where: str = "delta") -> None:
    for head, tensors in delta.heads.items():
        try:
            module = model.get_submodule(head)
        except AttributeError:
            raise TargetError(f"{where}: head {head!r} is not a module of this model") from None
        own = module.state_dict()
        for k, t in tensors.items():
            if k not in own or own[k].shape != t.shape:
                got = tuple(own[k].shape) if k in own else "missing"
                raise ShapeMismatch(f"{where}: head tensor {head}.{k} has shape {tuple(t.shape)}, model has {got}")
        module.load_state_dict(tensors, strict=True)


def apply_delta(model: nn.Module, delta: Delta, name: str = DEFAULT, merge: bool = False, force: bool = False,
                where: str = "delta") -> None:
    """Check the base fingerprint, load task heads, then attach (or merge) the delta's parts.

    With ``merge`` every part must be additive (:class:`~deltatune.errors.NotMergeable`, before anything is
    written)."""
    if merge:
        require_capability(delta, "additive", f"apply with merging ({where})")
    if not force:
        check_fingerprint(delta.fingerprint, model, delta.heads, where)
    load_heads(model, delta, where)
    if merge:
        merge_delta(model, delta, where=where)
    else:
        attach_parts(model, delta.parts, name)


def merge_delta(model: nn.Module, delta: Delta, where: str = "delta") -> None:
    """``W ← W + ΔW`` for every part, into the (unwrapped) base modules (every part must be additive:
    :class:`~deltatune.errors.NotMergeable` before any weight is written)."""
    require_capability(delta, "additive", f"merge ({where})")
    for module_name, part in delta.parts.items():
        base = get_module(model, module_name)
        part.check_base(base, f"{where}:{module_name}")
        part.merge_into(base)


def revert_delta(model: nn.Module, delta: Delta) -> None:
    """``W ← W − ΔW``: undo :func:`merge_delta` (apply stacks in reverse order to restore the base)."""
    for module_name, part in reversed(list(delta.parts.items())):
        part.unmerge_from(get_module(model, module_name))


def detach(model: nn.Module, name: str | None = None) -> dict[str, Part]:
    """Remove parts (all, or those under ``name``); unwrap layers that have none left."""
    removed: dict[str, Part] = {}
    for module_name, layer in list(delta_layers(model)):
        for part_name in list(layer.parts):
            if name is None or part_name == name or part_name.startswith(f"{name}{TIED_SUFFIX}"):
                part = layer.remove(part_name)
                if not part.is_alias:
                    removed[module_name] = part
        if not len(layer.parts):
            model.set_submodule(module_name, layer.base)
    return removed


@contextmanager
def mixed_batch(model: nn.Module, names: Sequence[str | None]):
    """Within the block, row ``i`` of every forward uses the delta ``names[i]`` (``None``: base)."""
    unique = list(dict.fromkeys(names))
    row_ids = torch.tensor([unique.index(n) for n in names], dtype=torch.long)
    layers = list(delta_layers(model))
    known = {p for _, layer in layers for p in layer.parts}
    missing = [n for n in unique if n is not None and n not in known]
    if missing:
        raise DeltaFormatError(f"no delta named {missing} is attached; attached: {sorted(known)}")
    for _, layer in layers:
        layer.route(unique, row_ids)
    try:
        yield
    finally:
        for _, layer in layers:
            layer.route(None)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
