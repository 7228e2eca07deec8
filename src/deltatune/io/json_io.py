"""Read a JSON object from a file, with errors that name the file.

JSON here is untrusted metadata: ``NaN``/``Infinity`` literals and numbers that overflow to ±Inf are
refused (:class:`NonFiniteError`), and so are nesting deeper than Python can parse, integers too long to
convert and text that is not UTF-8 (:class:`DeltaFormatError`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from deltatune.errors import DeltaFormatError, NonFiniteError


class _NonFinite(ValueError):
    """A NaN/Infinity literal or an overflowing number (turned into :class:`NonFiniteError` with the file)."""


def _reject_constant(literal: str) -> float:
    raise _NonFinite(f"the literal {literal} (NaN/Infinity are not allowed)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NonFinite(f"the number {text[:40]} overflows to {value}")
    return value


def parse_json(text: str, where: str) -> Any:
    """``json.loads(text)`` refusing non-finite numbers and over-deep nesting; errors name ``where``."""
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except _NonFinite as exc:
        raise NonFiniteError(f"{where}: {exc}") from None
    except RecursionError:
        raise DeltaFormatError(f"{where}: JSON nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, or an integer with too many digits
        raise DeltaFormatError(f"{where}: not valid JSON ({str(exc)[:120]})") from None


def read_json_object(file: Path, folder_kind: str, holds: str) -> dict[str, Any]:
    """The JSON object in ``file``; ``folder_kind``/``holds`` word the error for a missing file."""
    folder = file.parent
    if not folder.is_dir():
        raise DeltaFormatError(f"{folder}: not a {folder_kind} directory (it does not exist or is a file)")
    if not file.is_file():
        raise DeltaFormatError(f"{file}: missing; a {folder_kind} directory holds {holds}")
    try:
        text = file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DeltaFormatError(f"{file}: not valid JSON (not UTF-8 text at byte offset {exc.start})") from None
    except OSError as exc:
        raise DeltaFormatError(f"{file}: cannot read ({exc.strerror or exc})") from None
    value = parse_json(text, str(file))
    if not isinstance(value, dict):
        raise DeltaFormatError(f"{file}: expected a JSON object")
    return value
