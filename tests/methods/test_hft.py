"""HFT (Half Fine-Tuning): the per-block half draw, stage switches through the schedule hook, what trains and
what the optimiser keeps (state of the frozen half freed, reset per stage), weight decay never moving the frozen
half, the Half-Reset of an existing fine-tune, bad input, and a few steps on the real MiniLM.  The registry
matrix (tests/methods/test_matrix.py -k hft) covers save/load, merge, mixed batches and resume on the tiny
Llama/GPT-2/BERT models."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import TINY_MODELS, hooked_steps, logits, max_diff, randomize_delta, tiny_inputs

import deltatune
from deltatune.errors import ConfigError
from deltatune.methods import get_method
from deltatune.methods.hft import HFTConfig, draw_half, half_groups, half_reset, module_role
from deltatune.model import get_module

pytestmark = pytest.mark.usefixtures("one_thread")


def _hooked(arch: str, config: HFTConfig, lr: float = 1e-2, weight_decay: float = 0.0):
    model = TINY_MODELS[arch]()
    delta = deltatune.attach(model, config)
    method = get_method("hft")
    opt = method.optimizer([p for p in model.parameters() if p.requires_grad], lr, weight_decay, config)
    hooks = method.hooks(model, delta, config, opt, 100, 1)
    return model, delta, opt, hooks


def _step(model, delta, opt, hooks, step: int, inputs) -> None:
    model.train()
    hooked_steps(model, opt, hooks, inputs, step, step + 1)


def _snapshot(delta) -> dict[str, dict[str, torch.Tensor]]:
    return {n: {k: v.clone() for k, v in p.state().items()} for n, p in delta.parts.items()}


def _changed(a, b) -> set[str]:
    return {n for n in a if any(not torch.equal(a[n][k], b[n][k]) for k in a[n])}


def test_groups_per_block_and_role() -> None:
    model = TINY_MODELS["llama"]()
    delta = deltatune.attach(model, HFTConfig())
    groups = half_groups(list(delta.parts))
    assert groups["model.layers.000000/attention"] == [f"model.layers.0.self_attn.{p}_proj" for p in "koqv"]
    assert groups["model.layers.000001/ffn"] == [f"model.layers.1.mlp.{p}_proj" for p in ("down", "gate", "up")]
    assert groups["model.layers.000000/norm"] == ["model.layers.0.input_layernorm",
                                                  "model.layers.0.post_attention_layernorm"]
    assert set(groups["other"]) == {"model.embed_tokens", "model.norm", "lm_head"}
    assert module_role("bert.encoder.layer.3.attention.output.LayerNorm") == "norm"
    assert module_role("bert.encoder.layer.3.attention.output.dense") == "attention"
    assert module_role("bert.encoder.layer.3.output.dense") == "ffn"
    assert module_role("transformer.h.0.ln_2") == "norm"
    assert module_role("transformer.h.0.attn.c_attn") == "attention"


def test_group_order_is_blocks_then_other_whatever_the_blocks_path() -> None:
    # draw_half's systematic rounding walks the groups in order: it must not depend on how the path sorts
    # against "other" (GPT-2's "transformer.h." sorts after it)
    names = ["transformer.wte", "transformer.h.1.mlp.c_fc", "transformer.h.0.attn.c_attn", "transformer.ln_f"]
    assert list(half_groups(names)) == ["transformer.h.000000/attention", "transformer.h.000001/ffn", "other"]


def test_encoder_decoder_blocks_are_separate_groups_with_cross_attention_as_attention() -> None:
    bart = [f"model.{side}.layers.0.{sub}.{p}_proj" for side in ("encoder", "decoder") for sub in ("self_attn",)
            for p in "qv"] + ["model.decoder.layers.0.encoder_attn.q_proj", "model.decoder.layers.0.fc1",
                              "model.encoder.layers.0.fc1"]
    groups = half_groups(bart)
    assert groups["model.decoder.layers.000000/attention"] == [
        "model.decoder.layers.0.encoder_attn.q_proj", "model.decoder.layers.0.self_attn.q_proj",
        "model.decoder.layers.0.self_attn.v_proj"]
    assert groups["model.encoder.layers.000000/attention"] == [
        "model.encoder.layers.0.self_attn.q_proj", "model.encoder.layers.0.self_attn.v_proj"]
    assert groups["model.decoder.layers.000000/ffn"] == ["model.decoder.layers.0.fc1"]
    t5 = half_groups(["encoder.block.0.layer.0.SelfAttention.q", "decoder.block.0.layer.1.EncDecAttention.k",
                      "decoder.block.0.layer.2.DenseReluDense.wi"])
    assert t5 == {"decoder.block.000000/attention": ["decoder.block.0.layer.1.EncDecAttention.k"],
                  "decoder.block.000000/ffn": ["decoder.block.0.layer.2.DenseReluDense.wi"],
                  "encoder.block.000000/attention": ["encoder.block.0.layer.0.SelfAttention.q"]}


def test_each_stage_trains_half_of_every_group() -> None:
    groups = half_groups([f"m.layers.{b}.self_attn.{p}" for b in range(6) for p in "qkvo"]
                         + [f"m.layers.{b}.mlp.{p}" for b in range(6) for p in ("gate", "up", "down")]
                         + [f"m.layers.{b}.norm{i}" for b in range(6) for i in range(2)])
    total = sum(len(m) for m in groups.values())
    draws = []
    for stage in range(8):
        chosen = draw_half(groups, 0.5, seed=0, stage=stage)
        assert abs(len(chosen) - total / 2) <= 1
        for members in groups.values():
            k = len(chosen & set(members))
            assert k in (math.floor(len(members) / 2), math.ceil(len(members) / 2))
        draws.append(chosen)
        assert chosen == draw_half(groups, 0.5, seed=0, stage=stage), "a stage's draw is reproducible"
    assert len({frozenset(d) for d in draws}) > 4, "the half is re-drawn each stage"
    ffn_counts = {len(draws[s] & set(groups["m.layers.000000/ffn"])) for s in range(8)}
    assert ffn_counts == {1, 2}, "an odd group alternates between floor and ceil"
    assert draw_half(groups, 0.5, seed=1, stage=0) != draws[0]


def test_stages_train_only_the_drawn_half_and_reset_optimizer_state() -> None:
    inputs = tiny_inputs("llama")
    model, delta, opt, hooks = _hooked("llama", HFTConfig(stage_steps=2, seed=3))
    (schedule,) = hooks
    start = _snapshot(delta)
    _step(model, delta, opt, hooks, 0, inputs)
    first_half = set(schedule.training)
    assert 0 < len(first_half) < len(delta.parts)
    _step(model, delta, opt, hooks, 1, inputs)
    after_stage0 = _snapshot(delta)
    assert _changed(start, after_stage0) == first_half, "exactly the drawn half moved"
    # optimiser state only for the trained half
    with_state = {n for n, p in delta.parts.items() if any(q in opt.state for q in p.parameters())}
    assert with_state == first_half
    # every part reports trainable between steps (stable trainable set for checkpoints and accounting)
    assert all(p.requires_grad for part in delta.parts.values() for p in part.parameters())

    _step(model, delta, opt, hooks, 2, inputs)  # stage 1: a new draw
    second_half = set(schedule.training)
    assert second_half != first_half
    assert _changed(after_stage0, _snapshot(delta)) == second_half
    with_state = {n for n, p in delta.parts.items() if any(q in opt.state for q in p.parameters())}
    assert with_state == second_half, "the state of re-frozen parameters is freed"
    for name in second_half:
        steps = {int(opt.state[p]["step"]) for p in delta.parts[name].parameters()}
        assert steps == ({3} if name in first_half else {1}), f"{name}: a re-trained part starts fresh"


def test_reset_all_restarts_every_moment() -> None:
    inputs = tiny_inputs("gpt2")
    model, delta, opt, hooks = _hooked("gpt2", HFTConfig(stage_steps=1, reset_state="all"))
    for step in range(3):
        _step(model, delta, opt, hooks, step, inputs)
        assert {int(s["step"]) for s in opt.state.values()} == {1}


def test_weight_decay_never_moves_the_frozen_half() -> None:
    inputs = tiny_inputs("bert")
    model, delta, opt, hooks = _hooked("bert", HFTConfig(stage_steps=10), weight_decay=0.5)
    with torch.no_grad():
        for p in delta.parts.values():
            for t in p.parameters():
                t.fill_(0.1)
    before = _snapshot(delta)
    for step in range(3):
        _step(model, delta, opt, hooks, step, inputs)
    assert _changed(before, _snapshot(delta)) == hooks[0].training


def test_no_norms_no_embeddings_option() -> None:
    model = TINY_MODELS["gpt2"]()
    delta = deltatune.attach(model, HFTConfig(norms=False, embeddings=False))
    assert all(".h." in n and module_role(n) != "norm" for n in delta.parts)
    assert "transformer.h.0.attn.c_attn" in delta.parts


@pytest.mark.parametrize("mapping", [{"stage_steps": 0}, {"fraction": 0.0}, {"fraction": 1.5},
                                     {"reset_state": "some"}])
def test_bad_config(mapping) -> None:
    with pytest.raises(ConfigError):
        deltatune.make_config("hft", mapping)


def test_a_fraction_that_draws_no_module_in_some_stage_is_refused() -> None:
    n = len(deltatune.attach(TINY_MODELS["gpt2"](), HFTConfig(norms=False, embeddings=False)).parts)
    with pytest.raises(ConfigError, match=rf"hft config.fraction 0.01 of {n} modules trains none in some stages"):
        deltatune.attach(TINY_MODELS["gpt2"](), HFTConfig(fraction=0.01, norms=False, embeddings=False))
    smallest = HFTConfig(fraction=1 / n, norms=False, embeddings=False)
    assert len(deltatune.attach(TINY_MODELS["gpt2"](), smallest).parts) == n


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_half_reset_restores_half_of_each_block_to_the_base(arch: str) -> None:
    base = TINY_MODELS[arch]()
    full = randomize_delta(TINY_MODELS[arch](), deltatune.make_config("full"), seed=2, std=0.05)
    out = half_reset(full, seed=7)
    groups = half_groups(list(full.parts), outside=False)
    reset = set(out.metrics["half_reset"]["reset"])
    assert reset == set(full.parts) - set(out.parts)
    for members in groups.values():
        k = len(reset & set(members))
        assert k in (len(members) // 2, (len(members) + 1) // 2)
    assert abs(len(reset) - sum(len(m) for m in groups.values()) / 2) <= 1
    outside = [n for n in full.parts if not any(n in m for m in groups.values())]
    assert outside and all(n in out.parts for n in outside), "modules outside the blocks are kept by default"
    assert half_reset(full, seed=7).metrics["half_reset"] == out.metrics["half_reset"]
    assert half_reset(full, seed=8).metrics["half_reset"]["reset"] != out.metrics["half_reset"]["reset"]

    merged = copy.deepcopy(base)
    deltatune.merge_delta(merged, out)
    tuned = copy.deepcopy(base)
    deltatune.merge_delta(tuned, full)
    for name in full.parts:
        for k, p in get_module(merged, name).named_parameters(recurse=False):
            ref = get_module(base if name in reset else tuned, name)
            assert torch.equal(p, dict(ref.named_parameters(recurse=False))[k]), f"{name}.{k}"
    inputs = tiny_inputs(arch)
    assert max_diff(logits(merged, inputs), logits(base, inputs)) > 0
    assert max_diff(logits(merged, inputs), logits(tuned, inputs)) > 0


def test_half_reset_saves_and_refuses_a_delta_without_blocks(tmp_path) -> None:
    full = randomize_delta(TINY_MODELS["llama"](), deltatune.make_config("full"), seed=2, std=0.05)
    out = half_reset(full, seed=0, outside=True)
    assert any(n in out.metrics["half_reset"]["reset"] for n in ("model.embed_tokens", "model.norm", "lm_head"))
    loaded = deltatune.load_delta(deltatune.save_delta(out, tmp_path / "reset"))
    assert set(loaded.parts) == set(out.parts)
    heads_only = copy.copy(full)
    heads_only.parts = {n: p for n, p in full.parts.items() if ".layers." not in n}
    with pytest.raises(ConfigError, match="no part inside a transformer block"):
        half_reset(heads_only)
    with pytest.raises(ConfigError):
        half_reset(full, fraction=0.0)


def test_trains_on_minilm(minilm, tokenizer) -> None:
    batch = tokenizer(["a fine film", "dull and long", "great acting", "boring"], return_tensors="pt",
                      padding=True)
    batch["labels"] = torch.tensor([1, 0, 1, 0])
    config = HFTConfig(stage_steps=2)
    delta = deltatune.attach(minilm, config)
    method = get_method("hft")
    opt = method.optimizer([p for p in minilm.parameters() if p.requires_grad], 1e-3, 0.0, config)
    hooks = method.hooks(minilm, delta, config, opt, 4, 1)
    before = _snapshot(delta)
    losses = []
    for step in range(4):
        for h in hooks:
            h.before_step(step)
        minilm.train()
        loss = minilm(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        for h in hooks:
            h.after_step(step + 1)
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    moved = _changed(before, _snapshot(delta))
    assert 0 < len(moved) < len(delta.parts)


@pytest.mark.slow
def test_real_loop_crash_after_a_stage_switch_resumes_bit_exactly(tmp_path, monkeypatch, data_dir) -> None:
    """MiniLM / SST-2 in the training loop: stages of 2 steps, checkpoint at step 3, crash after step 5 (a stage
    switch at 4 lies between): the resumed run's delta equals the uninterrupted one bit for bit."""
    from schedule_resume import crash_and_resume

    delta = crash_and_resume(tmp_path, monkeypatch, "hft", {"stage_steps": 2})
    assert delta.part_kinds() == {"dense": len(delta.parts)}


def test_a_run_stopped_inside_a_step_leaves_no_part_frozen() -> None:
    model, delta, opt, hooks = _hooked("llama", HFTConfig())
    for h in hooks:
        h.before_step(0)  # the frozen half: requires_grad off until after_step, which a crash never reaches
    assert any(not p.requires_grad for part in delta.parts.values() for p in part.parameters())
    for h in hooks:
        h.close()
    assert all(p.requires_grad for part in delta.parts.values() for p in part.parameters())
