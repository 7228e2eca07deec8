"""The default optimiser of methods with dense state: torch's fused AdamW where it can run, the same update."""

from __future__ import annotations

import torch

from deltatune import get_method, make_config
from deltatune.methods.lt_sft import LTSFTAdamW
from deltatune.methods.registry import adamw, unwrap_optimizer


def test_fused_on_cpu_tensors_and_groups_and_unfused_elsewhere() -> None:
    p = torch.nn.Parameter(torch.randn(4))
    assert adamw([p], 1e-3, 0.0).defaults["fused"] is True
    groups = [{"params": [p]}, {"params": [torch.nn.Parameter(torch.randn(2))], "lr": 1e-2}]
    opt = adamw(groups, 1e-3, 0.1)
    assert opt.defaults["fused"] is True and [g["lr"] for g in opt.param_groups] == [1e-3, 1e-2]
    model = torch.nn.Linear(3, 2)  # a group whose params are a generator is read once for the check, not emptied
    opt = adamw([{"params": model.parameters()}, {"params": p}], 1e-3, 0.0)
    assert opt.defaults["fused"] is True and [len(g["params"]) for g in opt.param_groups] == [2, 1]
    assert len(LTSFTAdamW([{"params": model.parameters()}]).param_groups[0]["params"]) == 2
    meta = torch.nn.Parameter(torch.empty(3, device="meta"))
    assert not adamw([meta], 1e-3, 0.0).defaults["fused"]
    assert get_method("lora").optimizer([p], 1e-3, 0.0, make_config("lora", {})).defaults["fused"] is True
    assert LTSFTAdamW(iter([p])).defaults["fused"] is True  # LT-SFT's own AdamW (L1 pull) follows the same rule


def test_the_fused_update_is_adamw_up_to_rounding() -> None:
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(64, 32))
    b = torch.nn.Parameter(a.detach().clone())
    start = a.detach().clone()
    fused, loop = adamw([a], 1e-2, 0.1), torch.optim.AdamW([b], lr=1e-2, weight_decay=0.1)
    assert not loop.defaults["fused"]
    for _ in range(20):
        g = torch.randn(64, 32)
        a.grad, b.grad = g.clone(), g.clone()
        fused.step()
        loop.step()
    assert (a.detach() - start).abs().max() > 0.05  # 20 steps of lr 1e-2 moved it
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_unwrap_optimizer_sees_through_wrappers_that_are_optimizers_themselves() -> None:
    class Wrapper(torch.optim.Optimizer):  # accelerate's AcceleratedOptimizer: an Optimizer holding `.optimizer`
        def __init__(self, inner) -> None:
            self.optimizer = inner

    inner = adamw([torch.nn.Parameter(torch.randn(2))], 1e-3, 0.0)
    assert unwrap_optimizer(Wrapper(Wrapper(inner))) is inner and unwrap_optimizer(inner) is inner
