"""Misbehaving toy loaders that check the fuzz pool's own judge (imported by workers when
``DELTATUNE_FUZZ_EXTRA=fuzz.toy_targets``): each loads its original normally and misbehaves on mutants."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from fuzz.targets import TARGETS, Target


def _read(path: Path) -> Any:
    return json.loads((path / "m.json").read_text(errors="replace") or "{}") if path.name == "orig" else None


def sleepy(path: Path) -> Any:
    """Never returns on a mutant: a hang."""
    if path.name != "orig":
        time.sleep(3600)
    return _read(path)


def hog(path: Path) -> Any:
    """Allocates 4 GB on a mutant: the address-space cap must stop it."""
    if path.name != "orig":
        return bytearray(4 * 2**30)
    return _read(path)


def crash(path: Path) -> Any:
    """Kills its own process on a mutant, as a segfault in native code would."""
    if path.name != "orig":
        os._exit(3)
    return _read(path)


for _name, _fn in (("toy-sleepy", sleepy), ("toy-hog", hog), ("toy-crash", crash)):
    TARGETS[_name] = Target(_name, _fn, True, "toy")
