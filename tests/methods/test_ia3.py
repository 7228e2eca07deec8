"""(IA)³: the part's math against hand formulas, PEFT's default targets, training on tiny Llama / GPT-2 / BERT and
MiniLM, save/load, exact merge and revert, mixed batches beside LoRA and sparse rows, the algebra (compose,
compress, merge) and bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY_MODELS, logits, max_diff, tiny_inputs
from torch import nn
from torch.func import functional_call

import deltatune
from deltatune.algebra.compress import compress_delta
from deltatune.algebra.engine import merge as merge_engine
from deltatune.algebra.sum_deltas import compose_deltas
from deltatune.config import parse_config
from deltatune.delta import Delta
from deltatune.errors import ConfigError, DeltaFormatError, NotMergeable, ShapeMismatch, TargetError
from deltatune.fingerprint import base_parameters
from deltatune.methods.ia3 import IA3_FEEDFORWARD, IA3_TARGETS, IA3Config
from deltatune.model import attach_parts, detach, get_module, load_heads, routed_batch
from deltatune.parts.ia3 import IA3Part, ia3_weight_update, scaled_axis
from deltatune.parts.layers import LayerKind
from deltatune.routing import Routing

pytestmark = pytest.mark.usefixtures("one_thread")

ARCHS = ("llama", "gpt2", "bert")
HEADS = {"llama": [], "gpt2": [], "bert": ["classifier"]}
TOL = 1e-5


def randomise(delta: Delta, seed: int, std: float = 0.3) -> Delta:
    """Every ``ia3_l`` drawn from N(1, std²) (seeded), so the delta changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in sorted(delta.parts):
            vector = delta.parts[name].ia3_l
            vector.copy_(1.0 + torch.randn(vector.shape, generator=g) * std)
    return delta


def random_ia3(arch: str, seed: int, config: IA3Config | None = None) -> Delta:
    """A saved-and-loaded IA3 delta with random vectors, made on a fresh tiny base."""
    model = TINY_MODELS[arch]()
    delta = randomise(deltatune.attach(model, config or IA3Config()), seed)
    delta.snapshot_heads(model)
    return delta


def train(model: nn.Module, inputs: dict[str, torch.Tensor], steps: int = 3, lr: float = 3e-2) -> None:
    opt = deltatune.get_method("ia3").optimizer([p for p in model.parameters() if p.requires_grad], lr, 0.0, None)
    for _ in range(steps):
        model(**inputs).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


# --------------------------------------------------------------------------------------------------
# math
# --------------------------------------------------------------------------------------------------
def _conv1d(d_in: int, d_out: int) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    m = Conv1D(d_out, d_in)
    with torch.no_grad():
        m.weight.normal_()
        m.bias.normal_()
    return m


@pytest.mark.parametrize("layer", ["linear", "conv1d"])
@pytest.mark.parametrize("position", ["output", "input"])
def test_part_matches_hand_formula_and_its_own_update(layer: str, position: str) -> None:
    torch.manual_seed(0)
    base = nn.Linear(5, 3) if layer == "linear" else _conv1d(5, 3)
    w_out_in = base.weight if layer == "linear" else base.weight.t()  # (out, in)
    n = 3 if position == "output" else 5
    part = IA3Part(5, 3, position, LayerKind(layer), bias=True)
    with torch.no_grad():
        part.ia3_l.copy_(torch.linspace(0.5, 1.5, n))
    x = torch.randn(2, 4, 5)
    l_vec = part.ia3_l.detach()
    # output: y = l ⊙ (x Wᵀ + b); input: y = (x ⊙ l) Wᵀ + b
    expected = (l_vec * (x @ w_out_in.t() + base.bias) if position == "output"
                else (x * l_vec) @ w_out_in.t() + base.bias)
    with torch.no_grad():
        got = part(x, base)
        ups = part.updates(base)
        merged = functional_call(base, {k: getattr(base, k) + v for k, v in ups.items()}, (x,))
    assert max_diff(got, expected) <= 1e-5
    assert max_diff(merged, expected) <= 1e-5
    assert set(ups) == ({"weight", "bias"} if position == "output" else {"weight"})
    assert part.update_shapes() == {k: tuple(v.shape) for k, v in ups.items()}
    # the scaled axis of the native weight: rows of Linear (out, in) / columns of Conv1D (in, out) for outputs
    axis = scaled_axis(position, LayerKind(layer))
    assert axis == {("linear", "output"): 0, ("linear", "input"): 1, ("conv1d", "output"): 1,
                    ("conv1d", "input"): 0}[(layer, position)]
    dw = ia3_weight_update(base.weight, part.ia3_l, axis)
    assert torch.allclose(dw, base.weight * ((l_vec - 1).reshape(-1, 1) if axis == 0 else (l_vec - 1)), atol=1e-7)


def test_updates_need_the_base_module() -> None:
    part = IA3Part(4, 3, "output", bias=True)
    with pytest.raises(NotMergeable, match="base module"):
        part.updates()


# --------------------------------------------------------------------------------------------------
# targets: PEFT's defaults per model type
# --------------------------------------------------------------------------------------------------
def test_default_tables_follow_peft() -> None:
    constants = pytest.importorskip("peft.utils.constants")
    for mtype, targets in IA3_TARGETS.items():
        assert set(targets) == set(constants.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING[mtype]), mtype
        assert set(IA3_FEEDFORWARD[mtype]) == set(constants.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING[
            mtype]), mtype


PREFIX = {"llama": "model.layers.{}.", "gpt2": "transformer.h.{}.", "bert": "bert.encoder.layer.{}."}
EXPECTED_DEFAULTS = {  # (suffixes scaled at the output, suffixes scaled at the input), per layer
    "llama": ({"self_attn.k_proj", "self_attn.v_proj"}, {"mlp.down_proj"}),
    "gpt2": ({"attn.c_attn"}, {"mlp.c_proj"}),
    "bert": ({"attention.self.key", "attention.self.value"}, {"attention.output.dense", "output.dense"}),
}


@pytest.mark.parametrize("arch", ARCHS)
def test_default_targets_and_positions(arch: str) -> None:
    model = TINY_MODELS[arch]()
    delta = deltatune.attach(model, IA3Config())
    outputs, inputs = EXPECTED_DEFAULTS[arch]
    want = {}
    for i in range(2):
        prefix = PREFIX[arch].format(i)
        want.update({prefix + s: "output" for s in outputs} | {prefix + s: "input" for s in inputs})
    assert {n: p.position for n, p in delta.parts.items()} == want
    for name, part in delta.parts.items():
        module = get_module(model, name)
        assert part.layer is (LayerKind.CONV1D if arch == "gpt2" else LayerKind.LINEAR)
        assert part.bias == (getattr(module, "bias", None) is not None)
        assert torch.equal(part.ia3_l, torch.ones_like(part.ia3_l))
    assert delta.trainable_count == sum(p.features for p in delta.parts.values())


def test_explicit_targets_feedforward_and_type_targets() -> None:
    model = TINY_MODELS["llama"]()
    cfg = IA3Config(targets=["q_proj", "type:Linear"], feedforward=["o_proj"])
    delta = deltatune.attach(model, cfg)
    assert "lm_head" in delta.parts  # type:Linear is literal: every Linear, the LM head too
    assert {n.rsplit(".", 1)[-1] for n, p in delta.parts.items() if p.position == "input"} == {"o_proj"}


# --------------------------------------------------------------------------------------------------
# training, save/load, merge, revert
# --------------------------------------------------------------------------------------------------
_TRAINED: dict[str, tuple] = {}


def trained(arch: str):
    """(base copy, model with a trained IA3 delta, delta, inputs, base logits, logits at attach, after)."""
    if arch not in _TRAINED:
        model = TINY_MODELS[arch]()
        base = copy.deepcopy(model)
        inputs = tiny_inputs(arch)
        before = logits(model, inputs)
        delta = deltatune.attach(model, IA3Config())
        at_init = logits(model, inputs)
        train(model, inputs)
        delta.snapshot_heads(model)
        _TRAINED[arch] = (base, model, delta, inputs, before, at_init, logits(model, inputs))
    return _TRAINED[arch]


@pytest.mark.parametrize("arch", ARCHS)
def test_trains_only_its_vectors(arch: str) -> None:
    base, model, delta, inputs, before, at_init, after = trained(arch)
    assert torch.equal(at_init, before), "l = 1 must leave the output unchanged at attach"
    assert max_diff(after, before) > 1e-3
    heads = HEADS[arch]
    ref = dict(base_parameters(base, heads))
    assert all(torch.equal(p, ref[n]) for n, p in base_parameters(model, heads)), "a base tensor changed"
    part_ids = {id(p) for part in delta.parts.values() for p in part.parameters()}
    head_ids = {id(p) for h in heads for p in model.get_submodule(h).parameters()}
    assert {id(p) for p in model.parameters() if p.requires_grad} == part_ids | head_ids
    assert any(not torch.equal(p.ia3_l, torch.ones_like(p.ia3_l)) for p in delta.parts.values())


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip_is_bit_exact(arch: str, tmp_path) -> None:
    base, _, delta, inputs, _, _, after = trained(arch)
    loaded = deltatune.load_delta(deltatune.save_delta(delta, tmp_path / "d"))
    assert loaded.method == "ia3" and loaded.config == delta.config
    assert set(loaded.parts) == set(delta.parts)
    for name, part in delta.parts.items():
        assert loaded.parts[name].meta() == part.meta()
        assert torch.equal(loaded.parts[name].ia3_l, part.ia3_l)
    fresh = copy.deepcopy(base)
    deltatune.apply_delta(fresh, loaded)
    assert torch.equal(logits(fresh, inputs), after)


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_is_exact_and_revert_restores(arch: str) -> None:
    base, _, delta, inputs, _, _, after = trained(arch)
    fresh = copy.deepcopy(base)
    load_heads(fresh, delta)
    before = {n: p.detach().clone() for n, p in base_parameters(fresh, HEADS[arch])}
    deltatune.merge_delta(fresh, delta)
    assert max_diff(logits(fresh, inputs), after) <= TOL
    deltatune.revert_delta(fresh, delta)
    assert max(max_diff(p, before[n]) for n, p in base_parameters(fresh, HEADS[arch])) <= 1e-6


@pytest.mark.parametrize("arch", ARCHS)
def test_updates_summed_by_the_layer_equal_the_forward(arch: str) -> None:
    """Two IA3 deltas active at once (the layer sums their updates) equal their composition alone, and the
    composition is one IA3 part per module with l = 1 + Σ(l_t − 1)."""
    a, b = random_ia3(arch, 1), random_ia3(arch, 2)
    inputs = tiny_inputs(arch)
    both = TINY_MODELS[arch]()
    deltatune.apply_delta(both, a, name="a")
    deltatune.apply_delta(both, b, name="b", force=True)
    composed = compose_deltas([a, b])
    assert {p.kind for p in composed.parts.values()} == {"ia3"}
    for name, part in composed.parts.items():
        assert torch.allclose(part.ia3_l, a.parts[name].ia3_l + b.parts[name].ia3_l - 1, atol=1e-6)
    alone = TINY_MODELS[arch]()
    deltatune.apply_delta(alone, composed)
    assert max_diff(logits(both, inputs), logits(alone, inputs)) <= TOL
    assert max_diff(logits(alone, inputs), logits(TINY_MODELS[arch](), inputs)) > 1e-4


def test_trains_on_minilm(minilm, tokenizer) -> None:
    batch = tokenizer(["a gripping, beautiful film", "dull and far too long"], return_tensors="pt", padding=True)
    batch["labels"] = torch.tensor([1, 0])
    base = copy.deepcopy(minilm)
    before = logits(minilm, batch)
    delta = deltatune.attach(minilm, IA3Config())
    assert {n.split("encoder.layer.")[-1].split(".", 1)[-1] for n in delta.parts} == {
        "attention.self.key", "attention.self.value", "attention.output.dense", "output.dense"}
    assert torch.equal(logits(minilm, batch), before)
    train(minilm, batch, steps=3, lr=5e-2)
    delta.snapshot_heads(minilm)
    after = logits(minilm, batch)
    assert max_diff(after, before) > 1e-3
    merged = copy.deepcopy(base)
    deltatune.apply_delta(merged, delta, merge=True)
    assert max_diff(logits(merged, batch), after) <= TOL


# --------------------------------------------------------------------------------------------------
# mixed batches beside LoRA, sparse and base rows
# --------------------------------------------------------------------------------------------------
def _others(arch: str) -> tuple[Delta, Delta]:
    lora = deltatune.attach(TINY_MODELS[arch](), deltatune.LoRAConfig(r=2))
    sparse = deltatune.attach(TINY_MODELS[arch](), deltatune.SparseConfig(num_tunable=500, regrow=False))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for d, std in ((lora, 0.1), (sparse, 0.5)):
            for part in d.parts.values():
                for p in part.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * std)
    return lora, sparse


@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_batch_equals_each_row_alone(arch: str) -> None:
    ia3_a, ia3_b = random_ia3(arch, 3), random_ia3(arch, 4, IA3Config(targets=["all-linear"], feedforward=[]))
    lora, sparse = _others(arch)
    deltas = {"ia3_a": ia3_a, "ia3_b": ia3_b, "lora": lora, "sparse": sparse}
    model = TINY_MODELS[arch]()
    for name, d in deltas.items():
        attach_parts(model, d.parts, name)
    rows = ["ia3_a", None, "lora", "ia3_b", "sparse", "ia3_a"]
    inputs = tiny_inputs(arch, batch=len(rows))
    with deltatune.mixed_batch(model, rows):
        mixed = logits(model, inputs)
    bare = TINY_MODELS[arch]()
    for i, name in enumerate(rows):
        ref_model = TINY_MODELS[arch]()
        if name is not None:
            attach_parts(ref_model, deltas[name].parts, name)
        row = {k: v[i:i + 1] for k, v in inputs.items()}
        ref = logits(ref_model, row)
        assert max_diff(mixed[i:i + 1], ref) <= 1e-6, f"row {i} ({name})"
        if name is not None and name.startswith("ia3"):
            assert max_diff(ref, logits(bare, row)) > 1e-4, "the IA3 delta does not change this row (vacuous)"


@pytest.mark.parametrize("positions", [("output", "output"), ("input", "input"), ("output", "input")])
def test_per_token_routing(positions: tuple[str, str]) -> None:
    """IA3 parts alone on a module take the fused pass (one position) or one pass per part (two positions)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4))
    parts = {}
    for name, seed, position in (("a", 1, positions[0]), ("b", 2, positions[1])):
        part = IA3Part(6, 4, position, bias=True)
        with torch.no_grad():
            part.ia3_l.copy_(1 + torch.randn(part.features, generator=torch.Generator().manual_seed(seed)))
        parts[name] = part
        attach_parts(model, {"0": part}, name)
    x = torch.randn(2, 3, 6)
    tokens = [["a", None, "b"], ["b", "b", "a"]]
    with torch.no_grad(), routed_batch(model, Routing.per_token(tokens)):
        out = model(x)
    base = model[0].base
    for i, row in enumerate(tokens):
        for t, name in enumerate(row):
            with torch.no_grad():
                ref = base(x[i, t]) if name is None else parts[name](x[i, t], base)
            assert max_diff(out[i, t], ref) <= 1e-6


# --------------------------------------------------------------------------------------------------
# the algebra
# --------------------------------------------------------------------------------------------------
def test_compress_acts_on_the_deviation_from_one() -> None:
    delta = random_ia3("llama", 6)
    kept = compress_delta(delta, "magnitude", density=0.5)
    for name, part in kept.parts.items():
        dev, orig = part.ia3_l - 1, delta.parts[name].ia3_l - 1
        on = dev != 0
        assert torch.allclose(dev[on], orig[on], atol=1e-6)  # kept values unchanged …
        assert part.kind == "ia3"
    total = sum(int((p.ia3_l != 1).sum()) for p in kept.parts.values())
    assert total == sum(p.features for p in delta.parts.values()) // 2  # … and dropped ones back to l = 1


@pytest.mark.parametrize("dtype,torch_dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_quantize_rounds_the_deviation_not_the_scale(dtype: str, torch_dtype: torch.dtype) -> None:
    """``l = 1 + round(l − 1)`` kept in fp32: rounding ``l`` itself in bf16 (spacing 2⁻⁷ near 1) erased small
    deviations (relative error 0.6 on ``l − 1`` with std 3e-3, most updates zeroed)."""
    delta = randomise(random_ia3("llama", 6), seed=6, std=3e-3)
    quant = compress_delta(delta, "quantize", dtype=dtype)
    for name, part in quant.parts.items():
        dev = delta.parts[name].ia3_l.detach() - 1
        assert part.ia3_l.dtype == torch.float32
        assert torch.equal(part.ia3_l - 1, dev.to(torch_dtype).float())


def test_lowrank_and_engine_merge_need_the_base_and_say_so(tmp_path) -> None:
    a, b = random_ia3("llama", 7), random_ia3("llama", 8)
    with pytest.raises(NotMergeable, match="base module"):
        compress_delta(a, "lowrank", rank=2)
    assert compress_delta(a, "lowrank", rank=2, model=TINY_MODELS["llama"]()).parts
    with pytest.raises(NotMergeable, match="base weights") as err:
        merge_engine([a, b], "linear", weights=[0.5, 0.5])
    assert err.value.kind == "ia3"
    TINY_MODELS["llama"]().save_pretrained(tmp_path / "base")
    merged = merge_engine([a, b], "linear", weights=[0.5, 0.5], base=str(tmp_path / "base"))
    if True:  # the engine densified the updates against the base: θ₀ + ½(Δ_a + Δ_b), i.e. l = 1 + ½Σ(l_t − 1)
        model = TINY_MODELS["llama"]()
        deltatune.apply_delta(model, merged, merge=True, force=True)
        average = compose_deltas([a, b])
        with torch.no_grad():
            for p in average.parts.values():
                p.ia3_l.copy_(1 + (p.ia3_l - 1) / 2)
        ref = TINY_MODELS["llama"]()
        deltatune.apply_delta(ref, average)
        inputs = tiny_inputs("llama")
        assert max_diff(logits(model, inputs), logits(ref, inputs)) <= TOL


# --------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------
def test_config_values_are_checked() -> None:
    with pytest.raises(ConfigError, match="targets is empty"):
        IA3Config(targets=[])
    with pytest.raises(ConfigError, match="feedforward"):
        IA3Config(feedforward=["ok", ""])
    with pytest.raises(ConfigError, match="unknown field"):
        parse_config(IA3Config, {"rank": 4})
    with pytest.raises(ConfigError, match="targets"):
        parse_config(IA3Config, {"targets": 3})


def test_unknown_model_type_needs_targets() -> None:
    model = TINY_MODELS["llama"]()
    model.config.model_type = "no-such-model"
    with pytest.raises(ConfigError, match="no default targets for model type 'no-such-model'.*llama"):
        deltatune.attach(model, IA3Config())
    assert not any(isinstance(m, deltatune.layer.DeltaLayer) for m in model.modules())


def test_targets_matching_nothing_list_what_exists() -> None:
    with pytest.raises(TargetError, match="type:LayerNorm.*Module types in this model.*Linear"):
        deltatune.attach(TINY_MODELS["llama"](), IA3Config(targets=["type:LayerNorm"]))
    with pytest.raises(TargetError, match="nope.*targeted: .*k_proj"):
        deltatune.attach(TINY_MODELS["llama"](), IA3Config(feedforward=["nope"]))


def test_check_base_and_meta_are_validated() -> None:
    part = IA3Part(4, 3, "output", bias=True)
    with pytest.raises(ShapeMismatch, match="3→4|4→3"):
        part.check_base(nn.Linear(3, 4), "m")
    with pytest.raises(ShapeMismatch, match="with a bias, but the base module has none"):
        part.check_base(nn.Linear(4, 3, bias=False), "m")
    with pytest.raises(ShapeMismatch, match="Linear or Conv1D"):
        part.check_base(nn.LayerNorm(3), "m")
    good = part.meta()
    assert IA3Part.expected_state(good) == {"ia3_l": (3,)}
    for bad in ({**good, "position": "middle"}, {**good, "layer": "embedding"}, {**good, "out_features": None},
                {**good, "bias": "yes"}, {**good, "extra": 1}, {**good, "in_features": -1}, [1, 2]):
        with pytest.raises(DeltaFormatError):
            IA3Part.expected_state(bad)
    with pytest.raises(ShapeMismatch):
        IA3Part.from_state({"ia3_l": torch.ones(4)}, good)


def test_unbound_part_refuses_the_algebra() -> None:
    part = IA3Part(None, 6, "output", bias=None)  # read from PEFT without a model
    with pytest.raises(NotMergeable, match="without its base model"):
        part.update_shapes()
    assert part.covered_entries() == 0
    part.check_base(nn.Linear(5, 6), "m")  # attaches: the module decides the rest


def test_revert_with_a_zero_vector_is_refused_before_writing() -> None:
    torch.manual_seed(0)
    base = nn.Linear(3, 2)
    part = IA3Part(3, 2, "output", bias=True)
    with torch.no_grad():
        part.ia3_l.copy_(torch.tensor([0.0, 2.0]))
    part.merge_into(base)
    snapshot = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(NotMergeable, match="zero"):
        part.unmerge_from(base)
    assert all(torch.equal(base.state_dict()[k], v) for k, v in snapshot.items())


def test_detach_restores_the_base() -> None:
    model = TINY_MODELS["gpt2"]()
    ref = {n: p.clone() for n, p in model.state_dict().items()}
    randomise(deltatune.attach(model, IA3Config()), 9)
    detach(model)
    assert all(torch.equal(p, ref[n]) for n, p in model.state_dict().items())
