"""Sparse parts trained with ``W + scatter(values)`` kept in the base weight (parts/sparse_binding.py): the same
numbers as the patched weight, bit for bit, through optimiser steps, reselections, weight decay, evaluation between
steps, loaded checkpoints and tied weights; the base comes back bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY_MODELS, RecordingObserver, hooked_steps, logits, tiny_inputs

import deltatune
from deltatune.methods import get_method
from deltatune.model import get_module

SPIEL = {"num_tunable": 600, "reselection_steps": 3, "accumulation_steps": 1}


def _run(arch: str, mapping: dict, steps: int = 5, weight_decay: float = 0.0, close: bool = True,
         method_name: str = "sparse"):
    model = TINY_MODELS[arch]().eval()  # no dropout: both runs see the same computation
    base = copy.deepcopy(model)
    config = deltatune.make_config(method_name, mapping)
    delta = deltatune.attach(model, config)
    method = get_method(method_name)
    opt = method.optimizer([p for p in model.parameters() if p.requires_grad], 1e-2, weight_decay, config)
    hooks = method.hooks(model, delta, config, opt, 40, 1)
    bound = {n: p.bound for n, p in delta.parts.items()}
    hooked_steps(model, opt, hooks, tiny_inputs(arch), 0, steps)
    if close:
        for h in hooks:
            h.close()
    return base, model, delta, bound, hooks


def _same_parts(a, b) -> None:
    assert set(a.parts) == set(b.parts)
    for name, part in a.parts.items():
        other = b.parts[name]
        assert torch.equal(part.indices, other.indices), name
        assert torch.equal(part.values, other.values), name


def _base_restored(model, base) -> None:
    own = {n.replace(".base.", "."): t for n, t in model.named_parameters() if not t.requires_grad}
    ref = dict(base.named_parameters())
    assert len(own) > len(ref) / 2
    for name, t in own.items():  # the frozen base (a task head trains)
        assert torch.equal(t, ref[name]), f"{name} not restored"


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("regrow_by", ["grad", "momentum"])
def test_bound_training_equals_the_patched_weight_bit_for_bit(arch: str, regrow_by: str) -> None:
    mapping = {**SPIEL, "regrow_by": regrow_by}
    base, model, delta, bound, hooks = _run(arch, mapping)
    _, ref_model, ref, ref_bound, ref_hooks = _run(arch, {**mapping, "in_place": False})
    assert all(bound.values()) and not any(ref_bound.values())
    assert len(hooks[-1].events) >= 2 and hooks[-1].events == ref_hooks[-1].events  # reselections moved entries
    assert max(float(p.values.detach().abs().max()) for p in delta.parts.values()) > 1e-3
    _same_parts(delta, ref)
    assert not any(p.bound for p in delta.parts.values())
    _base_restored(model, base)
    inputs = tiny_inputs(arch)
    assert torch.equal(logits(model, inputs), logits(ref_model, inputs))


def test_random_sparse_binds_under_torch_adamw() -> None:
    # torch's AdamW writes the values in place (their version moves on), as SparseAdamW does
    base, model, delta, bound, _ = _run("llama", {"num_tunable": 600}, method_name="random-sparse", weight_decay=0.1)
    _, _, ref, _, _ = _run("llama", {"num_tunable": 600, "in_place": False}, method_name="random-sparse",
                           weight_decay=0.1)
    assert all(bound.values()) and float(next(iter(delta.parts.values())).values.detach().abs().max()) > 1e-3
    _same_parts(delta, ref)
    _base_restored(model, base)


def test_lt_sft_masked_phase_binds_its_sparse_parts() -> None:
    mapping = {"density": 0.01, "full_steps": 2, "l1_sparse": 0.1}
    base, model, delta, _, hooks = _run("llama", mapping, method_name="lt-sft", steps=5, close=False)
    assert hooks[0].phase == 2 and all(p.kind == "sparse" and p.bound for p in delta.parts.values())
    for h in hooks:
        h.close()
    _, _, ref, _, _ = _run("llama", {**mapping, "in_place": False}, method_name="lt-sft", steps=5)
    assert max(float(p.values.detach().abs().max()) for p in delta.parts.values()) > 1e-3
    _same_parts(delta, ref)
    assert not any(p.bound for p in delta.parts.values())
    _base_restored(model, base)


def test_weight_decay_still_binds_a_sparse_part_and_decays_its_values() -> None:
    base, model, delta, bound, _ = _run("llama", SPIEL, weight_decay=0.1)
    _, _, ref, _, _ = _run("llama", {**SPIEL, "in_place": False}, weight_decay=0.1)
    assert all(bound.values())
    _same_parts(delta, ref)
    _base_restored(model, base)


def test_an_evaluation_between_steps_and_a_loaded_checkpoint_see_the_current_values() -> None:
    _, model, delta, _, hooks = _run("gpt2", SPIEL, steps=2, close=False)
    _, ref_model, ref, _, _ = _run("gpt2", {**SPIEL, "in_place": False}, steps=2, close=False)
    inputs = tiny_inputs("gpt2")
    assert all(p.bound for p in delta.parts.values())
    assert torch.equal(logits(model, inputs), logits(ref_model, inputs))  # no-grad forward, weight as it is
    gen = torch.Generator().manual_seed(0)
    for name, part in delta.parts.items():  # a resumed checkpoint writes another support and values into the part
        fresh = torch.randperm(part.numel_base, generator=gen)[:part.indices.numel()].sort().values
        assert not torch.equal(fresh.to(part.indices.dtype), part.indices)
        state = {"indices": fresh.to(part.indices.dtype), "values": torch.randn(part.values.shape, generator=gen)}
        for p in (part, ref.parts[name]):
            p.load_tensors(state, "test")
    assert torch.equal(logits(model, inputs), logits(ref_model, inputs))
    for name, part in delta.parts.items():  # while bound, the base weight is W + ΔW entry for entry
        w = get_module(model, name).weight.detach().reshape(-1)
        ref_w = get_module(ref_model, name).weight.detach().reshape(-1).clone()
        ref_w.index_add_(0, part.indices, part.values.detach())
        assert torch.equal(w, ref_w)
    for h in hooks:
        h.close()


def test_a_tied_weight_computes_with_the_bound_weight_once() -> None:
    # lm_head is a tied alias of wte: bound, it computes with the weight as it is (W + ΔW, not W + 2ΔW) and its
    # gradient reaches the values through the sampled entries (unbound: through the dense ΔW; the same sum, in
    # another order, so equal to rounding; no reselection, which would turn a rounding difference into another entry)
    mapping = {"num_tunable": 300, "targets": ["transformer.wte"], "regrow": False}
    base, model, delta, bound, _ = _run("gpt2", mapping, steps=4)
    _, ref_model, ref, _, _ = _run("gpt2", {**mapping, "in_place": False}, steps=4)
    assert bound == {"transformer.wte": True}
    part, ref_part = delta.parts["transformer.wte"], ref.parts["transformer.wte"]
    assert torch.equal(part.indices, ref_part.indices) and float(part.values.detach().abs().max()) > 1e-3
    assert torch.allclose(part.values, ref_part.values, rtol=1e-4, atol=1e-6)
    _base_restored(model, base)


def test_a_loop_of_your_own_leaves_the_sparse_part_unbound() -> None:
    from deltatune.train.integration import prepare

    model = TINY_MODELS["llama"]()
    delta = deltatune.attach(model, deltatune.make_config("sparse", SPIEL))
    _, schedule = prepare(model, delta, total_steps=4)
    assert not any(p.bound for p in delta.parts.values())
    schedule.close()


def test_a_tied_alias_of_the_same_kind_feeds_no_selection_window() -> None:
    from deltatune.parts import SparsePart
    from deltatune.parts.layers import LayerKind

    owner, alias = torch.nn.Embedding(20, 4), torch.nn.Embedding(20, 4)
    alias.weight = owner.weight  # tied, as BART's encoder and decoder embeddings share one table
    part = SparsePart((20, 4), torch.arange(0, 80, 3), LayerKind.EMBEDDING)
    ids = torch.tensor([[1, 5, 5, 7]])
    unbound = torch.autograd.grad(part.forward_shared(alias, LayerKind.EMBEDDING, ids).square().sum() +
                                  part(ids, owner).sum(), part.values)[0]
    observer = RecordingObserver()
    part.grad_observer = observer
    assert part.bind(owner, None)
    out = part.forward_shared(alias, LayerKind.EMBEDDING, ids).square().sum() + part(ids, owner).sum()
    assert torch.allclose(torch.autograd.grad(out, part.values)[0], unbound)
    assert [tuple(g.shape) for g in observer.dense] == [(20, 4)]  # the owner's own use only
    part.unbind()


def test_merging_a_bound_part_gives_the_base_back_first() -> None:
    from deltatune.parts import SparsePart

    module = torch.nn.Linear(6, 5)
    w0 = module.weight.detach().clone()
    part = SparsePart((5, 6), torch.arange(0, 30, 4))
    with torch.no_grad():
        part.values.uniform_(-1, 1)
    assert part.bind(module, None)
    part(torch.randn(2, 6), module)  # synced: the weight holds W₀ + ΔW
    part.merge_into(module)  # W₀ + ΔW once, not twice, and no later restore over it
    assert not part.bound
    want = w0.reshape(-1).index_add(0, part.indices, part.values.detach()).view(5, 6)
    assert torch.equal(module.weight.detach(), want)


def test_a_bound_part_sums_with_others_as_unbound_and_refuses_routing() -> None:
    """A bound part's ΔW is already in the module's weight: a sum with another part adds only its gradient term, so
    outputs and gradients equal the unbound ones; rows routed to other deltas would get it too: routing is refused."""
    from deltatune.errors import ConfigError
    from deltatune.layer import DeltaLayer
    from deltatune.parts import SparsePart
    from deltatune.routing import Routing, routed

    module = torch.nn.Linear(6, 5)
    layer = DeltaLayer(module)
    sparse, other = SparsePart((5, 6), torch.arange(0, 30, 4)), SparsePart((5, 6), torch.arange(1, 30, 5))
    with torch.no_grad():
        sparse.values.uniform_(-1, 1)
        other.values.uniform_(-1, 1)
    layer.add("s", sparse)
    layer.add("o", other)
    x = torch.randn(2, 6)

    def out_and_grads() -> tuple[torch.Tensor, ...]:
        out = layer(x)
        return (out.detach(), *torch.autograd.grad(out.square().sum(), [sparse.values, other.values]))

    unbound = out_and_grads()
    assert sparse.bind(module, None)
    for got, want in zip(out_and_grads(), unbound, strict=True):
        assert torch.allclose(got, want, atol=1e-6)
    with routed(Routing.per_row(["s", "o"])), pytest.raises(ConfigError, match="bound for in-place training"):
        layer(x)
    sparse.unbind()
    expected = torch.nn.functional.linear(x, module.weight + sparse.delta_weight() + other.delta_weight(), module.bias)
    assert torch.allclose(layer(x), expected, atol=1e-6)
