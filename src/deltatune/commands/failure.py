"""How the command-line tool reports a failure: one line on stderr and exit status 2.

* a deltatune error (:class:`~deltatune.errors.DeltaTuneError`): ``error (Type): message``;
* a full disk anywhere (``ENOSPC``, ``os error 28``): ``error (DiskFull): …`` naming the path when known;
* anything else (``RecursionError``, ``TypeError``, ``OSError``, …): ``internal error (Type): message``
  and a hint to rerun with ``--debug``.

Messages are flattened to one line and cut to :data:`MAX_CHARS`.  With ``deltatune --debug`` (or
``DELTATUNE_DEBUG=1``) the full traceback is printed instead.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import TextIO

from deltatune.errors import DeltaTuneError

MAX_CHARS = 300
EXIT_STATUS = 2
_state = {"debug": False}


def set_debug(flag: bool) -> None:
    """Print tracebacks for this run (``--debug``); the environment variable ``DELTATUNE_DEBUG=1`` also does."""
    _state["debug"] = flag


def debug_enabled() -> bool:
    return _state["debug"] or os.environ.get("DELTATUNE_DEBUG", "").strip() not in ("", "0", "false", "no")


def one_line(text: str, limit: int = MAX_CHARS) -> str:
    """``text`` with all whitespace runs (newlines included) collapsed to one space, cut to ``limit`` chars."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def failure_line(exc: BaseException) -> str:
    """The one-line report of ``exc`` (see the module docstring)."""
    from deltatune.io.atomic import is_disk_full

    name = type(exc).__name__
    if isinstance(exc, DeltaTuneError):
        return f"error ({name}): {one_line(str(exc))}"
    if is_disk_full(exc):
        where = getattr(exc, "filename", None)
        detail = f" while writing {one_line(str(where), 200)}" if where else f": {one_line(str(exc), 200)}"
        return f"error (DiskFull): disk full (No space left on device){detail}"
    message = one_line(str(exc) or repr(exc), 240)
    return f"internal error ({name}): {message} (rerun with --debug for the traceback)"


def report_failure(exc: BaseException, stream: TextIO | None = None) -> int:
    """Write the report of ``exc`` (one line, or the traceback in debug mode) and return the exit status."""
    stream = stream or sys.stderr
    if debug_enabled():
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=stream)
    else:
        print(failure_line(exc), file=stream)
    stream.flush()
    return EXIT_STATUS
