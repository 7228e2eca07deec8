"""Read a JSON object from a file, with errors that name the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from deltatune.errors import DeltaFormatError


def read_json_object(file: Path, folder_kind: str, holds: str) -> dict[str, Any]:
    """The JSON object in ``file``; ``folder_kind``/``holds`` word the error for a missing file."""
    folder = file.parent
    if not folder.is_dir():
        raise DeltaFormatError(f"{folder}: not a {folder_kind} directory (it does not exist or is a file)")
    if not file.is_file():
        raise DeltaFormatError(f"{file}: missing; a {folder_kind} directory holds {holds}")
    try:
        value = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DeltaFormatError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise DeltaFormatError(f"{file}: expected a JSON object")
    return value
