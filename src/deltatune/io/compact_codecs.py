"""Per-tensor codecs of the compact delta format: the smallest exact encoding of a tensor, and its decoding.

:mod:`deltatune.io.compact_format` owns the directory (manifest, ``data.safetensors``, byte report); this
module turns one tensor into a manifest *entry* plus numpy *components*, and back.  Encoding is
lossless: every candidate codec is exact, and the cheapest by stored bytes wins (ties: ``gaps`` before
``bitmask``, value codecs in the order of :data:`VALUE_ORDER`).  Decoding checks every count, dtype, range
and component name and raises :class:`~deltatune.errors.DeltaFormatError` naming the entry.

Components and references.  Each codec stores one or more 1-D numpy arrays (*components*).
:class:`Blobs` appends every component to the array of its numpy dtype (``uint8``, ``float32`` …) and the
entry records ``[dtype, offset, count]`` (offset and count in elements of that dtype); :class:`Reader`
resolves a reference and finally checks that the references tile every dtype array exactly once.

Entry (JSON): ``{"dtype", "shape", "layout", "index"?, "values", "nnz"?, "domain"?, "index_tensor"?}``,
where ``index`` and ``values`` are ``{"codec": name, "data": {component: [dtype, offset, count]}}``
(``int8`` adds ``"groups"``).  Layouts:

* ``dense`` — ``values`` holds all ``prod(shape)`` entries, row-major;
* ``sparse`` — the non-zeros of a float tensor: ``index`` holds the ``nnz`` flat positions in
  ``prod(shape)``, ``values`` their values; chosen when it costs ≤ ``prod(shape)`` bytes or less than
  the best dense encoding;
* ``indexed`` — a :class:`~deltatune.parts.sparse.SparsePart`'s own index set (sorted, unique, explicit
  zeros kept): ``shape == [nnz]``, ``domain`` is the weight's shape, ``index_tensor`` names the decoded
  index tensor.

Index codecs (``n = nnz`` sorted unique positions ``i_0 < … < i_{n−1}`` in ``D`` positions):

* ``gaps`` — ``gaps``: ``W[n]`` with ``g_k = i_k − i_{k−1} − 1`` (``i_{−1} = −1``), ``W`` the one of
  ``uint8/16/32/64`` minimising total bytes; a gap ≥ ``max(W)`` is stored as the marker ``max(W)``
  and its true value, in order, in ``escapes``: ``E[#markers]``, ``E`` the smallest unsigned dtype
  holding the largest escaped gap (``uint8[0]`` when none; ``uint64`` gaps never escape).
  Bytes: ``n·|W| + #markers·|E|``.
* ``bitmask`` — ``mask``: ``uint8[⌈D/8⌉]``, bit ``j`` (least significant first, ``np.packbits``
  ``bitorder="little"``) of byte ``k`` set iff position ``8k + j`` is present; padding bits are 0.

Value codecs (``n`` values ``v``, in entry order):

* ``ternary`` — every ``|v| = s > 0`` (finite): ``signs``: ``uint8[⌈n/8⌉]``, little-endian bits, set
  = ``+s``, clear = ``−s``, padding 0; ``scale``: ``float32[1]`` (``float64[1]`` for fp64 tensors).
  Bytes: ``⌈n/8⌉ + 4`` (or ``+ 8``).
* ``int8`` — fp32 tensors whose every value is exactly ``fl32(q·s_g)``, ``q ∈ [−127, 127]`` (as
  :func:`deltatune.ops.compress.dequantize_int8` writes them): ``q``: ``int8[n]``; ``scale``:
  ``float32[1]`` when ``"groups": "tensor"``, or ``float32[shape[0]]`` when ``"groups": "row"``, with
  ``g`` the dim-0 index of the value's position (for ``sparse``/``indexed``, of its position in the
  dense tensor or weight).  Bytes: ``n + 4·#scales``.
* ``bf16`` / ``fp16`` / ``fp32`` / ``fp64`` — ``values``: ``uint16[n]`` (bfloat16 bit patterns) /
  ``float16[n]`` / ``float32[n]`` / ``float64[n]``, offered when casting to that type and back is
  exact; decoded and cast to the entry's ``dtype``.
* ``raw`` — non-float tensors: ``values`` in the tensor's own dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from deltatune.errors import DeltaFormatError

BLOB_DTYPES = ("uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64", "float16", "float32",
               "float64", "bool")
UNSIGNED = ("uint8", "uint16", "uint32", "uint64")
VALUE_ORDER = ("ternary", "int8", "bf16", "fp16", "fp32", "fp64", "raw")
FLOAT_CODECS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}
GroupsFn = Callable[[], Tensor] | None  # the row (dim-0 index) of every value, for per-row int8 scales
TORCH_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16, torch.int8,
    torch.uint8, torch.bool)}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def shape_numel(shape: list[int] | tuple[int, ...]) -> int:
    """Number of entries of a tensor of this shape."""
    return math.prod(int(s) for s in shape)


def _row_len(shape: list[int] | tuple[int, ...]) -> int | None:
    """Entries per index of dim 0 (per-row int8 scales), ``None`` for tensors of < 2 dims."""
    if len(shape) < 2 or int(shape[0]) == 0:
        return None
    return shape_numel(shape) // int(shape[0])


def _to_numpy(t: Tensor) -> np.ndarray:
    t = t.detach().to("cpu").contiguous().reshape(-1)
    if t.dtype is torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def _smallest_unsigned(max_value: int) -> np.dtype:
    for name in UNSIGNED:
        if max_value <= np.iinfo(name).max:
            return np.dtype(name)
    raise DeltaFormatError(f"value {max_value} does not fit in uint64")


# --------------------------------------------------------------------------------------------------
# component storage: writing (Blobs) and reading (Reader) the per-dtype arrays
# --------------------------------------------------------------------------------------------------
class Blobs:
    """Concatenates components per numpy dtype; :meth:`put` returns the ``[dtype, offset, count]`` ref."""

    def __init__(self) -> None:
        self.chunks: dict[str, list[np.ndarray]] = {}
        self.sizes: dict[str, int] = {}

    def put(self, arr: np.ndarray) -> list[Any]:
        name = arr.dtype.name
        offset = self.sizes.get(name, 0)
        self.chunks.setdefault(name, []).append(np.ascontiguousarray(arr).reshape(-1))
        self.sizes[name] = offset + int(arr.size)
        return [name, offset, int(arr.size)]

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: np.concatenate(v) for k, v in self.chunks.items()}


class Reader:
    """The loaded blobs; :meth:`take` checks one component reference and returns its array."""

    def __init__(self, file: Path, blobs: dict[str, np.ndarray]) -> None:
        self.file, self.blobs = file, blobs
        self.used: dict[str, list[tuple[int, int]]] = {k: [] for k in blobs}

    def take(self, codec: dict[str, Any], comp: str, dtypes: tuple[str, ...], count: int | None,
             where: str) -> np.ndarray:
        ref = codec["data"].get(comp)
        if ref is None:
            raise DeltaFormatError(f"{where}: codec {codec['codec']!r} needs component {comp!r}, the manifest "
                                   f"has {sorted(codec['data'])}")
        dtype, offset, n = ref
        if dtype not in dtypes:
            raise DeltaFormatError(f"{where}: component {comp!r} is {dtype}, codec {codec['codec']!r} stores "
                                   f"{' or '.join(dtypes)}")
        if count is not None and n != count:
            raise DeltaFormatError(f"{where}: component {comp!r} has {n} entries, expected {count}")
        blob = self.blobs.get(dtype)
        if blob is None or offset + n > blob.size:
            size = 0 if blob is None else blob.size
            raise DeltaFormatError(f"{self.file}: {where}: component {comp!r} reads {dtype}[{offset}:{offset + n}] "
                                   f"but the file holds {size} {dtype} values (truncated?)")
        self.used[dtype].append((offset, n))
        return blob[offset:offset + n]

    def check_coverage(self) -> None:
        for dtype, spans in self.used.items():
            end = 0
            for offset, n in sorted(spans):
                if offset != end:
                    raise DeltaFormatError(f"{self.file}: {dtype} values [{min(offset, end)}:{max(offset, end)}] "
                                           "are referenced twice or by nothing in the manifest")
                end = offset + n
            if end != self.blobs[dtype].size:
                raise DeltaFormatError(f"{self.file}: {dtype} values [{end}:{self.blobs[dtype].size}] are referenced "
                                       "by nothing in the manifest")


# --------------------------------------------------------------------------------------------------
# encoding candidates: each is (bytes, codec fields, component builders)
# --------------------------------------------------------------------------------------------------
@dataclass
class _Choice:
    cost: int
    fields: dict[str, Any]
    components: dict[str, Any]  # name → zero-argument callable returning the numpy array


def _cheapest(choices: list[_Choice]) -> _Choice:
    return min(choices, key=lambda c: (c.cost, VALUE_ORDER.index(c.fields["codec"])
                                       if c.fields["codec"] in VALUE_ORDER else 0))


def _write(choice: _Choice, blobs: Blobs) -> dict[str, Any]:
    return {**choice.fields, "data": {name: blobs.put(make()) for name, make in choice.components.items()}}


def _only(codec: dict[str, Any], names: set[str], where: str) -> None:
    extra = sorted(set(codec["data"]) - names)
    if extra:
        raise DeltaFormatError(f"{where}: codec {codec['codec']!r} has unknown component(s) {extra}")


# --------------------------------------------------------------------------------------------------
# index codecs: gaps, bitmask
# --------------------------------------------------------------------------------------------------
def _index_choices(idx: np.ndarray, domain: int) -> list[_Choice]:
    """``gaps`` at the cheapest width (escapes for longer gaps) and ``bitmask``."""
    n = idx.size
    gaps = np.diff(idx, prepend=-1) - 1 if n else np.zeros(0, dtype=np.int64)
    best: _Choice | None = None
    for name in UNSIGNED:
        marker = int(np.iinfo(name).max)
        escaped = gaps >= marker if name != "uint64" else np.zeros(n, dtype=bool)
        esc_values = gaps[escaped]
        esc_dtype = _smallest_unsigned(int(esc_values.max())) if esc_values.size else np.dtype("uint8")
        cost = n * np.dtype(name).itemsize + esc_values.size * esc_dtype.itemsize
        if best is None or cost < best.cost:
            best = _Choice(cost, {"codec": "gaps"}, {
                "gaps": (lambda m=marker, dt=name: (gaps if dt == "uint64" else np.minimum(gaps, m)).astype(dt)),
                "escapes": (lambda v=esc_values, dt=esc_dtype: v.astype(dt)),
            })
    mask_bytes = (domain + 7) // 8

    def packed() -> np.ndarray:
        mask = np.zeros(domain, dtype=bool)
        mask[idx] = True
        return np.packbits(mask, bitorder="little")

    return [best, _Choice(mask_bytes, {"codec": "bitmask"}, {"mask": packed})]


def _decode_index(codec: dict[str, Any], nnz: int, domain: int, r: Reader, where: str) -> Tensor:
    name = codec["codec"]
    if name == "gaps":
        _only(codec, {"gaps", "escapes"}, where)
        gaps = r.take(codec, "gaps", UNSIGNED, nnz, where)
        marker = np.iinfo(gaps.dtype).max
        markers = gaps == marker if gaps.dtype != np.uint64 else np.zeros(nnz, dtype=bool)
        escapes = r.take(codec, "escapes", UNSIGNED, int(markers.sum()), where)
        if escapes.size and int(escapes.min()) < marker:
            raise DeltaFormatError(f"{where}: escaped gap {int(escapes.min())} is below the escape marker {marker}")
        g = gaps.astype(np.uint64)
        g[markers] = escapes.astype(np.uint64)
        if nnz and (int(g.max()) >= domain or float(g.astype(np.float64).sum()) + nnz > domain + 0.5):
            raise DeltaFormatError(f"{where}: indices out of range: the gaps run past the {domain} positions")
        idx = np.cumsum(g.astype(np.int64) + 1) - 1
        if nnz and int(idx[-1]) >= domain:
            raise DeltaFormatError(f"{where}: index {int(idx[-1])} out of range for {domain} positions")
        return torch.from_numpy(idx.astype(np.int64))
    if name == "bitmask":
        _only(codec, {"mask"}, where)
        packed = r.take(codec, "mask", ("uint8",), (domain + 7) // 8, where)
        bits = np.unpackbits(packed, bitorder="little")
        if bits[domain:].any():
            raise DeltaFormatError(f"{where}: bitmask has bits set past the {domain} positions")
        idx = np.flatnonzero(bits[:domain])
        if idx.size != nnz:
            raise DeltaFormatError(f"{where}: bitmask marks {idx.size} positions, nnz is {nnz}")
        return torch.from_numpy(idx.astype(np.int64))
    raise DeltaFormatError(f"{where}: unknown index codec {name!r}; known: gaps, bitmask")


# --------------------------------------------------------------------------------------------------
# value codecs: ternary, int8, bf16/fp16/fp32/fp64, raw
# --------------------------------------------------------------------------------------------------
def _int8_fit(v: Tensor, groups: Tensor | None, n_groups: int) -> tuple[Tensor, Tensor] | None:
    """``(q, scales)`` with ``fl32(q·s[g]) == v`` exactly for every entry, or ``None``.

    The scale of each group is recovered from its absmax (``s = max|v| / 127``), trying the fp32
    neighbours of that estimate because ``fl(fl(127·s)/127)`` can miss ``s`` by an ulp or two.
    """
    if groups is None:
        groups = torch.zeros(v.numel(), dtype=torch.int64)
    absmax = torch.zeros(n_groups, dtype=torch.float32).scatter_reduce(0, groups, v.abs(), "amax")
    scales = torch.zeros(n_groups, dtype=torch.float32)
    solved = absmax == 0
    cand = absmax / 127
    ratio = v / torch.where(cand > 0, cand, torch.ones_like(cand))[groups]
    if bool(((ratio - ratio.round()).abs() > 1e-3).any()):  # quick rejection: not a multiple of one scale
        return None
    lower, upper = cand.clone(), cand.clone()
    for step in range(5):
        if step:
            if step % 2:
                upper = torch.nextafter(upper, torch.full_like(upper, math.inf))
                cand = upper
            else:
                lower = torch.nextafter(lower, torch.zeros_like(lower))
                cand = lower
        safe = torch.where(cand > 0, cand, torch.ones_like(cand))[groups]
        q = torch.round(v / safe).clamp(-127, 127)
        exact = (q * safe == v).to(torch.int64)
        group_ok = torch.ones(n_groups, dtype=torch.int64).scatter_reduce(0, groups, exact, "amin") == 1
        newly = group_ok & ~solved
        scales = torch.where(newly, cand, scales)
        solved = solved | group_ok
        if bool(solved.all()):
            break
    if not bool(solved.all()):
        return None
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))[groups]
    q = torch.round(v / safe).clamp(-127, 127)
    if not torch.equal(q * scales[groups], v):
        return None
    return q.to(torch.int8), scales


def _value_choices(v: Tensor, groups: GroupsFn, n_groups: int) -> list[_Choice]:
    """Exact encodings of the 1-D ``v``; the tensor's own dtype is always among them."""
    n = v.numel()
    if not v.is_floating_point():
        return [_Choice(n * v.element_size(), {"codec": "raw"}, {"values": lambda: _to_numpy(v)})]
    own = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}[v.dtype]
    choices = [_Choice(n * v.element_size(), {"codec": own}, {"values": lambda: _to_numpy(v)})]
    finite = bool(torch.isfinite(v).all())
    if not finite or n == 0:
        return choices
    scale_dtype = np.float64 if v.dtype is torch.float64 else np.float32
    mags = v.abs()
    if bool((mags == mags[0]).all()) and float(mags[0]) > 0:
        choices.append(_Choice((n + 7) // 8 + np.dtype(scale_dtype).itemsize, {"codec": "ternary"}, {
            "signs": lambda: np.packbits(_to_numpy(v > 0), bitorder="little"),
            "scale": lambda: np.array([float(mags[0])], dtype=scale_dtype),
        }))
        if n >= 4:  # n/8 + 4 bytes: no other codec can be smaller
            return choices
    if v.dtype is torch.float32:
        for granularity, count in (("tensor", 1), ("row", n_groups)):
            if granularity == "row" and (groups is None or n_groups <= 1):
                continue
            fit = _int8_fit(v, None if granularity == "tensor" else groups(), count)
            if fit is not None:
                q, s = fit
                choices.append(_Choice(n + 4 * count, {"codec": "int8", "groups": granularity}, {
                    "q": (lambda q=q: q.numpy()), "scale": (lambda s=s: s.numpy())}))
                break
    for codec, dt in FLOAT_CODECS.items():
        if codec != own and torch.equal(v.to(dt).to(v.dtype), v):
            choices.append(_Choice(n * torch.empty(0, dtype=dt).element_size(), {"codec": codec},
                                   {"values": (lambda dt=dt: _to_numpy(v.to(dt)))}))
    return choices


def _decode_values(codec: dict[str, Any], n: int, dtype: torch.dtype, groups: GroupsFn, n_groups: int,
                   r: Reader, where: str) -> Tensor:
    name = codec["codec"]
    if name == "ternary":
        _only(codec, {"signs", "scale"}, where)
        signs = r.take(codec, "signs", ("uint8",), (n + 7) // 8, where)
        scale = r.take(codec, "scale", ("float32", "float64"), 1, where)
        bits = np.unpackbits(signs, bitorder="little")
        if bits[n:].any():
            raise DeltaFormatError(f"{where}: sign bits set past the {n} values")
        s = float(scale[0])
        if not math.isfinite(s) or s <= 0:
            raise DeltaFormatError(f"{where}: ternary scale must be finite and > 0, got {s}")
        st = torch.tensor(s, dtype=torch.float64 if scale.dtype == np.float64 else torch.float32)
        return torch.where(torch.from_numpy(bits[:n].astype(bool)), st, -st).to(dtype)
    if name == "int8":
        _only(codec, {"q", "scale"}, where)
        granularity = codec.get("groups")
        if granularity not in ("tensor", "row") or (granularity == "row" and groups is None):
            raise DeltaFormatError(f"{where}: int8 'groups' must be 'tensor' or 'row' (row needs ≥ 2 dims), got "
                                   f"{granularity!r}")
        count = 1 if granularity == "tensor" else n_groups
        q = r.take(codec, "q", ("int8",), n, where)
        scale = torch.from_numpy(r.take(codec, "scale", ("float32",), count, where).copy())
        if q.size and int(q.min()) < -127:
            raise DeltaFormatError(f"{where}: int8 value -128 is outside the symmetric range [-127, 127]")
        if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
            raise DeltaFormatError(f"{where}: int8 scales must be finite and ≥ 0")
        g = torch.zeros(n, dtype=torch.int64) if granularity == "tensor" else groups()
        return (torch.from_numpy(q.astype(np.float32)) * scale[g]).to(dtype)
    if name in FLOAT_CODECS or name == "raw":
        _only(codec, {"values"}, where)
        if name == "raw":
            want = _dtype_name(dtype)
            if want not in BLOB_DTYPES:
                raise DeltaFormatError(f"{where}: codec 'raw' cannot store {want}")
            return torch.from_numpy(r.take(codec, "values", (want,), n, where).copy())
        store = {"bf16": "uint16", "fp16": "float16", "fp32": "float32", "fp64": "float64"}[name]
        arr = r.take(codec, "values", (store,), n, where).copy()
        t = torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16) if name == "bf16" else torch.from_numpy(arr)
        return t.to(dtype)
    raise DeltaFormatError(f"{where}: unknown value codec {name!r}; known: {', '.join(VALUE_ORDER)}")


# --------------------------------------------------------------------------------------------------
# tensor entries: layouts dense, sparse, indexed
# --------------------------------------------------------------------------------------------------
def _groups(flat_idx: Callable[[], Tensor], shape: list[int] | tuple[int, ...]) -> tuple[GroupsFn, int]:
    """``(row of each entry, computed on demand; number of rows)``, or ``(None, 1)`` below 2 dims."""
    row_len = _row_len(shape)
    return (None, 1) if row_len is None else ((lambda: flat_idx() // row_len), int(shape[0]))


def encode_tensor(t: Tensor, blobs: Blobs) -> dict[str, Any]:
    """The cheapest exact ``dense`` or ``sparse`` encoding of ``t``."""
    t = t.detach().to("cpu").contiguous()
    shape = list(t.shape)
    spec: dict[str, Any] = {"dtype": _dtype_name(t.dtype), "shape": shape}
    flat = t.reshape(-1)
    n = flat.numel()
    groups, n_groups = _groups(lambda: torch.arange(n), shape)
    nz = torch.nonzero(flat != 0).reshape(-1) if t.is_floating_point() else None
    if nz is not None and nz.numel() < n:
        idx_choice = min(_index_choices(nz.numpy(), n), key=lambda c: c.cost)
        sparse_values = _cheapest(_value_choices(flat[nz], _groups(lambda: nz, shape)[0], n_groups))
        sparse_cost = idx_choice.cost + sparse_values.cost
        # with zeros present a dense encoding costs ≥ 1 byte per entry (int8): skip it when beaten already
        if sparse_cost <= n or sparse_cost < _cheapest(_value_choices(flat, groups, n_groups)).cost:
            return {**spec, "layout": "sparse", "nnz": int(nz.numel()), "index": _write(idx_choice, blobs),
                    "values": _write(sparse_values, blobs)}
    return {**spec, "layout": "dense", "values": _write(_cheapest(_value_choices(flat, groups, n_groups)), blobs)}


def encode_indexed(indices: Tensor, values: Tensor, domain: tuple[int, ...], where: str,
                   blobs: Blobs) -> dict[str, Any]:
    """A sparse part's own index set (kept as is, explicit zeros included) and values."""
    idx = indices.detach().to("cpu", torch.int64).reshape(-1)
    n_domain = shape_numel(domain)
    if idx.numel() and (bool((idx[1:] <= idx[:-1]).any()) or int(idx[0]) < 0 or int(idx[-1]) >= n_domain):
        raise DeltaFormatError(f"{where}: indices must be unique, sorted and inside the weight {list(domain)} "
                               "to be stored in the compact format")
    groups, n_groups = _groups(lambda: idx, domain)
    values = values.detach().to("cpu").contiguous().reshape(-1)
    return {"dtype": _dtype_name(values.dtype), "shape": [int(idx.numel())], "layout": "indexed",
            "nnz": int(idx.numel()), "domain": [int(d) for d in domain], "index_tensor": "indices",
            "index": _write(min(_index_choices(idx.numpy(), n_domain), key=lambda c: c.cost), blobs),
            "values": _write(_cheapest(_value_choices(values, groups, n_groups)), blobs)}


def decode_entry(tname: str, entry: dict[str, Any], r: Reader, where: str) -> dict[str, Tensor]:
    """The tensors of one validated entry: ``{tname: tensor}``, plus ``{index_tensor: indices}`` if indexed."""
    dtype, shape, layout = TORCH_DTYPES[entry["dtype"]], entry["shape"], entry["layout"]
    if layout == "dense":
        n = shape_numel(shape)
        groups, n_groups = _groups(lambda: torch.arange(n), shape)
        return {tname: _decode_values(entry["values"], n, dtype, groups, n_groups, r, where).reshape(shape)}
    domain = entry["domain"] if layout == "indexed" else shape
    idx = _decode_index(entry["index"], entry["nnz"], shape_numel(domain), r, where)
    groups, n_groups = _groups(lambda: idx, domain)
    values = _decode_values(entry["values"], entry["nnz"], dtype, groups, n_groups, r, where)
    if layout == "indexed":
        return {entry["index_tensor"]: idx, tname: values}
    dense = torch.zeros(shape_numel(shape), dtype=dtype)
    dense[idx] = values
    return {tname: dense.reshape(shape)}
