"""Output folders deltatune may replace: a marker file names each one's kind and contents.

Every directory committed by :func:`deltatune.io.atomic.atomic_dir` holds ``.deltatune-output.json``
(``{"kind": "delta", "files": [...]}``, the top-level entries it was written with).  An existing,
non-empty folder given as an output is replaced only when that marker has the same kind and the
folder holds nothing outside the marker's list, so an unrelated folder (or a file a user put into an
earlier output) is never deleted; ``overwrite=True`` (CLI ``--overwrite``) replaces it anyway.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from deltatune.errors import OutputExists

MARKER = ".deltatune-output.json"
#: Hidden siblings that :func:`deltatune.io.atomic.atomic_dir` builds in (``.NAME.tmp-PID-xxxx``, ``.NAME.old-…``).
TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<role>tmp|old)-(?:(?P<pid>\d+)-)?(?P<rand>[A-Za-z0-9_]+)$")
SHOWN_ENTRIES = 5
# Output kinds shared by writers and the CLI's early checks (any string works; these are the common ones).
DELTA_KIND, COMPACT_KIND, PEFT_KIND, CHECKPOINT_KIND = "delta", "compact", "peft", "checkpoint"


def read_marker(path: str | Path) -> dict[str, Any] | None:
    """The marker of ``path`` as ``{"kind": str, "files": [str, ...]}``, or ``None`` (absent or unreadable)."""
    try:
        doc = json.loads((Path(path) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("kind"), str):
        return None
    files = doc.get("files")
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        return None
    return {"kind": doc["kind"], "files": files}


def write_marker(path: str | Path, kind: str, files: Iterable[str] | None = None) -> None:
    """Mark ``path`` as a deltatune output of ``kind``; ``files`` defaults to its current top-level entries."""
    path = Path(path)
    names = sorted(files) if files is not None else sorted(p.name for p in path.iterdir() if p.name != MARKER)
    tmp = path / f"{MARKER}.tmp-{os.getpid()}-marker"  # a TEMP_NAME: renamed into place, never half written
    tmp.write_text(json.dumps({"kind": kind, "files": names}, indent=1), encoding="utf-8")
    os.replace(tmp, path / MARKER)


def _short(name: str, limit: int = 40) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"


def _listing(names: list[str]) -> str:
    shown = ", ".join(_short(n) for n in names[:SHOWN_ENTRIES])
    more = f", … ({len(names)} entries)" if len(names) > SHOWN_ENTRIES else ""
    return shown + more


def guard_output(path: str | Path, kind: str, overwrite: bool = False) -> None:
    """Raise :class:`OutputExists` unless ``path`` may receive a new output of ``kind``.

    Allowed: a missing path, an empty folder, or an earlier deltatune output of the same ``kind`` holding
    only the entries it was written with (leftover temporaries of interrupted writes are ignored).
    ``overwrite=True`` allows anything.  The message names the path and a few of its entries.
    """
    path = Path(path)
    if overwrite or not (path.exists() or path.is_symlink()):
        return
    hint = "pass --overwrite (overwrite=True) to replace it"
    if not path.is_dir():
        raise OutputExists(f"output {path} exists and is a file, not a folder; {hint}")
    entries = sorted(p.name for p in path.iterdir() if not TEMP_NAME.match(p.name))
    if not entries:
        return
    marker = read_marker(path)
    if marker is None:
        raise OutputExists(f"output folder {path} is not empty and is not a deltatune output (it holds "
                           f"{_listing(entries)}); {hint}")
    if marker["kind"] != kind:
        raise OutputExists(f"output folder {path} holds a deltatune {_short(marker['kind'], 20)} output, not a "
                           f"{kind} one ({_listing([n for n in entries if n != MARKER])}); {hint}")
    foreign = [n for n in entries if n != MARKER and n not in set(marker["files"])]
    if foreign:
        raise OutputExists(f"output folder {path} holds entries that are not part of its earlier {kind} output "
                           f"({_listing(foreign)}); {hint}")


def folder_bytes(path: str | Path) -> int:
    """Bytes of the files under ``path``, the output marker (a few dozen bytes of bookkeeping) aside: a saved
    delta's size on disk, what a copy or an upload moves."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file() and p.name != MARKER)
