"""Base-model fingerprint: shapes plus a hash of a few tensors, so a delta meets only its own base.

``shapes``: SHA-256 of the sorted ``name:shape`` lines of every base parameter (task heads
excluded); ``values``: SHA-256 of the first 256 fp32 values of 8 evenly spaced tensors.  Two bases
with the same architecture but different weights differ in ``values`` only, which the error says.
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
    }


def check_fingerprint(expected: dict[str, Any] | None, model: nn.Module, exclude: Iterable[str],
                      where: str, actual: dict[str, Any] | None = None) -> None:
    """Raise :class:`FingerprintMismatch` naming what differs between ``expected`` and ``model`` (``actual``: the
    model's fingerprint with ``exclude`` left out, when the caller keeps it)."""
    if not expected:
        return
    actual = fingerprint(model, exclude) if actual is None else actual
    diffs = [k for k in ("model_type", "num_params", "shapes", "values") if expected.get(k) != actual.get(k)]
    if not diffs:
        return
    if diffs == ["values"]:
        what = "the architecture matches but the weights differ (another checkpoint of the same model?)"
    else:
        what = "the architecture differs"
    detail = ", ".join(f"{k}: delta has {expected.get(k)!r}, model has {actual.get(k)!r}" for k in diffs)
    raise FingerprintMismatch(
        f"{where} was trained on another base model: {what} ({detail}). "
        "Pass force=True (CLI: --force) to apply it anyway, or use `deltatune rebase`."
    )
