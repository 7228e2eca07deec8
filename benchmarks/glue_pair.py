"""Paired comparison of two sets of GLUE runs (``glue.py``'s ``FILE.runs.jsonl``): the same method, task, budget,
learning rate, seed, steps and row limits, trained by two versions of the code.

Each row is one run key present (and finished) in both files: ``before`` and ``after`` are the task's main metric
from the first and the second file, ``diff = after − before``.  A summary row per (method, budget) gives the mean
over the tasks both files share (a five-task GLUE average where all five are there) and the mean difference.
Nothing is trained here; the script only reads what ``glue.py`` recorded.

Run::

    python benchmarks/glue_pair.py benchmarks/results/glue.runs.jsonl \\
        benchmarks/results/glue_spiel_rigl.runs.jsonl --out benchmarks/results/glue_spiel_rigl_pair.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import write_sections  # noqa: E402

COLUMNS = ("method", "budget", "task", "lr", "seed", "metric_name", "before", "after", "diff")
SUMMARY_COLUMNS = ("method", "budget", "tasks", "before", "after", "diff")


def finished_runs(path: str | Path) -> dict[str, dict[str, Any]]:
    """``{key: run}`` of the runs in a ``runs.jsonl`` that recorded a metric (failed runs are left out)."""
    runs = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            run = json.loads(line)
            if run.get("metric") is not None:
                runs[run["key"]] = run
    return runs


def paired_rows(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per key finished in both, in the order of ``after``."""
    rows = []
    for key, new in after.items():
        old = before.get(key)
        if old is None:
            continue
        rows.append({"method": new["method"], "budget": new["budget"], "task": new["task"], "lr": new["lr"],
                     "seed": new["seed"], "metric_name": new["metric_name"], "before": round(old["metric"], 4),
                     "after": round(new["metric"], 4), "diff": round(new["metric"] - old["metric"], 4)})
    return rows


def summary_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ``before``, ``after`` and ``diff`` over the paired rows of each (method, budget)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["budget"]), []).append(r)
    return [{"method": m, "budget": b, "tasks": len(g),
             **{c: round(statistics.fmean(r[c] for r in g), 4) for c in ("before", "after", "diff")}}
            for (m, b), g in groups.items()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("before", help="runs.jsonl of the earlier code")
    ap.add_argument("after", help="runs.jsonl of the later code")
    ap.add_argument("--out", required=True, help="FILE.json (FILE.md beside it)")
    args = ap.parse_args(argv)
    rows = paired_rows(finished_runs(args.before), finished_runs(args.after))
    if not rows:
        print(f"glue_pair: no run key is finished in both {args.before} and {args.after}", file=sys.stderr)
        return 2
    meta = {"before": args.before, "after": args.after}
    sections = [{"title": "Mean over the paired tasks", "rows": summary_rows(rows), "columns": SUMMARY_COLUMNS},
                {"title": "Paired runs", "rows": rows, "columns": COLUMNS}]
    print(write_sections(args.out, meta, sections, title="GLUE: the same runs before and after a code change"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
