"""Compact delta directory: ``manifest.json`` + ``data.safetensors``, every tensor stored by a codec.

Lossless: :func:`load_compact` returns exactly the tensors that were saved (the *lossy* steps live in
:mod:`deltatune.algebra.compress`; this format only stores the smallest exact encoding).  Each tensor is a
manifest entry (layout ``dense``, ``sparse`` or ``indexed``; an index codec ``gaps``/``bitmask``; a value
codec ``ternary``/``int8``/``bf16``/``fp16``/``fp32``/``fp64``/``raw``) chosen and decoded by
:mod:`deltatune.io.compact_codecs`, whose docstring gives each codec's byte layout.

All components of one numpy dtype are concatenated into one safetensors tensor named by the dtype
(``uint8``, ``float32`` …); the manifest holds ``[dtype, offset, count]`` for each component, so
per-tensor overhead is a few dozen bytes of JSON.  :class:`CompactReport` accounts for every byte:
component payloads, the safetensors header and the manifest add up to the files' sizes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file
from torch import Tensor

from deltatune.delta import Delta
from deltatune.errors import DeltaFormatError, ShapeMismatch
from deltatune.io.atomic import atomic_dir
from deltatune.io.compact_codecs import (
    BLOB_DTYPES,
    TORCH_DTYPES,
    Blobs,
    Reader,
    decode_entry,
    encode_indexed,
    encode_tensor,
    shape_numel,
)
from deltatune.io.delta_format import COMPACT_FORMAT, _json_default, check_manifest_fields, part_from_state
from deltatune.io.json_io import read_json_object
from deltatune.parts.sparse import SparsePart

__all__ = ["DATA_FILE", "MANIFEST", "CompactReport", "TensorBytes", "compact_report", "load_compact",
           "read_compact_manifest", "save_compact"]

FORMAT = COMPACT_FORMAT
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DATA_FILE = "data.safetensors"
REQUIRED = {"format", "format_version", "method", "config", "fingerprint", "parts", "heads", "metrics", "blobs"}
OPTIONAL = {"created_by"}


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
        numel = shape_numel(entry["shape"])
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
    blobs = Blobs()
    parts: dict[str, Any] = {}
    for name, part in delta.parts.items():
        if isinstance(part, SparsePart):
            tensors = {"values": encode_indexed(part.indices, part.values, part.weight_shape,
                                                 f"part {name!r}", blobs)}
        else:
            tensors = {k: encode_tensor(v, blobs) for k, v in part.state().items()}
        parts[name] = {"kind": part.kind, "meta": part.meta(), "tensors": tensors}
    heads = {h: {k: encode_tensor(v, blobs) for k, v in t.items()} for h, t in delta.heads.items()}
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
    check_manifest_fields(manifest, file, FORMAT, FORMAT_VERSION, REQUIRED, OPTIONAL,
                          ("config", "parts", "heads", "metrics", "blobs"))
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
        if nnz > shape_numel(domain):
            raise DeltaFormatError(f"{where}: nnz {nnz} exceeds the {shape_numel(domain)} positions of {domain}")
        if layout == "indexed" and (shape != [nnz] or not isinstance(entry.get("index_tensor"), str)):
            raise DeltaFormatError(f"{where}: an indexed entry needs shape [nnz] and an 'index_tensor' name")

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
    reader = Reader(path / DATA_FILE, _read_blobs(path, manifest["blobs"]))
    parts = {}
    for name, spec in manifest["parts"].items():
        state: dict[str, Tensor] = {}
        for tname, entry in spec["tensors"].items():
            state.update(decode_entry(tname, entry, reader, f"{path / MANIFEST}: part {name!r} tensor {tname!r}"))
        parts[name] = part_from_state(name, spec, state, path / MANIFEST, path / MANIFEST)
    heads = {}
    for head, spec in manifest["heads"].items():
        heads[head] = {}
        for tname, entry in spec.items():
            where = f"{path / MANIFEST}: head {head!r} tensor {tname!r}"
            heads[head].update(decode_entry(tname, entry, reader, where))
    reader.check_coverage()
    return Delta(method=manifest["method"], config=manifest["config"], parts=parts, heads=heads,
                 fingerprint=manifest["fingerprint"], metrics=manifest["metrics"])
