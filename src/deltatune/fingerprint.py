"""Base-model fingerprint: shapes plus a hash of a few tensors, so a delta meets only its own base.

``shapes``: SHA-256 of the sorted ``name:shape`` lines of every base parameter (task heads
excluded); ``values``: SHA-256 of the first 256 fp32 values of 8 evenly spaced tensors.  Two bases
with the same architecture but different weights differ in ``values`` only, which the error says.
``probe``: a digest per tensor of a few parameters chosen by the hash of their *names* among all of the model's
parameters, so two fingerprints taken with different task heads left out (a language delta without heads, a task
delta with a classifier) still share most probe tensors and can be compared on them
(:func:`fingerprint_differences`); the other fields depend on which heads were left out.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from deltatune.errors import FingerprintMismatch

SAMPLED_TENSORS = 8
SAMPLED_VALUES = 256


def base_parameters(model: nn.Module, exclude: Iterable[str] = ()) -> Iterator[tuple[str, Tensor]]:
    """``(original name, tensor)`` of the base model's parameters, seen through any ``DeltaLayer``."""
    from deltatune.layer import DeltaLayer, ModelParts

    skip = tuple(exclude)

    def walk(module: nn.Module, prefix: str) -> Iterator[tuple[str, Tensor]]:
        if isinstance(module, DeltaLayer):
            yield from walk(module.base, prefix)
            return
        for name, p in module.named_parameters(recurse=False):
            yield prefix + name, p
        for name, child in module.named_children():
            if not isinstance(child, ModelParts):  # model-level parts are delta, not base
                yield from walk(child, f"{prefix}{name}.")

    seen: set[int] = set()
    for name, p in walk(model, ""):
        if id(p) in seen or any(name == s or name.startswith(s + ".") for s in skip):
            continue
        seen.add(id(p))
        yield name, p


PROBE_TENSORS = 8
#: the fields compared exactly (when both fingerprints have them); ``probe`` is compared on the tensors both hold
EXACT_FIELDS = ("model_type", "num_params", "shapes", "values")


def _probe(model: nn.Module, kept: dict[str, Tensor]) -> dict[str, str]:
    """``{name: digest}`` of the first :data:`PROBE_TENSORS` of the model's parameters ordered by the hash of their
    names (heads included in the ranking, left out of the result when excluded): the choice does not depend on
    which heads a delta leaves out."""
    ranked = sorted((hashlib.sha256(n.encode()).hexdigest(), n) for n, _ in base_parameters(model))
    out = {}
    with torch.no_grad():
        for _, name in ranked[:PROBE_TENSORS]:
            if name in kept and not kept[name].is_meta:  # a meta model (a streamed merge's) has no values to probe
                t = kept[name]
                sample = t.detach().reshape(-1)[:SAMPLED_VALUES].to(device="cpu", dtype=torch.float32)
                out[name] = hashlib.sha256(f"{list(t.shape)}".encode() + sample.numpy().tobytes()).hexdigest()[:12]
    return out


def fingerprint_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The fields on which two fingerprints disagree: each of :data:`EXACT_FIELDS` both have and that differ, and
    ``probe`` when a tensor both probed differs (fingerprints without a field, e.g. written before ``probe`` or a
    composed delta's partial one, are not compared on it)."""
    diffs = [k for k in EXACT_FIELDS if k in a and k in b and a[k] != b[k]]
    pa, pb = a.get("probe"), b.get("probe")
    if isinstance(pa, dict) and isinstance(pb, dict) and any(pa[n] != pb[n] for n in set(pa) & set(pb)):
        diffs.append("probe")
    return diffs


def same_base(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """Whether two recorded fingerprints (``None``: unknown) name the same base: both unknown, or both known and
    without :func:`fingerprint_differences` (fields one of them lacks, e.g. ``probe`` before it was recorded, are
    not compared)."""
    if a is None or b is None:
        return a is None and b is None
    return not fingerprint_differences(a, b)


def weights_only(diffs: list[str]) -> bool:
    """Whether :func:`fingerprint_differences` found only the weights differing (same architecture)."""
    return set(diffs) <= {"values", "probe"}


def describe_field(field: str, a: dict[str, Any], b: dict[str, Any], a_name: str, b_name: str) -> str:
    """One differing field, for an error: ``"values: A has '…', B has '…'"``, or for ``probe`` the tensors whose
    digests differ."""
    if field == "probe":
        names = sorted(n for n in set(a["probe"]) & set(b["probe"]) if a["probe"][n] != b["probe"][n])
        return f"probe: {a_name} and {b_name} differ on {names[:3]}"
    return f"{field}: {a_name} has {a.get(field)!r}, {b_name} has {b.get(field)!r}"


def fingerprint(model: nn.Module, exclude: Iterable[str] = ()) -> dict[str, Any]:
    params = list(base_parameters(model, exclude))
    shapes = hashlib.sha256("\n".join(sorted(f"{n}:{list(p.shape)}" for n, p in params)).encode()).hexdigest()
    ordered = sorted(params, key=lambda item: item[0])
    step = max(1, len(ordered) // SAMPLED_TENSORS)
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in ordered[::step][:SAMPLED_TENSORS]:
            sample = p.detach().reshape(-1)[:SAMPLED_VALUES].to(device="cpu", dtype=torch.float32)
            h.update(name.encode())
            h.update(sample.numpy().tobytes())
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return {
        "model_type": model_type,
        "num_params": sum(p.numel() for _, p in params),
        "shapes": shapes[:16],
        "values": h.hexdigest()[:16],
        "probe": _probe(model, dict(params)),
    }


def check_fingerprint(expected: dict[str, Any] | None, model: nn.Module, exclude: Iterable[str],
                      where: str, actual: dict[str, Any] | None = None) -> None:
    """Raise :class:`FingerprintMismatch` naming what differs between ``expected`` and ``model`` (``actual``: the
    model's fingerprint with ``exclude`` left out, when the caller keeps it)."""
    if not expected:
        return
    actual = fingerprint(model, exclude) if actual is None else actual
    diffs = fingerprint_differences(expected, actual)
    if not diffs:
        return
    if weights_only(diffs):
        what = "the architecture matches but the weights differ (another checkpoint of the same model?)"
    else:
        what = "the architecture differs"
    detail = ", ".join(describe_field(k, expected, actual, "delta", "model") for k in diffs)
    raise FingerprintMismatch(
        f"{where} was trained on another base model: {what} ({detail}). "
        "Pass force=True (CLI: --force) to apply it anyway, or use `deltatune rebase`."
    )
