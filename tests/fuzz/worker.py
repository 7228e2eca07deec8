"""A fuzz worker process (``python -m fuzz.worker``): makes mutants and loads them, one per request.

Protocol (JSON lines): the first line on stdin is ``{"originals": {target: [folder, ...]}, "mem_mb": N}``;
the worker loads every original once (warming imports), then caps its address space at its current size
plus ``mem_mb`` (``RLIMIT_AS``: an allocation bomb fails instead of taking the machine) and answers
``{"ready": true}``.  Each request ``{"target", "seed", "orig", "dst"}`` gets ``{"phase": "load"}``, then
``{"phase": "compare"}`` once the loader returned, then the result (see :func:`run_one`).  The parent
kills a worker that takes too long (a hang) and starts another.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MEMORY_TEXT = ("can't allocate memory", "cannot allocate memory", "os error 12", "out of memory", "unable to allocate",
               "std::bad_alloc")


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> None:
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


_PROTOCOL = sys.stdout


def _send(obj: dict[str, Any]) -> None:
    _PROTOCOL.write(json.dumps(obj) + "\n")
    _PROTOCOL.flush()


def _cut(text: str, n: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _where(exc: BaseException) -> str:
    """The innermost traceback frame inside deltatune (else the innermost one): ``file:line in fn``."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "deltatune" in f.filename] or frames
    if not ours:
        return ""
    f = ours[-1]
    return f"{f.filename.split('site-packages/')[-1].split('src/')[-1]}:{f.lineno} in {f.name}"


class Worker:
    """Loads each original once (its snapshot is what a mutant must equal), then judges mutants."""

    def __init__(self, originals: dict[str, list[str]]) -> None:
        from fuzz.snapshot import flatten
        from fuzz.targets import TARGETS

        self.targets = TARGETS
        self.snapshots: dict[tuple[str, str], dict[str, Any]] = {}  # (target, original folder) → snapshot
        for name, folders in originals.items():
            target = TARGETS[name]
            if not target.supported():
                continue
            for folder in folders:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    self.snapshots[name, folder] = flatten(target.load(Path(folder)), folder)

    def run_one(self, target_name: str, seed: int, orig: str, dst: str, notify: bool = False) -> dict[str, Any]:
        """Make mutant ``seed`` of ``orig`` at ``dst``, load it and classify the outcome:

        ``typed`` (a DeltaTuneError), ``identical`` (same numbers and metadata as ``orig``), ``valid``
        (lenient targets: other values that pass the invariants), ``silent`` (a strict target loaded other
        values, or a lenient one an invalid value), ``memory`` (an allocation over the cap), ``other``
        (any other exception), ``harness`` (the mutation itself failed: a bug of the fuzzer).
        With ``notify``, the phases (``load``, ``compare``) are sent to the parent as they start.
        """
        from deltatune.errors import DeltaTuneError
        from fuzz.mutate import make_mutant
        from fuzz.snapshot import TooLarge, first_difference, flatten, invariant_violation

        target = self.targets[target_name]
        rec: dict[str, Any] = {"target": target_name, "seed": seed, "orig": Path(orig).name}
        try:
            mutant = make_mutant(Path(orig), Path(dst), seed, target.weights, target.max_edits)
        except Exception as exc:  # noqa: BLE001 - a fuzzer bug, reported as such
            shutil.rmtree(dst, ignore_errors=True)
            return {**rec, "outcome": "harness", "exc_type": type(exc).__name__, "message": _cut(str(exc)),
                    "where": _where(exc)}
        rec.update(file=mutant.file, kind=mutant.kind, what=_cut(mutant.what, 160))
        rss0 = _status_kb("VmRSS")
        _reset_peak()
        t0 = time.perf_counter()
        if notify:  # the parent learns what the mutant is before it may hang
            _send({"phase": "load", "file": mutant.file, "kind": mutant.kind, "what": rec["what"]})
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loaded = target.load(Path(dst))
        except DeltaTuneError as exc:
            text = str(exc)
            memory = any(m in text.lower() for m in MEMORY_TEXT)
            rec.update(outcome="memory" if memory else "typed", exc_type=type(exc).__name__, message=_cut(text))
        except MemoryError as exc:
            rec.update(outcome="memory", exc_type=type(exc).__name__, message=_cut(str(exc)), where=_where(exc))
        except BaseException as exc:  # noqa: BLE001 - everything else is a finding
            text = str(exc)
            memory = any(m in text.lower() for m in MEMORY_TEXT)
            rec.update(outcome="memory" if memory else "other", exc_type=type(exc).__name__, message=_cut(text),
                       where=_where(exc))
        else:
            if notify:
                _send({"phase": "compare"})
            try:
                snap = flatten(loaded, dst)
                diff = first_difference(self.snapshots[target_name, orig], snap)
                bad = invariant_violation(loaded) if diff else None
            except TooLarge as exc:
                diff, bad = "too large", str(exc)
            if diff is None:
                rec["outcome"] = "identical"
            elif target.strict:
                rec.update(outcome="silent", message=_cut(f"loaded other values: {diff}"))
            elif bad:
                rec.update(outcome="silent", message=_cut(f"loaded an invalid value: {bad}"))
            else:
                rec.update(outcome="valid", message=_cut(diff, 120))
        rec["seconds"] = round(time.perf_counter() - t0, 4)
        rec["peak_mb"] = round(max(0, _status_kb("VmHWM") - rss0) / 1024, 1)
        shutil.rmtree(dst, ignore_errors=True)
        return rec


def _cap_memory(mem_mb: int) -> None:
    limit = _status_kb("VmSize") * 1024 + mem_mb * 2**20
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def main() -> None:
    global _PROTOCOL
    _PROTOCOL = os.fdopen(os.dup(1), "w")  # the protocol gets its own descriptor; stray prints go to stderr
    os.dup2(2, 1)
    import torch

    torch.set_num_threads(1)
    config = json.loads(sys.stdin.readline())
    if os.environ.get("DELTATUNE_FUZZ_EXTRA"):  # more targets, registered on import (the harness's own tests)
        import importlib

        importlib.import_module(os.environ["DELTATUNE_FUZZ_EXTRA"])
    worker = Worker(config["originals"])
    if config.get("mem_mb"):
        _cap_memory(int(config["mem_mb"]))
    _send({"ready": True, "skipped": sorted(n for n in config["originals"] if not worker.targets[n].supported())})
    for line in sys.stdin:
        req = json.loads(line)
        _send(worker.run_one(req["target"], req["seed"], req["orig"], req["dst"], notify=True))


if __name__ == "__main__":
    main()
