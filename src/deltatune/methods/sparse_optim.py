"""AdamW with a per-element step count ("age"), for dynamic-sparsity deltas (SpIEL's SftAdamW).

For each trained element: ``age ← age + 1``, ``m ← m + (1−β₁)(g − m)`` (= ``β₁m + (1−β₁)g``, as ``lerp``),
``v ← β₂v + (1−β₂)g²``,
``θ ← θ − η·λ·θ − η·(m / (1−β₁^age)) / (√(v / (1−β₂^age)) + ε)``.
A newly grown coordinate gets its own bias correction because its age restarts
(Ansell et al., 2024, §3; decoupled decay pulls the *delta* towards zero, i.e. towards the base).

A parameter may train only a subset of its elements (:meth:`SparseAdamW.set_active`: LIFT's mask, SaRA's
progressive reselection): its moments and ages then exist only for those positions, and neither the Adam step
nor the weight decay touches any other element.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from deltatune.errors import ConfigError
from deltatune.parts.sparse_grad import lookup_sorted

STATE_KEYS = ("exp_avg", "exp_avg_sq", "age")


def remap_state(state: dict[str, Tensor], old_keys: Tensor, new_keys: Tensor) -> dict[str, Tensor]:
    """Each state tensor of ``state`` (one entry, or one row, per key) re-indexed from the sorted key set
    ``old_keys`` to the sorted ``new_keys``: an element whose key is in both keeps its moments and age; a new key
    starts at zero (age 0, so its bias correction starts afresh)."""
    out = {}
    pos, hit = lookup_sorted(old_keys, new_keys)
    for key, old in state.items():
        fresh = old.new_zeros((new_keys.numel(), *old.shape[1:]), device=new_keys.device)
        if old_keys.numel():
            fresh[hit] = old[pos[hit]].to(fresh.device)
        out[key] = fresh
    return out


def run_closure(closure: Callable[[], Any] | None) -> Any:
    """An optimiser step's ``closure`` (re-evaluating the loss) called with gradients on, as torch's optimisers do."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class SparseAdamW(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        #: ``{parameter: sorted flat positions}`` of parameters that train only some elements
        self.active: dict[Tensor, Tensor] = {}
        #: ``{(β, device): 1 − β^a for a = 0, 1, …}`` (:meth:`bias_corrections`)
        self._bias_tables: dict[tuple[float, torch.device], Tensor] = {}

    def bias_corrections(self, ages: list[Tensor], betas: tuple[float, float]) -> tuple[list[Tensor], list[Tensor]]:
        """``1 − β₁^age`` and ``1 − β₂^age`` for each tensor of ``ages`` (whole numbers, fp32), shaped like it.

        Read from a table of ``1 − β^a`` computed in float64 (as AdamW computes its scalar ``1 − β^step``) and rounded
        once to fp32, grown to the largest age seen: two gathers over all the ages at once instead of two elementwise
        ``pow`` per tensor, which took three quarters of the optimiser step (scalar base, tensor exponent: a slow kernel
        on CPU; an ad hoc ``torch.profiler`` run over MiniLM's 36 SpIEL parts)."""
        if len({a.device for a in ages}) > 1:  # one table per device: each device's ages on their own
            out1: list[Tensor] = [torch.empty(0)] * len(ages)
            out2 = list(out1)
            for device in {a.device for a in ages}:
                at = [i for i, a in enumerate(ages) if a.device == device]
                for i, bc1, bc2 in zip(at, *self.bias_corrections([ages[i] for i in at], betas), strict=True):
                    out1[i], out2[i] = bc1, bc2
            return out1, out2
        flat = torch.cat([a.reshape(-1) for a in ages]).long() if ages else torch.zeros(0, dtype=torch.long)
        top = int(flat.max()) if flat.numel() else 0
        out = []
        for beta in betas:
            key = (float(beta), flat.device)
            table = self._bias_tables.get(key)
            if table is None or table.numel() <= top:
                size = max(top + 1, 2 * table.numel() if table is not None else 1024)
                powers = torch.full((size,), float(beta), dtype=torch.float64, device=flat.device)
                powers = powers.pow(torch.arange(size, dtype=torch.float64, device=flat.device))
                table = self._bias_tables[key] = (1 - powers).float()
            out.append([bc.view_as(a) for bc, a in
                        zip(table.index_select(0, flat).split([a.numel() for a in ages]), ages, strict=True)])
        return out[0], out[1]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's, but the moments and ages of a bf16 or fp16 parameter come back in fp32, as :meth:`state_of` keeps
        them (torch casts every floating state tensor to its parameter's dtype, which the step then refuses)."""
        super().load_state_dict(state_dict)
        ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for i, p in zip(ids, params, strict=True):
            saved, st = state_dict["state"].get(i), self.state.get(p)
            if not saved or not st:
                continue
            for key in STATE_KEYS:
                if key in saved and st[key].dtype != saved[key].dtype:
                    st[key] = saved[key].to(device=p.device, dtype=torch.float32, copy=True)

    def state_of(self, p: Tensor) -> dict[str, Tensor]:
        """Moments and age of ``p`` (one entry per trained element), created (zeros) on first use."""
        st = self.state[p]
        if not st:
            n = self.active[p].numel() if p in self.active else p.numel()
            for key in STATE_KEYS:
                st[key] = torch.zeros(n, dtype=torch.float32, device=p.device) if p in self.active \
                    else torch.zeros_like(p, dtype=torch.float32)
        return st

    def set_active(self, p: Tensor, positions: Tensor | None, old_keys: Tensor | None = None,
                   new_keys: Tensor | None = None) -> None:
        """Train only ``p.flatten()[positions]`` (sorted, distinct; ``None``: every element).

        Existing state is carried over by key: ``old_keys`` names the currently trained elements and ``new_keys``
        the ones in ``positions`` (e.g. flat indices into the base weight, stable while ``p`` is re-laid out);
        without keys the positions themselves are the keys.  Elements that stop training lose their state."""
        if positions is not None:
            positions = positions.to(device=p.device, dtype=torch.int64)
            if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= p.numel()):
                raise ConfigError(f"optimizer: active positions out of range for a parameter of {p.numel()} "
                                  "elements")
        st = self.state.get(p)
        if st:
            before = self.active.get(p)
            if old_keys is None:
                old_keys = before if before is not None else torch.arange(p.numel(), device=p.device)
            if new_keys is None:
                new_keys = positions if positions is not None else torch.arange(p.numel(), device=p.device)
            moved = remap_state({k: st[k].reshape(-1) for k in STATE_KEYS}, old_keys.to(p.device),
                                new_keys.to(p.device))
            for k in STATE_KEYS:
                st[k] = moved[k] if positions is not None else moved[k].view_as(p)
        if positions is None:
            self.active.pop(p, None)
        else:
            self.active[p] = positions

    def replace_param(self, old: Tensor, new: Tensor) -> None:
        """Put ``new`` in ``old``'s place in its parameter group, keeping its state and active positions (a
        tensor re-laid out to another size must be a new leaf: autograd keeps a leaf's shape)."""
        for group in self.param_groups:
            group["params"] = [new if q is old else q for q in group["params"]]
        if old in self.state:
            self.state[new] = self.state.pop(old)
        if old in self.active:
            self.active[new] = self.active.pop(old)

    def forget(self, p: Tensor) -> None:
        """Drop every state of ``p`` (it stopped training)."""
        self.state.pop(p, None)
        self.active.pop(p, None)

    def state_bytes(self) -> int:
        """Bytes of optimiser state held now."""
        return sum(t.numel() * t.element_size() for st in self.state.values() for t in st.values()
                   if isinstance(t, Tensor))

    @torch.no_grad()
    def step(self, closure=None):
        loss = run_closure(closure)
        for group in self.param_groups:
            whole, partial = [], []
            for p in group["params"]:
                if p.grad is not None:
                    plain = self.active.get(p) is None and p.dtype == torch.float32 and p.grad.dtype == torch.float32
                    (whole if plain else partial).append(p)
            if whole:
                self._step_whole(whole, group)
            for p in partial:
                self._step_one(p, group)
        return loss

    def _step_whole(self, params: list[Tensor], group: dict) -> None:
        """The update for fp32 parameters that train every element, in place, as one ``torch._foreach_*`` call per
        operation across all of them (the per-parameter loop's dispatch cost, dozens of parameters × a dozen
        operations); the same arithmetic, operation for operation, as
        :meth:`_step_one` (bit for bit on CPU, where foreach runs the same per-tensor kernels; CUDA's fused foreach
        kernels may round differently, not checked: no GPU was lent to this work)."""
        b1, b2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        grads = [p.grad for p in params]
        states = [self.state_of(p) for p in params]
        m, v, age = ([st[key] for st in states] for key in STATE_KEYS)
        torch._foreach_add_(age, 1)
        torch._foreach_lerp_(m, grads, 1 - b1)
        torch._foreach_mul_(v, b2)
        torch._foreach_addcmul_(v, grads, grads, value=1 - b2)
        bc1, bc2 = self.bias_corrections(age, (b1, b2))
        update = torch._foreach_div(m, bc1)
        denom = torch._foreach_div(v, bc2)
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, eps)
        if wd:
            torch._foreach_mul_(params, 1 - lr * wd)
        torch._foreach_addcdiv_(params, update, denom, value=-lr)

    def _step_one(self, p: Tensor, group: dict) -> None:
        """The update of one parameter: a low-precision one through an fp32 copy, a partly trained one
        (:meth:`set_active`) at its active positions only."""
        b1, b2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        positions = self.active.get(p)
        g = p.grad.float() if positions is None else p.grad.reshape(-1).index_select(0, positions).float()
        st = self.state_of(p)
        m, v, age = st["exp_avg"], st["exp_avg_sq"], st["age"]
        age.add_(1)
        m.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        (bc1,), (bc2,) = self.bias_corrections([age], (b1, b2))
        p32 = p.float() if positions is None else p.reshape(-1).index_select(0, positions).float()
        if wd:
            p32.mul_(1 - lr * wd)
        p32.addcdiv_(m / bc1, (v / bc2).sqrt_().add_(eps), value=-lr)
        if positions is None:
            p.copy_(p32.to(p.dtype))
        else:
            p.view(-1).index_copy_(0, positions, p32.to(p.dtype))
