"""Which merges of stacked deltas (trained on top of others, ``train --on``) mean what they say.

A delta ``B`` trained on ``A`` is a task vector from ``θ₀ + Δ_A``, not from ``θ₀``.  Merging deltas that share one
stack (``B`` and ``C`` both trained on ``A``) works in that stack's space: the result keeps ``A`` beneath it, and
``merge(B, C)`` is ``θ₀ + Δ_A + m(Δ_B, Δ_C)`` for any method ``m`` that reads no base weights.  Deltas on different
stacks (``B`` on ``A`` beside ``A`` itself, or beside ``C`` on the bare base) have no common space: only the plain
sum ``Σ_t Δ_t`` (``compose``; ``task_arithmetic`` with every weight and λ equal to 1) is the same in every space —
``A`` stays beneath at weight 1 (or counts once, when it is an input).  A weighted or non-linear merge there would
scale or trim ``Δ_B`` alone where ``B``'s task vector from ``θ₀`` is ``Δ_A + Δ_B``, and is refused
(:class:`~deltatune.provenance.StackedDeltaRefused`), as is a method that reads the base (its base would be
``θ₀ + Δ_A``, which the merge never reads).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from deltatune.delta import Delta
from deltatune.provenance import StackedDeltaRefused, recorded_stack


def _stack_key(delta: Delta) -> tuple[tuple[str, str], ...]:
    return tuple((str(r.get("path")), str(r.get("digest"))) for r in recorded_stack(delta))


def _plain_sum(method: str, params: Mapping[str, Any], per_input: Sequence[Mapping[str, Any]]) -> bool:
    """Whether the merge is ``Σ_t Δ_t``: ``task_arithmetic`` with λ = 1, no normalisation and every weight 1."""
    return (method == "task_arithmetic" and float(params.get("lambda", 1.0)) == 1.0 and not params.get("normalize")
            and all(float(p.get("weight", 1.0)) == 1.0 for p in per_input))


def _reads_base(method: str, needs_base: bool, params: Mapping[str, Any],
                per_input: Sequence[Mapping[str, Any]]) -> bool:
    """Whether the merged task vector reads ``θ₀``: Model Stock, SLERP, and an unnormalised ``linear`` whose
    weights do not sum to 1 (``Σ w θ_t − θ₀ = Σ w τ_t + (Σ w − 1) θ₀``)."""
    if needs_base:
        return True
    return (method == "linear" and not params.get("normalize")
            and abs(sum(float(p.get("weight", 1.0)) for p in per_input) - 1.0) >= 1e-12)


def check_stacked_inputs(deltas: Sequence[Delta], labels: Sequence[str], method: str, needs_base: bool,
                         params: Mapping[str, Any], per_input: Sequence[Mapping[str, Any]]) -> None:
    """Refuse a merge of stacked deltas that would not mean what it says (see the module docstring), naming the
    inputs and their stacks; merges of unstacked deltas pass unchanged."""
    stacks = [_stack_key(d) for d in deltas]
    if not any(stacks):
        return
    stacked = [f"{label} (on {[p for p, _ in key]})" for label, key in zip(labels, stacks, strict=True) if key]
    if _reads_base(method, needs_base, params, per_input):
        raise StackedDeltaRefused(
            f"merge ({method}): {', '.join(stacked)} was trained on top of other deltas, and {method} reads the base "
            "weights, which for a stacked delta are the base plus the deltas beneath it; write base + those deltas "
            "as one checkpoint (`deltatune apply`) and merge over it; nothing was written")
    if len(set(stacks)) > 1 and not _plain_sum(method, params, per_input):
        bare = [label for label, key in zip(labels, stacks, strict=True) if not key]
        others = f"; {', '.join(bare)} on the bare base" if bare else ""
        raise StackedDeltaRefused(
            f"merge ({method}): the inputs were trained on different stacks of deltas ({', '.join(stacked)}{others}),"
            " so they share no base to weigh or trim their task vectors from; only their plain sum is defined "
            "(`deltatune compose`, or task_arithmetic with every weight and lambda 1); nothing was written")
