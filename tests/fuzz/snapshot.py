"""What a loader returned, as a flat ``{path: leaf}`` map compared bit-exactly, and the invariants any load
must satisfy (finite numbers, valid sparse indices, a bounded size).

Tensors and arrays become ``(dtype, shape, sha256 of the bytes)``, floats their bit pattern, so NaN and
-0.0 compare exactly.  The folder a mutant lives in is written ``<ROOT>`` in strings, so a recipe whose
paths resolve against its own folder compares equal to the original.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import math
import struct
from pathlib import PurePath
from typing import Any

import numpy as np
import torch

MAX_LEAVES = 1_000_000


class TooLarge(Exception):
    """The loaded value holds more than ``MAX_LEAVES`` leaves (e.g. an expanded YAML alias bomb)."""


def _tensor_leaf(t: torch.Tensor) -> tuple[Any, ...]:
    t = t.detach().to("cpu").contiguous()
    data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return ("tensor", str(t.dtype), tuple(t.shape), hashlib.sha256(data).hexdigest())


def _children(obj: Any) -> list[tuple[str, Any]] | None:
    """Named children of a container-like object, or ``None`` for a leaf."""
    if isinstance(obj, dict):
        return [(str(k), v) for k, v in obj.items()]
    if isinstance(obj, list | tuple):
        return [(str(i), v) for i, v in enumerate(obj)]
    if all(hasattr(obj, a) for a in ("kind", "meta", "state")) and callable(obj.state):  # a deltatune Part
        return [("type", type(obj).__name__), ("kind", obj.kind), ("meta", obj.meta()), ("state", obj.state())]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [("type", type(obj).__name__)] + [(f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj)]
    return None


def flatten(obj: Any, root: str | None = None) -> dict[str, Any]:
    """``{path: leaf}`` of ``obj``; raises :class:`TooLarge` beyond ``MAX_LEAVES`` leaves."""
    out: dict[str, Any] = {}
    stack: list[tuple[str, Any]] = [("", obj)]
    while stack:
        path, value = stack.pop()
        if len(out) >= MAX_LEAVES:
            raise TooLarge(f"the loaded value has more than {MAX_LEAVES:,} leaves")
        kids = _children(value)
        if kids is not None:
            out[path + "/"] = ("container", type(value).__name__, len(kids))
            stack.extend((f"{path}/{k}", v) for k, v in reversed(kids))
        else:
            out[path] = _leaf(value, root)
    return out


def _leaf(value: Any, root: str | None) -> Any:
    if isinstance(value, torch.Tensor):
        return _tensor_leaf(value)
    if isinstance(value, np.ndarray):
        a = np.ascontiguousarray(value)
        return ("array", str(a.dtype), a.shape, hashlib.sha256(a.tobytes()).hexdigest())
    if isinstance(value, bool | None | int):
        return (type(value).__name__, value)
    if isinstance(value, float | np.floating):
        return ("float", struct.pack("<d", float(value)).hex())
    if isinstance(value, str | PurePath):
        text = str(value)
        return ("str", text.replace(root, "<ROOT>") if root else text)
    if isinstance(value, enum.Enum):
        return ("enum", type(value).__name__, value.name)
    if isinstance(value, torch.dtype | torch.device):
        return ("torch", str(value))
    return ("object", type(value).__name__)


def first_difference(a: dict[str, Any], b: dict[str, Any]) -> str | None:
    """A short description of the first path where ``a`` and ``b`` differ, or ``None`` if equal."""
    if a == b:
        return None
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            before = a.get(key, a.get(key + "/", "absent"))  # a value that became a container, or back
            after = b.get(key, b.get(key + "/", "absent"))
            return f"{key or '<root>'}: {str(before)[:60]} → {str(after)[:60]}"
    return "order differs"


def invariant_violation(obj: Any) -> str | None:
    """Why a loaded value is invalid whatever the input (non-finite number, bad sparse indices), else ``None``."""
    stack: list[tuple[str, Any]] = [("", obj)]
    seen = 0
    while stack:
        path, value = stack.pop()
        seen += 1
        if seen > MAX_LEAVES:
            return f"more than {MAX_LEAVES:,} values (unbounded input accepted)"
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
            return f"non-finite tensor at {path}"
        if isinstance(value, np.ndarray) and value.dtype.kind == "f" and not np.isfinite(value).all():
            return f"non-finite array at {path}"
        if isinstance(value, float | np.floating) and not math.isfinite(value):
            return f"non-finite number at {path}"
        bad = _sparse_violation(value)
        if bad:
            return f"{path}: {bad}"
        kids = _children(value)
        if kids is not None:
            stack.extend((f"{path}/{k}", v) for k, v in kids)
    return None


def _sparse_violation(value: Any) -> str | None:
    """Sparse parts: flat indices must be strictly increasing and inside the weight."""
    if getattr(value, "kind", None) != "sparse" or not hasattr(value, "indices"):
        return None
    idx = value.indices.reshape(-1)
    numel = math.prod(getattr(value, "weight_shape", ()) or (0,))
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= numel):
        return f"sparse indices outside [0, {numel})"
    if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
        return "sparse indices not strictly increasing (duplicates or unsorted)"
    return None
