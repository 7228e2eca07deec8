"""Target selection: by module-name pattern, by module type, by role, or by a predicate.

A target is one of

* a **name pattern**: it matches a module name when it equals the name, is a dot-separated suffix of it
  (``query`` matches ``bert.encoder.layer.0.attention.self.query``), or, if it contains regex characters,
  fully matches it as a regular expression;
* ``type:Class``: every module whose class is named ``Class`` or ends with it (``type:RMSNorm`` matches
  ``LlamaRMSNorm``, ``type:LayerNorm`` matches ``nn.LayerNorm``);
* ``role:attention`` / ``role:mlp``: the outermost attention block and the feed-forward block of each layer
  (found by class name: ``…Attention``, ``…MLP``; see :data:`ROLES`);
* in Python, a predicate ``(name, module) -> bool``.

``all-linear`` means every Linear/Conv1D module except task heads and a causal LM's output layer; ``all``
every module with parameters.  Names are the base model's own paths, seen through any ``DeltaLayer``
wrapper, so targets of a second delta resolve on a model that already carries one (parts nest).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence

from torch import nn

from deltatune.errors import TargetError
from deltatune.parts.layers import LayerKind, layer_kind

_REGEX_CHARS = set("*?[]()|^$+\\{}")
Predicate = Callable[[str, nn.Module], bool]
Target = str | Predicate
TYPE_PREFIX, ROLE_PREFIX = "type:", "role:"


def _is_attention(name: str, module: nn.Module) -> bool:
    return type(module).__name__.endswith("Attention")


def _is_mlp(name: str, module: nn.Module) -> bool:
    cls = type(module).__name__
    return cls.endswith("MLP") or cls.endswith("FeedForward") or name.rsplit(".", 1)[-1] in ("mlp", "feed_forward")


#: role name → predicate on ``(name, module)``; a role keeps only the outermost matching modules.
ROLES: dict[str, Predicate] = {"attention": _is_attention, "mlp": _is_mlp}


def pattern_matches(pattern: str, name: str) -> bool:
    if set(pattern) & _REGEX_CHARS:
        return re.fullmatch(pattern, name) is not None
    return name == pattern or name.endswith("." + pattern)


def type_matches(class_name: str, module: nn.Module) -> bool:
    """``type:class_name`` matches a module whose class (or a base class) is named ``class_name`` or ends with it."""
    return any(c.__name__ == class_name or c.__name__.endswith(class_name) for c in type(module).__mro__
               if c not in (nn.Module, object))


def _excluded(name: str, exclude: Iterable[str]) -> bool:
    return any(name == e or name.startswith(e + ".") for e in exclude)


def output_layer_names(model: nn.Module) -> set[str]:
    """The LM head (``get_output_embeddings``), which ``all-linear`` leaves out as PEFT does.  Once a delta has
    wrapped it, the getter returns the wrapper: the module compared is the one it wraps."""
    from deltatune.layer import DeltaLayer
    from deltatune.model import logical_modules

    getter = getattr(model, "get_output_embeddings", None)
    out = getter() if callable(getter) else None
    if isinstance(out, DeltaLayer):
        out = out.base
    return {n for n, m in logical_modules(model) if out is not None and m is out}


def _outermost(names: list[str]) -> list[str]:
    kept: list[str] = []
    for n in names:
        if not any(n.startswith(k + ".") for k in kept):
            kept.append(n)
    return kept


def _target_hits(target: Target, candidates: dict[str, nn.Module]) -> list[str]:
    if callable(target):
        return [n for n, m in candidates.items() if target(n, m)]
    if target.startswith(TYPE_PREFIX):
        cls = target[len(TYPE_PREFIX):]
        return [n for n, m in candidates.items() if type_matches(cls, m)]
    if target.startswith(ROLE_PREFIX):
        role = target[len(ROLE_PREFIX):]
        if role not in ROLES:
            raise TargetError(f"unknown role {role!r} in target {target!r}; known roles: {sorted(ROLES)}")
        return _outermost([n for n, m in candidates.items() if n and ROLES[role](n, m)])
    return [n for n in candidates if pattern_matches(target, n)]


def _describe_miss(target: Target, candidates: dict[str, nn.Module], what: str) -> str:
    if callable(target):
        label = getattr(target, "__name__", "predicate")
        return f"target predicate {label!r} matched no {what} module. Available: {summarise_names(list(candidates))}"
    if target.startswith(TYPE_PREFIX):
        types = sorted({type(m).__name__ for m in candidates.values()})
        return f"target {target!r} matched no {what} module. Module types in this model: {', '.join(types[:60])}"
    if target.startswith(ROLE_PREFIX):
        found = [r for r, pred in ROLES.items() if any(n and pred(n, m) for n, m in candidates.items())]
        return (f"target {target!r} matched no {what} module (this model has no such block); roles present: "
                f"{found or 'none'}. Target modules by name or type instead: {summarise_names(list(candidates))}")
    return f"target pattern {target!r} matched no {what} module. Available: {summarise_names(list(candidates))}"


def select_modules(model: nn.Module, patterns: Sequence[Target], exclude: Iterable[str] = (),
                   kinds: Iterable[LayerKind] | None = tuple(LayerKind)) -> list[str]:
    """Names of the modules matched by ``patterns`` (each must match at least one module), in model order.

    ``kinds`` limits the candidates to Linear/Conv1D/Embedding kinds; ``None`` allows any module (blocks,
    norms).  A target that matches nothing raises :class:`TargetError` listing what exists."""
    from deltatune.model import logical_modules

    exclude = list(exclude)
    allowed = None if kinds is None else set(kinds)
    candidates = {n: m for n, m in logical_modules(model)
                  if (allowed is None or layer_kind(m) in allowed) and not _excluded(n, exclude)}
    what = "" if allowed is None else "/".join(sorted(k.value for k in allowed))
    chosen: set[str] = set()
    for target in patterns:
        if target == "all-linear":  # alone or beside other targets (``all-linear`` + ``type:Embedding``)
            skip = output_layer_names(model)
            hits = [n for n, m in candidates.items()
                    if layer_kind(m) in (LayerKind.LINEAR, LayerKind.CONV1D) and n not in skip]
            if not hits:
                raise TargetError("all-linear matched no Linear/Conv1D module in this model")
        else:
            hits = _target_hits(target, candidates)
            if not hits:
                raise TargetError(_describe_miss(target, candidates, what))
        chosen.update(hits)
    return [n for n in candidates if n in chosen]


def one_per_weight(model: nn.Module, names: Iterable[str]) -> list[str]:
    """``names`` without every module whose ``weight`` is the very tensor (``id``) of an earlier one's: tied weights
    (GPT-2's ``transformer.wte``/``lm_head``, T5's ``shared``/``encoder.embed_tokens``/``decoder.embed_tokens``)
    keep only their first module in ``names``.  A method that trains a module's weight gives each weight tensor one
    part: the other modules sharing it see that part as an alias on attach (:func:`deltatune.model.attach_parts`),
    whereas a second part on the same tensor would train a second, overlapping update that counts the tensor twice
    in the budget and that in-place training would overwrite (each binding keeps its own ``W₀``).  Modules without a
    ``weight`` are kept."""
    from deltatune.model import get_module

    kept, seen = [], set()
    for name in names:
        weight = getattr(get_module(model, name), "weight", None)
        if weight is not None:
            if id(weight) in seen:
                continue
            seen.add(id(weight))
        kept.append(name)
    return kept


def summarise_names(names: Sequence[str], limit: int = 40) -> str:
    """Names with layer numbers folded (``encoder.layer.{0..5}.attention.self.query``)."""
    folded: dict[str, list[str]] = {}
    for n in names:
        key = re.sub(r"\.(\d+)\.", ".{N}.", n)
        folded.setdefault(key, []).append(n)
    items = sorted(folded)
    shown = ", ".join(items[:limit])
    return shown + (f", … ({len(items) - limit} more)" if len(items) > limit else "")


def modules_with_parameters(model: nn.Module, exclude: Iterable[str] = ()) -> list[str]:
    """Every module that owns parameters directly (full fine-tuning's targets)."""
    from deltatune.model import logical_modules

    exclude = list(exclude)
    return [n for n, m in logical_modules(model)
            if n and any(True for _ in m.parameters(recurse=False)) and not _excluded(n, exclude)]


def narrow_names(names: list[str], patterns: Sequence[str], what: str, who: str = "target") -> list[str]:
    """The ``names`` matching any of ``patterns`` (``["all"]``: every name); a pattern matching none raises
    :class:`TargetError` naming it and listing ``names`` (``what`` says what they are, e.g. "module with a bias")."""
    if list(patterns) == ["all"]:
        return names
    for pattern in patterns:
        if not any(pattern_matches(pattern, n) for n in names):
            raise TargetError(f"{who} pattern {pattern!r} matched no {what}. Available: {summarise_names(names)}")
    return [n for n in names if any(pattern_matches(p, n) for p in patterns)]
