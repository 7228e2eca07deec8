"""AdamW that keeps a row-sparse gradient row-sparse: an ``nn.Embedding(sparse=True)`` trained with AdamW's update (not
lazy Adam's) and optimiser state only for the rows its batches have looked up.

AdamW (Loshchilov & Hutter, 2019) on a row that no batch has looked up yet does nothing: its gradient has been zero at
every step, so ``m = v = 0`` and the step ``η·m̂/(√v̂ + ε)`` is exactly zero (decoupled decay aside, which
:meth:`AdamWRows._step_rows` applies to every row).  So the state of those rows need not exist.  For a parameter whose
gradient arrives as a sparse tensor, this optimiser keeps ``exp_avg`` and ``exp_avg_sq`` for the rows ever looked up
(``rows``, sorted), adds a row with zero moments the first time a batch looks it up, and at every step updates all of
them with the batch's gradient (zero for a known row the batch did not look up, as dense AdamW does):
``m ← β₁m + (1−β₁)g``, ``v ← β₂v + (1−β₂)g²``, ``θ ← θ(1 − ηλ) − η·(m / (1−β₁ᵗ)) / (√(v / (1−β₂ᵗ)) + ε)`` with the
parameter's own step count ``t``, which is dense AdamW's update row for row up to float rounding (it orders the
operations otherwise than torch's kernels: ``β₁m`` plus an added row where torch interpolates, so the results part in
the last bits; a bf16 or fp16 parameter rounds at other points too).  Once more than half the rows are known,
all of them are (one copy, then none as rows come): the state is then AdamW's own size, and the gradient still
row-sparse.  A vocab × dim embedding then costs neither a dense gradient nor dense moments: LISA's always-trained
embeddings (Pan et al., 2024) at a fraction of their dense cost on a small model, where they are half the
parameters.

Every other parameter (dense gradient) takes ``torch.optim.AdamW``'s own step, fused where it was built fused.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from deltatune.errors import ConfigError
from deltatune.methods.sparse_optim import remap_state, run_closure
from deltatune.parts.sparse_grad import lookup_sorted

#: the state of a row-sparse parameter besides torch's ``step``
ROW_KEYS = ("exp_avg", "exp_avg_sq")
#: AdamW options the row step does not implement (refused for a parameter with a sparse gradient)
UNSUPPORTED = ("amsgrad", "maximize", "capturable", "differentiable")


class AdamWRows(torch.optim.AdamW):
    """``torch.optim.AdamW`` that also takes sparse (row) gradients: see the module docstring.  Under a ``GradScaler``
    (which hands a fused optimiser ``grad_scale`` and ``found_inf`` instead of unscaling), the rows' gradients are
    unscaled and a step with an inf or NaN gradient is skipped, as AdamW's fused step does."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = run_closure(closure)
        rows = [(group, p) for group in self.param_groups for p in group["params"]
                if p.grad is not None and p.grad.is_sparse]
        for group, _ in rows:
            wanted = [k for k in UNSUPPORTED if group.get(k)]
            if wanted:
                raise ConfigError(f"AdamWRows: a parameter with a sparse (row) gradient cannot train with "
                                  f"{', '.join(wanted)} (not implemented for rows); read it densely instead")
        for p in self._dense_again():
            self._to_dense_state(p)
        sparse = {p: p.grad for _, p in rows}
        for p in sparse:
            p.grad = None  # hidden from AdamW's own step, which refuses a sparse gradient
        try:
            # AdamW's step without its hook wrapper: this class's own step already ran the optimizer's hooks
            getattr(torch.optim.AdamW.step, "__wrapped__", torch.optim.AdamW.step)(self)
        finally:
            for p, grad in sparse.items():
                p.grad = grad
        scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        if found_inf is not None and float(found_inf) > 0:
            return loss
        for group, p in rows:
            self._step_rows(p, group, scale)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """AdamW's, then each row-sparse parameter's ``rows`` put back as int64 (AdamW casts every state tensor but
        ``step`` to its parameter's dtype, which would make row ids floats, inexact in bf16)."""
        saved = [i for g in state_dict["param_groups"] for i in g["params"]]
        rows = {saved.index(i): st["rows"] for i, st in state_dict["state"].items() if "rows" in st}
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for position, ids in rows.items():
            self.state[params[position]]["rows"] = ids.to(device=params[position].device, dtype=torch.long)

    def _dense_again(self) -> list[Tensor]:
        """Parameters holding row state whose gradient is dense this step (a tied weight read densely elsewhere too)."""
        return [p for group in self.param_groups for p in group["params"]
                if p.grad is not None and not p.grad.is_sparse and "rows" in self.state.get(p, {})]

    def _to_dense_state(self, p: Tensor) -> None:
        """Row state made AdamW's own dense state (zero moments in the rows never looked up)."""
        st = self.state[p]
        rows = st.pop("rows")
        for key in ROW_KEYS:
            st[key] = torch.zeros_like(p, memory_format=torch.preserve_format).index_copy_(0, rows, st[key])

    def _step_rows(self, p: Tensor, group: dict, scale: Tensor | None) -> None:
        """The AdamW step of ``p`` from its sparse gradient, on the rows ever looked up (the module docstring)."""
        b1, b2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        grad = p.grad.coalesce()
        looked_up, values = grad.indices()[0], grad.values().to(p.dtype)
        if scale is not None:
            values = values / scale.to(values.dtype)
        st = self.state[p]
        if "exp_avg" not in st:  # first step: no row yet; ``step`` where AdamW keeps it
            on_device = group["fused"] or group["capturable"]
            st["step"] = torch.zeros((), dtype=torch.float32, device=p.device if on_device else "cpu")
            st["rows"] = torch.zeros(0, dtype=torch.long, device=p.device)
            for key in ROW_KEYS:
                st[key] = torch.zeros((0, *p.shape[1:]), dtype=p.dtype, device=p.device)
        elif "rows" not in st:  # dense state (a checkpoint of a dense run): every row is known
            st["rows"] = torch.arange(p.shape[0], device=p.device)
        self._add_rows(st, looked_up, p.shape[0])
        pos, _ = lookup_sorted(st["rows"], looked_up)
        st["step"] += 1
        t = float(st["step"])
        m, v = st["exp_avg"], st["exp_avg_sq"]
        m.mul_(b1).index_add_(0, pos, values, alpha=1 - b1)  # β₁m + (1−β₁)g, g zero off the looked-up rows
        v.mul_(b2).index_add_(0, pos, values * values, alpha=1 - b2)
        if wd:
            p.mul_(1 - lr * wd)
        step = v.sqrt().div_(math.sqrt(1 - b2**t)).add_(eps)  # one temporary the size of the known rows
        torch.div(m, step, out=step)
        p.index_add_(0, st["rows"], step, alpha=-lr / (1 - b1**t))

    @staticmethod
    def _add_rows(st: dict[str, Tensor], looked_up: Tensor, n_rows: int) -> None:
        """Rows of ``looked_up`` not yet in ``st["rows"]`` join it (sorted) with zero moments; past half of the
        ``n_rows``, every row joins (no more copies as rows come)."""
        known = st["rows"]
        _, hit = lookup_sorted(known, looked_up)
        if bool(hit.all()):
            return
        rows = torch.cat([known, looked_up[~hit]]).sort().values
        if 2 * rows.numel() > n_rows:
            rows = torch.arange(n_rows, device=known.device)
        st.update(remap_state({key: st[key] for key in ROW_KEYS}, known, rows))
        st["rows"] = rows
