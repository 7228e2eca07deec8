"""LISA: embeddings and head always train, γ blocks re-drawn every K steps; parts created lazily; the optimizer
state of re-frozen blocks really freed; the final delta holds every block ever trained; exact resume across a
re-draw."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import TINY_MODELS, hooked_steps, logits, max_diff, tiny_inputs
from transformers import LlamaConfig, LlamaForCausalLM

import deltatune
from deltatune.errors import ConfigError, TargetError
from deltatune.methods import get_method
from deltatune.methods.lisa import draw, find_blocks
from deltatune.methods.targets import modules_with_parameters
from deltatune.model import get_module
from deltatune.train import checkpoint as ckpt

pytestmark = pytest.mark.usefixtures("one_thread")
N_BLOCKS = 6


def llama6() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=N_BLOCKS,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def blocks_of(delta) -> set[int]:
    return {int(n.split(".")[2]) for n in delta.parts if n.startswith("model.layers.")}


def setup(config_map: dict, total: int = 40, weight_decay: float = 0.1, lr: float = 1e-2):
    """LISA on :func:`llama6`; with weight decay nothing trains in place (and no embedding looks up sparsely)."""
    model = llama6()
    config = deltatune.make_config("lisa", config_map)
    delta = deltatune.attach(model, config)
    method = get_method("lisa")
    opt = method.optimizer([p for p in model.parameters() if p.requires_grad], lr, weight_decay, config)
    (sampler,) = method.hooks(model, delta, config, opt, total, 1)
    return model, delta, opt, sampler


def run(model, delta, opt, sampler, start: int, steps: int):
    inputs = tiny_inputs("llama")
    model.train()
    for step in range(start, start + steps):
        sampler.before_step(step)
        model(**inputs).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sampler.after_step(step + 1)


def test_blocks_are_found_for_each_architecture():
    assert find_blocks(TINY_MODELS["llama"](), None) == [("model.layers", 2)]
    assert find_blocks(TINY_MODELS["gpt2"](), None) == [("transformer.h", 2)]
    assert find_blocks(TINY_MODELS["bert"](), None) == [("bert.encoder.layer", 2)]
    with pytest.raises(TargetError, match="not a module"):
        find_blocks(TINY_MODELS["llama"](), "model.nothing")
    with pytest.raises(TargetError, match="not the ModuleList"):
        find_blocks(TINY_MODELS["llama"](), "model.norm")


def test_draws_are_seeded_distinct_and_change():
    draws = [draw(N_BLOCKS, 2, 0, s) for s in range(0, 100, 10)]
    assert all(len(set(d)) == 2 and d == sorted(d) for d in draws)
    assert draws == [draw(N_BLOCKS, 2, 0, s) for s in range(0, 100, 10)]
    assert len({tuple(d) for d in draws}) > 1


def test_parts_are_created_lazily_for_the_drawn_blocks_only():
    model, delta, opt, sampler = setup({"layers": 2, "interval": 2})
    outside = {"model.embed_tokens", "model.norm", "lm_head"}
    assert outside <= set(delta.parts)
    assert blocks_of(delta) == set(draw(N_BLOCKS, 2, 0, 0)) == set(sampler.active)
    full = sum(p.numel() for p in llama6().parameters())
    assert delta.trainable_count < 0.6 * full


def test_redraw_changes_the_blocks_frees_state_and_freezes_the_old_ones():
    model, delta, opt, sampler = setup({"layers": 2, "interval": 2}, total=40)
    run(model, delta, opt, sampler, 0, 2)
    first = list(sampler.active)
    old = [p for n, part in delta.parts.items() if n.startswith("model.layers.") for p in part.parameters()]
    old_values = [p.detach().clone() for p in old]
    step = next(s for s in range(2, 40, 2) if set(draw(N_BLOCKS, 2, 0, s)) - set(first))
    run(model, delta, opt, sampler, 2, step - 2)  # up to (not including) the step with a new draw
    old_values = [p.detach().clone() for p in old]
    run(model, delta, opt, sampler, step, 1)  # the re-draw happens before this step
    assert sampler.active == draw(N_BLOCKS, 2, 0, step) and set(sampler.active) != set(first)
    assert blocks_of(delta) == set(first) | set(sampler.active)
    # left-out blocks: frozen, no gradient, no optimizer state, Δ unchanged by the step (weight decay 0.1 too)
    left = [b for b in first if b not in sampler.active]
    frozen = [p for n, part in delta.parts.items() if n.startswith(tuple(f"model.layers.{b}." for b in left))
              for p in part.parameters()]
    assert frozen and all(not p.requires_grad and p.grad is None for p in frozen)
    assert not any(p in opt.state for p in frozen)
    for p, v in zip(old, old_values, strict=True):
        if any(p is q for q in frozen):
            assert torch.equal(p.detach(), v)
    # optimizer state exists exactly for what trains now, and its bytes are AdamW's 2 moments + step
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in opt.state} == {id(p) for p in trainable}
    assert {id(p) for p in opt.param_groups[0]["params"]} == {id(p) for p in trainable}
    moments = 2 * sum(p.numel() * p.element_size() for p in trainable)
    assert moments <= sampler.state_bytes() <= moments + 8 * len(trainable)
    # a leaky sampler (LMFlow) would still hold the left blocks' moments on top
    leaked = 2 * sum(p.numel() * p.element_size() for p in frozen)
    assert sampler.state_bytes() < moments + leaked


def test_delta_holds_every_trained_block_and_reproduces_outputs(tmp_path):
    model, delta, opt, sampler = setup({"layers": 1, "interval": 1}, total=8)
    base = llama6()
    run(model, delta, opt, sampler, 0, 8)
    assert len(blocks_of(delta)) > 1
    loaded = deltatune.load_delta(deltatune.save_delta(delta, tmp_path / "d"))
    assert set(loaded.parts) == set(delta.parts)
    fresh = copy.deepcopy(base)
    deltatune.apply_delta(fresh, loaded)
    inputs = tiny_inputs("llama")
    assert max_diff(logits(fresh, inputs), logits(model.eval(), inputs)) <= 1e-5
    merged = copy.deepcopy(base)
    deltatune.merge_delta(merged, loaded)
    assert max_diff(logits(merged, inputs), logits(model, inputs)) <= 1e-5


@pytest.mark.parametrize("wd", [0.1, 0.0])  # 0.0: in place, the embedding's rows looked up sparsely
def test_resume_across_a_redraw_is_bit_exact(tmp_path, wd):
    cfg = {"layers": 2, "interval": 2}
    straight = setup(cfg, total=8, weight_decay=wd)
    run(*straight, 0, 8)

    first = setup(cfg, total=8, weight_decay=wd)
    run(*first, 0, 3)
    model, delta, opt, sampler = first
    payload = {"trainable": ckpt.trainable_state(model, delta), "optimizer": opt.state_dict(), "scheduler": {},
               "hooks": [sampler.state_dict()], "step": 3, "epoch": 0, "offset": 0, "before": {}, "best": None,
               "history": [], "rng": [ckpt.rng_state()]}
    ckpt.save_checkpoint(tmp_path / "ckpt", payload)

    model2, delta2, opt2, sampler2 = setup(cfg, total=8, weight_decay=wd)
    assert get_module(model2, "model.embed_tokens").sparse is (wd == 0)
    state = ckpt.load_checkpoint(tmp_path / "ckpt")
    sampler2.load_state_dict(state["hooks"][0])
    ckpt.restore_trainable(model2, state["trainable"], tmp_path, delta2)
    opt2.load_state_dict(state["optimizer"])
    run(model2, delta2, opt2, sampler2, 3, 5)
    assert set(delta2.parts) == set(straight[1].parts)
    for name, part in straight[1].parts.items():
        for k, v in part.state().items():
            assert torch.equal(delta2.parts[name].state()[k], v), f"{name}.{k} differs after resuming"


@pytest.mark.parametrize("bad", [{"layers": 0}, {"interval": 0}])
def test_bad_config_is_a_typed_error(bad):
    with pytest.raises(ConfigError, match="lisa config"):
        deltatune.make_config("lisa", bad)


def test_more_layers_than_blocks_is_refused():
    with pytest.raises(ConfigError, match="2 blocks"):
        deltatune.attach(TINY_MODELS["gpt2"](), deltatune.make_config("lisa", {"layers": 3}))


@pytest.mark.slow
def test_minilm_run_resumes_bit_exactly_across_a_redraw(tmp_path, monkeypatch, data_dir):
    from schedule_resume import crash_and_resume

    delta = crash_and_resume(tmp_path, monkeypatch, "lisa", {"layers": 1, "interval": 2})
    assert len({n.split(".")[3] for n in delta.parts if n.startswith("bert.encoder.layer.")}) > 1


def test_always_trained_embedding_looks_up_rows_without_a_dense_sum():
    """The embedding's dense part adds the looked-up rows of ``ΔW`` to those of ``W`` (no ``vocab × dim`` sum):
    the same output and gradient as autograd through ``W + ΔW``, and the base unchanged."""
    from deltatune.parts.dense import DensePart

    torch.manual_seed(0)
    emb = torch.nn.Embedding(50, 8, padding_idx=3).requires_grad_(False)
    before = emb.weight.detach().clone()
    part = DensePart.for_module(emb)
    with torch.no_grad():
        part.delta_for("weight").normal_()
    ids = torch.tensor([[1, 3, 7, 7], [3, 0, 49, 1]])
    target = torch.randn(2, 4, 8)
    out = part(ids, emb)
    (out * target).sum().backward()
    delta = part.delta_for("weight").detach().clone().requires_grad_(True)
    ref = torch.nn.functional.embedding(ids, emb.weight + delta, padding_idx=3)
    (ref * target).sum().backward()
    assert torch.equal(out.detach(), ref.detach())
    assert torch.allclose(part.delta_for("weight").grad, delta.grad, rtol=0, atol=1e-6)
    assert torch.equal(emb.weight, before)


@pytest.mark.parametrize("conv1d", [False, True])
def test_large_head_forms_the_sum_block_by_block(conv1d, monkeypatch):
    """An always-trained head above ``DENSE_BLOCK`` entries forms ``W + ΔW`` a block of output features at a time:
    output and gradients equal autograd through the whole sum."""
    from transformers.pytorch_utils import Conv1D

    import deltatune.parts.dense as dense_mod

    monkeypatch.setattr(dense_mod, "DENSE_BLOCK", 100)  # 40 × 24 entries: blocks of 4 output features
    torch.manual_seed(1)
    head = (Conv1D(40, 24) if conv1d else torch.nn.Linear(24, 40)).requires_grad_(False)
    with torch.no_grad():
        head.bias.normal_()
    part = dense_mod.DensePart.for_module(head)
    with torch.no_grad():
        for name in ("weight", "bias"):
            part.delta_for(name).normal_()
    x = torch.randn(3, 5, 24, requires_grad=True)
    target = torch.randn(3, 5, 40)
    (part(x, head) * target).sum().backward()
    deltas = {k: part.delta_for(k).detach().clone().requires_grad_(True) for k in ("weight", "bias")}
    x_ref = x.detach().clone().requires_grad_(True)
    w, b = head.weight + deltas["weight"], head.bias + deltas["bias"]
    ref = x_ref @ w + b if conv1d else torch.nn.functional.linear(x_ref, w, b)
    (ref * target).sum().backward()
    assert torch.allclose(part(x, head), ref, rtol=0, atol=1e-5)
    assert torch.allclose(x.grad, x_ref.grad, rtol=0, atol=1e-5)
    for k in ("weight", "bias"):
        assert torch.allclose(part.delta_for(k).grad, deltas[k].grad, rtol=0, atol=1e-5)


def test_task_head_group_keeps_its_optimizer_state_across_draws():
    # the loop's optimizer lists the task head in a group of its own: a draw must not free (and restart) it
    from transformers import LlamaForSequenceClassification

    from deltatune.train.integration import make_optimizer

    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=N_BLOCKS, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, num_labels=2, pad_token_id=0))
    config = deltatune.make_config("lisa", {"layers": 1, "interval": 1})
    delta = deltatune.attach(model, config)
    opt = make_optimizer(model, delta, 1e-2, config=config)
    assert [g["name"] for g in opt.param_groups] == ["delta", "heads"]
    (sampler,) = get_method("lisa").hooks(model, delta, config, opt, 40, 1)
    head = model.score.weight
    model.train()
    hooked_steps(model, opt, [sampler], {"input_ids": torch.randint(1, 128, (2, 8)), "labels": torch.tensor([0, 1])},
                 0, 3)
    assert float(opt.state[head]["step"]) == 3
    assert [id(p) for p in opt.param_groups[1]["params"]] == [id(head)]


def test_block_parameters_stay_in_their_own_group_across_draws():
    # a Trainer splits parameters into decay / no-decay groups: a block's norm stays in the no-decay group and is
    # never listed twice; the state of a left-out block is freed from whichever group held it
    model = llama6()
    config = deltatune.make_config("lisa", {"layers": 2, "interval": 1})
    delta = deltatune.attach(model, config)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if "norm" not in n]
    no_decay = [p for n, p in trainable if "norm" in n]
    opt = get_method("lisa").optimizer([{"params": decay, "weight_decay": 0.1},
                                        {"params": no_decay, "weight_decay": 0.0}], 1e-2, 0.1, config)
    (sampler,) = get_method("lisa").hooks(model, delta, config, opt, 40, 1)
    norm_ids = {id(p) for n, p in model.named_parameters() if "norm" in n}
    run(model, delta, opt, sampler, 0, 6)
    listed = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(listed) == len(set(listed))
    first_norms = {id(p) for p in no_decay}
    assert all(i in norm_ids for i in map(id, opt.param_groups[1]["params"]) if i in first_norms)
    assert all(id(p) not in first_norms for p in opt.param_groups[0]["params"])
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert set(listed) == {id(p) for p in trainable} and {id(p) for p in opt.state} <= set(listed)


def test_always_trained_embedding_trains_on_looked_up_rows_as_dense_adamw_would():
    """Trained in place (no weight decay), the input embedding gets row-sparse gradients and optimiser state for the
    rows looked up only.  The first step's update equals the dense-gradient run's (AdamW's update, row for row); the
    losses of later steps agree (the two updates round differently, and Adam turns last-bit differences in tiny
    gradients into step-sized ones); the module reads densely again once training ends."""
    first, losses = {}, {}
    inputs = tiny_inputs("llama")
    for sparse in (True, False):
        model, delta, opt, sampler = setup({"layers": 2, "interval": 3, "sparse_embeddings": sparse},
                                           weight_decay=0.0, lr=1e-3)
        emb = get_module(model, "model.embed_tokens")
        assert isinstance(emb, torch.nn.Embedding) and emb.sparse is sparse
        model.train()
        losses[sparse] = []
        for step in range(7):
            sampler.before_step(step)
            loss = model(**inputs).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sampler.after_step(step + 1)
            losses[sparse].append(float(loss))
            if step == 0:
                first[sparse] = {n: part.updates(get_module(model, n)) for n, part in delta.parts.items()}
        (weight,) = delta.parts["model.embed_tokens"].parameters()  # θ, trained in the base's storage
        st = opt.state[weight]
        ids = inputs["input_ids"].unique()
        if sparse:
            assert torch.equal(st["rows"], ids) and st["exp_avg"].shape == (ids.numel(), emb.embedding_dim)
        else:
            assert st["exp_avg"].shape == weight.shape
        sampler.close()
        assert emb.sparse is False
    assert first[True].keys() == first[False].keys()
    for name, updates in first[True].items():
        for key, value in updates.items():
            torch.testing.assert_close(value, first[False][name][key], rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(torch.tensor(losses[True]), torch.tensor(losses[False]), rtol=1e-4, atol=0)


def test_a_loop_of_your_own_with_torchs_adamw_is_not_warned():
    """Out of deltatune's loop nothing trains in place, so no gradient is row-sparse and AdamW is LISA's optimiser."""
    from deltatune.train.integration import schedule_for

    model = llama6()
    delta = deltatune.attach(model, deltatune.make_config("lisa", {"layers": 1}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        schedule = schedule_for(model, delta, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]),
                                4)
    schedule.close()
    assert get_module(model, "model.embed_tokens").sparse is False


# --- encoder–decoder: both stacks' blocks form one pool --------------------------------------------------------
T5_STACKS = {"encoder": 2, "decoder": 3}


def t5_setup(config_map: dict, total: int = 12):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(
        vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=T5_STACKS["encoder"],
        num_decoder_layers=T5_STACKS["decoder"], num_heads=2, decoder_start_token_id=0))
    config = deltatune.make_config("lisa", config_map)
    delta = deltatune.attach(model, config)
    method = get_method("lisa")
    opt = method.optimizer([p for p in model.parameters() if p.requires_grad], 1e-2, 0.1, config)
    (sampler,) = method.hooks(model, delta, config, opt, total, 1)
    return model, delta, opt, sampler


def t5_block(name: str) -> tuple[str, int] | None:
    """``(stack, index)`` of the T5 block a module belongs to, or None outside the blocks."""
    parts = name.split(".")
    return (parts[0], int(parts[2])) if parts[1:2] == ["block"] else None


def training_now(delta, opt) -> set[str]:
    """The delta's modules whose parameters train now (require a gradient and are in the optimizer)."""
    listed = {id(p) for g in opt.param_groups for p in g["params"]}
    names = {n for n, part in delta.parts.items() if any(p.requires_grad for p in part.parameters())}
    assert names == {n for n, part in delta.parts.items() if any(id(p) in listed for p in part.parameters())}
    return names


def test_encoder_decoder_trains_one_block_of_either_stack_besides_the_outside():
    model, delta, opt, sampler = t5_setup({"layers": 1, "interval": 1})
    every = {n: t5_block(n) for n in modules_with_parameters(model)}
    outside = {n for n, b in every.items() if b is None}
    assert {"shared", "encoder.final_layer_norm", "decoder.final_layer_norm"} <= outside
    drawn = []
    # the schedule alone: which modules train at each stage (the forward is the method-independent core's)
    for step in range(12):
        sampler.before_step(step)
        now = training_now(delta, opt)
        # exactly one block's modules (all of them) train, and the outside (its parts: a tied alias has none)
        blocks = {every[n] for n in now if every[n] is not None}
        assert len(blocks) == 1, f"step {step}: blocks {sorted(blocks)} train at once"
        (block,) = blocks
        assert {n for n in now if every[n] is not None} == {n for n, b in every.items() if b == block}
        assert {n for n in now if every[n] is None} == outside & set(delta.parts)
        drawn.append(block)
        sampler.after_step(step + 1)
    # one pool of 2 + 3 blocks, the encoder's first; the draws are the pool's, taking blocks of both stacks
    assert sampler.plan.n == 5
    pool = [t5_block(names[0]) for names in sampler.plan.blocks]
    assert pool == [("encoder", 0), ("encoder", 1), ("decoder", 0), ("decoder", 1), ("decoder", 2)]
    assert drawn == [pool[draw(5, 1, 0, step)[0]] for step in range(12)]
    assert {stack for stack, _ in drawn} == {"encoder", "decoder"}
    # the schedule resumes: a fresh run loading the sampler's state trains the same modules, with the same parts
    model2, delta2, opt2, sampler2 = t5_setup({"layers": 1, "interval": 1})
    sampler2.load_state_dict(sampler.state_dict())
    assert set(delta2.parts) == set(delta.parts) and training_now(delta2, opt2) == training_now(delta, opt)


def test_layers_path_names_the_pooled_lists_and_leaves_the_rest_outside():
    model, delta, opt, sampler = t5_setup({"layers": 1, "layers_path": "decoder.block"})
    assert sampler.plan.lists == [("decoder.block", 3)]
    # the encoder's blocks are outside the pool: they always train
    assert {f"encoder.block.{i}.layer.1.DenseReluDense.wi" for i in range(2)} <= set(sampler.plan.outside)
    model, delta, opt, sampler = t5_setup({"layers": 4, "layers_path": "decoder.block, encoder.block"})
    assert sampler.plan.lists == [("decoder.block", 3), ("encoder.block", 2)]
    with pytest.raises(ConfigError, match="overlap"):
        t5_setup({"layers": 1, "layers_path": "encoder.block,encoder.block.0.layer"})
    with pytest.raises(ConfigError, match=r"has 5 blocks \(encoder.block: 2, decoder.block: 3\)"):
        t5_setup({"layers": 6})
