"""SpIEL drop/regrow with accumulated-gradient growth ("SpIEL-AG"; Ansell et al., 2024).

Events happen after ``t_j = A + j·R`` completed steps (``t ≤ T``); the ``A`` steps before each event
form a selection window.  In a window, the first backward of each layer picks ``k_l`` candidates by
``|∂L/∂W|`` (from a transient dense gradient the sparse autograd function forms for it); later
backwards accumulate ``Σg`` and ``Σg²`` at those candidates, computed at them alone where the active entries and
candidates together are sparse enough for the sampled path (a sampled matmul beside the active entries' own; no
dense gradient).  At the event, with rate
``p = 1`` for the first event (the random support is replaced) and then ``ρ₀(1 − t/T)`` (linear) or
``ρ₀(1 + cos(πt/T))/2`` (cosine):

* drop ``n = ⌊k_l p⌋`` active entries with the smallest ``|value|`` (their weights revert to the base);
* grow the top-``n`` inactive candidates by ``|Σg|``, values 0;
* seed Adam for grown entries: ``m = ḡ(1−β₁^age)``, ``v = \\overline{g²}(1−β₂^age)``, with ``age`` the
  window's step count, so per-element bias correction yields unbiased moments.

Under DDP each rank accumulates at its own candidates; at the event the candidates and sums of all
ranks are gathered and merged by index, so every rank takes the same decision.

:class:`MomentumSelector` ("SpIEL-MA") keeps the drop rule and schedule but grows by SM3 row/column
accumulators of the active values' squared gradients (``O(d_out + d_in)`` per matrix, no window, no dense
gradient): the inactive entries of largest ``r_i · c_j`` grow.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from deltatune.methods.registry import TrainHook
from deltatune.methods.sparse_optim import SparseAdamW
from deltatune.parts.layers import LayerKind
from deltatune.parts.sparse import SparsePart, check_indices, index_dtype
from deltatune.parts.sparse_grad import (
    WINDOW_ROLES,
    CsrSupport,
    csr_support,
    lookup_sorted,
    release_scratch,
    scratch,
    use_sampled_grad,
)


class _Window:
    """Accumulators of one layer in one selection window: the layer's :class:`~deltatune.parts.sparse.GradObserver`.

    The first backward hands it the dense ``∂L/∂W`` (:meth:`observe`); it keeps the ``k`` positions of largest
    ``|g|`` as candidates, sorted, with their CSR support (``wanted``), so every later backward of the window
    computes the gradient at those alone (:meth:`observe_at`): sampled, with no dense gradient, while the part's
    entries and the candidates together stay within the sampled path's density
    (:data:`~deltatune.parts.sparse_grad.SAMPLED_GRAD_MAX_DENSITY`), else gathered from it."""

    def __init__(self, k: int, layer: LayerKind) -> None:
        self.k, self.layer = k, layer
        self.candidates: Tensor | None = None
        self.support: CsrSupport | None = None
        self.grad_sum: Tensor | None = None
        self.grad_sq: Tensor | None = None
        self.samples = 0

    @property
    def wanted(self) -> tuple[Tensor, CsrSupport | None] | None:
        return None if self.candidates is None else (self.candidates, self.support)

    def observe(self, grad_w: Tensor) -> None:
        flat = grad_w.reshape(-1)
        magnitudes = torch.abs(flat, out=scratch("abs", flat.numel(), flat.dtype, flat.device))
        top = magnitudes.topk(min(self.k, flat.numel()), sorted=False).indices.sort().values
        self._choose(top.to(index_dtype(flat.numel())), tuple(grad_w.shape))  # int32 below 2³¹: half the bytes
        self.observe_at(flat.index_select(0, self.candidates))

    def observe_at(self, grad_at: Tensor) -> None:
        g = grad_at.float()
        self.grad_sum.add_(g)
        self.grad_sq.addcmul_(g, g)
        self.samples += 1

    def _choose(self, candidates: Tensor, weight_shape: tuple[int, ...]) -> None:
        self.candidates = candidates
        self.support = None if self.layer is LayerKind.EMBEDDING else csr_support(candidates, weight_shape)
        self.grad_sum = torch.zeros(candidates.numel(), dtype=torch.float32, device=candidates.device)
        self.grad_sq = torch.zeros_like(self.grad_sum)

    def state(self) -> dict[str, Any]:
        return {"candidates": self.candidates, "grad_sum": self.grad_sum, "grad_sq": self.grad_sq,
                "samples": self.samples}

    @classmethod
    def from_state(cls, st: dict[str, Any], part: SparsePart) -> _Window:
        """Rebuild from :meth:`state` (a checkpoint holds CPU tensors; they move to the part's device).  Candidates
        of a checkpoint written before they were kept sorted are sorted here, their sums with them."""
        w, device = cls(part.indices.numel(), part.layer), part.indices.device
        if st["candidates"] is not None:
            check_indices(st["candidates"], part.numel_base, "selection window candidates", require_sorted=False)
            order = st["candidates"].argsort()
            w._choose(st["candidates"][order].to(device), part.weight_shape)
            w.grad_sum.copy_(st["grad_sum"][order])
            w.grad_sq.copy_(st["grad_sq"][order])
        w.samples = st["samples"]
        return w


def _gather_windows(w: _Window) -> tuple[Tensor, Tensor, Tensor]:
    """Candidates and sums merged over ranks (identity without a process group)."""
    cand, gsum, gsq = w.candidates, w.grad_sum, w.grad_sq
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return cand, gsum, gsq
    world = dist.get_world_size()
    bufs = [[torch.empty_like(t) for _ in range(world)] for t in (cand, gsum, gsq)]
    for out, t in zip(bufs, (cand, gsum, gsq), strict=True):
        dist.all_gather(out, t.contiguous())
    all_c, all_s, all_q = (torch.cat(b) for b in bufs)
    uniq, inverse = torch.unique(all_c, return_inverse=True)
    s = torch.zeros(uniq.numel(), dtype=torch.float32, device=all_s.device).index_add_(0, inverse, all_s)
    q = torch.zeros_like(s).index_add_(0, inverse, all_q)
    return uniq, s / world, q / world


class SpIELSelector(TrainHook):
    def __init__(self, parts: dict[str, SparsePart], optimizer: torch.optim.Optimizer, config: Any,
                 total_steps: int, grad_accum: int) -> None:
        self.parts = dict(parts)  # the sparse method's delta holds only sparse parts
        self.optimizer = optimizer
        self.R, self.A = config.reselection_steps, config.accumulation_steps
        self.rho0, self.schedule = config.initial_reselection_rate, config.schedule
        self.T, self.grad_accum = max(1, total_steps), max(1, grad_accum)
        self.windows: dict[str, _Window] | None = None
        self.events: list[dict[str, Any]] = []

    # --- schedule ------------------------------------------------------------------------
    def rate(self, step: int) -> float:
        """The fraction of each part's entries replaced at ``step`` (SpIEL's reference ``SftSelector``): linear
        ``ρ₀·(1 − step/T)``, but 1 at the first event (``step = A``: the random initial support replaced whole);
        cosine ``ρ₀·(1 + cos(π·step/T))/2`` at every event, the first too."""
        if self.schedule == "cosine":
            return self.rho0 * (1 + math.cos(math.pi * step / self.T)) / 2
        if step == self.A:
            return 1.0
        return self.rho0 * (1 - step / self.T)

    def before_step(self, step: int) -> None:
        if self.windows is None and step % self.R == 0 and step + self.A <= self.T:
            self._open()

    def after_step(self, step: int) -> None:
        if self.windows is None:
            return
        if step >= self.A and (step - self.A) % self.R == 0:
            self._regrow(step)
        else:
            release_scratch(self._spent_roles())

    def close(self) -> None:
        """Training ended (or stopped inside a selection window): no part keeps the window's gradient observer, so
        a later backward takes the sampled path and feeds no dead window."""
        self._close()

    # --- window ---------------------------------------------------------------------------
    def _open(self) -> None:
        self.windows = {n: _Window(p.indices.numel(), p.layer) for n, p in self.parts.items()}
        self._install()

    def _install(self) -> None:
        for name, part in self.parts.items():
            part.grad_observer = self.windows[name]

    def _spent_roles(self) -> tuple[str, ...]:
        """The window buffers no later backward of the window needs: the magnitudes once every layer that had a backward
        has its candidates; the dense gradient too, unless some layer's entries and candidates together are too
        dense for the sampled path (it then gathers both from the dense gradient at every step)."""
        dense_later = any(not use_sampled_grad(part.layer, part.indices.numel() + window.candidates.numel(),
                                               part.numel_base)
                          for name, part in self.parts.items() if (window := self.windows[name]).candidates is not None)
        return ("abs",) if dense_later else WINDOW_ROLES

    def _close(self) -> None:
        for part in self.parts.values():
            part.grad_observer = None
        self.windows = None
        release_scratch(WINDOW_ROLES)

    @torch.no_grad()
    def _regrow(self, step: int) -> None:
        rate = self.rate(step)
        b1, b2 = self._betas()
        moved = 0
        for name, part in self.parts.items():
            window = self.windows[name]
            if window.candidates is None:
                continue
            cand, gsum, gsq = _gather_windows(window)
            steps = max(1.0, window.samples / self.grad_accum)  # fractional where a layer missed a micro-batch
            moved += self._regrow_part(part, cand, gsum, gsq, steps, rate, b1, b2)
        self.events.append({"step": step, "rate": rate, "moved": moved})
        self._close()

    def _regrow_part(self, part: SparsePart, cand: Tensor, gsum: Tensor, gsq: Tensor, steps: float, rate: float,
                     b1: float, b2: float) -> int:
        """One drop/regrow event of one part (SpIEL's ``select_rigl``, Ansell et al., 2024, §3): drop the
        ``n = ⌊k·rate⌋`` entries of smallest ``|value|``; grow the top-``n`` by ``|accumulated gradient|`` among
        the candidates that do not *remain* active (a dropped entry may win its place back); an entry both dropped
        and regrown stays as it is (value and moments kept), so ``n`` shrinks by the overlap.  Grown entries start
        at 0 with moments seeded from the window (the bias counter-correction ``m = ḡ·(1−β₁^age)``, ``ḡ`` over the
        window's ``steps``, ``age`` its whole steps, as the optimiser's bias correction counts them).  Returns how
        many entries moved."""
        n = math.floor(part.indices.numel() * rate)
        if n <= 0:
            return 0
        # membership by binary search in the sorted indices (no torch.isin: a sort per call)
        slots = part.values.detach().abs().topk(n, largest=False, sorted=True).indices
        stays = torch.ones_like(part.indices, dtype=torch.bool)
        stays[slots] = False
        valid = ~lookup_sorted(part.indices[stays], cand)[1]
        cand, gsum, gsq = cand[valid], gsum[valid], gsq[valid]
        top = gsum.abs().topk(min(n, cand.numel())).indices
        at, back = lookup_sorted(part.indices, cand[top])  # active yet not staying: dropped and regrown, kept as is
        grow = top[~back]
        regrown = torch.zeros_like(stays)
        regrown[at[back]] = True
        slots = slots[~regrown[slots]][:grow.numel()]
        if not grow.numel():
            return 0
        part.indices[slots] = cand[grow].to(part.indices.dtype)
        part.values.data[slots] = 0
        if isinstance(self.optimizer, SparseAdamW):
            st = self.optimizer.state_of(part.values)
            mean_g = gsum[grow] / steps
            mean_sq = gsq[grow] * self.grad_accum / steps
            age = float(int(steps))  # whole steps, as SparseAdamW's bias-correction table counts them
            st["exp_avg"][slots] = mean_g * (1 - b1**age)
            st["exp_avg_sq"][slots] = mean_sq * (1 - b2**age)
            st["age"][slots] = age
        self._sort(part)
        return int(grow.numel())

    def _sort(self, part: SparsePart) -> None:
        order = part.indices.argsort()
        part.indices.copy_(part.indices[order])
        part.values.data.copy_(part.values.data[order])
        if isinstance(self.optimizer, SparseAdamW):
            st = self.optimizer.state_of(part.values)
            for key in ("exp_avg", "exp_avg_sq", "age"):
                st[key].copy_(st[key][order])

    def _betas(self) -> tuple[float, float]:
        return tuple(self.optimizer.param_groups[0].get("betas", (0.9, 0.999)))

    # --- exact resume ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        windows = None if self.windows is None else {n: w.state() for n, w in self.windows.items()}
        return {"windows": windows, "events": list(self.events)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.events = list(state["events"])
        if state["windows"] is None:
            self._close()
        else:
            self.windows = {n: _Window.from_state(st, self.parts[n]) for n, st in state["windows"].items()}
            self._install()


# --- SpIEL-MA: momentum-approximation growth ----------------------------------------------------------


def sm3_update(row: Tensor, col: Tensor, rows: Tensor, cols: Tensor, grad: Tensor) -> None:
    """One SM3-II step of the row/column accumulators of a matrix, over its active entries (in place).

    For each active ``(i, j)`` with gradient ``g``: ``ν = min(r_i, c_j) + g²``; then ``r_i ← max_{j active in row
    i} ν`` and ``c_j ← max_{i active in column j} ν`` (rows/columns without an active entry keep their value).
    Anil et al., "Memory-Efficient Adaptive Optimization" (SM3, NeurIPS 2019), as used by SpIEL-MA (Ansell et
    al., 2024, §3.2): ``O(d_out + d_in)`` memory, from the active entries' gradients only."""
    g = grad.float()
    nu = torch.minimum(row[rows], col[cols]) + g * g
    row.scatter_reduce_(0, rows, nu, "amax", include_self=False)
    col.scatter_reduce_(0, cols, nu, "amax", include_self=False)


def sm3_scores(row: Tensor, col: Tensor) -> Tensor:
    """Growth score of every entry, ``r_i · c_j`` (the SM3 estimate of its squared-gradient accumulator), flat."""
    return torch.outer(row, col).reshape(-1)


class SM3Accumulator:
    """Row and column accumulators of one sparse part's matrix (the weight as ``(shape[0], rest)``)."""

    def __init__(self, shape: tuple[int, ...], device: torch.device) -> None:
        self.cols = math.prod(shape[1:]) if len(shape) > 1 else 1
        self.row = torch.zeros(shape[0], dtype=torch.float32, device=device)
        self.col = torch.zeros(self.cols, dtype=torch.float32, device=device)

    def observe(self, indices: Tensor, grad_values: Tensor) -> None:
        indices = indices.long()
        sm3_update(self.row, self.col, indices // self.cols, indices % self.cols, grad_values)

    def reduce(self) -> None:
        """Under DDP, every rank takes the mean of the ranks' accumulators (the same decision everywhere)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for t in (self.row, self.col):
                dist.all_reduce(t)
                t.div_(dist.get_world_size())


class MomentumSelector(SpIELSelector):
    """SpIEL-MA: the same drop rule and schedule (events after ``A + j·R`` steps), but growth picks the inactive
    entries of largest ``r_i · c_j`` from SM3 accumulators fed by the active values' gradient of every optimiser
    step, as SM3 updates its accumulators in its step (the gradient summed over the step's micro-batches, after
    DDP's all-reduce) — no selection window, no dense gradient, ``O(d_out + d_in)`` extra memory per matrix.  Grown
    entries start with zero moments and age 0 (their own bias correction)."""

    def __init__(self, parts: dict[str, SparsePart], optimizer: torch.optim.Optimizer, config: Any,
                 total_steps: int, grad_accum: int) -> None:
        super().__init__(parts, optimizer, config, total_steps, grad_accum)
        self.acc = {n: SM3Accumulator(p.weight_shape, p.values.device) for n, p in self.parts.items()}
        self.handles = [optimizer.register_step_pre_hook(lambda *_: self._observe_step())]

    def _observe_step(self) -> None:
        """Feed each part's accumulators the gradient the optimiser is about to step with."""
        for name, part in self.parts.items():
            if part.values.grad is not None:
                self.acc[name].observe(part.indices, part.values.grad.detach())

    def close(self) -> None:
        """Remove the accumulators' optimiser hook (a later step no longer feeds them)."""
        for handle in self.handles:
            handle.remove()
        self.handles = []
        super().close()

    def before_step(self, step: int) -> None:
        """No selection window: the accumulators see every backward."""

    def after_step(self, step: int) -> None:
        if step >= self.A and (step - self.A) % self.R == 0 and step <= self.T:
            self._grow_by_momentum(step)

    @torch.no_grad()
    def _grow_by_momentum(self, step: int) -> None:
        rate, moved = self.rate(step), 0
        for name, part in self.parts.items():
            acc = self.acc[name]
            acc.reduce()
            score = sm3_scores(acc.row, acc.col)
            score[part.indices] = -math.inf
            n = min(math.floor(part.indices.numel() * rate), part.numel_base - part.indices.numel())
            if n <= 0:
                continue
            grow = score.topk(n).indices
            slots = part.values.detach().abs().topk(n, largest=False).indices
            part.indices[slots] = grow.to(part.indices.dtype)
            part.values.data[slots] = 0
            if isinstance(self.optimizer, SparseAdamW):
                st = self.optimizer.state_of(part.values)
                for key in ("exp_avg", "exp_avg_sq", "age"):
                    st[key][slots] = 0
            self._sort(part)
            moved += n
        self.events.append({"step": step, "rate": rate, "moved": moved})

    def state_dict(self) -> dict[str, Any]:
        return {"events": list(self.events), "acc": {n: (a.row.cpu(), a.col.cpu()) for n, a in self.acc.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.events = list(state["events"])
        for name, (row, col) in state["acc"].items():
            acc = self.acc[name]
            if row.shape != acc.row.shape or col.shape != acc.col.shape:
                raise ValueError(f"{name}: accumulators of shapes {tuple(row.shape)}, {tuple(col.shape)}")
            acc.row.copy_(row)
            acc.col.copy_(col)
