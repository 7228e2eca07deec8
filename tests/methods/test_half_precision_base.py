"""Deltas trained over a bf16 base in a loop of the user's own: parts are created in fp32 (PEFT's
``autocast_adapter_dtype``), every registered method trains, saves, loads and applies there, and small updates that
bf16 parameters would round away are kept."""

from __future__ import annotations

import tempfile

import pytest
import torch
from conftest import logits, tiny_inputs, tiny_llama
from test_matrix import train_steps

import deltatune
from deltatune.methods import METHODS

pytestmark = pytest.mark.usefixtures("one_thread")


def bf16_llama() -> torch.nn.Module:
    return tiny_llama(0).to(torch.bfloat16).eval()


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_trains_fp32_parts_over_a_bf16_base_and_applies_to_it(name) -> None:
    model, inputs = bf16_llama(), tiny_inputs("llama")
    config = deltatune.make_config(name, dict(next(iter(METHODS[name].examples.values()))))
    delta = deltatune.attach(model, config)
    assert {t.dtype for p in delta.parts.values() for t in p.parameters()} == {torch.float32}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}  # the base stays bf16
    before = logits(model, inputs)
    _, hooks = train_steps(model, delta, config, inputs, 3)
    for hook in hooks:
        hook.close()
    after = logits(model, inputs)
    assert torch.isfinite(after).all() and not torch.equal(after, before)
    with tempfile.TemporaryDirectory() as d:
        delta.save(f"{d}/delta")
        loaded = deltatune.Delta.load(f"{d}/delta")
    fresh = bf16_llama()
    deltatune.apply_delta(fresh, loaded)
    assert torch.equal(logits(fresh, inputs), after)


def test_lisa_creates_the_blocks_it_draws_later_in_fp32_too() -> None:
    model, inputs = bf16_llama(), tiny_inputs("llama")
    config = deltatune.make_config("lisa", {"layers": 1, "interval": 1, "train_outside": False})
    delta = deltatune.attach(model, config)
    first = set(delta.parts)
    _, hooks = train_steps(model, delta, config, inputs, 4, total=4)
    for hook in hooks:
        hook.close()
    assert set(delta.parts) > first  # blocks drawn after the first were created during training
    assert {t.dtype for p in delta.parts.values() for t in p.parameters()} == {torch.float32}


def test_small_updates_survive_in_fp32_parts_and_are_lost_in_bf16_ones() -> None:
    """LoRA's A starts uniform in ±1/√d_in (±0.125 here): an AdamW step of 1e-4 is below the rounding step of a bf16
    value above 2⁻⁵ or so, which holds for most entries; in fp32 every entry moves."""
    inputs = tiny_inputs("llama")
    moved = {}
    for autocast in (True, False):
        model = bf16_llama()
        config = deltatune.LoRAConfig(r=2, alpha=4.0)
        delta = deltatune.attach(model, config, autocast_dtype=autocast)
        a = {n: p.lora_A.detach().clone() for n, p in delta.parts.items()}
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
        train_steps(model, delta, config, inputs, 2, optimizer=optimizer)
        changed = [(p.lora_A.detach() != a[n]).float().mean() for n, p in delta.parts.items()]
        moved[autocast] = float(sum(changed) / len(changed))
    assert moved[True] > 0.99
    assert moved[False] < 0.5  # most updates rounded away
