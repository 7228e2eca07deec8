"""AdamW with a per-element step count ("age"), for dynamic-sparsity deltas (SpIEL's SftAdamW).

For each element: ``age ← age + 1``, ``m ← β₁m + (1−β₁)g``, ``v ← β₂v + (1−β₂)g²``,
``θ ← θ − η·λ·θ − η·(m / (1−β₁^age)) / (√(v / (1−β₂^age)) + ε)``.
A newly grown coordinate gets its own bias correction because its age restarts
(Ansell et al., 2024, §3; decoupled decay pulls the *delta* towards zero, i.e. towards the base).
"""

from __future__ import annotations

import torch
from torch import Tensor


class SparseAdamW(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    def state_of(self, p: Tensor) -> dict[str, Tensor]:
        """Moments and age of ``p``, created (zeros) on first use."""
        st = self.state[p]
        if not st:
            st["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
            st["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
            st["age"] = torch.zeros_like(p, dtype=torch.float32)
        return st

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.float()
                st = self.state_of(p)
                m, v, age = st["exp_avg"], st["exp_avg_sq"], st["age"]
                age.add_(1)
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                bc1 = 1 - torch.pow(b1, age)
                bc2 = 1 - torch.pow(b2, age)
                update = (m / bc1) / ((v / bc2).sqrt_().add_(eps))
                p32 = p.float()
                if wd:
                    p32.mul_(1 - lr * wd)
                p32.add_(update, alpha=-lr)
                p.copy_(p32.to(p.dtype))
        return loss
