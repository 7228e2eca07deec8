"""Delta-algebra benchmark: merge speed/memory vs mergekit, multi-task merge quality, delta compression.

Three parts, one report (``--out FILE.json`` plus ``FILE.md`` beside it):

1. **speed** (``merge_speed.py``) — TIES (density 0.2), task arithmetic and DARE-TIES (density 0.2) of
   three ~106 M-parameter bf16 Llama "fine-tunes" + base (merging.md §B), by ``mergekit-yaml`` and by
   ``deltatune merge`` on the same YAML, each in its own process: wall time, peak RSS (``ru_maxrss``),
   peak RssAnon / RssFile, ratios to mergekit and to an I/O floor (read the four inputs, write one).
   Targets for TIES: time ≤ 0.3× and peak ≤ 0.6× mergekit's; every method ≤ 3× the I/O floor.
2. **quality** (``merge_quality.py``) — four GLUE full fine-tuning deltas of MiniLM-L6 (SST-2, MRPC,
   RTE, CoLA) merged by linear, task arithmetic, TIES, DARE-TIES, Breadcrumbs, PCB, DELLA and LiNeS
   (on TA and TIES); per-task dev metric with each task's own head and the average normalized score;
   λ / β picked on held-out *train* rows.  Prints whether the papers' orderings hold at this scale.
3. **compress** (``merge_compress.py``) — an SST-2 LoRA and sparse delta compressed with ComPEFT and DARE
   at a few densities, saved in the compact format: size ratio vs the delta dir, dev accuracy change.

Trained deltas and generated checkpoints are cached under ``--work`` (default ``runs/bench-merge``), so
re-runs only measure.  Run::

    python benchmarks/merge.py --out benchmarks/results/merge.json           # full (quiet machine)
    python benchmarks/merge.py --quick --out /tmp/merge-quick.json           # smoke test
    python benchmarks/merge.py --parts train --threads 1                     # only fill the caches
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import merge_settings as S  # noqa: E402
from _common import machine_meta, write_sections  # noqa: E402

PARTS = ("speed", "quality", "compress")
SPEED_COLUMNS = ("method", "tool", "wall_s", "peak_mb", "peak_anon_mb", "peak_file_mb", "vs_mergekit_time",
                 "vs_mergekit_peak", "vs_io_floor", "target", "meets_target", "agree_with_mergekit", "max_abs_diff",
                 "error")
QUALITY_COLUMNS = ("method", "lambda", "beta", "sst2", "mrpc", "rte", "cola", "avg_normalized",
                   "heldout_normalized", "merge_s", "error")
COMPRESS_COLUMNS = ("delta", "compression", "density", "alpha", "dir_bytes", "compact_bytes", "ratio",
                    "dev_accuracy", "dev_accuracy_before", "change_points", "meets_target", "error")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def prepare(work: Path, quick: bool, threads: int | None, parts: list[str]) -> None:
    """Only build the caches: checkpoints for part 1, trained deltas for parts 2 and 3."""
    from merge_glue import ensure_trained
    from merge_speed import ensure_models

    if "speed" in parts:
        ensure_models(work, S.speed_settings(quick), log)
    specs = []
    if "quality" in parts:
        specs += list(S.quality_settings(quick).specs.values())
    if "compress" in parts:
        specs += list(S.compress_settings(quick).specs.values())
    for spec in specs:
        path, info = ensure_trained(spec, work, threads, log)
        log(f"{spec.task}/{spec.method}: {path} ({'cached' if info['cached'] else 'trained'}, "
            f"{info['train_wall_s']} s, final {info['final']})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny models, few steps, few eval rows (smoke test)")
    ap.add_argument("--out", default="benchmarks/results/merge.json")
    ap.add_argument("--work", default="runs/bench-merge", help="cache of checkpoints, deltas and merge outputs")
    ap.add_argument("--parts", default="speed,quality,compress",
                    help="comma list of speed, quality, compress; 'train' only fills the caches of the others")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for training/evaluation")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per tool and method (part 1)")
    ap.add_argument("--methods", default=None, help="comma list restricting part 2's merge methods")
    args = ap.parse_args()
    work = Path(args.work)  # cache entries are keyed by their settings, so quick and full never collide
    wanted = [p.strip() for p in args.parts.split(",") if p.strip()]
    if wanted == ["train"]:
        prepare(work, args.quick, args.threads, list(PARTS))
        return
    unknown = set(wanted) - set(PARTS)
    if unknown:
        ap.error(f"unknown part(s) {sorted(unknown)}; choose from {PARTS} or 'train'")

    t0 = time.perf_counter()
    meta: dict[str, Any] = machine_meta() | {"quick": args.quick, "work": str(work.resolve()),
                                             "load_avg_start": os.getloadavg()}
    sections = []
    if "speed" in wanted:
        from merge_speed import run_speed

        s = S.speed_settings(args.quick)
        if args.repeats:
            s = dataclasses.replace(s, repeats=args.repeats)
        rows, meta["speed"] = run_speed(work, s, log)
        sections.append({"title": "Part 1 — merge speed and peak memory vs mergekit 0.1.5", "rows": rows,
                         "columns": SPEED_COLUMNS, "notes": _speed_notes(meta["speed"])})
    if "quality" in wanted:
        from merge_quality import run_quality

        rows, meta["quality"] = run_quality(work, S.quality_settings(args.quick), args.threads,
                                            args.methods.split(",") if args.methods else None, log)
        sections.append({"title": "Part 2 — multi-task merge quality (MiniLM-L6, 4 GLUE task deltas)", "rows": rows,
                         "columns": QUALITY_COLUMNS, "notes": _quality_notes(meta["quality"])})
    if "compress" in wanted:
        from merge_compress import run_compress

        rows, meta["compress"] = run_compress(work, S.compress_settings(args.quick), args.threads, log)
        sections.append({"title": "Part 3 — delta compression (SST-2 LoRA and sparse deltas)", "rows": rows,
                         "columns": COMPRESS_COLUMNS, "notes": _compress_notes(meta["compress"])})
    meta["wall_s"] = round(time.perf_counter() - t0, 1)
    meta["load_avg_end"] = os.getloadavg()
    title = f"merge benchmark ({'quick' if args.quick else 'full'}, {meta['wall_s']} s)"
    print(write_sections(args.out, meta, sections, title=title))


def _speed_notes(m: dict[str, Any]) -> list[str]:
    cfg = m["llama_config"]
    notes = [f"models: random Llama (hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, vocab "
             f"{cfg['vocab_size']}), {m['models'].get('params', 0):,} parameters, bf16, "
             f"{m['models'].get('bytes_per_model', 0) / 1e6:.0f} MB per checkpoint; base + 3 fine-tunes "
             f"(noise std {m['noise_std']}).",
             f"commands: `{m['commands']['mergekit']}` and `{m['commands']['deltatune']}` (HF_HUB_OFFLINE=1).",
             f"protocol: {m['protocol']}; {m['repeats']} repeat(s).",
             "I/O floor: a process importing torch + safetensors, loading every tensor of the 4 inputs and "
             "writing one checkpoint of the same size (no fsync)."]
    if m.get("tools_missing"):
        notes.append(f"missing tools: {m['tools_missing']}")
    return notes


def _quality_notes(m: dict[str, Any]) -> list[str]:
    notes = [f"metric per task: SST-2/RTE accuracy, MRPC F1, CoLA Matthews; normalized = merged / own delta; "
             f"λ grids {m['lambda_grid']}, LiNeS β grid {list(m['lines_beta_grid'])}, chosen on the last "
             f"{m['holdout_rows']} rows of each train split (held out from training); preset 'paper'."]
    notes += [f"{c['claim']}: {'holds' if c['holds'] else 'does not hold' if c['holds'] is False else 'n/a'} "
              f"({c[c['claim'].split(' > ')[0]]} vs {c[c['claim'].split(' > ')[1]]})" for c in m["claims"]]
    for name, v in m["methods"].items():
        grid = f", λ grid '{v['lambda_grid']}'" if v["lambda_grid"] else ""
        notes.append(f"`{name}`: {v['note']} (params {v['params']}{grid})")
    notes += [f"skipped {k}: {v}" for k, v in m["skipped"].items()]
    return notes


def _compress_notes(m: dict[str, Any]) -> list[str]:
    return list(m.get("notes", []))


if __name__ == "__main__":
    main()
