"""Dense deltas trained in the base's own storage (methods/in_place.py): full fine-tuning, LISA, HFT and LT-SFT's
first phase hold no second copy of the model, train as a separate ``Δθ`` would, and give the base back bit for bit;
the cases that must keep a separate ``Δθ`` do."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY_MODELS, hooked_steps, logits, max_diff, tiny_inputs, tiny_opt

import deltatune
from deltatune.methods import get_method
from deltatune.methods.in_place import InPlaceTraining
from deltatune.model import get_module
from deltatune.parts.spill import TensorSpill


def _own(model, name: str) -> dict[str, torch.Tensor]:
    return dict(get_module(model, name).named_parameters(recurse=False))


def _run(arch: str, mapping: dict, method: str = "full", steps: int = 3, weight_decay: float = 0.0,
         close: bool = True, sgd: bool = False):
    model = (TINY_MODELS | {"opt": tiny_opt})[arch]().eval()  # no dropout: both storages compute alike
    base = copy.deepcopy(model)
    config = deltatune.make_config(method, mapping)
    delta = deltatune.attach(model, config)
    m = get_method(method)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1) if sgd else m.optimizer(params, 1e-2, weight_decay, config)
    hooks = m.hooks(model, delta, config, opt, 40, 1)
    hooked_steps(model, opt, hooks, tiny_inputs(arch), 0, steps)
    if close:
        for h in hooks:
            h.close()
    return base, model, delta, hooks


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_in_place_trains_the_same_delta_and_gives_the_base_back(arch: str) -> None:
    # SGD: Adam's m/√v would turn ulp-level gradient differences into lr-sized steps where a gradient is ~0
    base, model, delta, _ = _run(arch, {}, sgd=True)
    _, ref_model, ref, _ = _run(arch, {"in_place": False}, sgd=True)
    assert set(delta.parts) == set(ref.parts)
    assert max(v.abs().max() for part in delta.parts.values() for v in part.state().values()) > 1e-3
    for name, part in delta.parts.items():
        assert not part.bound
        for k, v in part.state().items():
            assert torch.allclose(v, ref.parts[name].state()[k], atol=1e-6, rtol=1e-4), f"{name}.{k}"
        for k, t in _own(model, name).items():  # θ₀ restored bit for bit from the spill
            assert torch.equal(t, _own(base, name)[k]), f"{name}.{k} not restored"
    inputs = tiny_inputs(arch)
    assert max_diff(logits(model, inputs), logits(ref_model, inputs)) <= 1e-4
    merged = copy.deepcopy(base)
    deltatune.merge_delta(merged, delta, force=True)
    assert max_diff(logits(merged, inputs), logits(model, inputs)) <= 1e-5


def test_a_module_called_with_extra_arguments_trains_in_place_too() -> None:
    """OPT calls its positional embedding as ``embed_positions(mask, past_length, position_ids=…)``: a bound part
    there runs the module's own forward on the trained θ (its Δθ was once added twice and never trained)."""
    _, model, delta, _ = _run("opt", {}, sgd=True)
    _, _, ref, _ = _run("opt", {"in_place": False}, sgd=True)
    name = "model.decoder.embed_positions"
    trained = delta.parts[name].state()["weight"]
    assert trained.abs().max() > 1e-3
    assert torch.allclose(trained, ref.parts[name].state()["weight"], atol=1e-6, rtol=1e-4)


def test_bound_parts_share_the_base_storage_and_read_as_their_delta() -> None:
    base, model, delta, hooks = _run("gpt2", {}, close=False)  # GPT-2: lm_head's weight is tied to wte's
    for name, part in delta.parts.items():
        assert part.bound
        own = _own(model, name)
        for k in part.shapes:
            assert part._tensor(k).data_ptr() == own[k].data_ptr(), "a second copy of the module"
            assert torch.equal(part.state()[k], own[k].detach() - _own(base, name)[k])
    assert not torch.equal(_own(model, "transformer.wte")["weight"], _own(base, "transformer.wte")["weight"])
    assert hooks[0].spill is not None  # one temporary file for every bound part
    hooks[0].close()
    hooks[0].close()  # closing twice is harmless
    assert hooks[0].spill is None
    assert not any(p.bound for p in delta.parts.values())


def test_weight_decay_or_a_sharding_launch_keeps_a_separate_delta(monkeypatch) -> None:
    _, _, delta, hooks = _run("llama", {}, weight_decay=0.1, close=False)
    assert not hooks[0].enabled and not any(p.bound for p in delta.parts.values())
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    model = TINY_MODELS["llama"]()
    config = deltatune.make_config("full", {})
    d = deltatune.attach(model, config)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], weight_decay=0.0)
    assert not InPlaceTraining(model, d, opt).enabled and not any(p.bound for p in d.parts.values())
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    assert InPlaceTraining(model, d, opt).enabled  # the same run without the sharding launch


def test_hft_trains_in_place_and_unbinds() -> None:
    base, model, delta, hooks = _run("bert", {"stage_steps": 1}, method="hft", steps=3, close=False)
    assert all(p.bound for p in delta.parts.values())
    hooks[0].close()
    for name, part in delta.parts.items():
        assert not part.bound
        assert all(torch.equal(t, _own(base, name)[k]) for k, t in _own(model, name).items())
    assert any(v.abs().max() > 0 for part in delta.parts.values() for v in part.state().values())


def test_a_half_precision_base_keeps_a_separate_delta() -> None:
    model = TINY_MODELS["llama"]().to(torch.bfloat16)
    config = deltatune.make_config("full", {})
    delta = deltatune.attach(model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    hook = InPlaceTraining(model, delta, torch.optim.AdamW(params, weight_decay=0.0))
    assert hook.enabled and not hook.bound and not any(p.bound for p in delta.parts.values())
    hook.close()


def test_lisa_binds_the_blocks_it_draws_later_and_unbinds_all() -> None:
    base, model, delta, hooks = _run("llama", {"layers": 1, "interval": 1}, method="lisa", steps=4, close=False)
    (sampler,) = hooks
    assert len(sampler.visited) == 2 and all(p.bound for p in delta.parts.values())
    sampler.close()
    for name, part in delta.parts.items():
        assert not part.bound
        assert all(torch.equal(t, _own(base, name)[k]) for k, t in _own(model, name).items())


def test_loading_tensors_into_a_bound_part_sets_theta() -> None:
    base, model, delta, hooks = _run("llama", {}, steps=1, close=False)
    name, part = next(iter(delta.parts.items()))
    want = {k: torch.full_like(v, 0.25) for k, v in part.state().items()}
    part.load_tensors(want, "test")
    for k, t in _own(model, name).items():
        assert torch.equal(t, _own(base, name)[k] + 0.25)
    hooks[0].close()  # Δθ = (θ₀ + 0.25) − θ₀, to the rounding of θ₀ + 0.25
    assert all(torch.allclose(part.state()[k], v, rtol=0, atol=1e-6) for k, v in want.items())


def test_the_training_loop_returns_an_unbound_delta_equal_to_the_saved_one(tmp_path, data_dir) -> None:
    from deltatune.api import load_base_for
    from deltatune.train import loop
    from deltatune.train.config import TrainConfig

    cfg = TrainConfig(out_dir=str(tmp_path / "run"), task="sst2", max_steps=2, train_limit=16, eval_limit=8,
                      eval_every=0, eval_before=False, max_length=16, batch_size=4, progress=False,
                      checkpoint_every=1, lr=1e-4)
    result = loop.train(cfg, deltatune.make_config("full", {"targets": ["bert.encoder.layer.0.attention.self.query"]}))
    assert result.delta.parts and not any(p.bound for p in result.delta.parts.values())
    saved = deltatune.load_delta(result.delta_dir)
    fresh = load_base_for(saved)
    for name, part in saved.parts.items():
        live = result.delta.parts[name]
        assert all(torch.equal(v, live.state()[k]) for k, v in part.state().items())
        assert any(v.abs().sum() > 0 for v in part.state().values())
        assert {k: t.shape for k, t in _own(fresh, name).items()} == {k: tuple(s) for k, s in part.shapes.items()}


def test_lt_sft_phase_one_trains_in_place_and_the_rewind_restores_the_base() -> None:
    base, model, delta, hooks = _run("llama", {"density": 0.01, "full_steps": 2}, method="lt-sft", steps=1,
                                     close=False)
    (phases,) = hooks
    name, part = next(iter(delta.parts.items()))
    assert part.bound and part._tensor("weight").data_ptr() == _own(model, name)["weight"].data_ptr()
    assert not torch.equal(_own(model, name)["weight"], _own(base, name)["weight"])
    hooked_steps(model, phases.optimizer, hooks, tiny_inputs("llama"), 1, 2)  # the switch after step 2
    assert phases.phase == 2 and {p.kind for p in delta.parts.values()} == {"sparse"}
    for n in delta.parts:  # rewound: θ₀ back bit for bit
        assert torch.equal(_own(model, n)["weight"], _own(base, n)["weight"])
    l1 = _run("llama", {"density": 0.01, "full_steps": 2, "l1_full": 0.1}, method="lt-sft", steps=1, close=False)
    assert not any(p.bound for p in l1[2].parts.values())  # the L1 pull needs sign(θ − θ₀): a separate Δ


def test_the_spill_gives_back_every_dtype_and_shape_bit_for_bit() -> None:
    spill = TensorSpill()
    tensors = [torch.randn(5, 7), torch.randn(3, 4).to(torch.bfloat16), torch.randn(6, 4).t(),  # non-contiguous
               torch.tensor(2.5, dtype=torch.float64), torch.arange(10, dtype=torch.int32), torch.zeros(0, 3)]
    handles = [spill.put(t) for t in tensors]
    for h, t in reversed(list(zip(handles, tensors, strict=True))):
        got = spill.get(h)
        assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t)
    spill.close()


@pytest.mark.parametrize("method", ["full", "lisa", "hft", "lt-sft"])
def test_a_loop_of_your_own_keeps_a_separate_delta(method: str) -> None:
    from deltatune.train.integration import prepare

    model = TINY_MODELS["llama"]()
    mapping = {"density": 0.01} if method == "lt-sft" else {}
    delta = deltatune.attach(model, deltatune.make_config(method, mapping))
    _, schedule = prepare(model, delta, total_steps=4)
    assert not any(p.bound for p in delta.parts.values())  # its checkpoints save the model's tensors as they are
    schedule.close()


def test_an_embedding_with_max_norm_is_not_bound() -> None:
    # its lookup renormalises the rows of the weight it reads in place: bound, that would be θ itself
    from torch import nn

    from deltatune.parts.dense import DensePart

    emb = nn.Embedding(10, 4, max_norm=1.0)
    part = DensePart.for_module(emb)
    spill = TensorSpill()
    assert not part.bind(emb, spill) and not part.bound
    spill.close()


def test_closing_gives_everything_back_when_one_unbind_or_hook_fails(monkeypatch) -> None:
    from deltatune.methods.registry import TrainHook
    from deltatune.train import loop

    model = TINY_MODELS["llama"]()
    config = deltatune.make_config("full", {})
    delta = deltatune.attach(model, config)
    opt = get_method("full").optimizer([p for p in model.parameters() if p.requires_grad], 1e-2, 0.0, config)
    hook = InPlaceTraining(model, delta, opt)
    spill = hook.spill
    assert hook.bound and spill is not None
    first = hook.bound[0]
    monkeypatch.setattr(first, "unbind", lambda: (_ for _ in ()).throw(RuntimeError("unbind failed")))
    closed = []

    class Other(TrainHook):
        def close(self) -> None:
            closed.append(True)

    others = [p for p in hook.bound if p is not first]
    with torch.no_grad():
        for p in others:
            for t in p.parameters():
                t.add_(0.5)  # trained: θ = θ₀ + 0.5
    with pytest.raises(RuntimeError, match="unbind failed"):
        loop._close_hooks([hook, Other()])
    assert closed == [True]
    assert hook.bound == [first] and not spill._file.closed  # its θ₀ stays in the spill while it is bound
    assert not any(p.bound for p in others)
    for p in others:  # the others gave the base back and hold their Δθ
        assert all(torch.allclose(t, torch.full_like(t, 0.5)) for t in p.parameters())
