"""Tied weights under the sparse-family methods (sparse, random-sparse, SaRA, LIFT, DSEE, LT-SFT): a weight tensor
shared by several target modules gets one part (its other modules see it as an alias), so the model that trains is
the delta that is saved: its logits while training (in place or not) and once the hooks close equal those of the
delta merged into a fresh base.  Before, each module got its own part on the shared tensor: a tied module without a
part aliased only the last owner, and in-place bindings each rewrote the tensor from their own ``W₀``."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import hooked_steps, max_diff, tiny_gpt2
from transformers import T5Config, T5ForConditionalGeneration

import deltatune
from deltatune.errors import ConfigError
from deltatune.methods import get_method
from deltatune.methods.in_place import InPlaceTraining
from deltatune.methods.targets import select_modules
from deltatune.model import detach, get_module, merge_delta
from deltatune.parts.sparse import SparsePart

pytestmark = pytest.mark.usefixtures("one_thread")


def tied_gpt2():
    """GPT-2 (``lm_head`` tied to ``transformer.wte``) with block 1's ``c_fc`` weight tied to block 0's as well (a
    Conv1D pair, for the methods that train linear layers only)."""
    model = tiny_gpt2()
    model.transformer.h[1].mlp.c_fc.weight = model.transformer.h[0].mlp.c_fc.weight
    return model


def tiny_t5():
    """T5: ``shared``, ``encoder.embed_tokens``, ``decoder.embed_tokens`` and ``lm_head`` are one tensor."""
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=4,
                   decoder_start_token_id=0)
    return T5ForConditionalGeneration(cfg).eval()


def gpt2_inputs():
    ids = torch.randint(1, 128, (3, 7), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "labels": ids.clone()}


def t5_inputs():
    g = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(1, 64, (2, 6), generator=g), "labels": torch.randint(1, 64, (2, 5), generator=g)}


MODELS = {"gpt2": (tied_gpt2, gpt2_inputs, ["transformer.wte", "lm_head", "c_fc"], ["lm_head", "c_fc"]),
          "t5": (tiny_t5, t5_inputs, ["type:Embedding"], ["lm_head"])}

#: (method, config without targets, whether it trains linear layers only)
CASES = {
    "sparse": ({"num_tunable": 1000, "reselection_steps": 2, "accumulation_steps": 1}, False),
    "sparse-not-in-place": ({"num_tunable": 1000, "regrow": False, "in_place": False}, False),
    "random-sparse": ({"num_tunable": 1000}, False),
    "random-sparse-not-in-place": ({"num_tunable": 1000, "in_place": False}, False),
    "sara": ({"fraction": 0.05, "progressive_step": 2, "nuclear_weight": 1e-3}, False),
    "lift": ({"lora_rank": 2, "filter_rank": 2, "update_interval": 2}, True),
    "dsee": ({"r": 2, "alpha": 4.0, "num_sparse": 20}, False),
    "lt-sft": ({"num_tunable": 1000, "full_steps": 1}, False),
    "lt-sft-not-in-place": ({"num_tunable": 1000, "full_steps": 1, "in_place": False}, False),
}


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits.detach().clone()


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_tied_weight_gets_one_part_and_trains_what_is_saved(arch: str, case: str) -> None:
    make, make_inputs, targets, linear_targets = MODELS[arch]
    options, linear_only = CASES[case]
    method_name = case.removesuffix("-not-in-place")
    model = make()
    fresh = copy.deepcopy(model)
    inputs = make_inputs()
    config = deltatune.make_config(method_name, {**options, "targets": linear_targets if linear_only else targets})
    delta = deltatune.attach(model, config)
    weights = [id(get_module(model, n).weight) for n in delta.parts]
    assert len(set(weights)) == len(weights), f"one part per weight tensor, got {sorted(delta.parts)}"
    method = get_method(method_name)
    opt = method.optimizer([p for p in model.parameters() if p.requires_grad], 1e-2, 0.0, config)
    hooks = method.hooks(model, delta, config, opt, 4, 1)
    model.train()
    hooked_steps(model, opt, hooks, inputs, 0, 3)
    model.eval()
    assert all(isinstance(p, SparsePart) for p in delta.parts.values()) or method_name == "dsee"
    assert any(float(p.delta_weight().detach().abs().max()) > 0 for p in delta.parts.values()), "nothing trained"
    if method_name in ("sparse", "random-sparse", "lt-sft") and options.get("in_place", True):
        assert all(p.bound for p in delta.parts.values()), "these train in place"
    during = _logits(model, inputs)  # bound in place where the method binds
    for hook in hooks:
        hook.close()
    attached = _logits(model, inputs)
    detach(model)
    merge_delta(fresh, delta, force=True)
    merged = _logits(fresh, inputs)
    assert max_diff(during, merged) < 1e-4
    assert max_diff(attached, merged) < 1e-4


def test_one_per_weight_keeps_the_first_module_of_each_tensor_and_the_budget_counts_it_once() -> None:
    from deltatune.methods.targets import one_per_weight

    model = tiny_t5()
    names = select_modules(model, ["type:Embedding"])
    assert one_per_weight(model, names) == [n for n in names if n not in ("encoder.embed_tokens",
                                                                          "decoder.embed_tokens")]
    # K over distinct tensors: the whole shared embedding plus the relative biases, no more
    distinct = sum(get_module(model, n).weight.numel() for n in one_per_weight(model, names))
    delta = deltatune.attach(tiny_t5(), deltatune.make_config("random-sparse", {"num_tunable": distinct,
                                                                                "targets": ["type:Embedding"]}))
    assert sum(p.indices.numel() for p in delta.parts.values()) == distinct
    with pytest.raises(ConfigError, match="hold only"):
        deltatune.attach(tiny_t5(), deltatune.make_config("random-sparse", {"num_tunable": distinct + 1,
                                                                            "targets": ["type:Embedding"]}))


def test_in_place_training_refuses_two_parts_on_one_tensor_before_binding_either() -> None:
    model = tiny_gpt2()
    shape = tuple(model.transformer.wte.weight.shape)
    parts = {"transformer.wte": SparsePart(shape, torch.arange(0, 40, 2)),
             "lm_head": SparsePart(shape, torch.arange(1, 41, 2))}
    delta = type("D", (), {"parts": parts})()
    before = model.transformer.wte.weight.detach().clone()
    with torch.no_grad():
        for p in parts.values():
            p.values.fill_(1.0)
    opt = torch.optim.SGD([p.values for p in parts.values()], lr=0.1)
    with pytest.raises(ConfigError, match=r"'transformer\.wte' and 'lm_head'.*one base tensor"):
        InPlaceTraining(model, delta, opt)
    assert not any(p.bound for p in parts.values())
    assert torch.equal(model.transformer.wte.weight, before)
    hook = InPlaceTraining(model, type("D", (), {"parts": {"lm_head": parts["lm_head"]}})(), opt)
    assert parts["lm_head"].bound
    with pytest.raises(ConfigError, match="one base tensor"):  # a later bind (a schedule's new parts) too
        hook.bind({"transformer.wte": parts["transformer.wte"]})
    hook.close()
    assert torch.equal(model.transformer.wte.weight, before)
    hook.bind({"transformer.wte": parts["transformer.wte"]})  # released on close: may be bound again
    assert parts["transformer.wte"].bound
    hook.close()


def test_a_tied_module_without_a_part_sees_every_owner_s_part() -> None:
    """A method that gives each module its own part (LoRA on ``type:Embedding``) puts three parts on T5's one
    embedding tensor (``shared``, ``encoder.embed_tokens``, ``decoder.embed_tokens``); ``lm_head``, tied to it with
    no part of its own, sees all three (each alias under its own name), as the merged tensor does — before, each
    owner's alias replaced the previous one."""
    from conftest import randomize_delta

    model = tiny_t5()
    delta = randomize_delta(tiny_t5(), deltatune.make_config("lora", {"r": 2, "targets": ["type:Embedding"]}), 3, 0.3)
    assert {"shared", "encoder.embed_tokens", "decoder.embed_tokens"} <= set(delta.parts)
    assert "lm_head" not in delta.parts
    merged = tiny_t5()
    merge_delta(merged, delta)
    deltatune.apply_delta(model, delta)
    inputs = t5_inputs()
    assert max_diff(_logits(model, inputs), _logits(merged, inputs)) <= 1e-4
    detach(model)
    assert max_diff(_logits(model, inputs), _logits(tiny_t5(), inputs)) == 0.0
