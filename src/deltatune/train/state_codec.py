"""A pickle-free codec for training state: nested Python values → (JSON tree, named tensors) and back.

What it stores (anything else is refused with a typed error at save time):

* ``None``, ``bool``, ``int``, ``str`` and finite ``float`` as themselves; NumPy scalars as the Python
  number they hold;
* a non-finite float as ``{"__float__": "nan" | "inf" | "-inf"}`` (the JSON stays standard);
* a list as a JSON list; a tuple as ``{"__tuple__": [...]}`` (``random.setstate`` needs tuples);
* a dict whose keys are all strings as a JSON object; any other dict (integer keys of an optimizer's
  ``state``) as ``{"__dict__": [[key, value], ...]}``, keys encoded like values, so their types survive;
* a ``torch.Tensor`` as ``{"__tensor__": ref}``, the tensor itself under ``ref`` in the tensor mapping
  (dtype and shape travel with it in safetensors);
* a ``numpy.ndarray`` of a numeric dtype as ``{"__ndarray__": {"ref", "dtype", "shape"}}``, its bytes
  as a ``uint8`` tensor under ``ref``.

Refs are the value's path (``optimizer/state/0/exp_avg``), so integrity errors name the tensor.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from safetensors.torch import _TYPES as _SAFETENSORS_DTYPES
from torch import Tensor

from deltatune.errors import DeltaFormatError

TUPLE, DICT, TENSOR, NDARRAY, FLOAT = "__tuple__", "__dict__", "__tensor__", "__ndarray__", "__float__"
MARKERS = frozenset({TUPLE, DICT, TENSOR, NDARRAY, FLOAT})
MAX_DEPTH = 64
_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
_STORABLE_DTYPES = frozenset(_SAFETENSORS_DTYPES.values())


def _join(path: str, key: Any) -> str:
    return f"{path}/{key}" if path else str(key)


def _cut(path: str, limit: int = 80) -> str:
    return path if len(path) <= limit else "…" + path[-limit:]


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


class _Encoder:
    def __init__(self, where: str) -> None:
        self.where = where
        self.tensors: dict[str, Tensor] = {}
        self._storages: set[int] = set()

    def fail(self, path: str, what: str) -> DeltaFormatError:
        return DeltaFormatError(f"{self.where}: {_cut(path) or '<root>'} {what}; a checkpoint stores only None, bool, "
                                f"int, float, str, list, tuple, dict, torch tensors and numeric numpy arrays")

    def ref(self, path: str) -> str:
        ref, n = path or "root", 1
        while ref in self.tensors:
            n += 1
            ref = f"{path}#{n}"
        return ref

    def value(self, obj: Any, path: str, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise self.fail(path, f"is nested deeper than {MAX_DEPTH} levels")
        if obj is None or isinstance(obj, bool | str):
            return obj
        if isinstance(obj, np.generic) and obj.dtype.kind in "biuf":
            return self.value(obj.item(), path, depth)
        if isinstance(obj, int):
            return int(obj)
        if isinstance(obj, float):
            return float(obj) if math.isfinite(obj) else {FLOAT: "nan" if math.isnan(obj) else
                                                          ("inf" if obj > 0 else "-inf")}
        if isinstance(obj, Tensor):
            return {TENSOR: self.tensor(obj, path)}
        if isinstance(obj, np.ndarray):
            return {NDARRAY: self.ndarray(obj, path)}
        if isinstance(obj, list):
            return [self.value(v, _join(path, i), depth + 1) for i, v in enumerate(obj)]
        if isinstance(obj, tuple):
            return {TUPLE: [self.value(v, _join(path, i), depth + 1) for i, v in enumerate(obj)]}
        if isinstance(obj, Mapping):
            return self.mapping(obj, path, depth)
        raise self.fail(path, f"holds a {type(obj).__name__} ({_short(obj)})")

    def mapping(self, obj: Mapping[Any, Any], path: str, depth: int) -> Any:
        plain = all(isinstance(k, str) for k in obj) and not (len(obj) == 1 and next(iter(obj)) in MARKERS)
        if plain:
            return {k: self.value(v, _join(path, k), depth + 1) for k, v in obj.items()}
        pairs = []
        for k, v in obj.items():
            if not isinstance(k, str | int | float | bool | tuple | np.generic) and k is not None:
                raise self.fail(path, f"has a dict key of type {type(k).__name__} ({_short(k)})")
            key_path = _join(path, k)
            pairs.append([self.value(k, key_path + "<key>", depth + 1), self.value(v, key_path, depth + 1)])
        return {DICT: pairs}

    def tensor(self, t: Tensor, path: str) -> str:
        if t.layout != torch.strided or t.is_quantized or t.dtype not in _STORABLE_DTYPES:
            raise self.fail(path, f"is a tensor of dtype {t.dtype} / layout {t.layout} that safetensors cannot hold")
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in self._storages or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()  # safetensors refuses tensors that share (or only partly use) a storage
        elif t.numel():
            self._storages.add(ptr)
        ref = self.ref(path)
        self.tensors[ref] = t
        return ref

    def ndarray(self, a: np.ndarray, path: str) -> dict[str, Any]:
        if a.dtype.kind not in "biuf":
            raise self.fail(path, f"is a numpy array of dtype {a.dtype} (only bool, integer and float arrays)")
        ref = self.ref(path)
        self.tensors[ref] = torch.from_numpy(np.frombuffer(np.ascontiguousarray(a).tobytes(), dtype=np.uint8).copy())
        return {"ref": ref, "dtype": a.dtype.str, "shape": list(a.shape)}


def encode(obj: Any, where: str) -> tuple[Any, dict[str, Tensor]]:
    """``(tree, tensors)``: ``tree`` is plain JSON (no NaN literals), ``tensors`` maps each ref to a CPU tensor.

    ``where`` names the output in errors (an unsupported value raises :class:`DeltaFormatError` with its path).
    """
    enc = _Encoder(where)
    return enc.value(obj, "", 0), enc.tensors


class _Decoder:
    def __init__(self, tensors: Mapping[str, Tensor], where: str) -> None:
        self.tensors, self.where = tensors, where
        self.used: set[str] = set()

    def fail(self, path: str, what: str) -> DeltaFormatError:
        return DeltaFormatError(f"{self.where}: state field {_cut(path) or '<root>'} {what}")

    def value(self, node: Any, path: str, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise self.fail(path, f"is nested deeper than {MAX_DEPTH} levels")
        if node is None or isinstance(node, bool | int | float | str):
            return node
        if isinstance(node, list):
            return [self.value(v, _join(path, i), depth + 1) for i, v in enumerate(node)]
        if not isinstance(node, dict):
            raise self.fail(path, f"holds a {type(node).__name__}, not a JSON value")
        if len(node) == 1 and next(iter(node)) in MARKERS:
            return self.marked(*next(iter(node.items())), path, depth)
        return {k: self.value(v, _join(path, k), depth + 1) for k, v in node.items()}

    def marked(self, marker: str, body: Any, path: str, depth: int) -> Any:
        if marker == FLOAT:
            if body not in _NON_FINITE:
                raise self.fail(path, f"has {FLOAT} {_short(body)}; expected 'nan', 'inf' or '-inf'")
            return _NON_FINITE[body]
        if marker == TUPLE:
            if not isinstance(body, list):
                raise self.fail(path, f"has {TUPLE} of type {type(body).__name__}; expected a list")
            return tuple(self.value(v, _join(path, i), depth + 1) for i, v in enumerate(body))
        if marker == DICT:
            return self.pairs(body, path, depth)
        if marker == TENSOR:
            return self.tensor(body, path)
        return self.ndarray(body, path)

    def pairs(self, body: Any, path: str, depth: int) -> dict[Any, Any]:
        if not isinstance(body, list) or not all(isinstance(p, list) and len(p) == 2 for p in body):
            raise self.fail(path, f"has a malformed {DICT}; expected a list of [key, value] pairs")
        out: dict[Any, Any] = {}
        for k, v in body:
            key = self.value(k, _join(path, "<key>"), depth + 1)
            try:
                hash(key)
            except TypeError:
                raise self.fail(path, f"has an unhashable dict key {_short(key)}") from None
            out[key] = self.value(v, _join(path, key), depth + 1)
        return out

    def tensor(self, ref: Any, path: str) -> Tensor:
        if not isinstance(ref, str) or ref not in self.tensors:
            raise self.fail(path, f"refers to tensor {_short(ref)}, which the tensor file does not hold")
        self.used.add(ref)
        return self.tensors[ref]

    def ndarray(self, body: Any, path: str) -> np.ndarray:
        if not (isinstance(body, dict) and set(body) == {"ref", "dtype", "shape"} and isinstance(body["dtype"], str)
                and isinstance(body["shape"], list) and all(type(n) is int and n >= 0 for n in body["shape"])):
            raise self.fail(path, f"has a malformed {NDARRAY}; expected {{ref, dtype, shape}}")
        try:
            dtype = np.dtype(body["dtype"])
        except (TypeError, ValueError):
            dtype = None
        if dtype is None or dtype.kind not in "biuf":
            raise self.fail(path, f"has numpy dtype {_short(body['dtype'])}; expected a bool, integer or float dtype")
        raw = self.tensor(body["ref"], path)
        count = math.prod(body["shape"])
        if raw.dtype != torch.uint8 or raw.dim() != 1 or raw.numel() != count * dtype.itemsize:
            raise self.fail(path, f"holds {raw.numel()} bytes of {raw.dtype}; shape {body['shape']} of "
                                  f"{dtype} needs {count * dtype.itemsize} uint8 bytes")
        return np.frombuffer(raw.numpy().tobytes(), dtype=dtype).reshape(body["shape"]).copy()


def decode(tree: Any, tensors: Mapping[str, Tensor], where: str) -> Any:
    """Inverse of :func:`encode`; every tensor in ``tensors`` must be referred to exactly where the tree says.

    Raises :class:`DeltaFormatError` naming ``where`` and the field for a malformed tree or a missing or unused
    tensor.
    """
    dec = _Decoder(tensors, where)
    value = dec.value(tree, "", 0)
    unused = sorted(set(tensors) - dec.used)
    if unused:
        raise DeltaFormatError(f"{where}: holds tensors the state does not refer to: {_short(unused)}")
    return value
