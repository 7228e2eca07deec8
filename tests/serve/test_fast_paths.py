"""The serving fast paths: one-token-per-row (decode) batches of LoRA/DoRA run the concatenated-rank kernel, a
mixed batch of several kinds runs the base module once and each kind onto its own rows (sparse through a cached
CSR update), per-layer plans are kept per routing context and rebuilt when a layer's parts change, and a delta whose
modules are already wrapped attaches without waiting for the engine's step lock."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from conftest import randomize_delta, tiny_llama

import deltatune
from deltatune.layer import DeltaLayer
from deltatune.methods import make_config
from deltatune.model import attach_parts
from deltatune.routing import Routing, routed
from deltatune.serve import DeltaStore

pytestmark = pytest.mark.usefixtures("one_thread")

KINDS = {"lora2": ("lora", {"r": 2, "alpha": 4.0}), "lora8": ("lora", {"r": 8, "alpha": 8.0}),
         "sparse": ("sparse", {"num_tunable": 777, "regrow": False}), "dora": ("dora", {"r": 2, "alpha": 4.0}),
         "ia3": ("ia3", {}), "adapter": ("adapter", {"bottleneck": 8})}


@pytest.fixture(scope="module")
def deltas():
    return {name: randomize_delta(tiny_llama(), make_config(method, cfg), seed=i + 1, std=0.3)
            for i, (name, (method, cfg)) in enumerate(KINDS.items())}


def _model(deltas):
    model = tiny_llama()
    for name, d in deltas.items():
        deltatune.apply_delta(model, d, name=name)
        for layer in [m for m in model.modules() if isinstance(m, DeltaLayer)]:
            if name in layer.active:
                layer.active.remove(name)  # attached inactive, as the store does
    return model


def _alone(deltas, name, ids):
    model = tiny_llama()
    if name is not None:
        deltatune.apply_delta(model, deltas[name])
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("seq", [1, 5], ids=["decode", "prefill"])
def test_every_kind_in_one_batch_equals_each_row_alone(deltas, seq):
    """Each row of a batch mixing all kinds (and a base row) equals the row run alone with its delta applied;
    one-token rows take the decode kernels, longer ones the prefill paths."""
    names = [None, *KINDS, "lora2"]
    ids = torch.randint(1, 128, (len(names), seq), generator=torch.Generator().manual_seed(3))
    model = _model(deltas)
    with torch.no_grad(), routed(Routing.per_row(names)):
        mixed = model(input_ids=ids).logits
    for i, name in enumerate(names):
        alone = _alone(deltas, name, ids[i:i + 1])
        assert (mixed[i:i + 1] - alone).abs().max().item() <= 1e-5, (name, seq)


def test_decode_lora_concat_matches_each_part(deltas):
    """The concatenated-rank kernel gives each row its own LoRA's ``s (x Aᵀ) Bᵀ`` and leaves base rows alone."""
    from deltatune.parts.lora import LoRAPart

    model = _model({k: deltas[k] for k in ("lora2", "lora8")})
    layer = model.model.layers[0].self_attn.q_proj
    parts = [layer.parts["lora2"], None, layer.parts["lora8"]]
    x = torch.randn(3, 1, 64, generator=torch.Generator().manual_seed(0))
    cache: dict = {}
    with torch.no_grad():
        got = LoRAPart.mixed_forward(x, layer.base, parts, torch.tensor([0, 1, 2]), cache)
        want = torch.cat([parts[0](x[0:1], layer.base), layer.base(x[1:2]), parts[2](x[2:3], layer.base)])
    assert ("concat", torch.float32) in cache
    assert torch.equal(got[1], layer.base(x)[1])  # exact zeros added to the base row
    assert (got - want).abs().max().item() <= 1e-6


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("seq", [1, 4], ids=["decode", "prefill"])
def test_dora_rows_join_the_lora_pass_on_a_biased_layer(seq, kind):
    """DoRA is LoRA's family: one pass (one kind in the layer's plan) gives each DoRA row ``g ⊙ (x Wᵀ) + b +
    g ⊙ s (x Aᵀ) Bᵀ`` and each LoRA row its own term, on a layer with a bias — values and gradients equal to each
    part's own forward on its row."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    from deltatune.parts.dora import DoRAPart
    from deltatune.parts.layers import LayerKind
    from deltatune.parts.lora import LoRAPart

    torch.manual_seed(0)
    lin = nn.Linear(16, 12) if kind == "linear" else Conv1D(12, 16)  # GPT-2's Conv1D(nf=out, nx=in), bias too
    with torch.no_grad():
        lin.bias.normal_()
    layer_kind = LayerKind.LINEAR if kind == "linear" else LayerKind.CONV1D
    parts = {"a": LoRAPart(16, 12, 2, 2.0, layer=layer_kind), "b": LoRAPart(16, 12, 5, 0.5, layer=layer_kind),
             "d": DoRAPart(16, 12, 3, 1.5, layer=layer_kind)}
    parts["d"].init_from_base(lin)
    layer = DeltaLayer(lin)
    with torch.no_grad():
        for name, part in parts.items():
            for t in part.parameters():
                t.add_(torch.randn_like(t) * 0.3)
            layer.add(name, part, activate=False)
    names = ["a", None, "d", "b", "d"]
    x = torch.randn(len(names), seq, 16)
    routing = Routing.per_row(names)
    with routed(routing):
        got = layer(x)
    assert len(routing.plans[id(layer)].kinds) == 1  # LoRA and DoRA rows in one pass
    want = torch.cat([lin(x[i:i + 1]) if n is None else parts[n](x[i:i + 1], lin) for i, n in enumerate(names)])
    assert (got - want).abs().max().item() <= 1e-5
    grads = torch.autograd.grad(got.square().sum(), [parts["d"].magnitude, parts["d"].lora_B])
    wants = torch.autograd.grad(want.square().sum(), [parts["d"].magnitude, parts["d"].lora_B])
    assert all((g - w).abs().max().item() <= 1e-4 for g, w in zip(grads, wants, strict=True))
    with torch.no_grad(), routed(Routing.per_row(names)):  # no gradient: the prepared (kept) factors and gains
        assert (layer(x) - want).abs().max().item() <= 1e-5


def test_sparse_rows_use_a_cached_csr_update(deltas):
    model = _model({"sparse": deltas["sparse"], "lora2": deltas["lora2"]})
    routing = Routing.per_row(["sparse", "lora2", None])
    ids = torch.randint(1, 128, (3, 1), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), routed(routing):
        model(input_ids=ids)
    prepared = [v[("updates", torch.float32)] for k, v in routing.cache.items() if k[1] == "sparse"]
    assert prepared and all(step[1].layout == torch.sparse_csr for steps in prepared for step in steps)


def test_prepared_updates_outlive_the_routing_and_follow_every_change(deltas, monkeypatch):
    """A sparse part's CSR update and a DoRA part's column scales are built once for all routing contexts, and built
    again when the part's tensors — or, for DoRA, the base weight — change in place."""
    import copy

    from deltatune.parts import dora
    from deltatune.parts.sparse import SparsePart

    model = _model({k: copy.deepcopy(deltas[k]) for k in ("sparse", "dora")})
    layers = [m for m in model.modules() if isinstance(m, DeltaLayer)]
    names = ["sparse", "dora", None]
    ids = torch.randint(1, 128, (3, 1), generator=torch.Generator().manual_seed(5))
    built = {"sparse": 0, "dora": 0}
    sparse_updates, scale = SparsePart.updates, dora.column_scale
    monkeypatch.setattr(SparsePart, "updates", lambda *a, **k: (built.__setitem__("sparse", built["sparse"] + 1),
                                                                sparse_updates(*a, **k))[1])
    monkeypatch.setattr(dora, "column_scale", lambda *a: (built.__setitem__("dora", built["dora"] + 1), scale(*a))[1])

    def mixed() -> torch.Tensor:
        with torch.no_grad(), routed(Routing.per_row(names)):
            return model(input_ids=ids).logits

    def alone(i: int) -> torch.Tensor:  # each part's own forward (nothing kept), the row on its own
        for layer in layers:
            layer.active = [names[i]] if names[i] in layer.parts else []
        with torch.no_grad():
            out = model(input_ids=ids[i:i + 1]).logits
        for layer in layers:
            layer.active = []
        return out

    first = mixed()
    once = dict(built)
    assert once["sparse"] > 0 and once["dora"] > 0
    assert torch.equal(mixed(), first) and built == once  # a new routing context reuses what was built
    with torch.no_grad():
        for layer in layers:
            if "sparse" in layer.parts:
                layer.parts["sparse"].values.mul_(3.0)
        model.model.layers[0].self_attn.q_proj.base.weight.mul_(1.5)  # a DoRA module's base weight
    changed = mixed()
    assert built["sparse"] > once["sparse"] and built["dora"] > once["dora"]
    for i in range(len(names)):
        assert (changed[i:i + 1] - alone(i)).abs().max().item() <= 1e-5, names[i]


def test_plans_are_kept_per_routing_and_rebuilt_when_parts_change(deltas):
    model = tiny_llama()
    attach_parts(model, deltas["lora2"].parts, "a", activate=False)
    routing = Routing.per_row(["a", "b"])
    ids = torch.randint(1, 128, (2, 4), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), routed(routing):
        first = model(input_ids=ids).logits
        plans = dict(routing.plans)
        again = model(input_ids=ids).logits
        assert plans and all(routing.plans[k] is v for k, v in plans.items())  # reused, not rebuilt
        attach_parts(model, deltas["lora8"].parts, "b", activate=False)
        after = model(input_ids=ids).logits
    assert torch.equal(first, again)
    assert (after[0] - first[0]).abs().max().item() <= 1e-5  # row "a" as before (its rank now padded to b's)
    assert (after[1] - first[1]).abs().max().item() > 1e-4  # row "b" now has its delta
    assert (after[1:2] - _alone(deltas, "lora8", ids[1:2])).abs().max().item() <= 1e-5


def test_a_delta_on_wrapped_modules_attaches_while_a_step_holds_the_lock(deltas, tmp_path):
    """The first delta wraps modules (it waits for the model's lock); a second one on the same modules joins the
    existing wrappers without waiting for the running step, and serves at once."""
    model = tiny_llama()
    store = DeltaStore(model, "base")
    paths = {n: deltas[n].save(tmp_path / n) for n in ("lora2", "lora8", "ia3")}
    held, release = threading.Event(), threading.Event()

    def step() -> None:  # what the engine does during a step
        with store.lock:
            held.set()
            release.wait(30)

    def add_while_held(name: str) -> float:
        worker = threading.Thread(target=step)
        worker.start()
        held.wait(30)
        done = threading.Event()
        adder = threading.Thread(target=lambda: (store.add(name, paths[name]), done.set()))
        t0 = time.perf_counter()
        adder.start()
        finished = done.wait(5)
        waited = time.perf_counter() - t0
        release.set()
        adder.join(30)
        worker.join(30)
        held.clear(), release.clear()
        return finished, waited

    finished, _ = add_while_held("lora2")
    assert not finished  # structural: had to wait for the step
    finished, _ = add_while_held("lora8")
    assert finished  # same modules, already wrapped: no wait
    assert store.resident().keys() == {"lora2", "lora8"}
    lease = store.acquire("lora8")
    ids = torch.randint(1, 128, (1, 4), generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), routed(Routing.per_row([lease.key])):
        got = model(input_ids=ids).logits
    assert (got - _alone(deltas, "lora8", ids)).abs().max().item() <= 1e-5
    store.release(lease)
    store.remove("lora8")
    assert "lora8" not in store.resident()


def test_a_fast_path_add_leaves_a_running_steps_iteration_of_the_parts_intact(deltas, tmp_path):
    """A fast-path add puts a part into wrappers whose parts a running step may be iterating (a routing plan is
    built from ``layer.parts``): the wrapper swaps in a new dict of parts, so the step's iteration goes on over the
    parts it started with instead of failing with "dictionary changed size during iteration"."""
    model = tiny_llama()
    store = DeltaStore(model, "base")
    store.add("lora2", deltas["lora2"].save(tmp_path / "lora2"))
    layer = next(m for m in model.modules() if isinstance(m, DeltaLayer))
    running = iter(layer.parts.items())  # a step, half-way through the parts
    first = next(running)
    store.add("lora8", deltas["lora8"].save(tmp_path / "lora8"))  # the fast path: no model lock
    assert [first, *running] == [first]  # the step saw the parts it started with
    assert len(layer.parts) == 2 and all(isinstance(p, torch.nn.Module) for p in layer.parts.values())
    store.remove("lora8")
    assert list(layer.parts) == [first[0]] and layer.parts[first[0]] is first[1]
    assert dict(model.named_modules())  # the module tree is still walkable
    with pytest.raises(KeyError, match="contain"):
        layer.add("a.b", first[1], activate=False)  # nn.Module's checks of a new name still run
    assert list(layer.parts) == [first[0]]
