"""Numbers between deltas, per tensor and accumulated over the model.

For two task vectors ``a``, ``b`` of one tensor:

* ``cosine`` = ``⟨a, b⟩ / (‖a‖‖b‖)`` of the flattened tensors;
* principal angles between the top-r left singular subspaces of the two ΔW (Björck & Golub 1973):
  ``subspace_overlap`` = mean ``cos² θ_i`` over the ``min(p, q)`` angles (1: one subspace inside the other, as
  the LoRA paper's φ; ≈ max(p, q)/m for random p- and q-dim subspaces of R^m);
* ``sign_agreement`` = the share of coordinates where both are non-zero that have the same sign (0.5 by chance);
* ``support_jaccard`` = ``|S_a ∩ S_b| / |S_a ∪ S_b|`` of the non-zero supports, next to its chance level
  ``d_a d_b / (d_a + d_b − d_a d_b)`` for independent supports of densities ``d_a``, ``d_b`` (over a model:
  ``Σ_t n_t d_a d_b / Σ_t n_t (d_a + d_b − d_a d_b)`` with each tensor's own densities);
  ``trimmed_jaccard`` (and its chance level) the same for the supports TIES keeps (top ``trim_density`` of
  ``|τ|`` per tensor): do the deltas' *largest* entries sit in the same places?
* ``conflict_mass`` — the interference TIES resolves (Yadav et al., NeurIPS 2023, arXiv 2306.01708): trim each
  ``τ_t`` to its top ``ρ`` entries by magnitude (per tensor, mergekit's scope; the authors trim over the whole
  model), elect ``γ = sgn(Σ_t τ̂_t)``, and report ``Σ_t Σ_p |τ̂_t,p|·[τ̂_t,p ≠ 0, sgn τ̂_t,p ≠ γ_p] / Σ_t Σ_p |τ̂_t,p|``:
  the share of the trimmed mass that TIES' disjoint merge throws away because its sign lost the vote.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from deltatune.inspect.linalg import principal_cosines
from deltatune.ops.sparsify import keep_count


def trim(tau: Tensor, density: float) -> Tensor:
    """TIES' trim: ``τ`` with all but its ``max(1, ⌊ρ·n⌋)`` largest-magnitude entries set to 0 (exactly k kept)."""
    flat = tau.reshape(-1)
    k = keep_count(flat.numel(), density)
    if k >= flat.numel():
        return tau
    out = torch.zeros_like(flat)
    idx = torch.topk(flat.abs(), k, sorted=False).indices
    out[idx] = flat[idx]
    return out.reshape(tau.shape)


def conflict_terms(trimmed: list[Tensor]) -> tuple[float, float]:
    """``(lost, total)`` |mass| of TIES' sign election over the trimmed ``τ̂_t`` (see the module docstring)."""
    elected = torch.sign(torch.stack(trimmed).sum(0))
    lost = total = 0.0
    for t in trimmed:
        mag = t.abs()
        total += float(mag.sum())
        lost += float(mag[(t != 0) & (torch.sign(t) != elected)].sum())
    return lost, total


def chance_jaccard(da: float, db: float) -> float:
    """Expected Jaccard of independent uniformly random supports of densities ``da``, ``db``."""
    union = da + db - da * db
    return da * db / union if union > 0 else float("nan")


@dataclass
class PairTotals:
    """Sums over tensors for one pair, turned into model-level numbers by :meth:`summary`."""

    dot: float = 0.0
    sq_a: float = 0.0
    sq_b: float = 0.0
    both: int = 0
    agree: int = 0
    inter: int = 0
    union: int = 0
    numel: int = 0
    nnz_a: int = 0
    nnz_b: int = 0
    t_inter: int = 0
    t_union: int = 0
    exp_inter: float = 0.0
    exp_union: float = 0.0
    t_exp_inter: float = 0.0
    t_exp_union: float = 0.0
    lost: float = 0.0
    mass: float = 0.0
    overlaps: list[float] = field(default_factory=list)
    tensors: int = 0

    def add_alone(self, tau: Tensor, trimmed: Tensor, first: bool) -> None:
        """A tensor only one side of the pair changes (``trimmed``: its top entries, as TIES keeps them): it counts in
        the norms, the supports and the trimmed supports (the other side is 0), and its trimmed mass in the conflict
        mass's denominator (nothing there conflicts) — every model-level number over the same tensors, as a TIES
        merge of the whole model sees them."""
        sq, nnz, t_nnz = float(tau.square().sum()), int((tau != 0).sum()), int((trimmed != 0).sum())
        if first:
            self.sq_a, self.nnz_a = self.sq_a + sq, self.nnz_a + nnz
        else:
            self.sq_b, self.nnz_b = self.sq_b + sq, self.nnz_b + nnz
        self.union += nnz
        self.exp_union += nnz
        self.t_union += t_nnz
        self.t_exp_union += t_nnz
        self.mass += float(trimmed.abs().sum())
        self.numel += tau.numel()

    def summary(self) -> dict[str, Any]:
        def ratio(a: float, b: float) -> float | None:
            return a / b if b else None

        return {"tensors": self.tensors,
                "cosine": ratio(self.dot, (self.sq_a * self.sq_b) ** 0.5),
                "sign_agreement": ratio(self.agree, self.both),
                "support_jaccard": ratio(self.inter, self.union),
                "support_jaccard_chance": ratio(self.exp_inter, self.exp_union),
                "trimmed_jaccard": ratio(self.t_inter, self.t_union),
                "trimmed_jaccard_chance": ratio(self.t_exp_inter, self.t_exp_union),
                "conflict_mass": ratio(self.lost, self.mass),
                "subspace_overlap": sum(self.overlaps) / len(self.overlaps) if self.overlaps else None}


def pair_metrics(key: str, a: Tensor, b: Tensor, ta: Tensor, tb: Tensor, ua: Tensor | None, ub: Tensor | None,
                 totals: PairTotals) -> dict[str, Any]:
    """The per-tensor row for the pair ``(a, b)`` (``ta``/``tb``: their trimmed versions, ``ua``/``ub``: top left
    singular vectors of each ΔW or ``None``); adds this tensor's sums into ``totals``."""
    dot, sq_a, sq_b = float((a * b).sum()), float(a.square().sum()), float(b.square().sum())
    nz_a, nz_b = a != 0, b != 0
    both = nz_a & nz_b
    n_both = int(both.sum())
    agree = int((torch.sign(a[both]) == torch.sign(b[both])).sum())
    inter, union = n_both, int((nz_a | nz_b).sum())
    tz_a, tz_b = ta != 0, tb != 0
    t_inter, t_union = int((tz_a & tz_b).sum()), int((tz_a | tz_b).sum())
    lost, mass = conflict_terms([ta, tb])
    row: dict[str, Any] = {"key": key,
                           "cosine": dot / (sq_a * sq_b) ** 0.5 if sq_a > 0 and sq_b > 0 else None,
                           "sign_agreement": agree / n_both if n_both else None,
                           "support_jaccard": inter / union if union else None,
                           "trimmed_jaccard": t_inter / t_union if t_union else None,
                           "conflict_mass": lost / mass if mass else None,
                           "principal_cos": None, "subspace_overlap": None}
    if ua is not None and ub is not None and ua.shape[1] and ub.shape[1]:
        cos = principal_cosines(ua, ub)
        row["principal_cos"] = [float(c) for c in cos]
        row["subspace_overlap"] = float(cos.square().mean())  # min(p, q) principal angles
        totals.overlaps.append(row["subspace_overlap"])
    totals.dot += dot
    totals.sq_a += sq_a
    totals.sq_b += sq_b
    totals.both += n_both
    totals.agree += agree
    totals.inter += inter
    totals.union += union
    totals.numel += a.numel()
    totals.nnz_a += int(nz_a.sum())
    totals.nnz_b += int(nz_b.sum())
    n = a.numel()
    da, db = int(nz_a.sum()) / n, int(nz_b.sum()) / n
    row["support_jaccard_chance"] = chance_jaccard(da, db)
    totals.exp_inter += n * da * db
    totals.exp_union += n * (da + db - da * db)
    tda, tdb = int(tz_a.sum()) / n, int(tz_b.sum()) / n
    row["trimmed_jaccard_chance"] = chance_jaccard(tda, tdb)
    totals.t_exp_inter += n * tda * tdb
    totals.t_exp_union += n * (tda + tdb - tda * tdb)
    totals.t_inter += t_inter
    totals.t_union += t_union
    totals.lost += lost
    totals.mass += mass
    totals.tensors += 1
    return row
