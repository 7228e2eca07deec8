"""SpIEL drop/regrow with accumulated-gradient growth ("SpIEL-AG"; Ansell et al., 2024).

Events happen after ``t_j = A + j·R`` completed steps (``t ≤ T``); the ``A`` steps before each event
form a selection window.  In a window, the first backward of each layer picks ``k_l`` candidates by
``|∂L/∂W|`` (from the transient dense gradient the sparse autograd function computes anyway); later
backwards accumulate ``Σg`` and ``Σg²`` at those candidates.  At the event, with rate
``p = 1`` for the first event (the random support is replaced) and then ``ρ₀(1 − t/T)`` (linear) or
``ρ₀(1 + cos(πt/T))/2`` (cosine):

* drop ``n = ⌊k_l p⌋`` active entries with the smallest ``|value|`` (their weights revert to the base);
* grow the top-``n`` inactive candidates by ``|Σg|``, values 0;
* seed Adam for grown entries: ``m = ḡ(1−β₁^age)``, ``v = \\overline{g²}(1−β₂^age)``, with ``age`` the
  window's step count, so per-element bias correction yields unbiased moments.

Under DDP each rank accumulates at its own candidates; at the event the candidates and sums of all
ranks are gathered and merged by index, so every rank takes the same decision.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from deltatune.methods.registry import TrainHook
from deltatune.methods.sparse_optim import SparseAdamW
from deltatune.parts.sparse import SparsePart


class _Window:
    """Accumulators of one layer in one selection window."""

    def __init__(self) -> None:
        self.candidates: Tensor | None = None
        self.grad_sum: Tensor | None = None
        self.grad_sq: Tensor | None = None
        self.samples = 0

    def observe(self, grad_w: Tensor, k: int) -> None:
        flat = grad_w.reshape(-1)
        if self.candidates is None:
            self.candidates = flat.abs().topk(min(k, flat.numel()), sorted=False).indices
            self.grad_sum = torch.zeros(self.candidates.numel(), dtype=torch.float32, device=flat.device)
            self.grad_sq = torch.zeros_like(self.grad_sum)
        g = flat.index_select(0, self.candidates).float()
        self.grad_sum.add_(g)
        self.grad_sq.addcmul_(g, g)
        self.samples += 1

    def state(self) -> dict[str, Any]:
        return {"candidates": self.candidates, "grad_sum": self.grad_sum, "grad_sq": self.grad_sq,
                "samples": self.samples}

    @classmethod
    def from_state(cls, st: dict[str, Any], device: torch.device) -> _Window:
        """Rebuild from :meth:`state` (a checkpoint holds CPU tensors; they move to the part's ``device``)."""
        w = cls()
        w.candidates, w.grad_sum, w.grad_sq = (None if st[k] is None else st[k].to(device)
                                               for k in ("candidates", "grad_sum", "grad_sq"))
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
        if step == self.A:
            return 1.0
        if self.schedule == "cosine":
            return self.rho0 * (1 + math.cos(math.pi * step / self.T)) / 2
        return self.rho0 * (1 - step / self.T)

    def before_step(self, step: int) -> None:
        if self.windows is None and step % self.R == 0 and step + self.A <= self.T:
            self._open()

    def after_step(self, step: int) -> None:
        if self.windows is not None and step >= self.A and (step - self.A) % self.R == 0:
            self._regrow(step)

    # --- window ---------------------------------------------------------------------------
    def _open(self) -> None:
        self.windows = {n: _Window() for n in self.parts}
        self._install()

    def _install(self) -> None:
        for name, part in self.parts.items():
            window, k = self.windows[name], part.indices.numel()
            part.grad_observer = lambda g, w=window, k=k: w.observe(g, k)

    def _close(self) -> None:
        for part in self.parts.values():
            part.grad_observer = None
        self.windows = None

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
            age = max(1.0, window.samples / self.grad_accum)
            moved += self._regrow_part(part, cand, gsum, gsq, age, rate, b1, b2)
        self.events.append({"step": step, "rate": rate, "moved": moved})
        self._close()

    def _regrow_part(self, part: SparsePart, cand: Tensor, gsum: Tensor, gsq: Tensor, age: float, rate: float,
                     b1: float, b2: float) -> int:
        keep = ~torch.isin(cand, part.indices)
        cand, gsum, gsq = cand[keep], gsum[keep], gsq[keep]
        n = min(math.floor(part.indices.numel() * rate), cand.numel())
        if n <= 0:
            return 0
        grow = gsum.abs().topk(n).indices
        slots = part.values.detach().abs().topk(n, largest=False).indices
        part.indices[slots] = cand[grow]
        part.values.data[slots] = 0
        if isinstance(self.optimizer, SparseAdamW):
            st = self.optimizer.state_of(part.values)
            mean_g = gsum[grow] / age
            mean_sq = gsq[grow] * self.grad_accum / age
            st["exp_avg"][slots] = mean_g * (1 - b1**age)
            st["exp_avg_sq"][slots] = mean_sq * (1 - b2**age)
            st["age"][slots] = age
        self._sort(part)
        return n

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
            self.windows = {n: _Window.from_state(st, self.parts[n].indices.device)
                            for n, st in state["windows"].items()}
            self._install()
