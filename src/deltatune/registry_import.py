"""Import every module of a package, so that the classes they define register themselves (part kinds,
methods): adding a kind or a method is adding a file, with no central list to edit."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable


def import_all(package: str, path: Iterable[str]) -> None:
    """Import each module of ``package`` (``path`` is its ``__path__``), skipping private ``_*`` modules."""
    for info in sorted(pkgutil.iter_modules(list(path)), key=lambda i: i.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")
