"""bf16 autocast (CPU) with every registered method: a training step under ``torch.autocast`` runs, its loss is
close to the fp32 step's, and every trainable tensor gets a finite gradient in its own (fp32) dtype."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_MODELS, tiny_inputs

import deltatune
from deltatune.methods import METHODS

ARCHS = ("llama", "gpt2", "bert")
CASES = [(name, arch) for name in sorted(METHODS) for arch in ARCHS]
pytestmark = pytest.mark.usefixtures("one_thread")


def _step(name: str, arch: str, autocast: bool) -> tuple[float, dict[str, torch.Tensor]]:
    model = TINY_MODELS[arch]()
    delta = deltatune.attach(model, deltatune.make_config(name, dict(METHODS[name].examples[""])))
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for part in delta.parts.values():
            for p in part.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.01)
    model.eval()  # no dropout: the two steps differ only by precision
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(**tiny_inputs(arch))
        aux = delta.aux_loss()
        loss = out.loss if aux is None else out.loss + aux
    loss.float().backward()
    return float(loss), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(("name", "arch"), CASES, ids=[f"{n}-{a}" for n, a in CASES])
def test_a_bf16_autocast_step(name: str, arch: str) -> None:
    ref_loss, _ = _step(name, arch, False)
    loss, grads = _step(name, arch, True)
    assert loss == pytest.approx(ref_loss, rel=0.05)
    assert grads
    for n, g in grads.items():
        assert g is not None, f"{n}: no gradient under autocast"
        assert g.dtype == torch.float32 and bool(torch.isfinite(g).all()), n
