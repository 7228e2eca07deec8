"""Read a delta's safetensors file in one pass: one read, tensors as views of that buffer, digests over the raw bytes,
finiteness in one pass per run of same-dtype tensors.

The ``safetensors`` library validates the file's header first (offsets contiguous and in range, byte sizes matching
dtype × shape) and every tensor's dtype and shape is compared with the manifest before any data is read, as before.
Then the file is read once into a fresh buffer and each tensor becomes a view of its bytes there (no copy per
tensor; the views are writable and share nothing with each other).  The SHA-256 of each tensor
(:func:`deltatune.io.digest.bytes_digest`, the same value as :func:`~deltatune.io.digest.tensor_digest`) is taken over
those bytes without building a tensor, and finiteness is checked over each maximal run of adjacent tensors of one
floating dtype at once (a whole all-fp32 file: one vectorised pass); only when a run holds a NaN/±Inf is each tensor
of the run checked on its own, so the :class:`~deltatune.errors.NonFiniteError` names the tensor as before.

The buffer's own header is parsed for the byte offsets (the library exposes no offsets); it is checked against what
the library validated — every expected tensor present with the manifest's dtype and shape, its bytes inside the data
section and of the right size — so a file changed between the two reads is refused (:class:`DeltaFormatError`), not
misread.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from torch import Tensor

from deltatune.errors import DeltaFormatError, DeltaTuneError, NonFiniteError, ShapeMismatch
from deltatune.io.digest import bytes_digest, raise_mismatch
from deltatune.parts.meta_checks import check_finite, short

#: safetensors header dtype → (torch dtype name, numpy dtype of the stored little-endian bytes or ``None``: numpy has
#: no such dtype and the bytes are reinterpreted by torch).
STORED_DTYPES: dict[str, tuple[str, np.dtype | None]] = {
    "F64": ("float64", np.dtype("<f8")), "F32": ("float32", np.dtype("<f4")), "F16": ("float16", np.dtype("<f2")),
    "BF16": ("bfloat16", None), "I64": ("int64", np.dtype("<i8")), "I32": ("int32", np.dtype("<i4")),
    "I16": ("int16", np.dtype("<i2")), "I8": ("int8", np.dtype("i1")), "U8": ("uint8", np.dtype("u1")),
    "BOOL": ("bool", np.dtype("?")), "U16": ("uint16", np.dtype("<u2")), "U32": ("uint32", np.dtype("<u4")),
    "U64": ("uint64", np.dtype("<u8")),
}
_ITEMSIZE = {"BF16": 2, **{k: v.itemsize for k, (_, v) in STORED_DTYPES.items() if v is not None}}
_FLOAT = {"F64", "F32", "F16", "BF16"}


@contextmanager
def safetensors_errors(file: Path) -> Iterator[None]:
    """Reading ``file`` inside the block: the safetensors library's errors and those of the OS or of a malformed
    file as a :class:`DeltaFormatError` naming the file; deltatune's own errors (a manifest mismatch found while
    reading) pass unchanged."""
    try:
        yield
    except DeltaTuneError:
        raise
    except SafetensorError as exc:
        raise DeltaFormatError(f"{file}: truncated or corrupt safetensors file ({short(str(exc))})") from None
    except (OSError, ValueError, RuntimeError, TypeError, OverflowError) as exc:
        raise DeltaFormatError(f"{file}: cannot be read as safetensors ({short(str(exc))})") from None


def read_file_bytes(file: Path) -> np.ndarray:
    """The whole of ``file`` in one fresh, writable ``uint8`` array (one read; a short read is an error)."""
    size = os.path.getsize(file)
    buf = np.empty(size, dtype=np.uint8)
    with open(file, "rb", buffering=0) as fh:
        got = fh.readinto(memoryview(buf)) if size else 0
        while got < size:  # readinto may return less than asked (signals, pipes); the rest follows
            more = fh.readinto(memoryview(buf)[got:])
            if not more:
                raise DeltaFormatError(f"{file}: truncated while being read ({got} of {size} bytes)")
            got += more
    return buf


def _layout(buf: np.ndarray, file: Path) -> tuple[int, dict[str, Any]]:
    """``(start of the data section, header entries)`` of the safetensors bytes in ``buf``."""
    if buf.size < 8:
        raise DeltaFormatError(f"{file}: truncated or corrupt safetensors file (no header)")
    n = int.from_bytes(buf[:8].tobytes(), "little")
    if n > buf.size - 8:
        raise DeltaFormatError(f"{file}: truncated or corrupt safetensors file (header of {n} bytes)")
    try:
        header = json.loads(buf[8:8 + n].tobytes())
    except (ValueError, RecursionError):
        raise DeltaFormatError(f"{file}: truncated or corrupt safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise DeltaFormatError(f"{file}: truncated or corrupt safetensors file (header is not an object)")
    return 8 + n, header


def _entry(header: dict[str, Any], key: str, spec: dict[str, Any], data_size: int, file: Path) -> tuple[str, int, int]:
    """``(header dtype, begin, end)`` of tensor ``key``, checked against the manifest's ``spec`` and the data size."""
    entry = header.get(key)
    ok = isinstance(entry, dict) and entry.get("dtype") in STORED_DTYPES and isinstance(entry.get("shape"), list)
    offsets = entry.get("data_offsets") if ok else None
    ok = ok and isinstance(offsets, list) and len(offsets) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) for v in offsets)
    if not ok:
        raise DeltaFormatError(f"{file}: tensor {key!r} has no valid header entry (the file changed while read?)")
    dtype, shape, (begin, end) = entry["dtype"], entry["shape"], offsets
    if STORED_DTYPES[dtype][0] != spec["dtype"] or shape != list(spec["shape"]):
        raise ShapeMismatch(f"{file}: tensor {key!r} is {STORED_DTYPES[dtype][0]}{shape}, the manifest says "
                            f"{spec['dtype']}{spec['shape']}")
    if not 0 <= begin <= end <= data_size or end - begin != math.prod(shape) * _ITEMSIZE[dtype]:
        raise DeltaFormatError(f"{file}: tensor {key!r}: bytes {begin}..{end} do not hold {dtype}{shape} inside the "
                               f"data section of {data_size} bytes")
    return dtype, begin, end


def _as_tensor(raw: np.ndarray, dtype: str, shape: list[int]) -> Tensor:
    """A tensor viewing ``raw`` (a ``uint8`` slice of the buffer) as ``dtype`` of ``shape``; a slice not aligned for
    its dtype is copied first (aligned), so no kernel reads misaligned memory."""
    size = _ITEMSIZE[dtype]
    if size > 1 and raw.ctypes.data % size:
        raw = raw.copy()
    np_dtype = STORED_DTYPES[dtype][1]
    if np_dtype is None:  # bfloat16: torch reinterprets the bytes
        return torch.from_numpy(raw).view(torch.bfloat16).reshape(shape)
    arr = raw.view(np_dtype)
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return torch.from_numpy(arr.reshape(shape))


def _runs(entries: list[tuple[str, str, int, int]]) -> list[tuple[str, list[tuple[str, str, int, int]]]]:
    """Maximal runs of byte-adjacent floating tensors of one dtype: ``(dtype, entries)``, in file order."""
    runs: list[tuple[str, list[tuple[str, str, int, int]]]] = []
    for item in sorted((e for e in entries if e[1] in _FLOAT), key=lambda e: e[2]):
        if runs and runs[-1][0] == item[1] and runs[-1][1][-1][3] == item[2]:
            runs[-1][1].append(item)
        else:
            runs.append((item[1], [item]))
    return runs


def _run_finite(data: np.ndarray, dtype: str, begin: int, end: int) -> bool:
    """Whether every value of ``dtype`` in ``data[begin:end]`` is finite (one vectorised pass)."""
    if begin == end:
        return True
    np_dtype = STORED_DTYPES[dtype][1]
    raw = data[begin:end]
    if np_dtype is None:  # bfloat16: non-finite iff the 8 exponent bits are all ones
        bits = np.frombuffer(raw.tobytes() if raw.ctypes.data % 2 else raw, dtype="<u2")
        return not bool(np.any((bits & 0x7F80) == 0x7F80))
    arr = raw.view(np_dtype) if raw.ctypes.data % np_dtype.itemsize == 0 else np.frombuffer(raw.tobytes(), np_dtype)
    return bool(np.isfinite(arr).all())


def read_tensors_checked(file: Path, expected: dict[str, dict[str, Any]], names: dict[str, str],
                         digests: dict[str, str] | None) -> dict[str, Tensor]:
    """The tensors ``expected`` (key → manifest spec) of ``file``, whose header the caller has validated with the
    ``safetensors`` library: each checked against its digest (``names``: key → digest key; ``digests``: ``None``
    skips the check) and for finiteness."""
    buf = read_file_bytes(file)
    start, header = _layout(buf, file)
    data = buf[start:]
    entries = [(key, *_entry(header, key, spec, data.size, file)) for key, spec in expected.items()]
    if digests is not None:
        for key, _, begin, end in entries:
            got = bytes_digest(names[key], expected[key]["dtype"], expected[key]["shape"], data[begin:end])
            if got != digests[names[key]]:
                raise_mismatch(file, names[key], digests[names[key]], got)
    out = {key: _as_tensor(data[begin:end], dtype, header[key]["shape"]) for key, dtype, begin, end in entries}
    for dtype, run in _runs(entries):
        if not _run_finite(data, dtype, run[0][2], run[-1][3]):
            for key, *_ in run:  # name the tensor (and count its bad values) as a per-tensor check does
                check_finite(out[key], f"{file}: tensor {key!r}")
            raise NonFiniteError(f"{file}: tensors {short([k for k, *_ in run])} hold NaN or ±Inf values")
    return out
