"""Capability checks: an operation refuses, up front and before writing anything, a part kind that lacks a
capability it needs (e.g. merging a non-additive adapter), with a typed error naming the module and kind."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from deltatune.errors import NotMergeable
from deltatune.parts.base import Part

CAPABILITIES: dict[str, str] = {
    "additive": "additive (mergeable as θ ← θ + Δθ)",
    "base_dependent": "base-dependent (its update depends on the base weights)",
    "mixed_rows": "usable in mixed-row batches",
    "has_aux_loss": "a source of an auxiliary loss",
    "model_level": "model-level (acting on the whole model's inputs, e.g. virtual tokens)",
}


def require_capability(delta: Any, capability: str, operation: str, value: bool = True) -> None:
    """Raise :class:`NotMergeable` unless every part of ``delta`` (a :class:`~deltatune.delta.Delta` or a
    mapping ``module → Part``) has ``getattr(type(part), capability) == value``.

    The message names the operation, the first offending module and its kind, and how many parts fail."""
    if capability not in CAPABILITIES:
        raise KeyError(f"unknown part capability {capability!r}; known: {sorted(CAPABILITIES)}")
    parts: Mapping[str, Part] = delta.parts if hasattr(delta, "parts") else delta
    bad = [(name, part) for name, part in parts.items() if bool(getattr(type(part), capability)) is not value]
    if not bad:
        return
    name, part = bad[0]
    what = CAPABILITIES[capability] if value else f"not {CAPABILITIES[capability]}"
    more = f" (and {len(bad) - 1} other part(s))" if len(bad) > 1 else ""
    raise NotMergeable(f"{operation}: module {name!r} holds a {part.kind!r} part{more}, and {operation} needs every "
                       f"part to be {what}; nothing was written", module=name, kind=part.kind)
