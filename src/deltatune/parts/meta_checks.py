"""Validation of a part's JSON metadata and of its tensors, before anything is allocated.

A part's ``meta`` comes from a manifest, i.e. from an untrusted file.  Every field is checked for its
JSON type, its range and (numbers) finiteness; each kind then derives the exact tensor shapes its
metadata implies (:meth:`~deltatune.parts.base.Part.expected_state`), so a loader can compare them with
the shapes recorded in a file's header and refuse a mismatch without reading or allocating anything.
Errors are typed (:class:`DeltaFormatError`, :class:`NonFiniteError`, :class:`InputTooLarge`,
:class:`ShapeMismatch`) and name the field; callers prefix the file and part name.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from deltatune.errors import DeltaFormatError, InputTooLarge, NonFiniteError, ShapeMismatch
from deltatune.parts.layers import LayerKind

MAX_NUMEL = 2**32  # elements of one tensor or weight a file may claim (the largest real weights hold ~2^31)


def short(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters (error messages stay one short line)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def check_keys(meta: Any, required: set[str], optional: set[str] = frozenset()) -> dict[str, Any]:
    """``meta`` as a dict holding every ``required`` key and nothing outside ``required | optional``."""
    if not isinstance(meta, dict):
        raise DeltaFormatError(f"'meta' must be a JSON object, got {type(meta).__name__}")
    missing, unknown = sorted(required - set(meta)), sorted(set(meta) - required - optional)
    if missing:
        raise DeltaFormatError(f"meta is missing field(s) {missing}")
    if unknown:
        raise DeltaFormatError(f"meta has unknown field(s) {short(unknown)}; known: {sorted(required | optional)}")
    return meta


def meta_int(meta: dict[str, Any], key: str, minimum: int = 1) -> int:
    """An integer field ``≥ minimum`` and ``≤ MAX_NUMEL``."""
    value = meta[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DeltaFormatError(f"meta field {key!r} must be an integer ≥ {minimum}, got {short(value)}")
    if value > MAX_NUMEL:
        raise InputTooLarge(f"meta field {key!r} is {short(value)}, above the limit of {MAX_NUMEL}")
    return value


def meta_number(meta: dict[str, Any], key: str, low: float = -math.inf, high: float = math.inf) -> float:
    """A finite number field in ``[low, high]``."""
    value = meta[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DeltaFormatError(f"meta field {key!r} must be a number, got {short(value)}")
    try:
        number = float(value)
    except OverflowError:
        raise NonFiniteError(f"meta field {key!r} is {short(value)}, too large for a float") from None
    if not math.isfinite(number):
        raise NonFiniteError(f"meta field {key!r} is {number}; it must be finite")
    if not low <= number <= high:
        raise DeltaFormatError(f"meta field {key!r} is {number}, expected a value in [{low}, {high}]")
    return number


def meta_layer(meta: dict[str, Any], key: str = "layer") -> LayerKind:
    """A :class:`LayerKind` by its value."""
    value = meta[key]
    if not isinstance(value, str) or value not in {k.value for k in LayerKind}:
        raise DeltaFormatError(f"meta field {key!r} is {short(value)}; known: {[k.value for k in LayerKind]}")
    return LayerKind(value)


def check_shape(value: Any, what: str, min_dim: int = 0) -> tuple[int, ...]:
    """A list of integers ``≥ min_dim`` whose product is at most :data:`MAX_NUMEL`."""
    if not isinstance(value, list | tuple) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= min_dim for d in value):
        raise DeltaFormatError(f"{what} must be a list of integers ≥ {min_dim}, got {short(value)}")
    if len(value) > 8 or math.prod(value) > MAX_NUMEL:
        raise InputTooLarge(f"{what} {short(value)} has more than {MAX_NUMEL} elements or 8 dimensions")
    return tuple(value)


def check_state(state: dict[str, Tensor], expected: dict[str, tuple[int, ...]], kind: str,
                int_tensors: frozenset[str] = frozenset()) -> None:
    """Names, shapes and dtype class of ``state`` against the shapes the metadata implies."""
    if set(state) != set(expected):
        raise ShapeMismatch(f"tensors {short(sorted(state))} but a {kind} part with this meta needs "
                            f"{sorted(expected)}")
    for name, shape in expected.items():
        t = state[name]
        if tuple(t.shape) != shape:
            raise ShapeMismatch(f"tensor {name!r} has shape {list(t.shape)}, its meta implies {list(shape)}")
        want_float = name not in int_tensors
        if t.dtype.is_floating_point != want_float or t.dtype == torch.bool:
            raise ShapeMismatch(f"tensor {name!r} has dtype {t.dtype}, expected "
                                f"{'a floating-point' if want_float else 'an integer'} dtype")


def check_finite(t: Tensor, what: str) -> None:
    """Raise :class:`NonFiniteError` naming ``what`` if the float (or complex) tensor ``t`` holds NaN or ±Inf.

    fp8 tensors are checked in fp32 (``torch.isfinite`` has no fp8 kernel)."""
    if not (t.is_floating_point() or t.is_complex()) or not t.numel():
        return
    wide = t.float() if t.is_floating_point() and t.element_size() == 1 else t
    finite = torch.isfinite(wide)
    if not bool(finite.all()):
        raise NonFiniteError(f"{what}: {int((~finite).sum())} of {t.numel()} values are NaN or ±Inf")
