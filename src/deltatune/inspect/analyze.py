"""One streaming pass over the tensors of the inputs: per-tensor metrics, pairwise numbers, model totals.

For each tensor name (the union over the inputs) the pass reads the base tensor once, each input's ``τ`` once,
factorises ``W`` once (shared by every input) and computes the rows of :mod:`~deltatune.inspect.metrics` and
:mod:`~deltatune.inspect.pairwise`; then everything of that tensor is dropped.  Peak memory is about
``2T + 4`` copies of the largest tensor for ``T`` inputs (the base, each τ and, with two or more inputs, its
TIES-trimmed copy, ``W + ΔW`` and the SVD factors of one matrix), never a whole model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from deltatune.delta import Delta
from deltatune.inspect.linalg import svd
from deltatune.inspect.metrics import canonical, tensor_metrics
from deltatune.inspect.options import InspectOptions
from deltatune.inspect.pairwise import PairTotals, conflict_terms, pair_metrics, trim
from deltatune.inspect.sources import Sources, open_sources
from deltatune.inspect.summary import (
    common_matrices,
    delta_summary,
    intruder_curve,
    layer_summary,
    recommend_merge,
)

EPSILONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def _keys(src: Sources, progress: bool) -> Any:
    keys: Any = list(src.shapes)
    if progress:
        from rich.progress import track

        keys = track(keys, description="inspect", transient=True)
    return keys


def analyze(src: Sources, opts: InspectOptions) -> dict[str, Any]:
    """The numbers of the report (see :func:`inspect_deltas`)."""
    n = len(src.sources)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    totals = {p: PairTotals() for p in pairs}
    group = PairTotals()
    rows: list[dict[str, Any]] = []
    pair_rows: list[dict[str, Any]] = []
    with torch.no_grad():
        for key in _keys(src, opts.progress):
            base = src.base_tensor(key)
            taus = src.taus(key, base)
            base = canonical(key, base, src.conv1d) if base is not None else None
            taus = [canonical(key, t, src.conv1d) if t is not None else None for t in taus]
            present = [t for t in taus if t is not None]
            if not present:
                continue
            matrix = present[0].dim() == 2 and min(present[0].shape) > 1
            base_svd = svd(base, opts.svd_full_max, opts.svd_rank) if matrix and base is not None else None
            u: list[Any] = [None] * n
            for i, t in enumerate(taus):
                if t is not None:
                    row, u[i] = tensor_metrics(key, src.labels[i], t, base, base_svd, opts, src.head_dim)
                    if base_svd is not None:
                        row["base_svd_exact"] = base_svd.exact
                    rows.append(row)
            del base_svd, base
            trimmed = [trim(t, opts.trim_density) if t is not None and n > 1 else None for t in taus]
            for i, j in pairs:
                a, b = taus[i], taus[j]
                if a is not None and b is not None:
                    row = pair_metrics(key, a, b, trimmed[i], trimmed[j], u[i], u[j], totals[(i, j)])
                    pair_rows.append({"a": src.labels[i], "b": src.labels[j], **row})
                elif a is not None or b is not None:
                    alone = i if a is not None else j
                    totals[(i, j)].add_alone(taus[alone], trimmed[alone], first=a is not None)
            if n > 2 and len(present) == n:
                lost, mass = conflict_terms([t for t in trimmed if t is not None])
                group.lost += lost
                group.mass += mass
            del taus, trimmed, present, u
    common = common_matrices(rows, src.labels)
    in_blocks = {r["key"] for r in rows if r["key"] in common and r["layer"] is not None}
    curve_keys = in_blocks or common  # the paper counts in the transformer blocks (the pooler/embeddings aside)
    summaries = [delta_summary(rows, lab, intruder_keys=curve_keys) for lab in src.labels]
    pair_summary = [{"a": src.labels[i], "b": src.labels[j], **totals[(i, j)].summary()} for i, j in pairs]
    return {
        "inputs": src.described,
        "base": str(src.base.path) if src.base is not None else None,
        "head_dim": src.head_dim,
        "options": {k: v for k, v in asdict(opts).items() if k not in ("out", "overwrite", "progress")},
        "summaries": summaries,
        "layers": rows,
        "per_layer": [entry for lab in src.labels for entry in layer_summary(rows, lab)],
        "pairs": pair_rows,
        "pairs_summary": pair_summary,
        "group_conflict_mass": group.lost / group.mass if group.mass else None,
        "intruder_curve": {"epsilons": list(EPSILONS), "matrices": len(curve_keys), "in_blocks": bool(in_blocks),
                           **{lab: intruder_curve(rows, lab, EPSILONS, curve_keys) for lab in src.labels}},
        "recommendation": recommend_merge(pair_summary, summaries),
        "notes": src.notes,
    }


def inspect_deltas(inputs: Sequence[Delta | str | Path], opts: InspectOptions | None = None) -> dict[str, Any]:
    """Analyse ``inputs`` (deltas, or full checkpoints with ``opts.base``) and return the numbers; with
    ``opts.out`` also write ``report.json``, the PNG plots and ``report.html`` into that folder (atomically).

    An unwritable ``out`` fails before any tensor is read (:class:`~deltatune.inspect.errors.OutputNotWritable`)."""
    from deltatune.inspect.report import check_writable, write_report

    opts = opts or InspectOptions()
    if opts.out is not None:
        check_writable(Path(opts.out), opts.overwrite)
    report = analyze(open_sources(list(inputs), opts), opts)
    if opts.out is not None:
        write_report(report, Path(opts.out), opts)
    return report
