"""Sum deltas into one :class:`Delta`: ``Δ = Σ_t Δ_t`` per module, in the most compact exact form.

LoRA + LoRA concatenates ranks (exact), sparse + sparse unites the index sets, anything else becomes a
dense part (Ansell et al., ACL 2022, arXiv 2110.07560 compose sparse fine-tunings by summation).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from deltatune.algebra.compose import describe_fingerprint_diff, fingerprint_diff, same_tensors
from deltatune.delta import Delta
from deltatune.errors import ConfigError, FingerprintMismatch, NotMergeable, ShapeMismatch
from deltatune.parts.base import Part, promote_dtypes
from deltatune.parts.capabilities import require_capability
from deltatune.parts.dense import DensePart
from deltatune.parts.lora import sum_lora
from deltatune.parts.sparse import sum_sparse

__all__ = ["check_same_bases", "clone_part", "compose_deltas", "output_fingerprint", "sum_dense", "sum_lora",
           "sum_parts", "sum_sparse"]


def _dense_tensors(part: Part, where: str) -> dict[str, Tensor]:
    try:
        return {k: v.detach() for k, v in part.updates(None).items()}
    except NotImplementedError:
        raise ConfigError(f"{where}: a {part.kind} part has no additive weight update, so it cannot be "
                          "summed") from None
    except NotMergeable as exc:  # a base-dependent update (DoRA, (IA)³): name the module it was summed on
        raise NotMergeable(f"{where}: {exc}", module=exc.module or where, kind=exc.kind or part.kind) from None


def sum_dense(parts: Sequence[Part], where: str) -> DensePart:
    """``Δθ = Σ_t Δθ_t`` per parameter (LoRA/sparse parts contribute their dense ``ΔW``), summed in fp32."""
    per_param: dict[str, list[Tensor]] = {}
    for p in parts:
        for k, t in _dense_tensors(p, where).items():
            per_param.setdefault(k, []).append(t)
    shapes: dict[str, tuple[int, ...]] = {}
    for k, ts in per_param.items():
        if any(t.shape != ts[0].shape for t in ts):
            raise ShapeMismatch(f"{where}.{k}: deltas of shapes {[tuple(t.shape) for t in ts]} cannot be summed")
        shapes[k] = tuple(ts[0].shape)
    dtype = promote_dtypes([t for ts in per_param.values() for t in ts])
    device = next(iter(per_param.values()))[0].device
    out = DensePart(shapes, dtype=dtype, device=device)
    with torch.no_grad():
        for k, ts in per_param.items():
            total = torch.zeros(shapes[k], dtype=torch.float32, device=device)
            for t in ts:
                total += t.to(device=device, dtype=torch.float32)
            out.delta_for(k).copy_(total.to(dtype))
    return out


def sum_parts(parts: Sequence[Part], where: str) -> Part:
    """The sum of several parts on one module, in the most compact exact form: the first part's
    :meth:`~deltatune.parts.base.Part.sum_with` (e.g. LoRA ranks concatenated, sparse index sets united),
    else :func:`sum_dense`."""
    same_kind = parts[0].sum_with(parts[1:], where)
    if same_kind is not None:
        return same_kind
    if any(p.adds_bias for p in parts):
        raise ConfigError(f"{where}: parts {sorted({p.kind for p in parts})} include a bias added to a bias-free "
                          "module (BitFit); their sum cannot be one part (the base has no bias for a dense part to add "
                          "to): compose them live (deltatune.algebra.compose), or sum the BitFit deltas apart")
    return sum_dense(parts, where)


def clone_part(part: Part) -> Part:
    """An independent copy of ``part`` (fresh tensors, same kind, metadata and values)."""
    state = {k: v.detach().clone() for k, v in part.state().items()}
    clone = type(part).from_state(state, part.meta())
    device = next(iter(state.values())).device if state else None
    return clone.to(device) if device is not None else clone


#: The fingerprint fields that do not depend on which task heads were left out (see :mod:`deltatune.fingerprint`).
HEADS_ASIDE = ("model_type", "probe")


def heads_aside(fp: dict[str, Any]) -> dict[str, Any]:
    """The fields of ``fp`` that hold whichever heads it was taken without (:data:`HEADS_ASIDE`)."""
    return {f: fp[f] for f in HEADS_ASIDE if f in fp}


def check_same_bases(deltas: Sequence[Delta], names: Sequence[str],
                     heads: Iterable[str] | None = None, hint: str = "") -> dict[str, Any] | None:
    """Raise :class:`FingerprintMismatch` naming two deltas whose bases differ; return the output's fingerprint
    (:func:`output_fingerprint` for an output carrying the task heads ``heads``; default: the union of the inputs').

    A delta's fingerprint is taken with *its own* task heads left out, so two fingerprints taken with different head
    sets differ in ``num_params``, ``shapes`` and ``values`` by construction: they are compared on ``model_type`` and
    on the ``probe`` tensors both hold (chosen independently of the heads; fingerprints written before ``probe``
    existed: on ``model_type`` alone).  Deltas with the same head set are compared on every field; a ``None``
    fingerprint (a PEFT import) is unknown and not compared.  One rule for every operation that combines deltas:
    ``compose_deltas``, ``deltatune compose`` (``--heads-of``) and ``merge``.
    """
    first: dict[frozenset[str], int] = {}
    known = [i for i, d in enumerate(deltas) if d.fingerprint]
    for i in known:
        j = first.setdefault(frozenset(deltas[i].heads), i)
        if fingerprint_diff(deltas[j].fingerprint, deltas[i].fingerprint):  # same heads: every field compares
            _mismatch(deltas, names, j, i, hint)
        for k in known[:known.index(i)]:  # other head sets: model_type and the probe tensors both hold
            if fingerprint_diff(heads_aside(deltas[k].fingerprint), heads_aside(deltas[i].fingerprint)):
                _mismatch(deltas, names, k, i, hint)
    return output_fingerprint(deltas, {h for d in deltas for h in d.heads} if heads is None else heads)


def output_fingerprint(deltas: Sequence[Delta], heads: Iterable[str] | None) -> dict[str, Any] | None:
    """The base fingerprint of a delta made from ``deltas`` (of one base) that carries exactly the task heads
    ``heads`` — what applying it compares against the model with ``heads`` left out.

    That is the fingerprint of the first input carrying exactly ``heads`` (a fingerprint leaves out its delta's own
    heads); without one, the partial ``{model_type, probe}`` (:func:`heads_aside`; the inputs' probe tensors united,
    the first input's digest kept for a tensor several probed), which compares whatever heads the model leaves out.
    ``heads=None``: the output is used with more than one head set (a merge keeping each task's heads): the partial
    one.  ``None`` when no input has a fingerprint."""
    known = [d.fingerprint for d in deltas if d.fingerprint]
    if not known:
        return None
    if heads is not None:
        want = frozenset(heads)
        exact = next((d.fingerprint for d in deltas if d.fingerprint and frozenset(d.heads) == want), None)
        if exact is not None:
            return dict(exact)
    probe: dict[str, str] = {}
    for fp in known:
        for name, digest in (fp.get("probe") or {}).items():
            probe.setdefault(name, digest)
    partial = {"model_type": known[0].get("model_type")}
    return {**partial, "probe": probe} if probe else partial


def _mismatch(deltas: Sequence[Delta], names: Sequence[str], j: int, i: int, hint: str) -> None:
    a, b = deltas[j].fingerprint, deltas[i].fingerprint
    raise FingerprintMismatch(
        f"{names[j]} and {names[i]} were trained on different base models: "
        f"{describe_fingerprint_diff(a, b, names[j], names[i])}; rebase one of them first (`deltatune rebase`){hint}"
    )


def compose_deltas(deltas: Sequence[Delta], names: Sequence[str] | None = None, heads_of: int | None = None) -> Delta:
    """One :class:`Delta` equal to ``Σ_t Δ_t``; applying it equals composing the inputs.

    Every part must be additive (:class:`~deltatune.errors.NotMergeable`).  Per module: LoRA + LoRA → ranks
    concatenated (exact); sparse + sparse → index union with summed values;
    any other mix → a dense part.  All known fingerprints must agree (:func:`check_same_bases`:
    :class:`FingerprintMismatch` naming the two deltas; a ``None`` fingerprint, e.g. from a PEFT import, is unknown
    and not compared), LoRA and sparse geometry must agree (:class:`ShapeMismatch`).  Task heads are replaced, not
    summed: by default the sum carries every input's heads, and a head carried by several deltas must be identical
    (:class:`ConfigError`); ``heads_of=i`` (0-based) keeps only input ``i``'s heads, and its task (the heads' label
    names).  The sum's fingerprint is the one for the heads it carries (:func:`output_fingerprint`).
    """
    if not deltas:
        raise ConfigError("compose_deltas needs at least one delta")
    names = list(names) if names is not None else [f"delta #{i} ({d.method})" for i, d in enumerate(deltas)]
    if len(names) != len(deltas):
        raise ConfigError(f"{len(names)} names for {len(deltas)} deltas")
    if heads_of is not None and not 0 <= heads_of < len(deltas):
        raise ConfigError(f"heads_of={heads_of} names no input: give 0 … {len(deltas) - 1}")
    for name, d in zip(names, deltas, strict=True):
        require_capability(d, "additive", f"compose ({name})")
    fp = check_same_bases(deltas, names, None if heads_of is None else deltas[heads_of].heads)
    heads: dict[str, dict[str, Tensor]] = {}
    head_owner: dict[str, str] = {}
    for i, (name, d) in enumerate(zip(names, deltas, strict=True)):
        for head, tensors in (d.heads.items() if heads_of in (None, i) else ()):
            if head in heads and not same_tensors(heads[head], tensors):
                raise ConfigError(f"{head_owner[head]} and {name} carry different task heads {head!r}; heads are "
                                  "replaced, not summed, so they cannot be composed (keep one input's: heads_of, "
                                  "CLI --heads-of)")
            heads.setdefault(head, {k: v.detach().clone() for k, v in tensors.items()})
            head_owner.setdefault(head, name)
    grouped: dict[str, list[Part]] = {}
    for d in deltas:
        for module_name, part in d.parts.items():
            grouped.setdefault(module_name, []).append(part)
    parts = {m: clone_part(ps[0]) if len(ps) == 1 else sum_parts(ps, m) for m, ps in grouped.items()}
    provenance = deltas[0].provenance.derived("compose", list(deltas))
    if heads_of is not None and heads:  # the task the kept heads' label names come from
        provenance.task = copy.deepcopy(deltas[heads_of].provenance.task)
    return Delta(
        method="compose",
        config={"inputs": [{"method": d.method, "config": d.config} for d in deltas]},
        parts=parts,
        heads=heads,
        fingerprint=fp,
        metrics={"composed_from": list(names)},
        provenance=provenance,
    )
