"""Gradient checkpointing works with every registered method: one training step with
``gradient_checkpointing_enable()`` gives the same loss and the same gradients on every trainable tensor
as without it (dropout off, so recomputation is exact)."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_MODELS, tiny_inputs

import deltatune
from deltatune.methods import METHODS

ARCHS = ("llama", "gpt2", "bert")
CASES = [(name, arch) for name in sorted(METHODS) for arch in ARCHS]
pytestmark = pytest.mark.usefixtures("one_thread")


def _step(name: str, arch: str, checkpointing: bool) -> tuple[float, dict[str, torch.Tensor]]:
    model = TINY_MODELS[arch]()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    delta = deltatune.attach(model, deltatune.make_config(name, dict(METHODS[name].examples[""])))
    with torch.no_grad():  # a non-trivial delta, so every gradient path is exercised
        g = torch.Generator().manual_seed(1)
        for part in delta.parts.values():
            for p in part.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.01)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    out = model(**tiny_inputs(arch))
    aux = delta.aux_loss()
    loss = out.loss if aux is None else out.loss + aux
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return float(loss), grads


@pytest.mark.parametrize(("name", "arch"), CASES, ids=[f"{n}-{a}" for n, a in CASES])
def test_gradient_checkpointing_gives_the_same_step(name: str, arch: str) -> None:
    plain_loss, plain = _step(name, arch, False)
    ckpt_loss, ckpt = _step(name, arch, True)
    assert ckpt_loss == pytest.approx(plain_loss, abs=1e-6)
    assert set(ckpt) == set(plain) and plain
    for n, g in plain.items():
        assert torch.allclose(ckpt[n], g, atol=1e-6), n
