"""Fuzz every loader with seeded mutants and report what each mutant ended in.

For each target (``tests/fuzz/targets.py``: the delta, compact and PEFT formats with and without digest
verification, training checkpoints and what `train --resume` restores from them, merge recipes in both
forms and a real merge per recipe, the training config) this makes
``--mutants`` mutated copies of small real originals and loads each in a memory-capped worker process
(``tests/fuzz/runner.py``).  Columns:

* ``typed errors``: a :class:`deltatune.errors.DeltaTuneError`;
* ``identical``: loaded to exactly the original's numbers and metadata;
* ``valid loads``: loaded to other, valid values (allowed only where the input carries no digest);
* ``other exceptions``, ``hangs`` (over ``--timeout`` s), ``memory`` (an allocation over the
  ``--mem-mb`` cap above the worker's size) and ``silent differences`` (a digest-protected input
  loaded to other values, or any input to an invalid value: NaN, bad sparse indices, an unbounded
  structure).  The target is 0 in these four columns;
* ``peak MB``: the largest per-mutant peak-RSS increase; ``max s``: the slowest mutant.

Usage::

    python benchmarks/fuzz.py --mutants 200 --seed 0            # writes results/fuzz.json and fuzz.md
    python benchmarks/fuzz.py --target compact --replay 123456  # one mutant in the foreground
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the fuzz package; before this folder, whose fuzz.py is us
sys.path.insert(1, str(HERE))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from _common import machine_meta, write_sections  # noqa: E402

COLUMNS = ["target", "mutants", "typed errors", "identical", "valid loads", "other exceptions", "hangs", "memory",
           "silent differences", "peak MB", "max s"]
FAIL_COLUMNS = ["target", "outcome", "count", "seed", "file", "mutation", "exception", "message", "where"]
NAMES = {"typed": "typed errors", "valid": "valid loads", "other": "other exceptions", "hang": "hangs",
         "silent": "silent differences", "peak_mb": "peak MB", "max_s": "max s"}


def _row(summary: dict[str, Any]) -> dict[str, Any]:
    row = {NAMES.get(k, k): v for k, v in summary.items() if k != "harness"}
    row["other exceptions"] += summary.get("harness", 0)
    return row


def _total(rows: list[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {"target": "**all**"}
    for c in COLUMNS[1:]:
        values = [r[c] for r in rows]
        total[c] = max(values) if c in ("peak MB", "max s") else sum(values)
    return total


def _fail_row(f: dict[str, Any]) -> dict[str, Any]:
    return {"target": f["target"], "outcome": f["outcome"], "count": f["count"], "seed": str(f["seed"]),
            "file": f"{f.get('orig')}/{f.get('file')}", "mutation": f"{f.get('kind')}: {f.get('what', '')[:80]}",
            "exception": f.get("exc_type", ""), "message": f.get("message", "")[:160].replace("|", "/"),
            "where": f.get("where", "")}


def main() -> None:
    from fuzz.originals import build_all
    from fuzz.runner import plan, replay, run_fuzz, signatures, summarise
    from fuzz.targets import TARGETS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mutants", type=int, default=200, help="mutants per target")
    ap.add_argument("--seed", type=int, default=0, help="base seed (mutant seeds derive from it)")
    ap.add_argument("--targets", default=",".join(TARGETS), help="comma-separated targets")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds per mutant before it counts as a hang")
    ap.add_argument("--mem-mb", type=int, default=512, help="address-space allowance per worker above its size")
    ap.add_argument("--out", default=str(HERE / "results" / "fuzz.json"))
    ap.add_argument("--target", help="with --replay: the target of the mutant to replay")
    ap.add_argument("--replay", type=int, help="run the mutant of this seed in the foreground and print it")
    args = ap.parse_args()

    targets = [args.target] if args.replay is not None else [t for t in args.targets.split(",") if t]
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        ap.error(f"unknown target(s) {unknown}; known: {sorted(TARGETS)}")
    with tempfile.TemporaryDirectory(prefix="deltatune-fuzz-originals-") as tmp:
        t0 = time.perf_counter()
        built = build_all(Path(tmp), {TARGETS[t].originals for t in targets})
        originals = {t: built[TARGETS[t].originals] for t in targets}
        build_s = time.perf_counter() - t0
        if args.replay is not None:
            _replay(replay, originals, args.target, args.replay, Path(tmp))
            return
        t0 = time.perf_counter()
        records, skipped = run_fuzz(originals, plan(targets, args.mutants, args.seed), args.workers,
                                    args.timeout, args.mem_mb, progress=True)
        fuzz_s = time.perf_counter() - t0
    rows = sorted((_row(s) for s in summarise(records)), key=lambda r: targets.index(r["target"]))
    rows.append(_total(rows))
    failures = signatures(records)
    meta = {**machine_meta(), "mutants_per_target": args.mutants, "seed": args.seed, "workers": args.workers,
            "timeout_s": args.timeout, "mem_mb": args.mem_mb, "build_s": round(build_s, 1),
            "fuzz_s": round(fuzz_s, 1), "skipped_targets": skipped, "failures": failures}
    notes = [f"{args.mutants} mutants per target, base seed {args.seed}, {args.workers} workers, {args.timeout:g} s "
             f"per mutant, address space capped at +{args.mem_mb} MB per worker; {fuzz_s:.0f} s in all.",
             "The target is 0 in the columns other exceptions, hangs, memory and silent differences."]
    if skipped:
        notes.append(f"Skipped (the loader has no verify parameter): {', '.join(skipped)}.")
    sections = [{"title": "Outcomes per target", "rows": rows, "columns": COLUMNS, "notes": notes},
                {"title": "Distinct failures (one reproducing seed each)", "rows": [_fail_row(f) for f in failures],
                 "columns": FAIL_COLUMNS,
                 "notes": ["Replay one: `python benchmarks/fuzz.py --target TARGET --replay SEED`."]}]
    print(write_sections(args.out, meta, sections, title="Fuzzing the loaders"))


def _replay(replay: Any, originals: dict[str, list[str]], target: str, seed: int, work: Path) -> None:
    import json

    from fuzz.mutate import make_mutant
    from fuzz.targets import TARGETS

    from deltatune.errors import DeltaTuneError

    origs = originals[target]
    mutant = make_mutant(Path(origs[seed % len(origs)]), work / "mutant", seed, TARGETS[target].weights,
                         TARGETS[target].max_edits)
    print(f"mutant: {mutant.path} ({mutant.describe()}, kind {mutant.kind})")
    try:
        TARGETS[target].load(mutant.path)
        print("loaded without error")
    except DeltaTuneError as exc:
        print(f"typed error {type(exc).__name__}: {exc}")
    except BaseException:  # noqa: BLE001 - show the traceback of the finding
        traceback.print_exc()
    print(json.dumps(replay(originals, target, seed, work), indent=1))


if __name__ == "__main__":
    main()
