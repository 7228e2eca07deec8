"""Part 3 of ``benchmarks/merge.py``: compress an SST-2 LoRA delta and a sparse delta, measure bytes and accuracy.

Each delta (trained once and cached, see ``merge_glue``) is compressed with
``deltatune.algebra.compress.compress_delta`` and written with
``deltatune.io.compact_format.save_compact``:

* ``lossless``  — the delta as is, only the compact encoding (gap-coded indices, exact narrower floats);
* ``compeft``   — ComPEFT (Yadav et al., arXiv 2311.13171) at a few densities, with the paper's global σ and
  top-k over all the update's entries, and (``compeft/tensor``) per tensor — for LoRA the factors ``A``
  (Kaiming-sized) and ``B`` (small) have very different scales, so one global threshold keeps mostly
  ``A``; ``α`` chosen by SST-2 accuracy on the held-out last rows of the *train* split (never trained
  on; dev is not used to tune);
* ``dare``      — DARE (Yu et al., ICML 2024, arXiv 2311.03099) with 1/ρ rescale, fp32 values and with the
  kept values rounded to bf16.

``ratio`` = bytes of the ordinary delta directory (``save_delta``: manifest + safetensors) / bytes of
the compact directory; the accuracy after compression is measured on the delta *loaded back* from the
compact directory (what a user would ship), on the full SST-2 dev set.  Target: ratio ≥ 8 with at
most 1 accuracy point lost.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from merge_glue import TaskScorer, ensure_trained
from merge_settings import CompressSettings

TARGET_RATIO = 8.0
TARGET_POINTS = 1.0


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def run_compress(work: Path, s: CompressSettings, threads: int | None = None,
                 log=print) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    import torch

    from deltatune.algebra.compress import compress_delta
    from deltatune.io.compact_format import load_compact, save_compact
    from deltatune.io.delta_format import load_delta

    if threads:
        torch.set_num_threads(threads)
    t_start = time.perf_counter()
    out_root = Path(work) / "compress"
    rows: list[dict[str, Any]] = []
    meta: dict[str, Any] = {"train": {}, "alpha_grid": list(s.compeft_alphas)}
    for kind, spec in s.specs.items():
        delta_dir, info = ensure_trained(spec, work, threads, log)
        meta["train"][kind] = {k: v for k, v in info.items() if k != "final"}
        delta = load_delta(delta_dir)
        scorer = TaskScorer(spec.task, delta_dir, spec.max_length, spec.holdout, spec.eval_limit)
        before = scorer.main(scorer.score(None, "dev", delta=delta))
        held_before = scorer.main(scorer.score(None, "heldout", delta=delta))
        base_bytes = dir_bytes(delta_dir)
        log(f"[compress] {kind}: {delta.trainable_count:,} trainable, {base_bytes:,} B on disk, dev acc {before:.4f}")

        def heldout_acc(d: Any, scorer: TaskScorer = scorer) -> float:
            return scorer.main(scorer.score(None, "heldout", delta=d))

        jobs: list[tuple[str, dict[str, Any]]] = [("lossless", {})]
        jobs += [("compeft", {"density": d}) for d in s.compeft_densities]
        jobs += [("compeft", {"density": d, "scope": "tensor"}) for d in s.compeft_densities]
        jobs += [("dare", {"density": d}) for d in s.dare_densities]
        jobs += [("dare", {"density": d, "dtype": "bf16"}) for d in s.dare_densities]
        for method, kw in jobs:
            label = _label(method, kw)
            row: dict[str, Any] = {"part": "compress", "delta": kind, "compression": label,
                                   "density": kw.get("density"), "dir_bytes": base_bytes,
                                   "dev_accuracy_before": round(before, 4),
                                   "heldout_accuracy_before": round(held_before, 4)}
            try:
                t0 = time.perf_counter()
                if method == "lossless":
                    small = delta
                elif method == "compeft":
                    small = compress_delta(delta, "compeft", eval_fn=heldout_acc, alphas=s.compeft_alphas, **kw)
                else:
                    small = compress_delta(delta, method, seed=0, **kw)
                compress_s = time.perf_counter() - t0
                target = out_root / f"{kind}-{label.replace('/', '-')}-{kw.get('density')}"
                report = save_compact(small, target)
                loaded = load_compact(target)
                after = scorer.main(scorer.score(None, "dev", delta=loaded))
                info_c = (small.metrics.get("compression") or [{}])[-1] if method != "lossless" else {}
                row.update({
                    "alpha": info_c.get("alpha"), "alpha_sweep_heldout": info_c.get("alpha_sweep"),
                    "density_achieved": _r(info_c.get("density_achieved")),
                    "compact_bytes": report.total_bytes, "ratio": round(base_bytes / report.total_bytes, 2),
                    "dev_accuracy": round(after, 4), "change_points": round(100 * (after - before), 2),
                    "compress_s": round(compress_s, 2), "bytes_by_component": report.by_component()})
                row["meets_target"] = row["ratio"] >= TARGET_RATIO and -row["change_points"] <= TARGET_POINTS
                log(f"[compress]   {row['compression']:10s} ρ={row['density']} α={row['alpha']} "
                    f"{report.total_bytes:>10,} B  ×{row['ratio']:<6} acc {after:.4f} ({row['change_points']:+.2f})")
            except Exception as exc:  # noqa: BLE001 - keep the other rows
                log(f"[compress]   {row['compression']} FAILED: {type(exc).__name__}: {exc}")
                row["error"] = f"{type(exc).__name__}: {exc}"[:500]
            rows.append(row)
    meta["notes"] = [
        "ratio = bytes of the save_delta directory / bytes of the save_compact directory; dev accuracy measured on "
        "the delta loaded back from the compact directory (full SST-2 dev).",
        f"ComPEFT α chosen from {list(s.compeft_alphas)} by accuracy on the last "
        f"{next(iter(s.specs.values())).holdout} rows of the SST-2 train split (held out from training); "
        "DARE rescales by 1/ρ (seed 0).",
        f"target: ratio ≥ {TARGET_RATIO:g} and at most {TARGET_POINTS:g} accuracy point lost.",
    ]
    for kind in s.specs:
        ok = [r for r in rows if r["delta"] == kind and r.get("meets_target")]
        best = max(ok, key=lambda r: r["ratio"], default=None)
        meta["notes"].append(f"{kind}: " + (f"best meeting the target: {best['compression']} ρ={best['density']} "
                                            f"(×{best['ratio']}, {best['change_points']:+.2f} points)" if best
                                            else "no setting meets the target"))
    meta["wall_s"] = round(time.perf_counter() - t_start, 1)
    return rows, meta


def _label(method: str, kw: dict[str, Any]) -> str:
    """Row name: ``compeft``, ``compeft/tensor``, ``dare+bf16`` …"""
    scope = f"/{kw['scope']}" if kw.get("scope") else ""
    dtype = f"+{kw['dtype']}" if kw.get("dtype") else ""
    return method + scope + dtype


def _r(v: float | None, nd: int = 4) -> float | None:
    return None if v is None else round(float(v), nd)
