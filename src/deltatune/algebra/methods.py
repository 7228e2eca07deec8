"""Merge methods: per-tensor kernels over task vectors ``τ_t`` plus the parameters each reads.

Every kernel receives a :class:`TensorJob` for one parameter and returns the merged task vector
``τ_m`` for it (the engine writes ``θ₀ + f_LiNeS(ℓ)·τ_m``).  The math lives in ``deltatune.ops``;
kernels only pick the semantics chosen by the preset (see :mod:`deltatune.algebra.options`).

* ``linear`` — model soup ``Σ w_t θ_t / Σ w_t`` (Wortsman et al., ICML 2022, arXiv 2203.05482).
* ``task_arithmetic`` — ``λ·Σ w_t τ_t`` (Ilharco et al., ICLR 2023, arXiv 2212.04089).
* ``ties`` — trim, elect sign, disjoint mean (Yadav et al., NeurIPS 2023, arXiv 2306.01708).
* ``dare_linear`` / ``dare_ties`` — drop-and-rescale first (Yu et al., ICML 2024, arXiv 2311.03099).
* ``breadcrumbs`` / ``breadcrumbs_ties`` — drop the largest γ and the smallest (Davari & Belilovsky,
  ECCV 2024, arXiv 2312.06795).
* ``della`` / ``della_linear`` — magnitude-ranked keep probabilities (Deep et al., arXiv 2406.11617).
* ``pcb`` — parameter competition balancing (Du et al., NeurIPS 2024, arXiv 2410.02396).
* ``model_stock`` — interpolate towards the base by the offsets' angle (Jang et al., ECCV 2024).
* ``slerp`` — spherical interpolation of two models (mergekit).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from deltatune.algebra.options import MethodParams
from deltatune.errors import ConfigError
from deltatune.ops import breadcrumbs as bc
from deltatune.ops import della as dl
from deltatune.ops import geometry, pcb
from deltatune.ops.merge import consensus_merge
from deltatune.ops.sparsify import dare_, l1_norm, l1_rescale_, magnitude_trim_
from deltatune.ops.topk import chunks, trim_below_


@dataclass
class TensorJob:
    """One parameter's inputs: task vectors, resolved parameters, lazy base tensor and global statistics."""

    key: str
    taus: list[Tensor]
    params: dict[str, Any]
    inputs: list[dict[str, Any]]
    base: Callable[[], Tensor]
    generator: Callable[[int], torch.Generator]
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def lam(self) -> float:
        return float(self.params.get("lambda", 1.0))


@dataclass(frozen=True)
class MergeMethod:
    name: str
    kernel: Callable[[TensorJob], Tensor]
    params: MethodParams
    needs_base: bool = False
    min_inputs: int = 1
    max_inputs: int | None = None
    stats: tuple[str, ...] = ()


def _weighted_sum(job: TensorJob, taus: Sequence[Tensor]) -> Tensor:
    """``Σ_t w_t τ_t`` (÷ ``Σ_t w_t`` when ``normalize``), accumulated in place."""
    first = job.inputs[0]["weight"]  # accumulate into τ_0 (the job owns it): 0 + w·τ_0 = w·τ_0
    total = taus[0] if first == 1.0 else taus[0].mul_(first)
    for p, t in zip(job.inputs[1:], taus[1:], strict=True):
        total.add_(t, alpha=p["weight"])
    if job.params.get("normalize"):
        total.div_(sum(p["weight"] for p in job.inputs))
    return total


def _consensus(job: TensorJob, taus: Sequence[Tensor]) -> Tensor:
    """TIES sign election + disjoint merge (:mod:`deltatune.ops.merge`) of already-sparsified ``taus``.

    Runs over :func:`~deltatune.ops.topk.chunks` so its temporaries stay small (and in cache) next to the
    inputs, and writes the result over ``taus[0]``.
    """
    weights = [p["weight"] for p in job.inputs]
    weighted = job.params["weighted_vote"]  # mergekit: w_t·τ_t replaces τ_t before the vote and the mask
    fill: Any = 1.0
    if job.params["sign_tie"] == "majority":
        fill = job.stats.get("majority_sign", {}).get("value")
        if fill is None:  # no global pass: this tensor's own majority sign
            total = sum(t * w if weighted else t for t, w in zip(taus, weights, strict=True))
            fill = -1.0 if float(torch.sign(total).sum()) < 0 else 1.0
    flats = [t.reshape(-1) for t in taus]
    out = flats[0]  # the job owns its task vectors: each chunk of τ_0 is read before it is overwritten
    for parts in zip(*(chunks(f) for f in flats), strict=True):
        consensus_merge(list(parts), weights, fill, normalize=job.params.get("normalize", True),
                        divide=job.params["divide"], weighted_vote=weighted, out=parts[0])
    return out.view_as(taus[0])


def _keeping_l1(job: TensorJob, tau: Tensor, sparsify: Callable[[Tensor], Tensor]) -> Tensor:
    """``sparsify(τ)``, then with ``rescale: l1`` scaled by ``‖τ‖₁/‖sparsify(τ)‖₁`` (mergekit's ``rescale: true``
    after its magnitude and outlier masks, :func:`~deltatune.ops.sparsify.l1_rescale_`); ``none`` leaves it."""
    if job.params.get("rescale", "none") != "l1":
        return sparsify(tau)
    before = l1_norm(tau)  # before: sparsify may work in place
    return l1_rescale_(sparsify(tau), before)


def _trim(job: TensorJob, i: int, tau: Tensor) -> Tensor:
    """Trim ``τ_i`` in place (the job owns it): global threshold, or per-tensor top-k; L1-rescaled on request.

    A density of 1 keeps ``τ_i`` as it is, unscaled (mergekit returns the tensor before masking)."""
    density = job.inputs[i]["density"]
    if density >= 1.0:
        return tau
    if job.params["scope"] == "global":  # keep |τ| ≥ the task's model-wide t_k
        return _keeping_l1(job, tau, lambda t: trim_below_(t.view(-1), job.stats["thresholds"][i]).view_as(t))
    return _keeping_l1(job, tau, lambda t: magnitude_trim_(t, density, exact=job.params["k_rule"] == "count"))


def _stack(parts: list[Tensor]) -> Tensor:
    return torch.stack(parts)


def linear(job: TensorJob) -> Tensor:
    mixed = _weighted_sum(job, job.taus)
    total_w = sum(p["weight"] for p in job.inputs)
    if job.params["normalize"] or abs(total_w - 1.0) < 1e-12:
        return mixed
    return mixed.add_(job.base(), alpha=total_w - 1.0)


def task_arithmetic(job: TensorJob) -> Tensor:
    return _weighted_sum(job, job.taus).mul_(job.lam)


def _trimmed(job: TensorJob) -> list[Tensor]:
    return [_trim(job, i, t) for i, t in enumerate(job.taus)]


def _dared(job: TensorJob) -> list[Tensor]:
    """DARE on every input, in place (the job owns its task vectors); a density of 1 keeps τ."""
    for i, (p, tau) in enumerate(zip(job.inputs, job.taus, strict=True)):
        if p["density"] < 1.0:
            dare_(tau, p["density"], job.generator(i), rescale=job.params["rescale"])
    return job.taus


def ties(job: TensorJob) -> Tensor:
    return _consensus(job, _trimmed(job)).mul_(job.lam)


def dare_linear(job: TensorJob) -> Tensor:
    return _weighted_sum(job, _dared(job)).mul_(job.lam)


def dare_ties(job: TensorJob) -> Tensor:
    return _consensus(job, _dared(job)).mul_(job.lam)


def _crumbs(job: TensorJob) -> list[Tensor]:
    """Each input's Breadcrumbs mask (scope ``row`` or ``tensor``, the method's limits), L1-rescaled on request."""
    def crumbs(i: int) -> Callable[[Tensor], Tensor]:
        p = job.inputs[i]
        return lambda t: bc.breadcrumbs(t, p["density"], p.get("gamma", 0.01), scope=job.params["scope"])

    return [_keeping_l1(job, t, crumbs(i)) for i, t in enumerate(job.taus)]


def breadcrumbs(job: TensorJob) -> Tensor:
    return _weighted_sum(job, _crumbs(job)).mul_(job.lam)


def breadcrumbs_ties(job: TensorJob) -> Tensor:
    return _consensus(job, _crumbs(job)).mul_(job.lam)


def _della(job: TensorJob) -> list[Tensor]:
    """Each input's MagPrune; ``density`` 1 leaves it whole (mergekit's default: no sparsification)."""
    rescale = {"inverse": "inverse_p", "l1": "l1", "none": "none"}[job.params["rescale"]]
    return [t if job.inputs[i]["density"] >= 1.0 else
            dl.della(t, job.inputs[i]["density"], job.inputs[i].get("epsilon", 0.15), job.generator(i),
                     rescale=rescale) for i, t in enumerate(job.taus)]


def della(job: TensorJob) -> Tensor:
    return _consensus(job, _della(job)).mul_(job.lam)


def della_linear(job: TensorJob) -> Tensor:
    return _weighted_sum(job, _della(job)).mul_(job.lam)


def pcb_merge(job: TensorJob) -> Tensor:
    lambdas = [p["weight"] for p in job.inputs]
    ratio = job.inputs[0]["density"]
    if any(p["density"] != ratio for p in job.inputs):
        raise ConfigError("pcb: every input needs the same density (the kept ratio r)")
    temperature = job.params["temperature"]
    if job.params["scope"] != "global":
        out = pcb.pcb(job.taus, ratio, temperature, lambdas,
                      clip_quantiles=(job.params["clip_low"], job.params["clip_high"]), inter=job.params["inter"])
        return job.lam * out
    s = job.stats["pcb"]
    clipped = _stack([pcb.pcb_clip(t, s["q_low"][i], s["q_high"][i]) for i, t in enumerate(job.taus)])
    scores = pcb.pcb_scores(clipped, s["norm_lo"], s["norm_hi"], temperature, job.params["inter"],
                            unclipped=_stack(job.taus))
    return job.lam * pcb.pcb_merge(clipped, scores, s["score_threshold"], s["score_max"], lambdas)


def model_stock(job: TensorJob) -> Tensor:
    base = job.base()
    merged = geometry.model_stock(base, [base + t for t in job.taus], filter_wise=job.params["filter_wise"])
    return merged - base


def slerp(job: TensorJob) -> Tensor:
    base = job.base()
    t = job.params.get("t")
    if t is None:
        raise ConfigError("slerp: parameter 't' (interpolation factor in [0, 1]) is required")
    if len(job.taus) == 1:
        return geometry.slerp(base, base + job.taus[0], t) - base
    return geometry.slerp(base + job.taus[0], base + job.taus[1], t) - base


_LAMBDA = {"weight", "lambda", "normalize"}
_SPARSE = _LAMBDA | {"density"}
#: TIES trims per tensor or model-wide (no per-row trim); Breadcrumbs masks per row or per tensor (no model-wide
#: band); both rescale by the L1 norm (mergekit's ``rescale: true``) or not at all, and default to not at all
#: under every preset, as the papers, mergekit (``rescale: false``) and PEFT do
_TIES_LIMITS = {"scope": ("global", "tensor"), "rescale": ("l1", "none")}
_CRUMBS_LIMITS = {"scope": ("row", "tensor"), "rescale": ("l1", "none")}
_NO_RESCALE = {"rescale": "none"}
_RESCALES = frozenset({"rescale"})  # DARE's and DELLA's 1/ρ or L1 rescale of the kept entries
METHODS: dict[str, MergeMethod] = {m.name: m for m in (
    MergeMethod("linear", linear, MethodParams(frozenset({"weight", "normalize"}), {"normalize": True})),
    MergeMethod("task_arithmetic", task_arithmetic, MethodParams(frozenset(_LAMBDA), {"normalize": False},
                                                                 mergekit_noops=frozenset({"density", "rescale"}))),
    MergeMethod("ties", ties, MethodParams(frozenset(_SPARSE), {"normalize": True, **_NO_RESCALE}, sparsifies=True,
                                           limits=_TIES_LIMITS, votes=True, semantics=frozenset({"k_rule"})),
                stats=("thresholds", "majority_sign")),
    MergeMethod("dare_linear", dare_linear, MethodParams(frozenset(_SPARSE), {"normalize": False}, True,
                                                         semantics=_RESCALES)),
    MergeMethod("dare_ties", dare_ties, MethodParams(frozenset(_SPARSE), {"normalize": False}, True, votes=True,
                                                     semantics=_RESCALES),
                stats=("majority_sign",)),
    MergeMethod("breadcrumbs", breadcrumbs, MethodParams(frozenset(_SPARSE | {"gamma"}),
                                                         {"normalize": False, **_NO_RESCALE}, True,
                                                         limits=_CRUMBS_LIMITS)),
    MergeMethod("breadcrumbs_ties", breadcrumbs_ties,
                MethodParams(frozenset(_SPARSE | {"gamma"}), {"normalize": False, **_NO_RESCALE}, True,
                             limits=_CRUMBS_LIMITS, votes=True), stats=("majority_sign",)),
    MergeMethod("della", della, MethodParams(frozenset(_SPARSE | {"epsilon"}), {"normalize": True}, True,
                                             votes=True, semantics=_RESCALES), stats=("majority_sign",)),
    MergeMethod("della_linear", della_linear,
                MethodParams(frozenset(_SPARSE | {"epsilon"}), {"normalize": False}, True, semantics=_RESCALES)),
    MergeMethod("pcb", pcb_merge, MethodParams(
        frozenset({"weight", "density", "lambda", "temperature", "inter", "clip_low", "clip_high"}),
        {"temperature": None, "inter": "raw", "clip_low": 1e-4, "clip_high": 1 - 1e-4}, True,
        limits={"scope": ("global", "tensor")}), stats=("pcb",)),
    MergeMethod("model_stock", model_stock, MethodParams(frozenset({"filter_wise"}), {"filter_wise": False}),
                needs_base=True, min_inputs=2),
    MergeMethod("slerp", slerp, MethodParams(frozenset({"t"}), {}), needs_base=True, max_inputs=2),
)}


SPARSIFIERS: dict[str, Callable[[TensorJob], Tensor]] = {
    "ties": _trimmed, "dare_ties": _dared, "breadcrumbs_ties": _crumbs, "della": _della,
}


def sparsify_stack(method: MergeMethod, job: TensorJob) -> list[Tensor]:
    """The sparsified ``(T, …)`` stack a consensus method votes on (for the global majority-sign pass)."""
    return SPARSIFIERS[method.name](job)


def get_merge_method(name: str) -> MergeMethod:
    if name not in METHODS:
        raise ConfigError(f"unknown merge method {name!r}; available: {sorted(METHODS)}")
    return METHODS[name]
