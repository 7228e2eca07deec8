"""Target selection by module-name patterns.

A pattern matches a module name when it equals the name, is a dot-separated suffix of it
(``query`` matches ``bert.encoder.layer.0.attention.self.query``), or, if it contains regex
characters, fully matches it as a regular expression.  ``all-linear`` means every Linear/Conv1D
module except task heads and a causal LM's output layer; ``all`` every module with parameters.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from torch import nn

from deltatune.errors import TargetError
from deltatune.parts.layers import LayerKind, layer_kind

_REGEX_CHARS = set("*?[]()|^$+\\{}")


def pattern_matches(pattern: str, name: str) -> bool:
    if set(pattern) & _REGEX_CHARS:
        return re.fullmatch(pattern, name) is not None
    return name == pattern or name.endswith("." + pattern)


def _excluded(name: str, exclude: Iterable[str]) -> bool:
    return any(name == e or name.startswith(e + ".") for e in exclude)


def output_layer_names(model: nn.Module) -> set[str]:
    """The LM head (``get_output_embeddings``), which ``all-linear`` leaves out as PEFT does."""
    getter = getattr(model, "get_output_embeddings", None)
    out = getter() if callable(getter) else None
    return {n for n, m in model.named_modules() if out is not None and m is out}


def select_modules(model: nn.Module, patterns: Sequence[str], exclude: Iterable[str] = (),
                   kinds: Iterable[LayerKind] = tuple(LayerKind)) -> list[str]:
    """Names of the modules matched by ``patterns`` (each pattern must match at least one)."""
    exclude = list(exclude)
    allowed = set(kinds)
    candidates = [n for n, m in model.named_modules() if layer_kind(m) in allowed and not _excluded(n, exclude)]
    if list(patterns) == ["all-linear"]:
        skip = output_layer_names(model)
        chosen = [n for n in candidates
                  if layer_kind(model.get_submodule(n)) is not LayerKind.EMBEDDING and n not in skip]
        if not chosen:
            raise TargetError("all-linear matched no Linear/Conv1D module in this model")
        return chosen
    chosen: list[str] = []
    for pattern in patterns:
        hits = [n for n in candidates if pattern_matches(pattern, n)]
        if not hits:
            raise TargetError(
                f"target pattern {pattern!r} matched no module. Available "
                f"{'/'.join(sorted(k.value for k in allowed))} modules: {summarise_names(candidates)}"
            )
        chosen.extend(h for h in hits if h not in chosen)
    return [n for n in candidates if n in chosen]


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
    exclude = list(exclude)
    return [n for n, m in model.named_modules()
            if n and any(True for _ in m.parameters(recurse=False)) and not _excluded(n, exclude)]
