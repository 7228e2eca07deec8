"""deltatune's delta directory: ``manifest.json`` + ``parts.safetensors`` (+ ``heads.safetensors``).

The manifest records the format version, method, config, base fingerprint, each part's kind,
metadata and tensor shapes/dtypes, task heads, training metrics and ``digests`` (SHA-256 of every
tensor, by name, dtype, shape and bytes, and of the manifest itself; see :mod:`deltatune.io.digest`).

Loading checks, in this order, so that nothing is allocated before it is known to be consistent:
the manifest's fields and types, that every number in it is finite, each part's metadata against the
tensor shapes it lists, those shapes and dtypes against the safetensors header (no data read), the
manifest digest; then it reads the tensor file once, checks each tensor's digest and finiteness
(:mod:`deltatune.io.tensor_file`: digests over the raw bytes, one finiteness pass per run of same-dtype
tensors, tensors as views of the one buffer), and rebuilds the parts (sparse indices must be strictly
increasing and in range).  The manifest is read and parsed once.  Errors are typed
(:class:`DeltaFormatError` and its subclasses :class:`ShapeMismatch`, :class:`IntegrityError`,
:class:`NonFiniteError`; :class:`InputTooLarge`) and name the file and the field or tensor at fault.

``digests`` is optional for format version 1: a delta written before digests existed has none and
loads unverified; once present, every tensor must have one.  ``verify=False`` skips the digest
checks (not the others).  Saving is atomic and refuses non-finite tensors and numbers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from deltatune.delta import Delta
from deltatune.errors import DeltaFormatError, DeltaTuneError, NonFiniteError, ShapeMismatch
from deltatune.io.atomic import atomic_dir
from deltatune.io.digest import DIGEST_FIELD, build_digests, digest_key, read_digests, verify_manifest
from deltatune.io.json_io import read_json_object
from deltatune.io.outputs import DELTA_KIND
from deltatune.io.tensor_file import read_tensors_checked, safetensors_errors
from deltatune.parts.base import PART_KINDS, Part
from deltatune.parts.meta_checks import check_finite, short
from deltatune.provenance import Provenance

FORMAT = "deltatune.delta"
FORMAT_VERSION = 1
COMPACT_FORMAT = "deltatune.compact"  # io/compact_format.py: codec-compressed tensors, same manifest idea
MANIFEST = "manifest.json"
PARTS_FILE = "parts.safetensors"
HEADS_FILE = "heads.safetensors"
SEP = "::"
REQUIRED = {"format", "format_version", "method", "config", "fingerprint", "parts", "heads", "metrics"}
OPTIONAL = {"created_by", DIGEST_FIELD, "provenance"}
PART_FIELDS = {"kind", "meta", "tensors"}


MAX_JSON_DEPTH = 32
HEADER_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                 "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "U16": "uint16",
                 "U32": "uint32", "U64": "uint64"}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _tensor_spec(t: Tensor) -> dict[str, Any]:
    return {"dtype": _dtype_name(t.dtype), "shape": list(t.shape)}


def json_ready(manifest: dict[str, Any], where: str) -> dict[str, Any]:
    """``manifest`` as it will read back from JSON (tensors → lists, tuples → lists), refusing non-finite
    numbers with :class:`NonFiniteError` naming the field."""
    text = json.dumps(manifest, default=_json_default)
    value = json.loads(text)
    check_json_values(value, where)
    return value


def prepare_tensors(tensors: dict[str, Tensor], where: str) -> None:
    """Refuse to write a non-finite tensor (``where`` names the output)."""
    for key, t in tensors.items():
        check_finite(t, f"{where}: tensor {key!r}")


def save_delta(delta: Delta, path: str | Path, metrics: dict[str, Any] | None = None,
               overwrite: bool = False) -> Path:
    """Write ``delta`` to the directory ``path`` atomically (a crash leaves any previous delta intact).

    An existing ``path`` that is not an earlier delta is refused unless ``overwrite``; NaN/±Inf in a
    tensor, the config or the metrics raise :class:`NonFiniteError` and write nothing."""
    from deltatune import __version__

    path = Path(path)
    part_tensors: dict[str, Tensor] = {}
    digested: dict[str, Tensor] = {}
    parts_manifest: dict[str, Any] = {}
    for name, part in delta.parts.items():
        state = {k: v.detach().to("cpu").contiguous() for k, v in part.state().items()}
        parts_manifest[name] = {"kind": part.kind, "meta": part.meta(),
                                "tensors": {k: _tensor_spec(v) for k, v in state.items()}}
        part_tensors.update({f"{name}{SEP}{k}": v for k, v in state.items()})
        digested.update({digest_key("parts", name, k): v for k, v in state.items()})
    head_tensors = {f"{h}{SEP}{k}": v.detach().to("cpu").contiguous()
                    for h, tensors in delta.heads.items() for k, v in tensors.items()}
    digested.update({digest_key("heads", h, k): head_tensors[f"{h}{SEP}{k}"]
                     for h, tensors in delta.heads.items() for k in tensors})
    prepare_tensors(digested, str(path))
    manifest = json_ready({
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created_by": f"deltatune {__version__}",
        "method": delta.method,
        "config": delta.config,
        "fingerprint": delta.fingerprint,
        "parts": parts_manifest,
        "heads": {h: {k: _tensor_spec(v) for k, v in t.items()} for h, t in delta.heads.items()},
        "metrics": {**delta.metrics, **(metrics or {})},
        "provenance": delta.provenance.to_json(),
    }, f"{path / MANIFEST}")
    manifest[DIGEST_FIELD] = build_digests(manifest, digested)
    with atomic_dir(path, DELTA_KIND, overwrite=overwrite) as tmp:
        save_file(part_tensors, str(tmp / PARTS_FILE), metadata={"format": FORMAT})
        if head_tensors:
            save_file(head_tensors, str(tmp / HEADS_FILE), metadata={"format": FORMAT})
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False))
    return path


def manifest_provenance(manifest: dict[str, Any], file: Path) -> Provenance:
    """The manifest's ``provenance`` (validated), or one rebuilt from the metrics of a delta saved before it."""
    if "provenance" in manifest:
        return Provenance.from_json(manifest["provenance"], str(file))
    return Provenance.from_metrics(manifest["metrics"])


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} into a delta manifest")


def check_json_values(value: Any, where: str) -> None:
    """Every number in the JSON ``value`` is finite and it nests at most :data:`MAX_JSON_DEPTH` deep
    (walked without recursion); raises :class:`NonFiniteError` / :class:`DeltaFormatError` naming the field."""
    stack: list[tuple[Any, str, int]] = [(value, "", 0)]
    while stack:
        item, field, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise DeltaFormatError(f"{where}: field {short(field)} nests deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(item, float) and not math.isfinite(item):
            raise NonFiniteError(f"{where}: field {short(field)} is {item}; numbers must be finite")
        if isinstance(item, dict):
            stack.extend((v, f"{field}.{k}" if field else str(k), depth + 1) for k, v in item.items())
        elif isinstance(item, list):
            stack.extend((v, f"{field}[{i}]", depth + 1) for i, v in enumerate(item))


def check_manifest_fields(manifest: dict[str, Any], file: Path, fmt: str, version_max: int,
                          required: set[str], optional: set[str], objects: tuple[str, ...]) -> None:
    """The checks every delta manifest shares: field names, format and version, JSON-object fields, the
    fingerprint, finite numbers, and each part's ``kind``/``meta``/``tensors`` (shared by the standard and
    compact formats)."""
    missing = sorted(required - set(manifest))
    unknown = sorted(set(manifest) - required - optional)
    if missing:
        raise DeltaFormatError(f"{file}: missing field(s) {missing}")
    if unknown:
        raise DeltaFormatError(f"{file}: unknown field(s) {short(unknown)}; known fields: "
                               f"{sorted(required | optional)}")
    if manifest["format"] != fmt:
        raise DeltaFormatError(f"{file}: field 'format' is {short(manifest['format'])}, expected {fmt!r}")
    version = manifest["format_version"]
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise DeltaFormatError(f"{file}: field 'format_version' must be a positive integer, got {short(version)}")
    if version > version_max:
        raise DeltaFormatError(f"{file}: format_version {version} is newer than this deltatune reads "
                               f"({version_max}); upgrade deltatune")
    for key in ("method", "created_by"):
        if key in manifest and not isinstance(manifest[key], str):
            raise DeltaFormatError(f"{file}: field {key!r} must be a string, got {short(manifest[key])}")
    for key in objects:
        if not isinstance(manifest[key], dict):
            raise DeltaFormatError(f"{file}: field {key!r} must be a JSON object, got {type(manifest[key]).__name__}")
    if manifest["fingerprint"] is not None and not isinstance(manifest["fingerprint"], dict):
        raise DeltaFormatError(f"{file}: field 'fingerprint' must be an object or null")
    check_json_values(manifest, str(file))
    if "provenance" in manifest:
        Provenance.from_json(manifest["provenance"], str(file))
    for name, spec in manifest["parts"].items():
        if not isinstance(spec, dict) or set(spec) != PART_FIELDS:
            raise DeltaFormatError(f"{file}: part {short(name)} must have exactly the fields {sorted(PART_FIELDS)}")
        if not isinstance(spec["kind"], str) or spec["kind"] not in PART_KINDS:
            raise DeltaFormatError(f"{file}: part {name!r} has unknown kind {short(spec['kind'])}; "
                                   f"known kinds: {sorted(PART_KINDS)}")
        if not isinstance(spec["meta"], dict) or not isinstance(spec["tensors"], dict):
            raise DeltaFormatError(f"{file}: part {name!r}: 'meta' and 'tensors' must be JSON objects")
    for head, spec in manifest["heads"].items():
        if not isinstance(spec, dict):
            raise DeltaFormatError(f"{file}: head {short(head)} must map tensor names to entries")


def _prefixed(exc: DeltaTuneError, prefix: str) -> DeltaTuneError:
    """``exc``'s type with ``prefix`` in front of its message."""
    return type(exc)(f"{prefix}: {exc}")


def check_part_meta(name: str, spec: dict[str, Any], shapes: dict[str, list[int]], file: Path) -> None:
    """Part ``name``'s metadata is valid and implies exactly the tensor ``shapes`` the file holds (checked
    before any tensor is read, so a meta claiming a huge shape fails without allocating)."""
    try:
        expected = PART_KINDS[spec["kind"]].expected_state(spec["meta"])
    except DeltaTuneError as exc:
        raise _prefixed(exc, f"{file}: part {name!r} metadata is invalid") from None
    got = {k: tuple(v) for k, v in shapes.items()}
    if got != expected:
        raise ShapeMismatch(f"{file}: part {name!r}: its tensors are {short(got)} but its meta implies "
                            f"{short(expected)}")


def part_from_state(name: str, spec: dict[str, Any], state: dict[str, Tensor], manifest_file: Path,
                    tensor_file: Path) -> Part:
    """Rebuild part ``name`` from its decoded tensors, naming the file at fault in any error."""
    try:
        return PART_KINDS[spec["kind"]].from_state(state, spec["meta"])
    except ShapeMismatch as exc:
        raise ShapeMismatch(f"{tensor_file}: part {name!r}: {exc}") from None
    except DeltaTuneError as exc:
        raise _prefixed(exc, f"{manifest_file}: part {name!r} metadata is invalid") from None
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise DeltaFormatError(f"{manifest_file}: part {name!r} metadata is invalid ({short(str(exc))})") from None


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Read and validate ``manifest.json`` (fields, version, finite numbers, part kinds, tensor specs)."""
    file = Path(path) / MANIFEST
    manifest = check_manifest(_manifest_object(file), file)
    read_digests(manifest, file)
    return manifest


def _manifest_object(file: Path) -> dict[str, Any]:
    return read_json_object(file, "delta", f"{MANIFEST} and {PARTS_FILE}")


def check_manifest(manifest: dict[str, Any], file: Path) -> dict[str, Any]:
    """Validate the parsed ``manifest`` of ``file`` (all of :func:`read_manifest` but the reading and the digests
    field, which the caller reads) and return it."""
    check_manifest_fields(manifest, file, FORMAT, FORMAT_VERSION, REQUIRED, OPTIONAL,
                          ("config", "parts", "heads", "metrics"))
    for name, spec in manifest["parts"].items():
        _check_specs(spec["tensors"], f"{file}: part {name!r}")
    for head, spec in manifest["heads"].items():
        _check_specs(spec, f"{file}: head {head!r}")
    return manifest


def _check_specs(specs: dict[str, Any], where: str) -> None:
    for tname, spec in specs.items():
        ok = (isinstance(spec, dict) and set(spec) == {"dtype", "shape"} and isinstance(spec["dtype"], str)
              and spec["dtype"] in HEADER_DTYPES.values() and isinstance(spec["shape"], list)
              and len(spec["shape"]) <= 8
              and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in spec["shape"]))
        if not ok:
            raise DeltaFormatError(f"{where}: tensor {short(tname)} needs {{'dtype': str, 'shape': [int, ...]}} "
                                   f"with a known dtype, got {short(spec)}")


def _read_tensors(file: Path, expected: dict[str, dict[str, Any]], names: dict[str, str],
                  digests: dict[str, str] | None) -> dict[str, Tensor]:
    """Load exactly the tensors named in ``expected`` (key → spec): shapes and dtypes are checked against the
    header before any data is read, then each tensor's digest (``names`` maps key → digest key) and finiteness
    (:func:`deltatune.io.tensor_file.read_tensors_checked`: one read of the file, tensors are views of it)."""
    if not expected:
        return {}
    if not file.is_file():
        raise DeltaFormatError(f"{file}: missing")
    with safetensors_errors(file):
        with safe_open(str(file), framework="pt") as fh:
            keys = set(fh.keys())
            missing = sorted(set(expected) - keys)
            extra = sorted(keys - set(expected))
            if missing or extra:
                raise DeltaFormatError(f"{file}: tensors do not match the manifest (missing {short(missing[:5])}, "
                                       f"unexpected {short(extra[:5])})")
            for key, spec in expected.items():
                header = fh.get_slice(key)
                dtype = HEADER_DTYPES.get(header.get_dtype(), header.get_dtype())
                if list(header.get_shape()) != list(spec["shape"]) or dtype != spec["dtype"]:
                    raise ShapeMismatch(f"{file}: tensor {key!r} is {dtype}{list(header.get_shape())}, the "
                                        f"manifest says {spec['dtype']}{spec['shape']}")
        out = read_tensors_checked(file, expected, names, digests)  # one read; digests, finiteness
    return out


def is_compact(path: str | Path) -> bool:
    """Whether the delta folder ``path`` is in the compact format (its manifest says so)."""
    file = Path(path) / MANIFEST
    return file.is_file() and _manifest_object(file).get("format") == COMPACT_FORMAT


def load_delta(path: str | Path, verify: bool = True) -> Delta:
    """Load and validate a delta directory written by :func:`save_delta` (or, dispatching on the manifest's
    ``format``, a compact one written by :func:`deltatune.io.compact_format.save_compact`).

    ``verify`` checks the manifest's and every tensor's SHA-256 digest (:class:`IntegrityError` on a
    mismatch); a manifest without digests (written before they existed) loads unverified."""
    path = Path(path)
    file = path / MANIFEST
    manifest = _manifest_object(file)  # read once: the format it names picks the loader
    if manifest.get("format") == COMPACT_FORMAT:
        from deltatune.io.compact_format import load_compact

        return load_compact(path, verify=verify)
    check_manifest(manifest, file)
    for name, spec in manifest["parts"].items():
        check_part_meta(name, spec, {k: s["shape"] for k, s in spec["tensors"].items()}, file)
    names = {f"{n}{SEP}{k}": digest_key("parts", n, k) for n, spec in manifest["parts"].items()
             for k in spec["tensors"]}
    head_names = {f"{h}{SEP}{k}": digest_key("heads", h, k) for h, spec in manifest["heads"].items() for k in spec}
    stored = read_digests(manifest, file)  # its structure is checked even unverified
    digests = stored if verify else None
    if digests is not None:
        verify_manifest(file, manifest, set(names.values()) | set(head_names.values()))
    expected = {f"{n}{SEP}{k}": s for n, spec in manifest["parts"].items() for k, s in spec["tensors"].items()}
    tensors = _read_tensors(path / PARTS_FILE, expected, names, digests)
    parts = {}
    for name, spec in manifest["parts"].items():
        state = {k: tensors[f"{name}{SEP}{k}"] for k in spec["tensors"]}
        parts[name] = part_from_state(name, spec, state, file, path / PARTS_FILE)
    head_expected = {f"{h}{SEP}{k}": s for h, spec in manifest["heads"].items() for k, s in spec.items()}
    head_tensors = _read_tensors(path / HEADS_FILE, head_expected, head_names, digests)
    heads = {h: {k: head_tensors[f"{h}{SEP}{k}"] for k in spec} for h, spec in manifest["heads"].items()}
    return Delta(method=manifest["method"], config=manifest["config"], parts=parts, heads=heads,
                 fingerprint=manifest["fingerprint"], metrics=manifest["metrics"],
                 provenance=manifest_provenance(manifest, file))
