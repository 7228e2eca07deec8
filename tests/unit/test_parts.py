"""Part math against hand-computed values and dense autograd references."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from deltatune.errors import ShapeMismatch
from deltatune.parts import DensePart, LoRAPart, SparsePart
from deltatune.parts.layers import LayerKind
from deltatune.parts.lora import lora_scale
from deltatune.parts.sparse import scatter_delta


def test_lora_scale_and_delta_hand_computed():
    assert lora_scale(16, 4, rslora=False) == 4.0
    assert lora_scale(16, 4, rslora=True) == 8.0
    part = LoRAPart(2, 2, rank=1, scale=2.0)
    with torch.no_grad():
        part.lora_A.copy_(torch.tensor([[1.0, 2.0]]))
        part.lora_B.copy_(torch.tensor([[3.0], [4.0]]))
    # ΔW = s·B·A = 2·[[3,6],[4,8]]
    assert torch.equal(part.delta_weight(), torch.tensor([[6.0, 12.0], [8.0, 16.0]]))


@pytest.mark.parametrize("kind", ["linear", "conv1d", "embedding"])
def test_lora_forward_equals_merged_weight(kind):
    torch.manual_seed(0)
    if kind == "linear":
        base, x = nn.Linear(5, 3), torch.randn(2, 4, 5)
        part = LoRAPart(5, 3, 2, 0.5, LayerKind.LINEAR)
    elif kind == "conv1d":
        base, x = Conv1D(3, 5), torch.randn(2, 4, 5)
        nn.init.normal_(base.weight)
        part = LoRAPart(5, 3, 2, 0.5, LayerKind.CONV1D)
    else:
        base, x = nn.Embedding(11, 3), torch.randint(0, 11, (2, 4))
        part = LoRAPart(11, 3, 2, 0.5, LayerKind.EMBEDDING)
    with torch.no_grad():
        part.lora_A.normal_()
        part.lora_B.normal_()
    attached = part(x, base)
    part.merge_into(base)
    assert torch.allclose(base(x), attached, atol=1e-5)
    part.unmerge_from(base)
    assert torch.allclose(part(x, base), attached, atol=1e-5)


def test_lora_mixed_forward_matches_per_row():
    torch.manual_seed(0)
    base = nn.Linear(6, 4)
    parts = [LoRAPart(6, 4, r, 1.5) for r in (1, 3)]
    for p in parts:
        with torch.no_grad():
            p.lora_B.normal_()
    x = torch.randn(5, 2, 6)
    names = [parts[0], None, parts[1]]
    row_ids = torch.tensor([0, 1, 2, 2, 0])
    out = LoRAPart.mixed_forward(x, base, names, row_ids)
    for i, pid in enumerate(row_ids.tolist()):
        ref = base(x[i : i + 1]) if names[pid] is None else names[pid](x[i : i + 1], base)
        assert torch.allclose(out[i : i + 1], ref, atol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "conv1d", "embedding"])
def test_sparse_autograd_matches_dense_reference(kind):
    """∂L/∂values equals the dense weight gradient gathered at the indices; ∂L/∂x matches too."""
    torch.manual_seed(0)
    if kind == "linear":
        base, x = nn.Linear(6, 5), torch.randn(3, 4, 6, requires_grad=True)
    elif kind == "conv1d":
        base, x = Conv1D(5, 6), torch.randn(3, 4, 6, requires_grad=True)
        nn.init.normal_(base.weight)
    else:
        base, x = nn.Embedding(9, 5), torch.randint(0, 9, (3, 4))
    base.requires_grad_(False)
    idx = torch.randperm(base.weight.numel())[:7]
    part = SparsePart(tuple(base.weight.shape), idx, LayerKind(kind))
    with torch.no_grad():
        part.values.normal_()
    out = part(x, base)
    (out.square().sum()).backward()

    dense_w = (base.weight + scatter_delta(base.weight.shape, part.indices, part.values.detach())).requires_grad_()
    x_ref = x.detach().clone().requires_grad_() if kind != "embedding" else x
    if kind == "linear":
        ref = torch.nn.functional.linear(x_ref, dense_w, base.bias)
    elif kind == "conv1d":
        ref = x_ref @ dense_w + base.bias
    else:
        ref = torch.nn.functional.embedding(x_ref, dense_w)
    ref.square().sum().backward()
    assert torch.allclose(out, ref, atol=1e-5)
    assert torch.allclose(part.values.grad, dense_w.grad.reshape(-1)[part.indices], atol=1e-4)
    if kind != "embedding":
        assert torch.allclose(x.grad, x_ref.grad, atol=1e-4)
    assert base.weight.grad is None


def test_sparse_merge_is_exact_scatter():
    base = nn.Linear(4, 3, bias=False)
    before = base.weight.detach().clone()
    part = SparsePart((3, 4), torch.tensor([0, 5, 11]))
    with torch.no_grad():
        part.values.copy_(torch.tensor([1.0, -2.0, 3.0]))
    part.merge_into(base)
    diff = base.weight.detach() - before
    assert diff.reshape(-1)[[0, 5, 11]].tolist() == pytest.approx([1.0, -2.0, 3.0])
    assert int((diff != 0).sum()) == 3
    part.unmerge_from(base)
    assert torch.allclose(base.weight, before, atol=1e-7)


def test_dense_part_handles_any_module():
    torch.manual_seed(0)
    ln = nn.LayerNorm(4)
    part = DensePart.for_module(ln)
    with torch.no_grad():
        for p in part.parameters():
            p.normal_()
    x = torch.randn(2, 4)
    attached = part(x, ln)
    part.merge_into(ln)
    assert torch.allclose(ln(x), attached, atol=1e-6)


def test_sparse_indices_are_sorted_and_state_roundtrips():
    part = SparsePart((4, 4), torch.tensor([9, 2, 14]))
    assert part.indices.tolist() == [2, 9, 14]
    with torch.no_grad():
        part.values.copy_(torch.tensor([1.0, 2.0, 3.0]))
    shuffled = {"indices": torch.tensor([14, 2, 9]), "values": torch.tensor([3.0, 1.0, 2.0])}
    with pytest.raises(ShapeMismatch, match="not sorted"):  # stored indices are never silently re-sorted
        SparsePart.from_state(shuffled, part.meta())
    back = SparsePart.from_state(part.state(), part.meta())
    assert back.indices.tolist() == [2, 9, 14]
    assert back.values.tolist() == [1.0, 2.0, 3.0]
    assert math.isclose(back.nbytes, 3 * 4 + 3 * 4)  # int32 indices, fp32 values
