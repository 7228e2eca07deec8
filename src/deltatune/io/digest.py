"""Content digests: SHA-256 over tensor names, dtypes, shapes and bytes, and over canonical JSON.

Every format deltatune writes stores ``digests = {"tensors": {name: hex}, "manifest": hex}``; loading
recomputes and compares them (``verify=False`` skips it).  The tensor digest covers the *name* and the
metadata as well as the bytes, so a bit flip anywhere (a value, a dtype, a shape or a part name) fails
the check instead of silently moving an update to another layer.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import numpy as np
import torch
from torch import Tensor

from deltatune.errors import IntegrityError
from deltatune.parts.meta_checks import short

DIGEST_FIELD = "digests"


def bytes_digest(name: str, dtype: str, shape: list[int] | tuple[int, ...], data: Any) -> str:
    """``sha256(name ‖ 0 ‖ dtype ‖ 0 ‖ shape ‖ 0 ‖ bytes)`` from the raw little-endian ``data`` (any buffer: bytes, a
    ``uint8`` array) of a tensor of torch dtype name ``dtype`` (``"float32"``) and ``shape``."""
    h = hashlib.sha256()
    h.update(name.encode("utf-8"))
    h.update(b"\0" + dtype.encode() + b"\0" + json.dumps(list(shape)).encode() + b"\0")
    h.update(data)
    return h.hexdigest()


def tensor_digest(name: str, tensor: Tensor | np.ndarray) -> str:
    """:func:`bytes_digest` of one tensor (torch or numpy, any device)."""
    if isinstance(tensor, Tensor):
        t = tensor.detach().to("cpu").contiguous()
        dtype, shape = str(t.dtype).removeprefix("torch."), list(t.shape)
        data = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
    else:
        a = np.ascontiguousarray(tensor)
        dtype, shape, data = str(a.dtype), list(a.shape), a.reshape(-1).view(np.uint8)
    return bytes_digest(name, dtype, shape, data)


def json_digest(obj: Any) -> str:
    """SHA-256 of ``obj`` as canonical JSON (sorted keys, no whitespace, NaN refused)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def manifest_digest(manifest: dict[str, Any]) -> str:
    """Digest of a manifest without its own ``digests`` field's ``manifest`` entry (the tensor digests are
    covered, so they cannot be swapped either)."""
    body = dict(manifest)
    digests = dict(body.get(DIGEST_FIELD) or {})
    digests.pop("manifest", None)
    body[DIGEST_FIELD] = digests
    return json_digest(body)


def verify_tensor(file: Any, name: str, tensor: Tensor | np.ndarray, expected: str) -> None:
    """Raise :class:`IntegrityError` naming ``file`` and ``name`` unless the digest matches."""
    got = tensor_digest(name, tensor)
    if got != expected:
        raise_mismatch(file, name, expected, got)


def raise_mismatch(file: Any, name: str, expected: str, got: str) -> None:
    """The :class:`IntegrityError` of tensor ``name`` of ``file`` whose digest is ``got``, not ``expected``."""
    raise IntegrityError(f"{file}: tensor {name!r} fails its SHA-256 check (stored {expected[:12]}…, "
                         f"read {got[:12]}…); the file is corrupt or was modified")


def digest_key(group: str, owner: str, tensor: str) -> str:
    """The name a tensor is digested under: ``parts/<module>::<tensor>`` or ``heads/<head>::<tensor>``."""
    return f"{group}/{owner}::{tensor}"


def build_digests(manifest: dict[str, Any], tensors: dict[str, Tensor]) -> dict[str, Any]:
    """The ``digests`` field for ``manifest`` (JSON-ready, without a ``digests`` field) and ``tensors``
    (digest key → tensor): each tensor's digest, then the manifest's, which covers the tensor digests."""
    digests: dict[str, Any] = {"tensors": {k: tensor_digest(k, t) for k, t in tensors.items()}}
    digests["manifest"] = manifest_digest({**manifest, DIGEST_FIELD: digests})
    return digests


_HEX64 = re.compile(r"[0-9a-f]{64}")


def _is_hex(value: Any) -> bool:
    return isinstance(value, str) and _HEX64.fullmatch(value) is not None


def read_digests(manifest: dict[str, Any], file: Any) -> dict[str, str] | None:
    """The stored tensor digests after checking the field's structure, or ``None`` when the manifest has
    no ``digests`` field (a format-version-1 file written before digests existed: it loads unverified)."""
    if DIGEST_FIELD not in manifest:
        return None
    field = manifest[DIGEST_FIELD]
    ok = (isinstance(field, dict) and set(field) == {"tensors", "manifest"} and _is_hex(field["manifest"])
          and isinstance(field["tensors"], dict) and all(_is_hex(v) for v in field["tensors"].values()))
    if not ok:
        raise IntegrityError(f"{file}: field {DIGEST_FIELD!r} must be {{'tensors': {{name: sha256}}, "
                             f"'manifest': sha256}} with 64-digit lowercase hex digests")
    return field["tensors"]


def verify_manifest(file: Any, manifest: dict[str, Any], expected_keys: set[str]) -> None:
    """Check the manifest's own digest and that the stored tensor digests name exactly ``expected_keys``."""
    got = manifest_digest(manifest)
    stored = manifest[DIGEST_FIELD]["manifest"]
    if got != stored:
        raise IntegrityError(f"{file}: the manifest fails its SHA-256 check (stored {stored[:12]}…, read "
                             f"{got[:12]}…); names, metadata or config were modified")
    keys = set(manifest[DIGEST_FIELD]["tensors"])
    if keys != expected_keys:
        missing, extra = sorted(expected_keys - keys)[:3], sorted(keys - expected_keys)[:3]
        raise IntegrityError(f"{file}: digests do not match the tensors (no digest for {short(missing)}, digest "
                             f"for unknown {short(extra)})")
