"""Bottleneck adapters (Houlsby, Pfeiffer, scaled parallel) on tiny Llama / GPT-2 / BERT and on MiniLM.

Checks: the adapter math against a hand computation; each placement lands where the papers put it (BERT's
parallel adapter inside ``LN(FFN(x) + s·Δh(x) + x)``); unchanged output at attach, training changes it; a bit-exact
save/load round trip; merge / compose / compress / apply-with-merging refused with ``NotMergeable`` before anything
is written; mixed batches beside LoRA and sparse rows equal to each row alone; detach restores the base; an
adapter on ``mlp`` nests with a LoRA on ``mlp.down_proj``; bad configs and metadata give typed errors.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_MODELS, base_state, logits, max_diff, randomize_delta, tiny_inputs
from torch import nn

import deltatune
from deltatune.algebra.compose import compose
from deltatune.algebra.compress import compress_delta
from deltatune.algebra.engine import merge
from deltatune.algebra.sum_deltas import compose_deltas
from deltatune.errors import ConfigError, DeltaFormatError, InputTooLarge, NotMergeable, ShapeMismatch, TargetError
from deltatune.fingerprint import base_parameters
from deltatune.layer import DeltaLayer
from deltatune.methods.adapter import AdapterConfig
from deltatune.model import attach_parts, delta_layers, get_module, load_heads, routed_batch
from deltatune.parts.adapter import AdapterPart, adapter_delta
from deltatune.routing import Routing

pytestmark = pytest.mark.usefixtures("one_thread")

ARCHS = ("llama", "gpt2", "bert")
PLACEMENTS = ("houlsby", "pfeiffer", "parallel")
HEADS = {"llama": [], "gpt2": [], "bert": ["classifier"]}
EXPECTED_SITES = {  # per layer N, what each placement wraps (the method file's table, spelled out)
    ("llama", "houlsby"): ["model.layers.{N}.self_attn.o_proj", "model.layers.{N}.mlp.down_proj"],
    ("llama", "pfeiffer"): ["model.layers.{N}.mlp.down_proj"],
    ("llama", "parallel"): ["model.layers.{N}.mlp"],
    ("gpt2", "houlsby"): ["transformer.h.{N}.attn.c_proj", "transformer.h.{N}.mlp.c_proj"],
    ("gpt2", "pfeiffer"): ["transformer.h.{N}.mlp.c_proj"],
    ("gpt2", "parallel"): ["transformer.h.{N}.mlp"],
    ("bert", "houlsby"): ["bert.encoder.layer.{N}.attention.output.dense", "bert.encoder.layer.{N}.output.dense"],
    ("bert", "pfeiffer"): ["bert.encoder.layer.{N}.output.dense"],
    ("bert", "parallel"): ["bert.encoder.layer.{N}.output"],
}
CASES = [(a, p) for a in ARCHS for p in PLACEMENTS]
IDS = [f"{p}-{a}" for a, p in CASES]


def train_steps(model: nn.Module, inputs: dict[str, torch.Tensor], steps: int = 3, lr: float = 1e-2) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        model(**inputs).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()


# --------------------------------------------------------------------------------------------------
# the math
# --------------------------------------------------------------------------------------------------
def test_adapter_delta_matches_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    u = torch.randn(2, 3, 5, generator=g)
    wd, bd = torch.randn(2, 5, generator=g), torch.randn(2, generator=g)
    wu, bu = torch.randn(5, 2, generator=g), torch.randn(5, generator=g)
    for act, fn in [("relu", torch.relu), ("gelu", F.gelu), ("silu", F.silu), ("tanh", torch.tanh)]:
        expected = 4.0 * (fn(u @ wd.t() + bd) @ wu.t() + bu)  # s · (W_up act(W_down u + b_down) + b_up)
        assert torch.allclose(adapter_delta(u, wd, bd, wu, bu, act, 4.0), expected, atol=1e-6)
    no_bias = 0.5 * (torch.relu(u @ wd.t()) @ wu.t())
    assert torch.allclose(adapter_delta(u, wd, None, wu, None, "relu", 0.5), no_bias, atol=1e-6)
    # dropout after the non-linearity acts only in training
    assert torch.equal(adapter_delta(u, wd, bd, wu, bu, "relu", 1.0, dropout=0.9, training=False),
                       adapter_delta(u, wd, bd, wu, bu, "relu", 1.0))
    torch.manual_seed(0)
    dropped = adapter_delta(u, wd, bd, wu, bu, "relu", 1.0, dropout=0.9, training=True)
    assert not torch.allclose(dropped, adapter_delta(u, wd, bd, wu, bu, "relu", 1.0))


@pytest.mark.parametrize("init", ["bert", "lora"])
def test_init_zeroes_the_up_projection_and_draws_the_down_projection(init):
    part = AdapterPart(64, 8, init=init, generator=torch.Generator().manual_seed(0))
    assert torch.count_nonzero(part.up_weight) == 0
    assert torch.count_nonzero(part.down_bias) == 0 and torch.count_nonzero(part.up_bias) == 0
    std = float(part.down_weight.detach().std())
    if init == "bert":
        assert 0.015 < std < 0.025  # N(0, 0.02²)
    else:
        bound = 1.0 / math.sqrt(64)  # kaiming-uniform(a=√5) on fan_in 64
        assert float(part.down_weight.detach().abs().max()) <= bound and std > 0.5 * bound / math.sqrt(3)
    assert torch.count_nonzero(part.adapt(torch.randn(3, 64))) == 0


# --------------------------------------------------------------------------------------------------
# placement
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("arch", "placement"), CASES, ids=IDS)
def test_placement_wraps_the_papers_sites(arch, placement):
    model = TINY_MODELS[arch]()
    delta = deltatune.attach(model, AdapterConfig(placement=placement, bottleneck=8))
    expected = [s.format(N=n) for n in range(2) for s in EXPECTED_SITES[(arch, placement)]]
    assert sorted(delta.parts) == sorted(expected)
    cfg = AdapterConfig(placement=placement)
    for part in delta.parts.values():
        assert isinstance(part, AdapterPart) and part.features == 64 and part.bottleneck == 8
        assert part.scale == (4.0 if placement == "parallel" else 1.0) == cfg.effective_scale
    sources = {p.source for p in delta.parts.values()}
    assert sources == ({"output"} if placement != "parallel" else {"residual" if arch == "bert" else "input"})
    assert delta.trainable_count == len(expected) * (2 * 64 * 8 + 8 + 64)


def test_parallel_adapter_on_bert_sits_inside_the_residual_and_layernorm():
    """``BertOutput(h, x)`` with the parallel part computes ``LN(dropout(dense(h)) + s·Δh(x) + x)``."""
    model = TINY_MODELS["bert"]()
    delta = randomize_delta(model, AdapterConfig(placement="parallel", bottleneck=8), seed=3, std=0.2)
    name = "bert.encoder.layer.0.output"
    part, module = delta.parts[name], get_module(model, name)
    g = torch.Generator().manual_seed(5)
    h, x = torch.randn(2, 4, 128, generator=g), torch.randn(2, 4, 64, generator=g)
    with torch.no_grad():
        got = model.get_submodule(name)(h, x)
        got_kw = model.get_submodule(name)(h, input_tensor=x)
        expected = module.LayerNorm(module.dense(h) + part.adapt(x) + x)
        plain = module(h, x)
    assert max_diff(got, expected) <= 1e-6 and max_diff(got_kw, expected) <= 1e-6
    assert max_diff(got, plain) > 1e-3


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_parallel_adapter_adds_to_the_ffn_output_from_its_input(arch):
    model = TINY_MODELS[arch]()
    delta = randomize_delta(model, AdapterConfig(placement="parallel", bottleneck=8), seed=3, std=0.2)
    name = next(iter(delta.parts))
    x = torch.randn(2, 4, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = model.get_submodule(name)(x)
        expected = get_module(model, name)(x) + delta.parts[name].adapt(x)
    assert max_diff(got, expected) <= 1e-6


# --------------------------------------------------------------------------------------------------
# attach, train, save/load, detach
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("arch", "placement"), CASES, ids=IDS)
def test_unchanged_at_attach_trains_round_trips_and_detaches(arch, placement, tmp_path):
    model = TINY_MODELS[arch]()
    base = copy.deepcopy(model)
    inputs = tiny_inputs(arch)
    before = logits(model, inputs)
    delta = deltatune.attach(model, AdapterConfig(placement=placement, bottleneck=8, dropout=0.1))
    assert torch.equal(logits(model, inputs), before), "attaching an adapter changed the output"
    train_steps(model, inputs)
    after = logits(model, inputs)
    assert max_diff(after, before) > 1e-3
    assert all(torch.count_nonzero(p.up_weight) > 0 for p in delta.parts.values()), "an adapter did not train"
    heads = HEADS[arch]
    ref = base_state(base, heads)
    assert all(torch.equal(p, ref[n]) and not p.requires_grad for n, p in base_parameters(model, heads))
    # save → load → apply on a fresh base: the same logits, bit for bit
    delta.snapshot_heads(model)
    loaded = deltatune.load_delta(deltatune.save_delta(delta, tmp_path / "delta"))
    assert loaded.method == "adapter" and set(loaded.parts) == set(delta.parts)
    for name, part in loaded.parts.items():
        assert part.meta() == delta.parts[name].meta()
        assert all(torch.equal(v, delta.parts[name].state()[k]) for k, v in part.state().items())
    fresh = copy.deepcopy(base)
    deltatune.apply_delta(fresh, loaded)
    assert torch.equal(logits(fresh, inputs), after)
    # detach: the base modules come back, and so does the base output
    removed = deltatune.detach(model)
    assert set(removed) == set(delta.parts)
    assert not any(isinstance(m, DeltaLayer) for m in model.modules())
    assert all(torch.equal(p, ref[n]) for n, p in base_parameters(model, heads))
    deltatune.detach(fresh)  # the delta's head was routed, not loaded: fresh is the base again, head included
    assert not any(isinstance(m, DeltaLayer) for m in fresh.modules())
    assert torch.equal(logits(fresh, inputs), before)
    with_head = copy.deepcopy(base)  # the trained model keeps its trained head (trained in place)
    load_heads(with_head, delta)
    assert torch.equal(logits(model, inputs), logits(with_head, inputs))


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_trains_on_minilm(placement, minilm, tokenizer):
    texts = ["a gripping, beautifully made film", "dull and far too long", "I loved every minute", "a mess"]
    batch = dict(tokenizer(texts, padding=True, return_tensors="pt"))
    batch["labels"] = torch.tensor([1, 0, 1, 0])
    base = copy.deepcopy(minilm)
    before = logits(minilm, batch)
    delta = deltatune.attach(minilm, AdapterConfig(placement=placement, reduction_factor=16))
    assert torch.equal(logits(minilm, batch), before)
    assert {p.bottleneck for p in delta.parts.values()} == {384 // 16}
    expected = 12 if placement == "houlsby" else 6
    assert len(delta.parts) == expected
    with torch.no_grad():
        loss0 = minilm(**batch).loss.item()
    train_steps(minilm, batch, steps=5, lr=1e-3)
    with torch.no_grad():
        loss1 = minilm(**batch).loss.item()
    assert loss1 < loss0
    assert all(torch.count_nonzero(p.up_weight) > 0 for p in delta.parts.values())
    heads = ["classifier"]
    ref = base_state(base, heads)
    assert all(torch.equal(p, ref[n]) for n, p in base_parameters(minilm, heads))


# --------------------------------------------------------------------------------------------------
# not mergeable: refused up front, nothing written
# --------------------------------------------------------------------------------------------------
def _trained_adapter(arch: str, placement: str, seed: int) -> deltatune.Delta:
    return randomize_delta(TINY_MODELS[arch](), AdapterConfig(placement=placement, bottleneck=4), seed, 0.1)


def _refused(err: NotMergeable, delta: deltatune.Delta) -> None:
    assert err.kind == "adapter" and err.module == next(iter(delta.parts))
    assert repr(err.module) in str(err) and "'adapter'" in str(err)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_merge_is_refused_before_anything_is_written(placement, tmp_path):
    delta = _trained_adapter("llama", placement, 1)
    other = _trained_adapter("llama", placement, 2)
    model = TINY_MODELS["llama"]()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def unchanged() -> None:
        assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
        assert list(delta_layers(model)) == []

    with pytest.raises(NotMergeable) as exc:
        deltatune.merge_delta(model, delta)
    _refused(exc.value, delta)
    unchanged()
    with pytest.raises(NotMergeable) as exc:
        deltatune.apply_delta(model, delta, merge=True)
    _refused(exc.value, delta)
    unchanged()
    out = tmp_path / "merged"
    with pytest.raises(NotMergeable) as exc:
        merge([delta, other], "linear", output="dense", out=out)
    _refused(exc.value, delta)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(NotMergeable) as exc:
        compose(model, [delta], mode="attach")
    _refused(exc.value, delta)
    unchanged()
    with pytest.raises(NotMergeable):
        compose_deltas([delta, other])
    with pytest.raises(NotMergeable) as exc:
        compress_delta(delta, "magnitude", density=0.5)
    _refused(exc.value, delta)


# --------------------------------------------------------------------------------------------------
# mixed batches
# --------------------------------------------------------------------------------------------------
MIXED_PAIRS = [("houlsby", "houlsby"), ("pfeiffer", "parallel"), ("parallel", "parallel")]


def _saved(arch: str, config, seed: int, std: float, tmp_path, name: str) -> deltatune.Delta:
    delta = randomize_delta(TINY_MODELS[arch](), config, seed, std)
    return deltatune.load_delta(deltatune.save_delta(delta, tmp_path / name))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("pa", "pb"), MIXED_PAIRS, ids=[f"{a}+{b}" for a, b in MIXED_PAIRS])
def test_mixed_batch_beside_lora_and_sparse_rows_matches_each_row_alone(arch, pa, pb, tmp_path):
    deltas = {
        "a": _saved(arch, AdapterConfig(placement=pa, bottleneck=4), 10, 0.1, tmp_path, "a"),
        "b": _saved(arch, AdapterConfig(placement=pb, bottleneck=6, act="gelu"), 20, 0.1, tmp_path, "b"),
        "l": _saved(arch, deltatune.LoRAConfig(r=2), 30, 0.1, tmp_path, "l"),
        "s": _saved(arch, deltatune.SparseConfig(num_tunable=500, regrow=False, seed=4), 40, 0.5, tmp_path, "s"),
    }
    model = TINY_MODELS[arch]()
    for name, delta in deltas.items():
        attach_parts(model, delta.parts, name)
    rows = ["a", None, "b", "l", "s"]
    inputs = tiny_inputs(arch, batch=len(rows))
    for names in (rows[:4], rows, ["a", "b", None]):  # the brief's batch; with sparse rows; adapters only
        sub = {k: v[: len(names)] for k, v in inputs.items()}
        with deltatune.mixed_batch(model, names):
            mixed = logits(model, sub)
        bare = TINY_MODELS[arch]()
        for i, name in enumerate(names):
            alone = TINY_MODELS[arch]()
            if name is not None:
                deltatune.apply_delta(alone, deltas[name])
            row = {k: v[i:i + 1] for k, v in sub.items()}
            ref = logits(alone, row)
            assert max_diff(mixed[i:i + 1], ref) <= 1e-6, f"row {i} ({name})"
            if name is not None:
                assert max_diff(ref, logits(bare, row)) > 1e-3, f"delta {name} does not change its row (vacuous)"


def test_mixed_forward_routes_tokens_independently():
    """Per-token routing: each token gets its own adapter (sequential and parallel), ``None`` the base."""
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(6, 6)
    parts = []
    for source in ("output", "input"):
        p = AdapterPart(6, 3, scale=2.0, source=source)
        with torch.no_grad():
            for t in p.parameters():
                t.copy_(torch.randn(t.shape, generator=g))
        parts.append(p)
    x = torch.randn(2, 5, 6, generator=g)
    ids = torch.tensor([[0, 1, 2, 1, 0], [2, 2, 0, 1, 1]])
    table = [None, *parts]
    with torch.no_grad():
        got = AdapterPart.mixed_forward(x, lin, table, ids)
        for i in range(2):
            for t in range(5):
                part = table[int(ids[i, t])]
                xt = x[i:i + 1, t:t + 1]
                ref = lin(xt) if part is None else part(xt, lin)
                assert max_diff(got[i:i + 1, t:t + 1], ref) <= 1e-6


def test_per_token_routing_through_the_model_matches_per_row():
    model = TINY_MODELS["llama"]()
    for name, seed in (("a", 1), ("b", 2)):
        delta = randomize_delta(TINY_MODELS["llama"](), AdapterConfig(placement="parallel", bottleneck=4), seed, 0.1)
        attach_parts(model, delta.parts, name)
    inputs = tiny_inputs("llama")
    names = ["a", "b", None]
    with deltatune.mixed_batch(model, names):
        per_row = logits(model, inputs)
    seq = inputs["input_ids"].shape[1]
    with routed_batch(model, Routing.per_token([[n] * seq for n in names])):
        per_token = logits(model, inputs)
    assert max_diff(per_row, per_token) <= 1e-6


# --------------------------------------------------------------------------------------------------
# nesting with LoRA
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("adapter_first", [True, False], ids=["adapter-first", "lora-first"])
def test_parallel_adapter_on_mlp_nests_with_lora_on_down_proj(adapter_first):
    model = TINY_MODELS["llama"]()
    inputs = tiny_inputs("llama")
    adapter = randomize_delta(TINY_MODELS["llama"](), AdapterConfig(placement="parallel", bottleneck=4), 1, 0.1)
    lora = randomize_delta(TINY_MODELS["llama"](), deltatune.LoRAConfig(r=2, targets=["mlp.down_proj"]), 2, 0.1)
    order = [("adapter", adapter), ("lora", lora)] if adapter_first else [("lora", lora), ("adapter", adapter)]
    for name, delta in order:
        deltatune.apply_delta(model, delta, name=name)
    wrapped = {n for n, _ in delta_layers(model)}
    assert wrapped == set(adapter.parts) | set(lora.parts)
    # one FFN by hand: the LoRA'd down projection inside, the adapter next to the block
    name = "model.layers.0.mlp"
    mlp, down = get_module(model, name), get_module(model, f"{name}.down_proj")  # base modules, unwrapped
    lp, ap = lora.parts[f"{name}.down_proj"], adapter.parts[name]
    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        z = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
        expected = down(z) + lp.scale * (z @ lp.lora_A.t()) @ lp.lora_B.t() + ap.adapt(x)
        assert max_diff(model.get_submodule(name)(x), expected) <= 1e-5
    both = logits(model, inputs)
    for only in (adapter, lora):
        alone = TINY_MODELS["llama"]()
        deltatune.apply_delta(alone, only)
        assert max_diff(both, logits(alone, inputs)) > 1e-3, "one of the two nested deltas does not act"
    deltatune.detach(model, "adapter")
    alone = TINY_MODELS["llama"]()
    deltatune.apply_delta(alone, lora)
    assert max_diff(logits(model, inputs), logits(alone, inputs)) <= 1e-6
    deltatune.detach(model)
    assert max_diff(logits(model, inputs), logits(TINY_MODELS["llama"](), inputs)) == 0.0


def _attach_both(model: nn.Module, adapter_first: bool) -> tuple[deltatune.Delta, deltatune.Delta]:
    out = {}
    for kind in (["adapter", "lora"] if adapter_first else ["lora", "adapter"]):
        config = (AdapterConfig(placement="parallel", bottleneck=4) if kind == "adapter"
                  else deltatune.LoRAConfig(r=2, targets=["mlp.c_proj"]))
        out[kind] = deltatune.attach(model, config, name=kind)
    return out["adapter"], out["lora"]


@pytest.mark.parametrize("adapter_first", [
    pytest.param(True, id="adapter-first"),
    pytest.param(False, id="lora-first"),
])
def test_nested_deltas_attached_for_training_both_train(adapter_first):
    model = TINY_MODELS["gpt2"]()
    inputs = tiny_inputs("gpt2")
    adapter, lora = _attach_both(model, adapter_first)
    train_steps(model, inputs)
    assert all(torch.count_nonzero(p.up_weight) > 0 for p in adapter.parts.values())
    assert all(torch.count_nonzero(p.lora_B) > 0 for p in lora.parts.values())


# --------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mapping", [
    {"placement": "serial"}, {"bottleneck": 0}, {"bottleneck": -3}, {"reduction_factor": 0},
    {"bottleneck": 8, "reduction_factor": 4}, {"scale": 0}, {"scale": -1.0}, {"scale": "nan"}, {"scale": "inf"},
    {"dropout": 1.0}, {"dropout": -0.1}, {"act": "softmax"}, {"init": "xavier"}, {"targets": []},
    {"bottleneck": "wide"}, {"bias": "maybe"}, {"bottelneck": 8},
], ids=lambda m: ",".join(f"{k}={v}" for k, v in m.items()))
def test_bad_config_is_a_config_error(mapping):
    with pytest.raises(ConfigError):
        deltatune.make_config("adapter", mapping)


def test_defaults_follow_the_papers():
    seq, par = deltatune.make_config("adapter", {}), deltatune.make_config("adapter", {"placement": "parallel"})
    assert (seq.effective_scale, seq.effective_init) == (1.0, "bert")
    assert (par.effective_scale, par.effective_init) == (4.0, "lora")
    assert deltatune.make_config("adapter", {"scale": "2", "bottleneck": "16"}).width(384) == 16
    assert deltatune.make_config("adapter", {"reduction_factor": 16}).width(384) == 24


def test_examples_attach_on_every_tiny_arch():
    method = deltatune.get_method("adapter")
    assert set(method.examples) == {"", "pfeiffer", "parallel"}
    for variant, mapping in method.examples.items():
        for arch in ARCHS:
            delta = deltatune.attach(TINY_MODELS[arch](), method.parse(mapping))
            assert delta.parts, (variant, arch)
    assert method.capabilities()["additive"] is False and method.capabilities()["mixed_rows"] is True


def test_targets_errors_are_typed():
    with pytest.raises(TargetError, match="nothing_here"):
        deltatune.attach(TINY_MODELS["llama"](), AdapterConfig(targets=["nothing_here"]))
    with pytest.raises(TargetError, match="role:mlp"):  # BERT has no FFN block module
        deltatune.attach(TINY_MODELS["bert"](), AdapterConfig(placement="parallel", targets=["role:mlp"]))
    with pytest.raises(TargetError, match="cannot be told"):  # an Embedding's input is token ids
        deltatune.attach(TINY_MODELS["llama"](), AdapterConfig(placement="parallel", targets=["embed_tokens"]))
    model = TINY_MODELS["llama"]()
    model.config.model_type = "unknown-arch"
    with pytest.raises(TargetError, match="unknown-arch"):
        deltatune.attach(model, AdapterConfig())
    # an explicit target works on any architecture
    delta = deltatune.attach(model, AdapterConfig(targets=["type:RMSNorm"], bottleneck=4))
    assert len(delta.parts) == 5 and {p.features for p in delta.parts.values()} == {64}


def test_residual_source_on_a_module_without_a_residual_argument_is_a_target_error():
    part = AdapterPart(4, 2, source="residual")
    layer = DeltaLayer(nn.Linear(4, 4))
    layer.add("a", part)
    with pytest.raises(TargetError, match="residual"):
        layer(torch.randn(2, 4))
    with pytest.raises(TargetError, match="residual"):
        AdapterPart.mixed_forward(torch.randn(2, 4), nn.Linear(4, 4), [part], torch.zeros(2, dtype=torch.long))
    with pytest.raises(ConfigError, match="source"):
        AdapterPart(4, 2, source="sideways")


def test_wrong_base_shape_is_a_shape_mismatch(tmp_path):
    delta = _trained_adapter("llama", "houlsby", 1)
    path = deltatune.save_delta(delta, tmp_path / "d")
    other = TINY_MODELS["gpt2"]()
    with pytest.raises(TargetError):  # no such module in GPT-2
        deltatune.apply_delta(other, deltatune.load_delta(path), force=True)
    part = AdapterPart(32, 4)
    with pytest.raises(ShapeMismatch, match="width 64"):
        part.check_base(nn.Linear(16, 64), "m")
    with pytest.raises(ShapeMismatch, match="cannot tell"):
        AdapterPart(32, 4, source="input").check_base(nn.Embedding(10, 32), "m")


GOOD_META = {"features": 8, "bottleneck": 2, "scale": 1.0, "source": "output", "act": "relu", "dropout": 0.0,
             "bias": True}


@pytest.mark.parametrize(("change", "error"), [
    ({"features": 0}, DeltaFormatError), ({"bottleneck": 2.5}, DeltaFormatError), ({"scale": "x"}, DeltaFormatError),
    ({"scale": float("nan")}, DeltaFormatError), ({"source": "side"}, DeltaFormatError),
    ({"act": "softmax"}, DeltaFormatError), ({"dropout": 1.0}, DeltaFormatError), ({"bias": 1}, DeltaFormatError),
    ({"extra": 1}, DeltaFormatError), ({"features": 2**40}, InputTooLarge),
], ids=lambda c: str(c) if isinstance(c, dict) else c.__name__)
def test_bad_meta_is_refused(change, error):
    assert AdapterPart.expected_state(GOOD_META) == {"down_weight": (2, 8), "up_weight": (8, 2), "down_bias": (2,),
                                                     "up_bias": (8,)}
    assert set(AdapterPart.expected_state({**GOOD_META, "bias": False})) == {"down_weight", "up_weight"}
    with pytest.raises(error):
        AdapterPart.expected_state({**GOOD_META, **change})
    with pytest.raises(DeltaFormatError):
        AdapterPart.expected_state([1, 2])
    with pytest.raises(DeltaFormatError):
        AdapterPart.expected_state({k: v for k, v in GOOD_META.items() if k != "source"})
    with pytest.raises(ShapeMismatch):
        AdapterPart.from_state({"down_weight": torch.zeros(2, 8), "up_weight": torch.zeros(8, 3),
                                "down_bias": torch.zeros(2), "up_bias": torch.zeros(8)}, GOOD_META)
