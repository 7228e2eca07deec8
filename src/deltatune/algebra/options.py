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
``rescale`` (DARE, DELLA)  ``inverse`` (1/ρ)                ``l1`` (norm matching)     ``inverse``
Breadcrumbs ``scope``     ``row``                          ``tensor``                 ``tensor``
density default           required                         1.0 (no sparsification)    required
========================  ===============================  =========================  ===================

``dare_ties`` also takes its ``normalize`` default from the preset: ``paper`` averages the agreeing deltas (TIES'
disjoint mean after DARE, MergeLM#38), ``mergekit`` sums them (its ``normalize: false``).  ``k_rule`` ``threshold``
keeps ``|τ| ≥`` the ``(n − ⌊ρ·n⌋)``-th smallest magnitude, ``⌊ρ·n⌋ + 1`` entries as the TIES authors' ``kthvalue``
mask does.

``rescale`` also takes mergekit's booleans (``true`` = ``l1``, ``false`` = ``none``).  TIES and Breadcrumbs take
only ``l1`` (the L1 norm matched after their masks, mergekit's ``rescale: true``) or ``none``, and default to ``none``
under every preset (the papers, PEFT and mergekit's own default for them).  A method refuses an option value it does
not implement (:attr:`MethodParams.limits`: TIES has no ``row`` scope, Breadcrumbs no ``global`` one, PCB no ``row``
one), and ``divide: count`` with an explicit ``normalize: false`` (the count division always divides).

Breadcrumbs' ``gamma`` (0.01) and DELLA's ``epsilon`` (0.15) default to mergekit's values under every preset; the
papers' own runs use other values (Breadcrumbs' README: γ = 0.1 in its own convention; DELLA's README: ε = 0.14),
so a ``paper`` merge that should match them gives them explicitly.

Every number must be finite (a NaN weight or λ would write an all-NaN merge) and at most
:data:`MAX_INPUTS` inputs are merged at once.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from deltatune.config import brief, finite_float
from deltatune.errors import ConfigError, InputTooLarge

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
#: a method's defaults that depend on the preset: the DARE authors run TIES' disjoint *mean* after DARE (MergeLM#38),
#: where mergekit's ``dare_ties`` defaults to ``normalize: false`` (agreeing deltas summed)
PRESET_METHOD_DEFAULTS = {("paper", "dare_ties"): {"normalize": True}}
VOTE_OPTIONS = frozenset({"sign_tie", "weighted_vote", "divide"})
PER_INPUT = {"weight", "density", "gamma", "epsilon"}
NUMERIC = {"weight", "density", "gamma", "epsilon", "lambda", "t", "temperature", "clip_low", "clip_high"}
BOOLEAN = {"normalize", "weighted_vote", "filter_wise", "int8_mask"}
MAX_INPUTS = 256
"""The most inputs one merge takes.  A merge's cost is linear in its inputs but heavy per input: every
statistics pass and the merge pass densify each input's task vector tensor by tensor, and each tensor's
job holds one dense task vector per input (MiniLM LoRA r=8 deltas on every linear layer, one core: about
0.03 s CPU and 6.5 MB per input with task arithmetic, 0.13 s and 12 MB with global TIES; 1,000 TIES
inputs would need about 12 GB).  256 is far above published merges (model soups: ≤ 72 ingredients; TIES,
DARE, PCB, LiNeS: ≤ 20 tasks) and bounds such a merge to about 35 s and 3 GB; beyond it, merge in groups."""


def check_input_count(count: int, where: str, limit: int = MAX_INPUTS) -> None:
    """:class:`InputTooLarge` unless ``count ≤ limit`` (``where`` names the recipe or call)."""
    if count > limit:
        raise InputTooLarge(f"{where}: {count} inputs; at most {limit} can be merged at once (each input is "
                            "densified tensor by tensor and held in memory with the others): merge in groups")


@dataclass(frozen=True)
class MethodParams:
    """Which keys a method reads (``keys``), its defaults and whether density must be given.

    ``limits`` narrows a preset option (:data:`CHOICES`) to the values the method implements (TIES has no
    per-row trim, Breadcrumbs no global one): any other value is refused rather than silently read as another.
    ``votes``: the method runs TIES' sign election and disjoint merge (reads ``divide``).  ``mergekit_noops``:
    keys mergekit accepts for this method without effect (``density``, ``rescale`` for ``task_arithmetic``), taken and
    ignored under the ``mergekit`` preset only, so its recipes run unchanged.
    """

    keys: frozenset[str]
    defaults: Mapping[str, Any]
    sparsifies: bool = False
    limits: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    votes: bool = False
    mergekit_noops: frozenset[str] = frozenset()
    semantics: frozenset[str] = frozenset()

    def reads(self) -> frozenset[str]:
        """The preset options (:data:`SEMANTICS`) this method reads: the sign election's when it votes, those it
        narrows (``limits``) and those it names (``semantics``, e.g. DARE's ``rescale``, TIES' ``k_rule``)."""
        return self.semantics | frozenset(self.limits) | (VOTE_OPTIONS if self.votes else frozenset())


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


FLOAT32_MAX = 3.4028234663852886e38


def coerce_param(key: str, value: Any, where: str) -> Any:
    """``value`` checked for merge parameter ``key``: a finite number, a boolean or one of the choices."""
    if isinstance(value, list):
        raise ConfigError(f"{where}: {brief(key)} is a list; per-layer gradients and filters are not supported "
                          "— give one value (per input if needed)")
    if key in NUMERIC:
        if isinstance(value, str):  # text is not a number here; YAML 1.1 reads 1e-3 (no dot) as text
            hint = " (YAML reads 1e-3 as text: write 1.0e-3)" if _looks_numeric(value) else ""
            raise ConfigError(f"{where}: {key!r} must be a number, got {brief(value)}{hint}")
        number = finite_float(value, f"{where}: {key!r}")
        if abs(number) > FLOAT32_MAX:  # merges compute in fp32: a larger weight or λ would overflow there
            raise ConfigError(f"{where}: {key!r} is {brief(value)}, beyond the float32 range (±3.4e38) merges use")
        return number
    if key in BOOLEAN:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {key!r} must be true or false, got {brief(value)}")
        return value
    if key == "rescale" and isinstance(value, bool):  # mergekit's spelling: true is its L1 norm matching
        return "l1" if value else "none"
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(f"{where}: {key!r} must be one of {list(CHOICES[key])}, got {brief(value)}")
    return value


def _check_limits(method: str, spec: MethodParams, merged: Mapping[str, Any]) -> None:
    """:class:`ConfigError` naming the option and ``method`` when a resolved option takes a value the method does
    not implement (``spec.limits``)."""
    for key, values in spec.limits.items():
        if merged.get(key) not in values:
            raise ConfigError(f"{method}: {key} {brief(merged.get(key))} is not implemented by {method}; "
                              f"{key} must be one of {list(values)}")


def _check_count_division(method: str, spec: MethodParams, merged: Mapping[str, Any],
                          given: Mapping[str, Any]) -> None:
    """``divide: count`` (PEFT's disjoint merge) always divides the agreeing sum by the number of agreeing
    inputs, ``Σ_{t∈A} w_t τ_t / |A|``: an explicit ``normalize: false`` (the undivided sum) cannot be honoured
    there and is refused, naming both options."""
    if spec.votes and merged.get("divide") == "count" and given.get("normalize") is False:
        raise ConfigError(f"{method}: normalize false is not implemented with divide 'count' (the PEFT preset's "
                          "disjoint mean over the agreeing inputs); use divide: weights for the undivided sum")


def resolve_params(method: str, spec: MethodParams, preset: str, global_params: Mapping[str, Any],
                   input_params: list[Mapping[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``(global, per-input)`` parameter dicts: explicit values, then the method's and preset's defaults."""
    if preset not in PRESETS:
        raise ConfigError(f"preset must be one of {list(PRESETS)}, got {brief(preset)}")
    if preset == "mergekit":
        spec = replace(spec, keys=spec.keys | spec.mergekit_noops)
    allowed = spec.keys | set(SEMANTICS[preset]) | {"int8_mask"}
    for key in global_params:
        if key not in allowed:
            raise ConfigError(f"{method}: unknown parameter {brief(key)}; accepted: {sorted(spec.keys)}")
        if key in SEMANTICS[preset] and key not in spec.reads() | spec.keys:  # a choice it would silently ignore
            raise ConfigError(f"{method}: {key} has no effect on {method} (it reads "
                              f"{sorted(spec.reads()) or 'none of the preset options'}); remove it")
    merged: dict[str, Any] = {**SEMANTICS[preset], **spec.defaults, **PRESET_METHOD_DEFAULTS.get((preset, method), {})}
    if method.startswith("breadcrumbs") and "scope" not in global_params:
        merged["scope"] = "row" if preset == "paper" else "tensor"
    merged.update({k: coerce_param(k, v, method) for k, v in global_params.items()})
    _check_limits(method, spec, merged)
    _check_count_division(method, spec, merged, global_params)
    per_input = []
    for i, params in enumerate(input_params):
        for key in params:  # a weight too where the method reads none (slerp, model_stock): it would be ignored
            if key == "weight" and key not in spec.keys and preset == "mergekit":
                warnings.warn(f"{method}: input {i}'s weight is ignored ({method} reads no weights; mergekit "
                              "ignores it too)", stacklevel=2)
            elif key not in PER_INPUT or key not in spec.keys:
                raise ConfigError(f"{method}: input {i}: unknown per-input parameter {brief(key)}; accepted: "
                                  f"{sorted(PER_INPUT & spec.keys) or 'none'}")
        own = {k: merged[k] for k in PER_INPUT if k in merged}
        own.update({k: coerce_param(k, v, f"{method} input {i}") for k, v in params.items()})
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
            raise ConfigError(f"{method}: normalize is true but the weights sum to 0 ({brief(weights)}); "
                              "set normalize: false for negation")
    return merged, per_input
