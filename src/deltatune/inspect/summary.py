"""Model-level summaries of the per-tensor rows, and the merge-method suggestion.

:func:`recommend_merge` is a **heuristic**, not a validated predictor: a documented rule over the pairwise numbers
that points at the merge whose assumption the deltas meet best.  The rule, in order (``T`` inputs, averages over
the ``T(T−1)/2`` pairs):

1. ``T = 1`` → nothing to merge.
2. every input sparse (overall density < ``SPARSE``) and support Jaccard ≤ ``DISJOINT`` → ``task_arithmetic``:
   the deltas touch (nearly) disjoint entries, so summing them rarely collides.
3. cosine ≥ ``ALIGNED`` → ``linear`` (a soup / average): the deltas point the same way, and averaging keeps the
   shared direction without double-counting it.
4. conflict mass ≥ ``CONFLICT`` → ``ties``: a large share of the trimmed mass disagrees in sign with the vote,
   the interference TIES' trim / elect / disjoint-merge is built to resolve.
5. otherwise → ``task_arithmetic``: near-orthogonal deltas with little sign conflict add without much
   interference (the method the 2025 LLM merging study found most reliable, see merging.md).

The thresholds (``ALIGNED`` = 0.5, ``CONFLICT`` = 0.15, ``DISJOINT`` = 0.05, ``SPARSE`` = 0.5) are judgement
calls: two independent dense deltas trimmed to 20 % give a conflict mass of roughly 0.03–0.05, so 0.15 means
several times the chance level.  Validate on held-out data before trusting the choice.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from typing import Any

from deltatune.inspect.metrics import block_path

ALIGNED, CONFLICT, DISJOINT, SPARSE = 0.5, 0.15, 0.05, 0.5


def _median(values: Iterable[float | None]) -> float | None:
    found = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.median(found) if found else None


def delta_summary(rows: list[dict[str, Any]], label: str, keys: set[str] | None = None,
                  intruder_keys: set[str] | None = None) -> dict[str, Any]:
    """One input's numbers over its tensors (or only ``keys``): totals, medians over matrices, intruder counts.

    ``density`` is over all its tensors (entry-weighted), ``rel_norm`` = ``√(Σ‖ΔW‖² / Σ‖W‖²)`` over the tensors with a
    known, non-zero base norm and a non-zero update; ``top1_energy`` and
    ``top10_energy`` are energy-weighted means of the per-tensor shares (concentration *within* tensors);
    ``rank_fraction_mean`` the mean of ``rank(ΔW) / min(m, n)`` over the matrices with an exact SVD (Mukherjee et
    al. 2025).  The intruder counts are over ``intruder_keys`` when given (the matrices the report's ε sweep
    counts, so the two totals agree), else over every matrix."""
    mine = [r for r in rows if r["input"] == label and (keys is None or r["key"] in keys)]
    mats = [r for r in mine if r["matrix"]]
    numel = sum(r["numel"] for r in mine)
    with_base = [r for r in mine if r["rel_norm"]]  # tensors with a non-zero base norm and a non-zero update
    energy = sum(r["norm"] ** 2 for r in with_base)
    base_sq = sum((r["norm"] / r["rel_norm"]) ** 2 for r in with_base)

    def weighted(name: str) -> float | None:
        pairs = [(r[name], r["norm"] ** 2) for r in mine if r[name] is not None and not math.isnan(r[name])]
        total = sum(w for _, w in pairs)
        return sum(v * w for v, w in pairs) / total if total else None

    intruders = [r["intruders"] for r in mats
                 if r.get("intruders") is not None and (intruder_keys is None or r["key"] in intruder_keys)]
    ranks = [r["rank_fraction"] for r in mats if r.get("rank_fraction") is not None]
    return {"input": label, "tensors": len(mine), "matrices": len(mats),
            "density": sum(r["density"] * r["numel"] for r in mine) / numel if numel else None,
            "density_tol": sum(r["density_tol"] * r["numel"] for r in mine) / numel if numel else None,
            "rel_norm": math.sqrt(energy / base_sq) if base_sq else None,
            "top1_energy": weighted("top1_energy"), "top10_energy": weighted("top10_energy"),
            "rel_entry_q50": _median(r["rel_entry_q50"] for r in mine),
            "rel_entry_q99": _median(r["rel_entry_q99"] for r in mine),
            "erank_median": _median(r.get("erank") for r in mats),
            "rank_fraction_mean": sum(ranks) / len(ranks) if ranks else None,
            "alignment_median": _median(r.get("alignment") for r in mats),
            "alignment_chance_median": _median(r.get("alignment_chance") for r in mats),
            "intruders_total": sum(intruders) if intruders else None,
            "matrices_with_intruders": sum(1 for n in intruders if n > 0) if intruders else None}


def layer_summary(rows: list[dict[str, Any]], label: str) -> list[dict[str, Any]]:
    """Per transformer block of one input (Mukherjee et al. 2025, §6.2 of the methods reference): the mean over
    the block's tensors that the input changes of their density (exact non-zeros) and ``density_tol``
    (``|Δ| > tol``), each tensor counting once whatever its size, and the mean ``rank(ΔW) / min(m, n)`` over its
    matrices with an exact SVD.  Blocks are told apart by path (an encoder's and a decoder's block N are two);
    tensors outside the blocks (embeddings, head, final norm) are left out."""
    blocks: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        path = block_path(r["key"])
        if r["input"] == label and path is not None:
            blocks.setdefault(path, []).append(r)
    out = []
    for path in sorted(blocks, key=lambda p: (p.rsplit(".", 1)[0], blocks[p][0]["layer"])):
        mine = blocks[path]
        ranks = [r["rank_fraction"] for r in mine if r.get("rank_fraction") is not None]
        out.append({"input": label, "block": path, "layer": mine[0]["layer"], "tensors": len(mine),
                    "density": sum(r["density"] for r in mine) / len(mine),
                    "density_tol": sum(r["density_tol"] for r in mine) / len(mine),
                    "rank_fraction": sum(ranks) / len(ranks) if ranks else None})
    return out


def common_matrices(rows: list[dict[str, Any]], labels: list[str]) -> set[str]:
    """The matrices every input changes (a fair ground for comparing totals between inputs)."""
    return set.intersection(*({r["key"] for r in rows if r["input"] == lab and r["matrix"]} for lab in labels))


def intruder_curve(rows: list[dict[str, Any]], label: str, epsilons: Iterable[float],
                   keys: set[str] | None = None) -> list[int]:
    """Total intruder dimensions of ``label`` over its matrices (or only ``keys``) at each ``ε`` (the paper's
    sweep)."""
    cos = [c for r in rows if r["input"] == label and r.get("intruder_cos") and (keys is None or r["key"] in keys)
           for c in r["intruder_cos"]]
    return [sum(1 for c in cos if c < eps) for eps in epsilons]


def recommend_merge(pairs: list[dict[str, Any]], summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """``{"method", "rule", "why"}`` from the rule in the module docstring (a heuristic)."""
    if len(summaries) < 2:
        return {"method": None, "rule": 1, "why": "one input: nothing to merge"}
    mean = {k: _mean(p.get(k) for p in pairs) for k in ("cosine", "conflict_mass", "support_jaccard")}
    numbers = ", ".join(f"{k} {v:.3f}" for k, v in mean.items() if v is not None)
    densities = [s["density"] for s in summaries]
    if all(d is not None and d < SPARSE for d in densities) and (mean["support_jaccard"] or 0.0) <= DISJOINT:
        return {"method": "task_arithmetic", "rule": 2, "numbers": mean,
                "why": f"sparse deltas on nearly disjoint supports ({numbers}): summing rarely collides"}
    if mean["cosine"] is not None and mean["cosine"] >= ALIGNED:
        return {"method": "linear", "rule": 3, "numbers": mean,
                "why": f"the deltas point the same way ({numbers}): average them"}
    if mean["conflict_mass"] is not None and mean["conflict_mass"] >= CONFLICT:
        return {"method": "ties", "rule": 4, "numbers": mean,
                "why": f"much of the trimmed mass disagrees in sign ({numbers}): TIES' sign election resolves it"}
    return {"method": "task_arithmetic", "rule": 5, "numbers": mean,
            "why": f"near-orthogonal deltas with little sign conflict ({numbers}): sum them"}


def _mean(values: Iterable[float | None]) -> float | None:
    found = [v for v in values if v is not None]
    return sum(found) / len(found) if found else None
