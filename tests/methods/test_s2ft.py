"""S2FT (structured sparse fine-tuning): the slice part's math, partial back-propagation, the co-permutation
(outputs unchanged, GQA groups moved whole), selection by count/ratio/criterion/explicit lists, bad input, and a
few steps on the real MiniLM.  The registry matrix (tests/methods/test_matrix.py -k s2ft) covers training,
save/load, merge, mixed batches and resume on tiny Llama/GPT-2/BERT."""

from __future__ import annotations

import copy
import time

import pytest
import torch
from conftest import TINY_MODELS, logits, max_diff, tiny_inputs
from torch import nn
from transformers.pytorch_utils import Conv1D

import deltatune
from deltatune.algebra.sum_deltas import sum_parts
from deltatune.errors import ConfigError, DeltaFormatError, ShapeMismatch, TargetError
from deltatune.methods.s2ft import (
    COMPONENTS,
    S2FTConfig,
    budget_config,
    channels,
    component_perm,
    s2ft_permutation,
    select,
    unit_size,
)
from deltatune.model import get_module
from deltatune.ops.permute import _permute, block_layouts, co_permute, expand, permute_slice_part, selection_order
from deltatune.parts.layers import LayerKind
from deltatune.parts.slice import SlicePart, _InputSliceLinear, sum_slices

pytestmark = pytest.mark.usefixtures("one_thread")
ARCHS = ("llama", "gpt2", "bert")


def _layer(kind: str, d_in: int = 12, d_out: int = 10) -> nn.Module:
    torch.manual_seed(3)
    layer = nn.Linear(d_in, d_out) if kind == "linear" else Conv1D(d_out, d_in)
    if kind == "conv1d":
        nn.init.normal_(layer.weight, std=0.3)
    return layer.requires_grad_(False)


def _random_part(kind: str, axis: str, idx: list[int], seed: int = 0) -> SlicePart:
    part = SlicePart(12, 10, axis, torch.tensor(idx), LayerKind(kind))
    with torch.no_grad():
        part.block.copy_(torch.randn(part.block.shape, generator=torch.Generator().manual_seed(seed)))
    return part


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("axis", ["out", "in"])
def test_slice_forward_and_gradients_equal_the_dense_reference(kind: str, axis: str) -> None:
    """y = x (W + ΔW)ᵀ with ΔW[I,:] = S (out) / ΔW[:,I] = S (in); ∂L/∂S and ∂L/∂x equal the dense autograd's."""
    base = _layer(kind)
    part = _random_part(kind, axis, [7, 2, 4] if axis == "in" else [0, 9, 3])
    x = torch.randn(2, 5, 12, requires_grad=True)
    y = part(x, base)
    y.pow(2).sum().backward()
    grad_block, grad_x = part.block.grad.clone(), x.grad.clone()

    s = part.block.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    dense = torch.zeros(10, 12).index_copy(0 if axis == "out" else 1, part.indices, s)
    w = base.weight.t() if kind == "conv1d" else base.weight
    ref = x2 @ (w + dense).t() + base.bias
    ref.pow(2).sum().backward()
    assert max_diff(y.detach(), ref.detach()) <= 1e-5
    assert max_diff(grad_block, s.grad) <= 1e-4
    assert max_diff(grad_x, x2.grad) <= 1e-4
    assert torch.equal(part.delta_weight(), part.updates()["weight"].detach())
    assert tuple(part.delta_weight().shape) == tuple(base.weight.shape)


def test_input_slice_backward_stores_only_the_input_slice() -> None:
    """Partial back-propagation: the o/down slice keeps x[..., I] (k columns), never the whole input."""
    base = _layer("linear", 64, 16)
    part = SlicePart(64, 16, "in", torch.tensor([3, 40, 41]))
    x = torch.randn(4, 6, 64, requires_grad=True)
    saved: list[tuple[int, ...]] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        part(x, base).sum().backward()
    activations = [s for s in saved if len(s) == 3]
    assert activations == [(4, 6, 3)], saved
    assert not any(s == (4, 6, 64) or s == (24, 64) for s in saved), f"the whole input was saved: {saved}"
    # the function alone, too: a gradient check in float64
    xs = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    blk = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: _InputSliceLinear.apply(a, b, torch.tensor([1, 6])), (xs, blk))


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("axis", ["out", "in"])
def test_slice_merge_writes_only_the_block_and_reverts(kind: str, axis: str) -> None:
    base = _layer(kind)
    original = base.weight.detach().clone()
    part = _random_part(kind, axis, [1, 4, 8])
    x = torch.randn(3, 12)
    unmerged = part(x, base).detach()
    part.merge_into(base)
    assert max_diff(base(x), unmerged) <= 1e-5
    changed = (base.weight != original).reshape(-1).nonzero().reshape(-1)
    sites = part.merge_sites()["weight"]
    assert set(changed.tolist()) <= set(sites.tolist())
    assert sites.numel() == part.block.numel()
    assert max_diff(base.weight - original, part.delta_weight()) <= 1e-6
    part.unmerge_from(base)
    assert max_diff(base.weight, original) <= 1e-6


def test_slice_state_round_trip_sum_and_values() -> None:
    part = _random_part("conv1d", "out", [0, 5, 9], seed=1)
    again = SlicePart.from_state(part.state(), part.meta())
    assert torch.equal(again.block, part.block) and torch.equal(again.indices, part.indices)
    other = _random_part("conv1d", "out", [5, 6], seed=2)
    total = sum_slices([part, other], "test")
    assert total.indices.tolist() == [0, 5, 6, 9]
    assert max_diff(total.delta_weight(), part.delta_weight() + other.delta_weight()) <= 1e-6
    assert part.sum_with([other], "test") is not None
    rebuilt = part.with_values({"": part.values_view()[""] * 2})
    assert max_diff(rebuilt.delta_weight(), 2 * part.delta_weight()) <= 1e-6
    columns = _random_part("conv1d", "in", [1], seed=3)
    with pytest.raises(ShapeMismatch):
        sum_slices([part, columns], "test")
    crossed = sum_parts([part, columns], "test")  # rows + columns of one weight: no slice, the dense sum
    assert crossed.kind == "dense"
    assert max_diff(crossed.updates(None)["weight"], part.delta_weight() + columns.delta_weight()) <= 1e-6


@pytest.mark.parametrize("meta,error", [
    ({"d_in": 12, "d_out": 10, "axis": "rows", "layer": "linear", "k": 2}, DeltaFormatError),
    ({"d_in": 12, "d_out": 10, "axis": "out", "layer": "linear", "k": 11}, DeltaFormatError),
    ({"d_in": 12, "d_out": 10, "axis": "in", "layer": "embedding", "k": 2}, DeltaFormatError),
    ({"d_in": 0, "d_out": 10, "axis": "in", "layer": "linear", "k": 0}, DeltaFormatError),
    ({"d_in": 12, "d_out": 10, "axis": "in", "layer": "linear"}, DeltaFormatError),
])
def test_slice_meta_is_validated(meta, error) -> None:
    with pytest.raises(error):
        SlicePart.expected_state(meta)


@pytest.mark.parametrize("bad", [None, [], "meta", {"d_in": True, "d_out": 10, "axis": "in", "layer": "linear", "k": 1},
                                 {"d_in": 2**40, "d_out": 10, "axis": "in", "layer": "linear", "k": 1},
                                 {"d_in": 2**31, "d_out": 2**31, "axis": "in", "layer": "linear", "k": 1},
                                 {"d_in": 12, "d_out": 10, "axis": [], "layer": "linear", "k": 1},
                                 {"d_in": 12, "d_out": 10, "axis": "in", "layer": 3, "k": 1},
                                 {"d_in": 12, "d_out": 10, "axis": "in", "layer": "linear", "k": -1},
                                 {"d_in": 12.5, "d_out": 10, "axis": "in", "layer": "linear", "k": 1},
                                 {"d_in": 12, "d_out": 10, "axis": "in", "layer": "linear", "k": 1, "x": 0}])
def test_garbage_meta_is_a_typed_error(bad) -> None:
    from deltatune.errors import DeltaTuneError

    with pytest.raises(DeltaTuneError):
        SlicePart.expected_state(bad)


def test_slice_indices_are_validated() -> None:
    meta = {"d_in": 12, "d_out": 10, "axis": "in", "layer": "linear", "k": 2}
    with pytest.raises(ShapeMismatch, match="not sorted"):
        SlicePart.from_state({"indices": torch.tensor([5, 1]), "block": torch.zeros(10, 2)}, meta)
    with pytest.raises(ShapeMismatch, match="out of range"):
        SlicePart.from_state({"indices": torch.tensor([1, 12]), "block": torch.zeros(10, 2)}, meta)
    with pytest.raises(ShapeMismatch, match="more than once"):
        SlicePart(12, 10, "out", torch.tensor([3, 3]))
    with pytest.raises(ShapeMismatch):
        SlicePart(12, 10, "out", torch.tensor([1])).check_base(nn.Linear(10, 12), "x")


# --- the co-permutation ----------------------------------------------------------------------------------------
def _orders(model: nn.Module, seed: int):
    g = torch.Generator().manual_seed(seed)
    units = {b.index: torch.randperm(b.units, generator=g).tolist() for b in block_layouts(model)}
    chans = {b.index: torch.randperm(b.intermediate, generator=g).tolist() for b in block_layouts(model)}
    return units, chans


@pytest.mark.parametrize("arch", ARCHS)
def test_co_permutation_keeps_the_outputs(arch: str) -> None:
    model = TINY_MODELS[arch]()
    inputs = tiny_inputs(arch)
    before = logits(model, inputs)
    units, chans = _orders(model, 0)
    assert any(o != sorted(o) for o in units.values()) and any(o != sorted(o) for o in chans.values())
    co_permute(model, units, chans)
    assert max_diff(logits(model, inputs), before) <= 1e-5
    ref = TINY_MODELS[arch]()
    name = block_layouts(model)[0].down
    assert not torch.equal(get_module(model, name).weight, get_module(ref, name).weight), "nothing was permuted"


def test_gqa_heads_move_with_their_kv_group() -> None:
    """Tiny Llama has 4 query heads over 2 KV heads: moving whole groups keeps the outputs; moving one query head
    to the other group (q rows and o columns alone, the reference's per-head reshape) does not."""
    model = TINY_MODELS["llama"]()
    block = block_layouts(model)[0]
    assert (block.heads, block.kv_heads, block.group) == (4, 2, 2)
    inputs = tiny_inputs("llama")
    before = logits(model, inputs)
    co_permute(model, {0: [1, 0], 1: [1, 0]})
    assert max_diff(logits(model, inputs), before) <= 1e-5
    broken = TINY_MODELS["llama"]()
    head_perm = expand([0, 2, 1, 3], block.head_dim)  # heads 1 and 2 swap groups
    _permute(get_module(broken, block.q), head_perm, "out")
    _permute(get_module(broken, block.o), head_perm, "in")
    assert max_diff(logits(broken, inputs), before) > 1e-3


def test_selection_order_makes_both_selections_contiguous() -> None:
    order = selection_order([5, 1, 3], [3, 7], 9)
    assert order == [1, 5, 3, 7, 0, 2, 4, 6, 8]
    pos = {u: i for i, u in enumerate(order)}
    assert sorted(pos[u] for u in (5, 1, 3)) == [0, 1, 2]
    assert sorted(pos[u] for u in (3, 7)) == [2, 3]
    with pytest.raises(ConfigError):
        selection_order([9], [], 9)


@pytest.mark.parametrize("arch", ARCHS)
def test_trained_slices_in_the_permuted_layout_are_dense_blocks_with_equal_outputs(arch: str) -> None:
    """Train on the original layout; co-permute the base by S2FT's order and map each part into it: every part is
    one contiguous range and the permuted model with the permuted delta gives the same outputs."""
    model = TINY_MODELS[arch]()
    config = S2FTConfig(v_ratio=0.5, o_ratio=0.5, u_ratio=0.1, d_ratio=0.1, seed=1)
    delta = deltatune.attach(model, config)
    with torch.no_grad():
        for i, part in enumerate(delta.parts.values()):
            part.block.copy_(torch.randn(part.block.shape, generator=torch.Generator().manual_seed(i)) * 0.2)
    inputs = tiny_inputs(arch)
    trained = logits(model, inputs)
    selection = select(TINY_MODELS[arch](), config)
    units, chans = s2ft_permutation(model, selection)
    permuted = TINY_MODELS[arch]()
    co_permute(permuted, units, chans)
    parts = {}
    for block in block_layouts(permuted):
        for comp in COMPONENTS:
            name = {"v": block.v_module(), "o": block.o, "u": block.up, "d": block.down}[comp]
            if name not in delta.parts:
                continue
            perm = component_perm(block, comp, units[block.index], chans[block.index])
            new = permute_slice_part(delta.parts[name], perm)
            old = delta.parts[name]
            assert (new.block.device, new.block.dtype, new.indices.dtype) == \
                (old.block.device, old.block.dtype, old.indices.dtype)
            idx = new.indices.tolist()
            segments = 1 + sum(1 for a, b in zip(idx, idx[1:], strict=False) if b != a + 1)
            # fused GPT-2 qkv keeps v in its own third: still one range inside it
            assert segments == 1, f"{name}: {idx} is not contiguous"
            parts[name] = new
    assert set(parts) == set(delta.parts)
    deltatune.model.attach_parts(permuted, parts)
    assert max_diff(logits(permuted, inputs), trained) <= 1e-5


# --- selection and bad input ------------------------------------------------------------------------------------
def test_ratio_and_count_select_from_the_global_pool() -> None:
    model = TINY_MODELS["gpt2"]()  # 2 blocks × 4 heads, 256 FFN channels
    sel = select(model, S2FTConfig(v_ratio=0.0, o_ratio=0.5, u_ratio=0.0, d_ratio=0.02))
    assert sum(len(v) for v in sel["o"].values()) == 4
    assert sum(len(v) for v in sel["d"].values()) == int(0.02 * 512)
    assert sel["v"] == {} and sel["u"] == {}
    assert select(model, S2FTConfig(o_ratio=0.01, d_ratio=0.0))["o"] != {}, "a positive ratio selects at least one"
    same = select(model, S2FTConfig(o_count=3, d_count=20, seed=4))
    assert same == select(model, S2FTConfig(o_count=3, d_count=20, seed=4))
    assert same != select(model, S2FTConfig(o_count=3, d_count=20, seed=5))
    assert sum(len(v) for v in same["d"].values()) == 20


def test_weight_norm_picks_the_largest_slices() -> None:
    model = TINY_MODELS["llama"]()
    block = block_layouts(model)[1]
    with torch.no_grad():
        get_module(model, block.down).weight[:, 77] *= 50
        get_module(model, block.o).weight[:, channels(block, "o", [1])] *= 50
    sel = select(model, S2FTConfig(o_count=1, d_count=1, criterion="weight_norm"))
    assert sel["d"] == {1: [77]} and sel["o"] == {1: [1]}


def test_parts_cover_the_selected_rows_and_columns() -> None:
    model = TINY_MODELS["llama"]()
    delta = deltatune.attach(model, S2FTConfig(o_ratio=0.0, d_ratio=0.0, v_heads={0: [1]}, o_heads={1: [0]},
                                                u_channels={0: [3, 60]}, d_channels={1: [5]}))
    parts = delta.parts
    assert parts["model.layers.0.self_attn.v_proj"].indices.tolist() == list(range(16, 32))  # KV head 1
    assert parts["model.layers.1.self_attn.o_proj"].indices.tolist() == list(range(0, 32))  # its 2 query heads
    assert parts["model.layers.0.mlp.up_proj"].indices.tolist() == [3, 60]
    assert parts["model.layers.1.mlp.down_proj"].axis == "in"
    assert delta.trainable_count == 16 * 64 + 64 * 32 + 2 * 64 + 64
    gpt2 = deltatune.attach(TINY_MODELS["gpt2"](), S2FTConfig(o_ratio=0.0, d_ratio=0.0, v_heads={1: [2]}))
    assert gpt2.parts["transformer.h.1.attn.c_attn"].indices.tolist() == list(range(128 + 32, 128 + 48))


@pytest.mark.parametrize("mapping,match", [
    ({"o_heads": {0: [2]}}, "head \\(KV group\\) 2 of block 0 does not exist"),
    ({"o_heads": {5: [0]}}, "block 5 does not exist"),
    ({"d_channels": {1: [128]}}, "FFN channel 128 of block 1 does not exist"),
    ({"u_channels": {0: [4, 4]}}, "twice"),
])
def test_a_selection_the_architecture_lacks_is_a_typed_error(mapping, match) -> None:
    with pytest.raises(TargetError, match=match):
        deltatune.attach(TINY_MODELS["llama"](), S2FTConfig(**{"o_ratio": 0.0, "d_ratio": 0.0, **mapping}))


def test_a_selection_from_the_command_line_is_read_as_a_yaml_mapping(tmp_path, data_dir, minilm_path) -> None:
    """``--set 'o_heads={0: [2]}'``: a mapping field given as text is YAML flow (as a --config file would hold)."""
    from typer.testing import CliRunner

    from deltatune.cli import app

    config = deltatune.make_config("s2ft", {"o_ratio": 0.0, "d_ratio": 0.0, "o_heads": "{0: [1], 1: [0, 1]}"})
    assert config.o_heads == {0: [1], 1: [0, 1]}
    for bad, match in (("[1, 2]", "expected a mapping"), ("{0: [1", "cannot read YAML")):
        with pytest.raises(ConfigError, match=match):
            deltatune.make_config("s2ft", {"o_ratio": 0.0, "d_ratio": 0.0, "o_heads": bad})
    res = CliRunner().invoke(app, ["train", "--method", "s2ft", "--model", minilm_path, "--task", "sst2",
                                   "--data", str(data_dir / "glue"), "--steps", "1", "--out", str(tmp_path / "o"),
                                   "--set", "o_ratio=0", "--set", "d_ratio=0", "--set", "o_heads={0: [12]}"])
    assert isinstance(res.exception, TargetError) and "head (KV group) 12 of block 0 does not" in str(res.exception)


def test_bad_config_and_architecture() -> None:
    with pytest.raises(ConfigError, match="o_ratio"):
        deltatune.make_config("s2ft", {"o_ratio": 1.5})
    with pytest.raises(ConfigError, match="selects nothing"):
        deltatune.make_config("s2ft", {"o_ratio": 0.0, "d_ratio": 0.0})
    with pytest.raises(ConfigError, match="only 4"):
        deltatune.attach(TINY_MODELS["llama"](), S2FTConfig(o_count=5))
    with pytest.raises(ConfigError, match="criterion"):
        deltatune.make_config("s2ft", {"criterion": "gradient"})

    class Odd(nn.Module):
        config = type("C", (), {"model_type": "t5"})()

    with pytest.raises(TargetError, match="t5"):
        block_layouts(Odd())


def test_only_the_slices_get_gradients_and_optimizer_state() -> None:
    model = TINY_MODELS["llama"]()
    delta = deltatune.attach(model, S2FTConfig(o_count=1, d_count=4))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(part.block) for part in delta.parts.values()}
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    model.train()
    model(**tiny_inputs("llama")).loss.backward()
    opt.step()
    assert sum(s["exp_avg"].numel() for s in opt.state.values()) == delta.trainable_count == 1 * 2 * 16 * 64 + 4 * 64


@pytest.mark.slow
def test_step_time_against_lora_at_the_same_trainable_count() -> None:
    """Rough CPU timing only (a busy shared machine; benchmarks/train_step.py is the measurement): a 4-block Llama
    (hidden 256, FFN 1024, 8 heads over 4 KV heads), S2FT on o and down vs LoRA on o_proj/down_proj with the
    rank that matches S2FT's trainable count; median of 10 steps after 2 warm-up steps."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def make() -> nn.Module:
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=1024,
                                            num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4))

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 512, (8, 64), generator=g)
    inputs = {"input_ids": ids, "labels": ids}

    def step_time(config) -> tuple[float, int]:
        model = make()
        delta = deltatune.attach(model, config)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        model.train()
        times = []
        for _ in range(12):
            t0 = time.perf_counter()
            model(**inputs).loss.backward()
            opt.step()
            opt.zero_grad()
            times.append(time.perf_counter() - t0)
        return sorted(times[2:])[5], delta.trainable_count

    s2, n = step_time(S2FTConfig(o_count=2, d_count=128))  # 2·64·256 + 128·256 = 65,536
    rank = round(n / (4 * (256 + 256 + 1024 + 256)))
    lora, m = step_time(deltatune.LoRAConfig(r=rank, targets=["o_proj", "down_proj"]))
    print(f"\ns2ft {s2 * 1e3:.1f} ms/step ({n} params) vs lora r={rank} {lora * 1e3:.1f} ms/step ({m} params)")
    assert s2 > 0 and lora > 0


def test_trains_on_minilm(minilm, tokenizer) -> None:
    batch = tokenizer(["a fine film", "dull and long", "great acting", "boring"], return_tensors="pt",
                      padding=True)
    batch["labels"] = torch.tensor([1, 0, 1, 0])
    base = copy.deepcopy(minilm)
    delta = deltatune.attach(minilm, S2FTConfig(v_ratio=0.05, o_ratio=0.05, u_ratio=0.01, d_ratio=0.01))
    assert {p.axis for p in delta.parts.values()} == {"out", "in"}
    opt = torch.optim.AdamW([p for p in minilm.parameters() if p.requires_grad], lr=5e-3)
    minilm.train()
    losses = []
    for _ in range(4):
        loss = minilm(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    minilm.eval()
    assert losses[-1] < losses[0]
    trained = logits(minilm, batch)
    merged = copy.deepcopy(base)
    deltatune.model.load_heads(merged, delta)
    deltatune.merge_delta(merged, delta)
    assert max_diff(logits(merged, batch), trained) <= 1e-5


def test_two_s2ft_deltas_compose_into_one_slice_delta_exactly() -> None:
    from conftest import randomize_delta

    from deltatune.algebra.sum_deltas import compose_deltas

    config = {"v_ratio": 0.5, "o_ratio": 0.5, "u_ratio": 0.1, "d_ratio": 0.1}
    d1 = randomize_delta(TINY_MODELS["gpt2"](), deltatune.make_config("s2ft", config), 1, 0.05)
    d2 = randomize_delta(TINY_MODELS["gpt2"](), deltatune.make_config("s2ft", {**config, "seed": 3}), 2, 0.05)
    both = compose_deltas([d1, d2])
    assert set(both.part_kinds()) == {"slice"}
    inputs = tiny_inputs("gpt2")
    one = TINY_MODELS["gpt2"]()
    deltatune.merge_delta(one, both)
    two = TINY_MODELS["gpt2"]()
    deltatune.merge_delta(two, d1)
    deltatune.merge_delta(two, d2, force=True)  # the base of d2 is the original, not base + d1
    assert max_diff(logits(one, inputs), logits(two, inputs)) <= 1e-5
    assert max_diff(logits(one, inputs), logits(TINY_MODELS["gpt2"](), inputs)) > 1e-3


@pytest.mark.parametrize("comp", COMPONENTS)
def test_a_unit_costs_what_it_trains_when_heads_times_head_dim_is_not_the_width(comp: str) -> None:
    # Llama with an explicit head_dim: 4 heads of 32 on a 64-wide residual stream
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=64)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    block = block_layouts(model)[0]
    assert (block.attn_width, block.model_dim) == (128, 64)
    one = {"o_ratio": 0.0, "d_ratio": 0.0, f"{comp}_heads" if comp in "vo" else f"{comp}_channels": {0: [0]}}
    delta = deltatune.attach(LlamaForCausalLM(config), deltatune.make_config("s2ft", one))
    assert unit_size(block, comp) == delta.trainable_count
    spent = deltatune.attach(LlamaForCausalLM(config), budget_config(model, 5000, {comp: 1.0})).trainable_count
    assert abs(spent - 5000) <= unit_size(block, comp)


def test_budget_config_matches_a_lora_count() -> None:
    model = TINY_MODELS["llama"]()
    lora = deltatune.attach(TINY_MODELS["llama"](), deltatune.LoRAConfig(r=4, targets=["o_proj", "down_proj"]))
    config = budget_config(model, lora.trainable_count)
    delta = deltatune.attach(model, config)
    assert abs(delta.trainable_count - lora.trainable_count) <= 64 * 32  # within one unit of the largest kind
    assert delta.parts and all(n.endswith(("o_proj", "down_proj")) for n in delta.parts)
    with pytest.raises(ConfigError):
        budget_config(model, 100, {"q": 1.0})
    with pytest.raises(ConfigError):
        budget_config(model, 0)


def test_co_permutation_is_a_write_the_weights_version_records() -> None:
    """Permuting writes through ``write_in_place``: a batched form kept from the unpermuted weights (keyed on the
    tensor's version) is renewed, not served again."""
    from deltatune.ops.permute import _permute

    layer = torch.nn.Linear(4, 6)
    before = (layer.weight._version, layer.bias._version)
    _permute(layer, torch.tensor([5, 4, 3, 2, 1, 0]), "out")
    assert layer.weight._version > before[0] and layer.bias._version > before[1]
