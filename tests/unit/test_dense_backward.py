"""The dense (full fine-tuning) part on Linear/Conv1D: the gradients of autograd through ``W + ΔW``, without the
``W + ΔW`` copy that autograd would keep alive for the backward."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call
from transformers.pytorch_utils import Conv1D

from deltatune.parts.dense import DensePart, _DenseLinearFunction
from deltatune.parts.layers import layer_kind


def _module(kind: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    module = nn.Linear(6, 5) if kind == "linear" else Conv1D(5, 6)
    return module.to(dtype).requires_grad_(False)


def _randomised(module: nn.Module, names: list[str]) -> DensePart:
    part = DensePart.for_module(module, names=names)
    with torch.no_grad():
        for p in part.parameters():
            p.normal_(0, 0.1)
    return part


def _reference(module: nn.Module, part: DensePart, x: torch.Tensor) -> torch.Tensor:
    own = dict(module.named_parameters(recurse=False))
    return functional_call(module, {k: own[k] + part.delta_for(k) for k in part.shapes}, (x,))


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("names", [["weight", "bias"], ["weight"]])
def test_outputs_and_gradients_equal_autograd_through_the_sum(kind, names):
    module = _module(kind)
    part = _randomised(module, names)
    x = torch.randn(3, 4, 6, requires_grad=True)
    w = torch.linspace(-1, 1, 5)
    out = part(x, module)
    (out * w).sum().backward()
    got = [x.grad.clone()] + [p.grad.clone() for p in part.parameters()]
    x.grad = None
    for p in part.parameters():
        p.grad = None
    ref_out = _reference(module, part, x)
    (ref_out * w).sum().backward()
    ref = [x.grad] + [p.grad for p in part.parameters()]
    assert torch.allclose(out, ref_out, atol=1e-6)
    for a, b in zip(got, ref, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_no_weight_sized_copy_is_saved_for_backward(kind):
    module = _module(kind)
    part = _randomised(module, ["weight", "bias"])
    x = torch.randn(2, 3, 6, requires_grad=True)
    allowed = {t.untyped_storage().data_ptr() for t in (x, module.weight, part.delta_for("weight"))}
    weight_sized = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.numel() == module.weight.numel() and t.untyped_storage().data_ptr() not in allowed:
            weight_sized.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        part(x, module).sum().backward()
        assert not weight_sized
        _reference(module, part, x).sum().backward()  # the check can fail: autograd through the sum saves it
    assert weight_sized


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_gradcheck_float64(kind):
    module = _module(kind, torch.float64)
    part = _randomised(module, ["weight", "bias"]).double()
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    dw, db = part.delta_for("weight"), part.delta_for("bias")
    f = lambda x_, dw_, db_: _DenseLinearFunction.apply(x_, dw_, module.weight, module.bias + db_,  # noqa: E731
                                                        layer_kind(module))
    assert torch.autograd.gradcheck(f, (x, dw.detach().clone().requires_grad_(True),
                                        db.detach().clone().requires_grad_(True)), eps=1e-6, atol=1e-8)
    assert torch.equal(part(x, module), f(x, dw, db))  # the part runs exactly this function


def test_frozen_delta_gets_no_gradient_and_autocast_matches_the_native_dtype():
    module = _module("linear")
    part = _randomised(module, ["weight", "bias"])
    part.requires_grad_(False)
    x = torch.randn(4, 6, requires_grad=True)
    part(x, module).sum().backward()
    assert x.grad is not None and all(p.grad is None for p in part.parameters())
    part.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = part(x, module)
        native = module(x)
    assert out.dtype == native.dtype == torch.bfloat16
    out.float().sum().backward()  # ∂/∂ΔW of Σ x(W+ΔW)ᵀ is 1ᵀx, exact from the bf16 output's all-ones gradient
    assert torch.allclose(part.delta_for("weight").grad, torch.ones(5, 4) @ x.detach(), rtol=1e-5, atol=1e-5)
