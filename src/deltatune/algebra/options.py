"""Merge parameters: what each method accepts, per input and globally, and the two presets' defaults.

The papers' reference code and mergekit 0.1.5 disagree on several choices (merging.md §3); every one
is an explicit option here and a preset only sets defaults:

========================  ===============================  =========================  ===================
option                    ``paper`` (authors' code)        ``mergekit`` (0.1.5)       ``peft`` (0.21)
========================  ===============================  =========================  ===================
``scope`` (TIES/PCB trim) ``global`` (whole model)         ``tensor``                 ``tensor``
``k_rule``                ``threshold`` (ties keep more)   ``count`` (exactly k)      ``count``
``sign_tie`` (sum = 0)    ``majority`` (global)            ``plus``                   ``plus``
``weighted_vote``         false                            true                       false
``divide`` (disjoint)     ``weights``                      ``weights``                ``count``
``rescale`` (DARE)        ``inverse`` (1/ρ)                ``l1`` (norm matching)     ``inverse``
Breadcrumbs ``scope``     ``row``                          ``tensor``                 ``tensor``
density default           required                         1.0 (no sparsification)    required
========================  ===============================  =========================  ===================
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from deltatune.errors import ConfigError

PRESETS = ("paper", "mergekit", "peft")
SEMANTICS = {
    "paper": {"scope": "global", "k_rule": "threshold", "sign_tie": "majority", "weighted_vote": False,
              "divide": "weights", "rescale": "inverse"},
    "mergekit": {"scope": "tensor", "k_rule": "count", "sign_tie": "plus", "weighted_vote": True,
                 "divide": "weights", "rescale": "l1"},
    "peft": {"scope": "tensor", "k_rule": "count", "sign_tie": "plus", "weighted_vote": False,
             "divide": "count", "rescale": "inverse"},
}
CHOICES = {"scope": ("global", "tensor", "row"), "k_rule": ("threshold", "count"),
           "sign_tie": ("plus", "majority"), "divide": ("weights", "count"),
           "rescale": ("inverse", "l1", "none"), "inter": ("raw", "normalized", "vision")}
PER_INPUT = {"weight", "density", "gamma", "epsilon"}
NUMERIC = {"weight", "density", "gamma", "epsilon", "lambda", "t", "temperature", "clip_low", "clip_high"}
BOOLEAN = {"normalize", "weighted_vote", "filter_wise", "int8_mask"}


@dataclass(frozen=True)
class MethodParams:
    """Which keys a method reads (``keys``), its defaults and whether density must be given."""

    keys: frozenset[str]
    defaults: Mapping[str, Any]
    sparsifies: bool = False


def _coerce(key: str, value: Any, where: str) -> Any:
    if isinstance(value, list):
        raise ConfigError(f"{where}: {key!r} is a list; per-layer gradients and filters are not supported "
                          "— give one value (per input if needed)")
    if key in NUMERIC:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: {key!r} must be a number, got {value!r}")
        return float(value)
    if key in BOOLEAN:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {key!r} must be true or false, got {value!r}")
        return value
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(f"{where}: {key!r} must be one of {list(CHOICES[key])}, got {value!r}")
    return value


def resolve_params(method: str, spec: MethodParams, preset: str, global_params: Mapping[str, Any],
                   input_params: list[Mapping[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``(global, per-input)`` parameter dicts: explicit values, then the method's and preset's defaults."""
    if preset not in PRESETS:
        raise ConfigError(f"preset must be one of {list(PRESETS)}, got {preset!r}")
    allowed = spec.keys | set(SEMANTICS[preset]) | {"int8_mask"}
    for key in global_params:
        if key not in allowed:
            raise ConfigError(f"{method}: unknown parameter {key!r}; accepted: {sorted(spec.keys)}")
    merged: dict[str, Any] = {**SEMANTICS[preset], **spec.defaults}
    if method.startswith("breadcrumbs") and "scope" not in global_params:
        merged["scope"] = "row" if preset == "paper" else "tensor"
    merged.update({k: _coerce(k, v, method) for k, v in global_params.items()})
    per_input = []
    for i, params in enumerate(input_params):
        for key in params:
            if key not in PER_INPUT or key not in spec.keys | {"weight"}:
                raise ConfigError(f"{method}: input {i}: unknown per-input parameter {key!r}; accepted: "
                                  f"{sorted(PER_INPUT & (spec.keys | {'weight'}))}")
        own = {k: merged[k] for k in PER_INPUT if k in merged}
        own.update({k: _coerce(k, v, f"{method} input {i}") for k, v in params.items()})
        own.setdefault("weight", 1.0)
        if spec.sparsifies and "density" not in own:
            if preset != "mergekit":
                raise ConfigError(f"{method}: input {i} has no 'density'; sparsifying methods need an explicit "
                                  "density in (0, 1] (mergekit's silent default of 1.0 disables sparsification)")
            own["density"] = 1.0
        if "density" in own and not 0.0 < own["density"] <= 1.0:
            raise ConfigError(f"{method}: input {i}: density must be in (0, 1], got {own['density']}")
        if "gamma" in own and not 0.0 <= own["gamma"] < 1.0:
            raise ConfigError(f"{method}: input {i}: gamma must be in [0, 1), got {own['gamma']}")
        per_input.append(own)
    if merged.get("normalize") and not method.startswith("pcb"):
        total = sum(p["weight"] for p in per_input)
        if abs(total) < 1e-12:
            weights = [p["weight"] for p in per_input]
            raise ConfigError(f"{method}: normalize is true but the weights sum to 0 ({weights}); "
                              "set normalize: false for negation")
    return merged, per_input
