"""Global statistics that some scopes need before the merge pass, each gathered by streaming passes.

* ``thresholds`` — per input, the k-th largest ``|τ_t|`` over the whole model with
  ``k = max(1, ⌊ρ_t·N_t⌋)`` (TIES' trim as the authors run it: one threshold per task vector).  ``N_t`` counts the
  entries of the tensors visited: every tensor of a checkpoint input (the untouched ones as zeros, as the authors'
  flattened state dict does), only the touched ones of a delta input, so a delta and the same fine-tune merged into
  a checkpoint keep different counts at one density (the per-tensor scope of the other presets agrees on both).
* ``majority_sign`` — ``sgn(Σ_p γ_p)`` over every coordinate of the model, used where the elected sign
  sum is exactly 0 (the TIES authors' ``resolve_zero_signs(…, "majority")``).
* ``pcb`` — per input the clip quantiles of ``|τ_t|`` and then the ``(1 − r)`` quantile and maximum of
  the balanced scores β_t (PCB's drop-and-rescale over the flattened model).

Each pass calls ``visit(key, job)`` for every tensor; quantiles use :class:`RadixSelect` (exact, two
passes, no concatenation of the model).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from deltatune.algebra.methods import MergeMethod, TensorJob, sparsify_stack
from deltatune.algebra.quantile import RadixSelect
from deltatune.ops import pcb
from deltatune.ops.sparsify import keep_count, threshold_count

Visit = Callable[[Callable[[TensorJob], None]], None]


def _two_pass(visit: Visit, n_inputs: int, values: Callable[[TensorJob, int], torch.Tensor],
              ranks: Callable[[int, int], list[int]], nonnegative: bool = False) -> list[list[float]]:
    selects = [RadixSelect(nonnegative) for _ in range(n_inputs)]

    def feed(job: TensorJob) -> None:
        for i in range(n_inputs):
            selects[i].feed(values(job, i))

    visit(feed)
    for i, s in enumerate(selects):
        s.resolve(ranks(i, s.count))
    visit(feed)
    return [s.values() for s in selects]


def gather_stats(method: MergeMethod, params: dict[str, Any], inputs: list[dict[str, Any]], visit: Visit
                 ) -> dict[str, Any]:
    """Run the passes ``method`` needs under ``params`` and return the statistics for :class:`TensorJob`."""
    stats: dict[str, Any] = {}
    n = len(inputs)
    if "thresholds" in method.stats and params["scope"] == "global":
        kept = keep_count if params["k_rule"] == "count" else threshold_count  # the reference's kthvalue rank
        found = _two_pass(visit, n, lambda job, i: job.taus[i].abs(),
                          lambda i, count: [count - kept(count, inputs[i]["density"])], nonnegative=True)
        stats["thresholds"] = [v[0] for v in found]
    if "pcb" in method.stats and params["scope"] == "global":
        lo, hi = params["clip_low"], params["clip_high"]
        clips = _two_pass(visit, n, lambda job, i: job.taus[i].abs(),
                          lambda i, count: [min(max(int(count * lo), 0), count - 1),
                                           min(max(int(count * hi - 1), 0), count - 1)], nonnegative=True)
        s: dict[str, Any] = {"q_low": [c[0] for c in clips], "q_high": [c[1] for c in clips]}
        s["norm_lo"] = torch.tensor(s["q_low"])
        s["norm_hi"] = torch.tensor(s["q_high"])
        maxima = torch.full((n,), float("-inf"))

        def scores(job: TensorJob, i: int) -> torch.Tensor:
            clipped = torch.stack([pcb.pcb_clip(t, s["q_low"][j], s["q_high"][j]) for j, t in enumerate(job.taus)])
            sc = pcb.pcb_scores(clipped, s["norm_lo"], s["norm_hi"], params["temperature"], params["inter"],
                                unclipped=torch.stack(job.taus))[i]
            maxima[i] = max(float(maxima[i]), float(sc.max()))
            return sc

        ratio = inputs[0]["density"]
        found = _two_pass(visit, n, scores, lambda i, count: [min(count - 1, int(count * (1 - ratio)))])
        s["score_threshold"] = torch.tensor([v[0] for v in found])
        s["score_max"] = maxima
        stats["pcb"] = s
    if "majority_sign" in method.stats and params["sign_tie"] == "majority":
        total = [0.0]

        def count_signs(job: TensorJob) -> None:
            job.stats = stats
            sparse = sparsify_stack(method, job)
            weights = [p["weight"] for p in inputs] if params["weighted_vote"] else [1.0] * len(sparse)
            vote = sum(t * w for t, w in zip(sparse, weights, strict=True))
            total[0] += float(torch.sign(vote).sum())

        visit(count_signs)
        stats["majority_sign"] = {"value": -1.0 if total[0] < 0 else 1.0}
    return stats


def lines_norms(jobs: Iterable[TensorJob], kernel: Callable[[TensorJob], torch.Tensor]) -> tuple[float, float]:
    """``(Σ_keys ‖Σ_t τ_t‖₁, Σ_keys ‖τ_m‖₁)`` for LiNeS' multi-task α (``Σ_t τ_t`` before the kernel,
    which may trim its task vectors in place)."""
    total = merged = 0.0
    for job in jobs:
        total += float(torch.stack(job.taus).sum(0).abs().sum())
        merged += float(kernel(job).abs().sum())
    return total, merged
