"""deltatune's delta directory: ``manifest.json`` + ``parts.safetensors`` (+ ``heads.safetensors``).

The manifest records the format version, method, config, base fingerprint, each part's kind,
metadata and tensor shapes/dtypes, task heads and training metrics.  Loading validates every field
and every tensor against the manifest and raises :class:`DeltaFormatError` (or
:class:`ShapeMismatch`) naming the file and the field or tensor at fault.  Saving is atomic.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from deltatune.delta import Delta
from deltatune.errors import DeltaFormatError, ShapeMismatch
from deltatune.io.atomic import atomic_dir
from deltatune.io.json_io import read_json_object
from deltatune.parts.base import PART_KINDS, Part

FORMAT = "deltatune.delta"
FORMAT_VERSION = 1
COMPACT_FORMAT = "deltatune.compact"  # io/compact_format.py: codec-compressed tensors, same manifest idea
MANIFEST = "manifest.json"
PARTS_FILE = "parts.safetensors"
HEADS_FILE = "heads.safetensors"
SEP = "::"
REQUIRED = {"format", "format_version", "method", "config", "fingerprint", "parts", "heads", "metrics"}
OPTIONAL = {"created_by"}
PART_FIELDS = {"kind", "meta", "tensors"}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _tensor_spec(t: Tensor) -> dict[str, Any]:
    return {"dtype": _dtype_name(t.dtype), "shape": list(t.shape)}


def save_delta(delta: Delta, path: str | Path, metrics: dict[str, Any] | None = None) -> Path:
    """Write ``delta`` to the directory ``path`` atomically (a crash leaves any previous delta intact)."""
    from deltatune import __version__

    path = Path(path)
    part_tensors: dict[str, Tensor] = {}
    parts_manifest: dict[str, Any] = {}
    for name, part in delta.parts.items():
        state = {k: v.detach().to("cpu").contiguous() for k, v in part.state().items()}
        parts_manifest[name] = {"kind": part.kind, "meta": part.meta(),
                                "tensors": {k: _tensor_spec(v) for k, v in state.items()}}
        part_tensors.update({f"{name}{SEP}{k}": v for k, v in state.items()})
    head_tensors = {f"{h}{SEP}{k}": v.detach().to("cpu").contiguous()
                    for h, tensors in delta.heads.items() for k, v in tensors.items()}
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created_by": f"deltatune {__version__}",
        "method": delta.method,
        "config": delta.config,
        "fingerprint": delta.fingerprint,
        "parts": parts_manifest,
        "heads": {h: {k: _tensor_spec(v) for k, v in t.items()} for h, t in delta.heads.items()},
        "metrics": {**delta.metrics, **(metrics or {})},
    }
    with atomic_dir(path) as tmp:
        save_file(part_tensors, str(tmp / PARTS_FILE), metadata={"format": FORMAT})
        if head_tensors:
            save_file(head_tensors, str(tmp / HEADS_FILE), metadata={"format": FORMAT})
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=_json_default))
    return path


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} into a delta manifest")


def check_manifest_fields(manifest: dict[str, Any], file: Path, fmt: str, version_max: int,
                          required: set[str], optional: set[str], objects: tuple[str, ...]) -> None:
    """The checks every delta manifest shares: field names, format and version, JSON-object fields, the
    fingerprint, and each part's ``kind``/``meta``/``tensors`` (shared by the standard and compact formats)."""
    missing = sorted(required - set(manifest))
    unknown = sorted(set(manifest) - required - optional)
    if missing:
        raise DeltaFormatError(f"{file}: missing field(s) {missing}")
    if unknown:
        raise DeltaFormatError(f"{file}: unknown field(s) {unknown}; known fields: {sorted(required | optional)}")
    if manifest["format"] != fmt:
        raise DeltaFormatError(f"{file}: field 'format' is {manifest['format']!r}, expected {fmt!r}")
    version = manifest["format_version"]
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise DeltaFormatError(f"{file}: field 'format_version' must be a positive integer, got {version!r}")
    if version > version_max:
        raise DeltaFormatError(f"{file}: format_version {version} is newer than this deltatune reads "
                               f"({version_max}); upgrade deltatune")
    for key in objects:
        if not isinstance(manifest[key], dict):
            raise DeltaFormatError(f"{file}: field {key!r} must be a JSON object, got {type(manifest[key]).__name__}")
    if manifest["fingerprint"] is not None and not isinstance(manifest["fingerprint"], dict):
        raise DeltaFormatError(f"{file}: field 'fingerprint' must be an object or null")
    for name, spec in manifest["parts"].items():
        if not isinstance(spec, dict) or set(spec) != PART_FIELDS:
            raise DeltaFormatError(f"{file}: part {name!r} must have exactly the fields {sorted(PART_FIELDS)}")
        if spec["kind"] not in PART_KINDS:
            raise DeltaFormatError(f"{file}: part {name!r} has unknown kind {spec['kind']!r}; "
                                   f"known kinds: {sorted(PART_KINDS)}")
        if not isinstance(spec["meta"], dict) or not isinstance(spec["tensors"], dict):
            raise DeltaFormatError(f"{file}: part {name!r}: 'meta' and 'tensors' must be JSON objects")
    for head, spec in manifest["heads"].items():
        if not isinstance(spec, dict):
            raise DeltaFormatError(f"{file}: head {head!r} must map tensor names to entries")


def part_from_state(name: str, spec: dict[str, Any], state: dict[str, Tensor], manifest_file: Path,
                    tensor_file: Path) -> Part:
    """Rebuild part ``name`` from its decoded tensors, naming the file at fault in any error."""
    try:
        return PART_KINDS[spec["kind"]].from_state(state, spec["meta"])
    except (KeyError, TypeError, ValueError) as exc:
        raise DeltaFormatError(f"{manifest_file}: part {name!r} metadata is invalid ({exc})") from None
    except ShapeMismatch as exc:
        raise ShapeMismatch(f"{tensor_file}: part {name!r}: {exc}") from None


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Read and validate ``manifest.json`` (fields, version, part kinds, tensor specs)."""
    path = Path(path)
    file = path / MANIFEST
    manifest = read_json_object(file, "delta", f"{MANIFEST} and {PARTS_FILE}")
    check_manifest_fields(manifest, file, FORMAT, FORMAT_VERSION, REQUIRED, OPTIONAL,
                          ("config", "parts", "heads", "metrics"))
    for name, spec in manifest["parts"].items():
        _check_specs(spec["tensors"], f"{file}: part {name!r}")
    for head, spec in manifest["heads"].items():
        _check_specs(spec, f"{file}: head {head!r}")
    return manifest


def _check_specs(specs: dict[str, Any], where: str) -> None:
    for tname, spec in specs.items():
        ok = (isinstance(spec, dict) and isinstance(spec.get("dtype"), str) and isinstance(spec.get("shape"), list)
              and all(isinstance(d, int) and d >= 0 for d in spec["shape"]))
        if not ok:
            raise DeltaFormatError(f"{where}: tensor {tname!r} needs {{'dtype': str, 'shape': [int, ...]}}, "
                                   f"got {spec!r}")


def _read_tensors(file: Path, expected: dict[str, dict[str, Any]]) -> dict[str, Tensor]:
    """Load exactly the tensors named in ``expected`` (key → spec), checking shapes and dtypes."""
    if not expected:
        return {}
    if not file.is_file():
        raise DeltaFormatError(f"{file}: missing")
    try:
        with safe_open(str(file), framework="pt") as fh:
            keys = set(fh.keys())
            missing = sorted(set(expected) - keys)
            extra = sorted(keys - set(expected))
            if missing or extra:
                raise DeltaFormatError(f"{file}: tensors do not match the manifest (missing {missing[:5]}, "
                                       f"unexpected {extra[:5]})")
            out = {k: fh.get_tensor(k) for k in expected}
    except SafetensorError as exc:
        raise DeltaFormatError(f"{file}: truncated or corrupt safetensors file ({exc})") from None
    except (OSError, ValueError, RuntimeError) as exc:
        if isinstance(exc, DeltaFormatError):
            raise
        raise DeltaFormatError(f"{file}: cannot be read as safetensors ({exc})") from None
    for key, spec in expected.items():
        t = out[key]
        if list(t.shape) != list(spec["shape"]) or _dtype_name(t.dtype) != spec["dtype"]:
            raise ShapeMismatch(f"{file}: tensor {key!r} is {_dtype_name(t.dtype)}{list(t.shape)}, the manifest "
                                f"says {spec['dtype']}{spec['shape']}")
    return out


def _stored_format(path: Path) -> Any:
    """The manifest's ``format`` field, or ``None`` when it cannot be read (``read_manifest`` then explains)."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest.get("format") if isinstance(manifest, dict) else None


def load_delta(path: str | Path) -> Delta:
    """Load and validate a delta directory written by :func:`save_delta` (or, dispatching on the manifest's
    ``format``, a compact one written by :func:`deltatune.io.compact_format.save_compact`)."""
    path = Path(path)
    if _stored_format(path) == COMPACT_FORMAT:
        from deltatune.io.compact_format import load_compact

        return load_compact(path)
    manifest = read_manifest(path)
    expected = {f"{n}{SEP}{k}": s for n, spec in manifest["parts"].items() for k, s in spec["tensors"].items()}
    tensors = _read_tensors(path / PARTS_FILE, expected)
    parts = {}
    for name, spec in manifest["parts"].items():
        state = {k: tensors[f"{name}{SEP}{k}"] for k in spec["tensors"]}
        parts[name] = part_from_state(name, spec, state, path / MANIFEST, path / PARTS_FILE)
    head_expected = {f"{h}{SEP}{k}": s for h, spec in manifest["heads"].items() for k, s in spec.items()}
    head_tensors = _read_tensors(path / HEADS_FILE, head_expected)
    heads = {h: {k: head_tensors[f"{h}{SEP}{k}"] for k in spec} for h, spec in manifest["heads"].items()}
    return Delta(method=manifest["method"], config=manifest["config"], parts=parts, heads=heads,
                 fingerprint=manifest["fingerprint"], metrics=manifest["metrics"])
