"""Compact delta directory: ``manifest.json`` + ``data.safetensors``, every tensor stored by a codec.

Lossless: :func:`load_compact` returns exactly the tensors that were saved (the *lossy* steps live in
:mod:`deltatune.algebra.compress`; this file only finds the smallest exact encoding).  Per tensor:

* layout ``dense`` (every entry), ``sparse`` (the non-zeros of a dense tensor) or ``indexed`` (a
  :class:`SparsePart`'s own index set into its weight);
* index codecs: ``gaps`` — ``g_i = i_k − i_{k−1} − 1`` (``i_{−1} = −1``) in the smallest of
  uint8/16/32/64 by total size, where the width's maximum marks an escape whose gap is read from an
  ``escapes`` array — or ``bitmask`` (one bit per position, ``np.packbits`` little-endian);
* value codecs: ``ternary`` (all values ``±s``: sign bits + one scale), ``int8`` (``q·s`` with one fp32
  scale per tensor or per row, recognised when every value is exactly ``fl32(q·s)``, as
  :func:`deltatune.ops.compress.dequantize_int8` writes them), ``bf16``/``fp16``/``fp32``/``fp64`` when
  exact, and ``raw`` for non-float tensors.

All components of one numpy dtype are concatenated into one safetensors tensor named by the dtype
(``uint8``, ``float32`` …); the manifest holds ``[dtype, offset, count]`` for each component, so
per-tensor overhead is a few dozen bytes of JSON.  :class:`CompactReport` accounts for every byte:
component payloads, the safetensors header and the manifest add up to the files' sizes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file
from torch import Tensor

from deltatune.delta import Delta
from deltatune.errors import DeltaFormatError, ShapeMismatch
from deltatune.io.atomic import atomic_dir
from deltatune.io.delta_format import COMPACT_FORMAT, _json_default
from deltatune.io.json_io import read_json_object
from deltatune.parts.base import PART_KINDS
from deltatune.parts.sparse import SparsePart

FORMAT = COMPACT_FORMAT
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DATA_FILE = "data.safetensors"
REQUIRED = {"format", "format_version", "method", "config", "fingerprint", "parts", "heads", "metrics", "blobs"}
OPTIONAL = {"created_by"}
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


def _numel(shape: list[int] | tuple[int, ...]) -> int:
    return math.prod(int(s) for s in shape)


def _row_len(shape: list[int] | tuple[int, ...]) -> int | None:
    """Entries per index of dim 0 (per-row int8 scales), ``None`` for tensors of < 2 dims."""
    if len(shape) < 2 or int(shape[0]) == 0:
        return None
    return _numel(shape) // int(shape[0])


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
# encoding: each candidate is (bytes, codec fields, component builders)
# --------------------------------------------------------------------------------------------------
@dataclass
class _Choice:
    cost: int
    fields: dict[str, Any]
    components: dict[str, Any]  # name → zero-argument callable returning the numpy array


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


def _cheapest(choices: list[_Choice]) -> _Choice:
    return min(choices, key=lambda c: (c.cost, VALUE_ORDER.index(c.fields["codec"])
                                       if c.fields["codec"] in VALUE_ORDER else 0))


class _Blobs:
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


def _write(choice: _Choice, blobs: _Blobs) -> dict[str, Any]:
    return {**choice.fields, "data": {name: blobs.put(make()) for name, make in choice.components.items()}}


def _groups(flat_idx: Callable[[], Tensor], shape: list[int] | tuple[int, ...]) -> tuple[GroupsFn, int]:
    """``(row of each entry, computed on demand; number of rows)``, or ``(None, 1)`` below 2 dims."""
    row_len = _row_len(shape)
    return (None, 1) if row_len is None else ((lambda: flat_idx() // row_len), int(shape[0]))


def _encode_tensor(t: Tensor, blobs: _Blobs) -> dict[str, Any]:
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


def _encode_indexed(indices: Tensor, values: Tensor, domain: tuple[int, ...], where: str,
                    blobs: _Blobs) -> dict[str, Any]:
    """A sparse part's own index set (kept as is, explicit zeros included) and values."""
    idx = indices.detach().to("cpu", torch.int64).reshape(-1)
    n_domain = _numel(domain)
    if idx.numel() and (bool((idx[1:] <= idx[:-1]).any()) or int(idx[0]) < 0 or int(idx[-1]) >= n_domain):
        raise DeltaFormatError(f"{where}: indices must be unique, sorted and inside the weight {list(domain)} "
                               "to be stored in the compact format")
    groups, n_groups = _groups(lambda: idx, domain)
    values = values.detach().to("cpu").contiguous().reshape(-1)
    return {"dtype": _dtype_name(values.dtype), "shape": [int(idx.numel())], "layout": "indexed",
            "nnz": int(idx.numel()), "domain": [int(d) for d in domain], "index_tensor": "indices",
            "index": _write(min(_index_choices(idx.numpy(), n_domain), key=lambda c: c.cost), blobs),
            "values": _write(_cheapest(_value_choices(values, groups, n_groups)), blobs)}


# --------------------------------------------------------------------------------------------------
# byte accounting
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorBytes:
    """Bytes of one stored tensor, by component (``index.gaps``, ``values.signs`` …)."""

    name: str
    layout: str
    index_codec: str | None
    values_codec: str
    numel: int
    nnz: int
    components: dict[str, int]

    @property
    def bytes(self) -> int:
        return sum(self.components.values())


@dataclass(frozen=True)
class CompactReport:
    """Exact on-disk accounting: ``total_bytes == Σ file sizes`` of the directory."""

    path: Path
    tensors: list[TensorBytes]
    header_bytes: int
    manifest_bytes: int
    files: dict[str, int] = field(default_factory=dict)

    @property
    def payload_bytes(self) -> int:
        return sum(t.bytes for t in self.tensors)

    @property
    def total_bytes(self) -> int:
        return self.payload_bytes + self.header_bytes + self.manifest_bytes

    def by_component(self) -> dict[str, int]:
        """Bytes per codec component over all tensors, plus ``header`` and ``manifest``."""
        out: dict[str, int] = {}
        for t in self.tensors:
            for name, b in t.components.items():
                key = f"{t.index_codec if name.startswith('index.') else t.values_codec}.{name.split('.', 1)[1]}"
                out[key] = out.get(key, 0) + b
        out["safetensors header"] = self.header_bytes
        out["manifest.json"] = self.manifest_bytes
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "total_bytes": self.total_bytes, "payload_bytes": self.payload_bytes,
                "header_bytes": self.header_bytes, "manifest_bytes": self.manifest_bytes, "files": self.files,
                "by_component": self.by_component(),
                "tensors": [{"name": t.name, "layout": t.layout, "index_codec": t.index_codec,
                             "values_codec": t.values_codec, "numel": t.numel, "nnz": t.nnz,
                             "components": t.components, "bytes": t.bytes} for t in self.tensors]}


def _entries(manifest: dict[str, Any]):
    for name, spec in manifest["parts"].items():
        for tname, entry in spec["tensors"].items():
            yield f"{name}::{tname}", entry, f"part {name!r} tensor {tname!r}"
    for head, spec in manifest["heads"].items():
        for tname, entry in spec.items():
            yield f"head {head}::{tname}", entry, f"head {head!r} tensor {tname!r}"


def _component_bytes(ref: list[Any]) -> int:
    return int(ref[2]) * np.dtype(ref[0]).itemsize


def _build_report(path: Path, manifest: dict[str, Any]) -> CompactReport:
    tensors = []
    for label, entry, _ in _entries(manifest):
        comps = {f"{side}.{c}": _component_bytes(ref) for side in ("index", "values") if side in entry
                 for c, ref in entry[side]["data"].items()}
        numel = _numel(entry["shape"])
        nnz = int(entry.get("nnz", numel))
        tensors.append(TensorBytes(label, entry["layout"], entry.get("index", {}).get("codec"),
                                   entry["values"]["codec"], numel, nnz, comps))
    data = path / DATA_FILE
    with open(data, "rb") as fh:
        header = 8 + int.from_bytes(fh.read(8), "little")
    files = {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file()}
    report = CompactReport(path, tensors, header, files[MANIFEST], files)
    if report.total_bytes != sum(files.values()):
        raise DeltaFormatError(f"{path}: files hold {sum(files.values())} bytes but the manifest accounts for "
                               f"{report.total_bytes} (payload {report.payload_bytes}, header {header}, manifest "
                               f"{files[MANIFEST]}); the directory is damaged or has extra files")
    return report


def compact_report(path: str | Path) -> CompactReport:
    """The byte accounting of an existing compact delta directory."""
    path = Path(path)
    return _build_report(path, read_compact_manifest(path))


# --------------------------------------------------------------------------------------------------
# save
# --------------------------------------------------------------------------------------------------
def save_compact(delta: Delta, path: str | Path) -> CompactReport:
    """Write ``delta`` in the compact format (atomically) and return its exact byte accounting."""
    from deltatune import __version__

    path = Path(path)
    blobs = _Blobs()
    parts: dict[str, Any] = {}
    for name, part in delta.parts.items():
        if isinstance(part, SparsePart):
            tensors = {"values": _encode_indexed(part.indices, part.values, part.weight_shape,
                                                 f"part {name!r}", blobs)}
        else:
            tensors = {k: _encode_tensor(v, blobs) for k, v in part.state().items()}
        parts[name] = {"kind": part.kind, "meta": part.meta(), "tensors": tensors}
    heads = {h: {k: _encode_tensor(v, blobs) for k, v in t.items()} for h, t in delta.heads.items()}
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "created_by": f"deltatune {__version__}",
        "method": delta.method, "config": delta.config, "fingerprint": delta.fingerprint, "metrics": delta.metrics,
        "parts": parts, "heads": heads, "blobs": dict(blobs.sizes),
    }
    text = json.dumps(manifest, separators=(",", ":"), default=_json_default)  # insertion order: parts keep theirs
    with atomic_dir(path) as tmp:
        save_file(blobs.arrays(), str(tmp / DATA_FILE), metadata={"format": FORMAT})
        (tmp / MANIFEST).write_text(text)
        report = _build_report(tmp, manifest)
    return CompactReport(path, report.tensors, report.header_bytes, report.manifest_bytes, report.files)


# --------------------------------------------------------------------------------------------------
# load
# --------------------------------------------------------------------------------------------------
def read_compact_manifest(path: str | Path) -> dict[str, Any]:
    """Read and validate the manifest's top-level fields."""
    file = Path(path) / MANIFEST
    manifest = read_json_object(file, "compact delta", f"{MANIFEST} and {DATA_FILE}")
    missing, unknown = sorted(REQUIRED - set(manifest)), sorted(set(manifest) - REQUIRED - OPTIONAL)
    if missing or unknown:
        raise DeltaFormatError(f"{file}: missing field(s) {missing}, unknown field(s) {unknown}")
    if manifest["format"] != FORMAT:
        raise DeltaFormatError(f"{file}: field 'format' is {manifest['format']!r}, expected {FORMAT!r}")
    version = manifest["format_version"]
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise DeltaFormatError(f"{file}: format_version {version!r} is not one this deltatune reads "
                               f"(1..{FORMAT_VERSION})")
    for key in ("config", "parts", "heads", "metrics", "blobs"):
        if not isinstance(manifest[key], dict):
            raise DeltaFormatError(f"{file}: field {key!r} must be a JSON object")
    if manifest["fingerprint"] is not None and not isinstance(manifest["fingerprint"], dict):
        raise DeltaFormatError(f"{file}: field 'fingerprint' must be an object or null")
    for name, spec in manifest["parts"].items():
        if not isinstance(spec, dict) or set(spec) != {"kind", "meta", "tensors"}:
            raise DeltaFormatError(f"{file}: part {name!r} must have exactly the fields kind, meta, tensors")
        if spec["kind"] not in PART_KINDS:
            raise DeltaFormatError(f"{file}: part {name!r} has unknown kind {spec['kind']!r}; known: "
                                   f"{sorted(PART_KINDS)}")
        if not isinstance(spec["meta"], dict) or not isinstance(spec["tensors"], dict):
            raise DeltaFormatError(f"{file}: part {name!r}: 'meta' and 'tensors' must be JSON objects")
    for head, spec in manifest["heads"].items():
        if not isinstance(spec, dict):
            raise DeltaFormatError(f"{file}: head {head!r} must map tensor names to entries")
    for dtype, count in manifest["blobs"].items():
        if dtype not in BLOB_DTYPES or isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise DeltaFormatError(f"{file}: field 'blobs' entry {dtype!r}: {count!r} is not a known dtype with a "
                                   "count ≥ 0")
    for _, entry, where in _entries(manifest):
        _check_entry(entry, f"{file}: {where}")
    return manifest


def _check_int(value: Any, where: str, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DeltaFormatError(f"{where}: {what} must be an integer ≥ 0, got {value!r}")
    return value


def _check_entry(entry: Any, where: str) -> None:
    if not isinstance(entry, dict):
        raise DeltaFormatError(f"{where}: must be a JSON object")
    if entry.get("dtype") not in TORCH_DTYPES:
        raise DeltaFormatError(f"{where}: unknown dtype {entry.get('dtype')!r}; known: {sorted(TORCH_DTYPES)}")
    shape = entry.get("shape")
    if not isinstance(shape, list):
        raise DeltaFormatError(f"{where}: 'shape' must be a list of integers")
    for d in shape:
        _check_int(d, where, "every shape entry")
    layout = entry.get("layout")
    if layout not in ("dense", "sparse", "indexed"):
        raise DeltaFormatError(f"{where}: unknown layout {layout!r}; known: dense, sparse, indexed")
    sides = ("values",) if layout == "dense" else ("index", "values")
    for side in sides:
        codec = entry.get(side)
        if not isinstance(codec, dict) or not isinstance(codec.get("codec"), str) or not isinstance(
                codec.get("data"), dict):
            raise DeltaFormatError(f"{where}: '{side}' must be an object with 'codec' and 'data'")
        for comp, ref in codec["data"].items():
            ok = (isinstance(ref, list) and len(ref) == 3 and ref[0] in BLOB_DTYPES
                  and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in ref[1:]))
            if not ok:
                raise DeltaFormatError(f"{where}: component {side}.{comp} must be [dtype, offset, count], got {ref!r}")
    if layout != "dense":
        nnz = _check_int(entry.get("nnz"), where, "'nnz'")
        domain = entry.get("domain") if layout == "indexed" else shape
        if not isinstance(domain, list) or not all(isinstance(d, int) and d >= 0 for d in domain):
            raise DeltaFormatError(f"{where}: 'domain' must be a list of integers")
        if nnz > _numel(domain):
            raise DeltaFormatError(f"{where}: nnz {nnz} exceeds the {_numel(domain)} positions of {domain}")
        if layout == "indexed" and (shape != [nnz] or not isinstance(entry.get("index_tensor"), str)):
            raise DeltaFormatError(f"{where}: an indexed entry needs shape [nnz] and an 'index_tensor' name")


class _Reader:
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


def _only(codec: dict[str, Any], names: set[str], where: str) -> None:
    extra = sorted(set(codec["data"]) - names)
    if extra:
        raise DeltaFormatError(f"{where}: codec {codec['codec']!r} has unknown component(s) {extra}")


def _decode_index(codec: dict[str, Any], nnz: int, domain: int, r: _Reader, where: str) -> Tensor:
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


def _decode_values(codec: dict[str, Any], n: int, dtype: torch.dtype, groups: GroupsFn, n_groups: int,
                   r: _Reader, where: str) -> Tensor:
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


def _decode_entry(tname: str, entry: dict[str, Any], r: _Reader, where: str) -> dict[str, Tensor]:
    dtype, shape, layout = TORCH_DTYPES[entry["dtype"]], entry["shape"], entry["layout"]
    if layout == "dense":
        n = _numel(shape)
        groups, n_groups = _groups(lambda: torch.arange(n), shape)
        return {tname: _decode_values(entry["values"], n, dtype, groups, n_groups, r, where).reshape(shape)}
    domain = entry["domain"] if layout == "indexed" else shape
    idx = _decode_index(entry["index"], entry["nnz"], _numel(domain), r, where)
    groups, n_groups = _groups(lambda: idx, domain)
    values = _decode_values(entry["values"], entry["nnz"], dtype, groups, n_groups, r, where)
    if layout == "indexed":
        return {entry["index_tensor"]: idx, tname: values}
    dense = torch.zeros(_numel(shape), dtype=dtype)
    dense[idx] = values
    return {tname: dense.reshape(shape)}


def _read_blobs(path: Path, expected: dict[str, int]) -> dict[str, np.ndarray]:
    file = path / DATA_FILE
    if not file.is_file():
        raise DeltaFormatError(f"{file}: missing")
    try:
        with safe_open(str(file), framework="numpy") as fh:
            keys = set(fh.keys())
            if keys != set(expected):
                raise DeltaFormatError(f"{file}: holds {sorted(keys)}, the manifest's 'blobs' lists {sorted(expected)}")
            blobs = {k: fh.get_tensor(k) for k in expected}
    except SafetensorError as exc:
        raise DeltaFormatError(f"{file}: truncated or corrupt safetensors file ({exc})") from None
    except (OSError, ValueError, RuntimeError, TypeError) as exc:
        raise DeltaFormatError(f"{file}: cannot be read as safetensors ({exc})") from None
    for k, count in expected.items():
        if blobs[k].dtype.name != k or blobs[k].ndim != 1 or blobs[k].size != count:
            raise ShapeMismatch(f"{file}: blob {k!r} is {blobs[k].dtype.name}{list(blobs[k].shape)}, the manifest "
                                f"says {k}[{count}]")
    return blobs


def load_compact(path: str | Path) -> Delta:
    """Load and validate a compact delta directory (every count, range and codec is checked)."""
    path = Path(path)
    manifest = read_compact_manifest(path)
    reader = _Reader(path / DATA_FILE, _read_blobs(path, manifest["blobs"]))
    parts = {}
    for name, spec in manifest["parts"].items():
        state: dict[str, Tensor] = {}
        for tname, entry in spec["tensors"].items():
            state.update(_decode_entry(tname, entry, reader, f"{path / MANIFEST}: part {name!r} tensor {tname!r}"))
        try:
            parts[name] = PART_KINDS[spec["kind"]].from_state(state, spec["meta"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DeltaFormatError(f"{path / MANIFEST}: part {name!r} metadata is invalid ({exc})") from None
        except ShapeMismatch as exc:
            raise ShapeMismatch(f"{path / MANIFEST}: part {name!r}: {exc}") from None
    heads = {}
    for head, spec in manifest["heads"].items():
        heads[head] = {}
        for tname, entry in spec.items():
            where = f"{path / MANIFEST}: head {head!r} tensor {tname!r}"
            heads[head].update(_decode_entry(tname, entry, reader, where))
    reader.check_coverage()
    return Delta(method=manifest["method"], config=manifest["config"], parts=parts, heads=heads,
                 fingerprint=manifest["fingerprint"], metrics=manifest["metrics"])
