"""Compact delta directory: ``manifest.json`` + ``data.safetensors``, every tensor stored by a codec.

Lossless: :func:`load_compact` returns exactly the tensors that were saved (the *lossy* steps live in
:mod:`deltatune.algebra.compress`; this format only stores the smallest exact encoding).  Each tensor is a
manifest entry (layout ``dense``, ``sparse`` or ``indexed``; an index codec ``gaps``/``bitmask``; a value
codec ``ternary``/``int8``/``bf16``/``fp16``/``fp32``/``fp64``/``raw``) chosen and decoded by
:mod:`deltatune.io.compact_codecs`, whose docstring gives each codec's byte layout.

All components of one numpy dtype are concatenated into one safetensors tensor named by the dtype
(``uint8``, ``float32`` …); the manifest holds ``[dtype, offset, count]`` for each component, so
per-tensor overhead is a few dozen bytes of JSON.  :class:`CompactReport` accounts for every byte:
component payloads, the safetensors header, the manifest and the output marker add up to the files' sizes.

Integrity: the manifest's optional ``digests`` field (as in the standard format, see
:mod:`deltatune.io.digest`) holds the SHA-256 of every *decoded* tensor (``parts/<module>::<tensor>``,
``heads/<head>::<tensor>``; a sparse part's ``indices`` and ``values``) and of the manifest itself, so a
flipped bit in a part name, a codec field or a payload byte fails the load with :class:`IntegrityError`
(``verify=False`` skips the check; a manifest without ``digests`` loads unverified).  Non-finite
numbers and tensors are refused (:class:`NonFiniteError`); part metadata is checked against the shapes the
entries decode to before anything is decoded, and no entry may claim more than ``MAX_NUMEL`` entries.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file
from torch import Tensor

from deltatune.delta import Delta
from deltatune.errors import DeltaFormatError, InputTooLarge, ShapeMismatch
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
from deltatune.io.delta_format import (
    COMPACT_FORMAT,
    HEADER_DTYPES,
    check_manifest_fields,
    check_part_meta,
    json_ready,
    manifest_provenance,
    part_from_state,
    prepare_tensors,
)
from deltatune.io.digest import DIGEST_FIELD, build_digests, digest_key, read_digests, verify_manifest, verify_tensor
from deltatune.io.json_io import read_json_object
from deltatune.io.outputs import COMPACT_KIND
from deltatune.io.outputs import MARKER as OUTPUT_MARKER
from deltatune.io.tensor_file import safetensors_errors
from deltatune.parts.base import Part
from deltatune.parts.meta_checks import MAX_NUMEL, check_finite, short

__all__ = ["DATA_FILE", "MANIFEST", "CompactReport", "TensorBytes", "compact_report", "load_compact",
           "read_compact_manifest", "save_compact"]

FORMAT = COMPACT_FORMAT
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DATA_FILE = "data.safetensors"
REQUIRED = {"format", "format_version", "method", "config", "fingerprint", "parts", "heads", "metrics", "blobs"}
OPTIONAL = {"created_by", DIGEST_FIELD, "provenance"}


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
    marker_bytes: int = 0  # the output marker that deltatune.io.atomic.atomic_dir writes into every output


    @property
    def payload_bytes(self) -> int:
        return sum(t.bytes for t in self.tensors)

    @property
    def total_bytes(self) -> int:
        return self.payload_bytes + self.header_bytes + self.manifest_bytes + self.marker_bytes

    def by_component(self) -> dict[str, int]:
        """Bytes per codec component over all tensors, plus ``header`` and ``manifest``."""
        out: dict[str, int] = {}
        for t in self.tensors:
            for name, b in t.components.items():
                key = f"{t.index_codec if name.startswith('index.') else t.values_codec}.{name.split('.', 1)[1]}"
                out[key] = out.get(key, 0) + b
        out["safetensors header"] = self.header_bytes
        out["manifest.json"] = self.manifest_bytes
        if self.marker_bytes:
            out[OUTPUT_MARKER] = self.marker_bytes
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "total_bytes": self.total_bytes, "payload_bytes": self.payload_bytes,
                "header_bytes": self.header_bytes, "manifest_bytes": self.manifest_bytes,
                "marker_bytes": self.marker_bytes, "files": self.files,
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
    report = CompactReport(path, tensors, header, files[MANIFEST], files, files.get(OUTPUT_MARKER, 0))
    if report.total_bytes != sum(files.values()):
        raise DeltaFormatError(f"{path}: files hold {sum(files.values())} bytes but the manifest accounts for "
                               f"{report.total_bytes} (payload {report.payload_bytes}, header {header}, manifest "
                               f"{files[MANIFEST]}, marker {report.marker_bytes}); the directory is damaged or has "
                               "extra files")
    return report


def compact_report(path: str | Path) -> CompactReport:
    """The byte accounting of an existing compact delta directory."""
    path = Path(path)
    return _build_report(path, read_compact_manifest(path))


# --------------------------------------------------------------------------------------------------
# save
# --------------------------------------------------------------------------------------------------
def _signless_zeros(t: Tensor) -> Tensor:
    """``t`` with −0.0 as +0.0 (``x + 0.0``; IEEE gives +0 for −0 + +0), the form digests are taken of: the
    sparse layouts store only non-zeros, so a −0.0 left by a DARE mask decodes as +0.0 — numerically the same
    update, but other bytes."""
    return t + 0.0 if t.is_floating_point() else t


def _encode_part(name: str, part: Part, state: dict[str, Tensor], blobs: Blobs) -> dict[str, Any]:
    """Manifest entries of one part: tensors the part stores at flat indices
    (:meth:`~deltatune.parts.base.Part.index_layout`) use the indexed layout and consume their index tensor;
    every other tensor is encoded on its own."""
    layout = part.index_layout()
    index_names = {iname for iname, _ in layout.values()}
    tensors: dict[str, Any] = {}
    for k, v in state.items():
        if k in layout:
            iname, domain = layout[k]
            entry = encode_indexed(state[iname], v, domain, f"part {name!r}", blobs)
            entry["index_tensor"] = iname
            tensors[k] = entry
        elif k not in index_names:
            tensors[k] = encode_tensor(v, blobs)
    return tensors


def save_compact(delta: Delta, path: str | Path, overwrite: bool = False) -> CompactReport:
    """Write ``delta`` in the compact format (atomically) and return its exact byte accounting.

    An existing ``path`` that is not an earlier compact delta is refused unless ``overwrite``; NaN/±Inf
    in a tensor, the config or the metrics raise :class:`NonFiniteError` and write nothing."""
    from deltatune import __version__

    path = Path(path)
    blobs = Blobs()
    parts: dict[str, Any] = {}
    digested: dict[str, Tensor] = {}
    for name, part in delta.parts.items():
        state = {k: v.detach().to("cpu").contiguous() for k, v in part.state().items()}
        index_names = {iname for iname, _ in part.index_layout().values()}  # decoded as int64 (int32 in memory)
        digested.update({digest_key("parts", name, k): v.long() if k in index_names else _signless_zeros(v)
                         for k, v in state.items()})
        prepare_tensors({k: state[k] for k in state}, f"{path}: part {name!r}")
        tensors = _encode_part(name, part, state, blobs)
        parts[name] = {"kind": part.kind, "meta": part.meta(), "tensors": tensors}
    heads = {}
    for h, t in delta.heads.items():
        state = {k: v.detach().to("cpu").contiguous() for k, v in t.items()}
        prepare_tensors(state, f"{path}: head {h!r}")
        digested.update({digest_key("heads", h, k): _signless_zeros(v) for k, v in state.items()})
        heads[h] = {k: encode_tensor(v, blobs) for k, v in state.items()}
    manifest = json_ready({
        "format": FORMAT, "format_version": FORMAT_VERSION, "created_by": f"deltatune {__version__}",
        "method": delta.method, "config": delta.config, "fingerprint": delta.fingerprint, "metrics": delta.metrics,
        "provenance": delta.provenance.to_json(),
        "parts": parts, "heads": heads, "blobs": dict(blobs.sizes),
    }, str(path / MANIFEST))
    manifest[DIGEST_FIELD] = build_digests(manifest, digested)
    text = json.dumps(manifest, separators=(",", ":"), allow_nan=False)  # insertion order: parts keep theirs
    with atomic_dir(path, COMPACT_KIND, overwrite=overwrite) as tmp:
        save_file(blobs.arrays(), str(tmp / DATA_FILE), metadata={"format": FORMAT})
        (tmp / MANIFEST).write_text(text)
    return _build_report(path, manifest)


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
    read_digests(manifest, file)
    return manifest


def _check_int(value: Any, where: str, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DeltaFormatError(f"{where}: {what} must be an integer ≥ 0, got {value!r}")
    return value


def _check_entry(entry: Any, where: str) -> None:
    if not isinstance(entry, dict):
        raise DeltaFormatError(f"{where}: must be a JSON object")
    if not isinstance(entry.get("dtype"), str) or entry["dtype"] not in TORCH_DTYPES:
        raise DeltaFormatError(f"{where}: unknown dtype {short(entry.get('dtype'))}; known: {sorted(TORCH_DTYPES)}")
    shape = entry.get("shape")
    if not isinstance(shape, list):
        raise DeltaFormatError(f"{where}: 'shape' must be a list of integers")
    for d in shape:
        _check_int(d, where, "every shape entry")
    _check_numel(shape, where, "'shape'")
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
        if not isinstance(domain, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                   for d in domain):
            raise DeltaFormatError(f"{where}: 'domain' must be a list of integers, got {short(domain)}")
        _check_numel(domain, where, "'domain'")
        if nnz > shape_numel(domain):
            raise DeltaFormatError(f"{where}: nnz {nnz} exceeds the {shape_numel(domain)} positions of {domain}")
        if layout == "indexed" and (shape != [nnz] or not isinstance(entry.get("index_tensor"), str)):
            raise DeltaFormatError(f"{where}: an indexed entry needs shape [nnz] and an 'index_tensor' name")


def _check_numel(shape: list[int], where: str, what: str) -> None:
    """A decoded tensor (or the weight an index set refers to) stays within :data:`MAX_NUMEL` entries; a
    ``sparse`` entry's dense size is not backed by bytes in the file, so this bounds its allocation."""
    if len(shape) > 8 or shape_numel(shape) > MAX_NUMEL:
        raise InputTooLarge(f"{where}: {what} {short(shape)} has more than {MAX_NUMEL} entries or 8 dimensions")


def _decoded_shapes(tensors: dict[str, Any], where: str) -> dict[str, list[int]]:
    """The tensors (name → shape) the validated entries of one part decode to (before decoding anything)."""
    shapes: dict[str, list[int]] = {}
    for tname, entry in tensors.items():
        names = {tname: entry["shape"]}
        if entry["layout"] == "indexed":
            names[entry["index_tensor"]] = [entry["nnz"]]
        for k, shape in names.items():
            if k in shapes or len(names) != (2 if entry["layout"] == "indexed" else 1):
                raise DeltaFormatError(f"{where}: tensor name {short(k)} is used twice")
            shapes[k] = shape
    return shapes

def _read_blobs(path: Path, expected: dict[str, int]) -> dict[str, np.ndarray]:
    file = path / DATA_FILE
    if not file.is_file():
        raise DeltaFormatError(f"{file}: missing")
    with safetensors_errors(file), safe_open(str(file), framework="numpy") as fh:
        keys = set(fh.keys())
        if keys != set(expected):
            raise DeltaFormatError(f"{file}: holds {short(sorted(keys))}, the manifest's 'blobs' lists "
                                   f"{sorted(expected)}")
        for k, count in expected.items():
            header = fh.get_slice(k)
            shape, dtype = header.get_shape(), HEADER_DTYPES.get(header.get_dtype(), header.get_dtype())
            if list(shape) != [count] or dtype != k:
                raise ShapeMismatch(f"{file}: blob {k!r} is {short(dtype)}{short(shape)}, the manifest says "
                                    f"{k}[{count}]")
        blobs = {k: fh.get_tensor(k) for k in expected}
    for k, count in expected.items():
        if blobs[k].dtype.name != k or blobs[k].ndim != 1 or blobs[k].size != count:
            raise ShapeMismatch(f"{file}: blob {k!r} is {blobs[k].dtype.name}{list(blobs[k].shape)}, the manifest "
                                f"says {k}[{count}]")
    return blobs


def load_compact(path: str | Path, verify: bool = True) -> Delta:
    """Load and validate a compact delta directory (every count, range and codec is checked).

    Order: manifest fields, types and finite numbers; each part's meta against the shapes its entries
    decode to; the manifest digest (``verify``); then the blobs (header first), and each decoded tensor's
    digest (``verify``) and finiteness before the parts are rebuilt.  A manifest without ``digests``
    (written before they existed) loads unverified."""
    path = Path(path)
    file = path / MANIFEST
    manifest = read_compact_manifest(path)
    keys: set[str] = set()
    for name, spec in manifest["parts"].items():
        shapes = _decoded_shapes(spec["tensors"], f"{file}: part {name!r}")
        check_part_meta(name, spec, shapes, file)
        keys.update(digest_key("parts", name, k) for k in shapes)
    for head, spec in manifest["heads"].items():
        for tname, entry in spec.items():
            if entry["layout"] == "indexed":
                raise DeltaFormatError(f"{file}: head {head!r} tensor {tname!r}: heads cannot use the indexed layout")
            keys.add(digest_key("heads", head, tname))
    digests = read_digests(manifest, file) if verify else None
    if digests is not None:
        verify_manifest(file, manifest, keys)
    reader = Reader(path / DATA_FILE, _read_blobs(path, manifest["blobs"]))

    def decode(group: str, owner: str, tname: str, entry: dict[str, Any], where: str) -> dict[str, Tensor]:
        out = decode_entry(tname, entry, reader, where)
        for k, t in out.items():
            if digests is not None:
                key = digest_key(group, owner, k)
                verify_tensor(file, key, _signless_zeros(t), digests[key])
            check_finite(t, f"{where} ({k!r})")
        return out

    parts = {}
    for name, spec in manifest["parts"].items():
        state: dict[str, Tensor] = {}
        for tname, entry in spec["tensors"].items():
            state.update(decode("parts", name, tname, entry, f"{file}: part {name!r} tensor {tname!r}"))
        parts[name] = part_from_state(name, spec, state, file, file)
    heads = {}
    for head, spec in manifest["heads"].items():
        heads[head] = {}
        for tname, entry in spec.items():
            heads[head].update(decode("heads", head, tname, entry, f"{file}: head {head!r} tensor {tname!r}"))
    reader.check_coverage()
    return Delta(method=manifest["method"], config=manifest["config"], parts=parts, heads=heads,
                 fingerprint=manifest["fingerprint"], metrics=manifest["metrics"],
                 provenance=manifest_provenance(manifest, file))
