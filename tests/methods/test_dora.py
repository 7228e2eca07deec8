"""DoRA (Liu et al., ICML 2024): the part's math against hand-written formulas, training on tiny Llama / GPT-2 /
BERT and the real MiniLM, save/load, exact merge and revert, mixed batches beside LoRA and sparse rows, the algebra
(compress, compose, merge) and bad input.  PEFT parity is in tests/parity/test_peft_dora.py."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_MODELS, logits, max_diff, tiny_inputs
from torch import nn
from transformers.pytorch_utils import Conv1D

import deltatune
from deltatune.algebra import compose_deltas, compress_delta
from deltatune.algebra import merge as algebra_merge
from deltatune.errors import ConfigError, DeltaFormatError, NotMergeable, ShapeMismatch
from deltatune.fingerprint import base_parameters
from deltatune.methods.dora import DoRAConfig
from deltatune.model import attach_parts, get_module, merge_delta, revert_delta, trainable_parameters
from deltatune.parts import PART_KINDS, LoRAPart
from deltatune.parts.dora import DoRAPart, dora_norm, dora_update, dora_weight
from deltatune.parts.layers import LayerKind, in_out_features, layer_kind

ARCHS = ("llama", "gpt2", "bert")
TOL = 1e-5
pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def randomize(delta: deltatune.Delta, seed: int, std: float = 0.1, mag: float = 0.3) -> deltatune.Delta:
    """Non-zero ``A``/``B`` (N(0, std²)) and a magnitude ``m ⊙ (1 + mag·N(0, 1))`` (seeded)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for part in delta.parts.values():
            for name in ("lora_A", "lora_B"):
                t = getattr(part, name)
                t.copy_(torch.randn(t.shape, generator=g) * std)
            if isinstance(part, DoRAPart):
                part.magnitude.mul_(1 + mag * torch.randn(part.magnitude.shape, generator=g))
    return delta


def random_dora(arch: str, config: DoRAConfig, seed: int) -> tuple[nn.Module, deltatune.Delta]:
    model = TINY_MODELS[arch]()
    return model, randomize(deltatune.attach(model, config), seed)


def reference_weight(w_out_in: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float,
                     m: torch.Tensor) -> torch.Tensor:
    """DoRA Eq. 5 written out independently of deltatune: ``m ⊙ V / ‖V‖_c`` with ``V = W + s·BA`` (rows)."""
    v = w_out_in + s * b @ a
    return m[:, None] * v / v.norm(p=2, dim=1, keepdim=True)


EMBEDDING = {"llama": "embed_tokens", "gpt2": "wte", "bert": "word_embeddings"}


# --------------------------------------------------------------------------------------------------
# the part's math on single modules
# --------------------------------------------------------------------------------------------------
def _module(kind: LayerKind) -> nn.Module:
    torch.manual_seed(0)
    if kind is LayerKind.LINEAR:
        return nn.Linear(6, 5, bias=True)
    if kind is LayerKind.CONV1D:
        m = Conv1D(5, 6)  # nf=5 outputs, nx=6 inputs: weight (6, 5)
        nn.init.normal_(m.weight, std=0.3), nn.init.normal_(m.bias, std=0.3)
        return m
    return nn.Embedding(11, 5)


def _part(module: nn.Module, seed: int = 1, dropout: float = 0.0) -> DoRAPart:
    kind = layer_kind(module)
    d_in, d_out = in_out_features(module)
    part = DoRAPart(d_in, d_out, 3, 0.7, layer=kind, dropout=dropout)
    part.init_from_base(module)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        part.lora_A.copy_(torch.randn(part.lora_A.shape, generator=g) * 0.5)
        part.lora_B.copy_(torch.randn(part.lora_B.shape, generator=g) * 0.5)
        part.magnitude.mul_(1 + 0.5 * torch.randn(part.magnitude.shape, generator=g))
    return part


def _input(kind: LayerKind) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    if kind is LayerKind.EMBEDDING:
        return torch.randint(0, 11, (2, 4), generator=g)
    return torch.randn(2, 4, 6, generator=g)


def _out_in(module: nn.Module) -> torch.Tensor:
    return module.weight if isinstance(module, nn.Linear) else module.weight.t()


@pytest.mark.parametrize("kind", list(LayerKind))
def test_forward_is_the_base_computation_with_the_decomposed_weight(kind):
    """``forward(x) = module(x)`` with ``W'`` in place of ``W`` — the bias is added, not rescaled; the norm is per
    output channel (for Conv1D and embeddings: after transposing to ``(out, in)``)."""
    module = _module(kind)
    part = _part(module)
    w_ref = reference_weight(_out_in(module).detach(), part.lora_A.detach(), part.lora_B.detach(), part.scale,
                             part.magnitude.detach())
    x = _input(kind)
    merged = copy.deepcopy(module)
    with torch.no_grad():
        merged.weight.copy_(w_ref if kind is LayerKind.LINEAR else w_ref.t())
    with torch.no_grad():
        out = part(x, module)
        assert max_diff(out, merged(x)) <= TOL
        assert max_diff(out, module(x)) > 1e-2  # not vacuous
        w = _out_in(module)
        assert max_diff(dora_weight(w, part.lora_A, part.lora_B, part.scale, part.magnitude), w_ref) <= 1e-6
        assert max_diff(dora_norm(w, part.lora_A, part.lora_B, part.scale),
                        (w + part.scale * part.lora_B @ part.lora_A).norm(dim=1)) <= 1e-6
        upd = part.updates(module)["weight"]
        assert tuple(upd.shape) == tuple(module.weight.shape) == part.update_shapes()["weight"]
        assert max_diff(module.weight + upd, merged.weight) <= 1e-6
    if kind is not LayerKind.LINEAR:
        assert tuple(part.magnitude.shape) == (5,)  # one per output channel / embedding dimension


@pytest.mark.parametrize("kind", [LayerKind.LINEAR, LayerKind.CONV1D])
def test_gradient_treats_the_norm_as_a_constant(kind):
    """DoRA §4.3: ``‖W + s·BA‖_c`` is detached, so ``∂/∂A, ∂/∂B, ∂/∂m`` are those of
    ``y = x (m/n̄ ⊙ V)ᵀ + b`` with ``n̄`` a constant."""
    module = _module(kind)
    part = _part(module)
    x = _input(kind)
    part(x, module).square().sum().backward()
    ours = [t.grad.clone() for t in (part.lora_A, part.lora_B, part.magnitude)]

    a, b, m = (t.detach().clone().requires_grad_() for t in (part.lora_A, part.lora_B, part.magnitude))
    w = _out_in(module).detach()
    v = w + part.scale * b @ a
    w_new = (m / v.norm(dim=1).detach())[:, None] * v
    (F.linear(x, w_new) + module.bias.detach()).square().sum().backward()
    for got, want in zip(ours, (a.grad, b.grad, m.grad), strict=True):
        assert max_diff(got, want) <= 1e-4 * max(1.0, want.abs().max().item())
    # with the norm in the graph the gradient of B differs: the detach is what is tested
    a2, b2, m2 = (t.detach().clone().requires_grad_() for t in (part.lora_A, part.lora_B, part.magnitude))
    v2 = w + part.scale * b2 @ a2
    (F.linear(x, (m2 / v2.norm(dim=1))[:, None] * v2) + module.bias.detach()).square().sum().backward()
    assert max_diff(ours[1], b2.grad) > 1e-3


def test_dropout_rescales_the_dropped_out_base_term():
    """Training with dropout: ``y = base(x) + (g − 1)·(drop(x) Wᵀ) + g·s·B A drop(x)`` (one dropout mask)."""
    module = _module(LayerKind.LINEAR)
    part = _part(module, dropout=0.5).train()
    x = _input(LayerKind.LINEAR)
    torch.manual_seed(7)
    with torch.no_grad():
        out = part(x, module)
    torch.manual_seed(7)
    xd = F.dropout(x, 0.5, training=True)
    with torch.no_grad():
        w = module.weight
        g = part.magnitude / (w + part.scale * part.lora_B @ part.lora_A).norm(dim=1)
        want = module(x) + (g - 1) * F.linear(xd, w) + g * part.scale * F.linear(F.linear(xd, part.lora_A),
                                                                                part.lora_B)
    assert max_diff(out, want) <= TOL
    part.eval()  # eval: no dropout, the base term is base(x) − b
    with torch.no_grad():
        assert max_diff(part(x, module), F.linear(x, dora_weight(w, part.lora_A, part.lora_B, part.scale,
                                                                  part.magnitude), module.bias)) <= TOL


def test_pure_update_is_exactly_zero_at_initialisation():
    module = _module(LayerKind.LINEAR)
    part = DoRAPart(6, 5, 2, 2.0)
    part.init_from_base(module)
    assert torch.equal(part.magnitude.detach(), module.weight.detach().norm(dim=1))
    assert torch.equal(dora_update(module.weight, part.lora_A, part.lora_B, 2.0, part.magnitude),
                       torch.zeros(5, 6))


# --------------------------------------------------------------------------------------------------
# the method on tiny models and MiniLM
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", list(deltatune.get_method("dora").examples))
@pytest.mark.parametrize("arch", ARCHS)
def test_examples_attach_unchanged_and_train(arch, variant):
    """Every registered example: the output is unchanged at attach; 3 AdamW steps lower the loss, change ``A``,
    ``B`` and ``m`` and leave every base tensor as it was."""
    config = deltatune.make_config("dora", deltatune.get_method("dora").examples[variant])
    model = TINY_MODELS[arch]()
    inputs = tiny_inputs(arch)
    before = logits(model, inputs)
    heads = ["classifier"] if arch == "bert" else []
    base_before = {n: p.detach().clone() for n, p in base_parameters(model, heads)}
    delta = deltatune.attach(model, config)
    assert delta.method == "dora" and delta.parts and all(isinstance(p, DoRAPart) for p in delta.parts.values())
    assert torch.equal(logits(model, inputs), before)
    start = {n: {k: v.detach().clone() for k, v in p.state().items()} for n, p in delta.parts.items()}
    opt = torch.optim.AdamW(trainable_parameters(model), lr=1e-2)
    model.train()
    losses = []
    for _ in range(3):
        loss = model(**inputs).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        losses.append(model(**inputs).loss.item())
    assert losses[-1] < losses[0]
    for name, part in delta.parts.items():
        for k, v in part.state().items():
            assert not torch.equal(v, start[name][k]), f"{name}.{k} did not train"
    for n, p in base_parameters(model, heads):
        assert torch.equal(p, base_before[n]), n


def test_trains_on_minilm(minilm, tokenizer):
    batch = tokenizer(["a gripping, beautiful film", "dull and far too long", "I loved every minute",
                       "a waste of time"], return_tensors="pt", padding=True)
    batch["labels"] = torch.tensor([1, 0, 1, 0])
    delta = deltatune.attach(minilm, DoRAConfig(r=4, alpha=8.0, targets=["query", "value"]))
    assert len(delta.parts) == 12 and "classifier" in delta.heads
    m0 = {n: p.magnitude.detach().clone() for n, p in delta.parts.items()}
    opt = torch.optim.AdamW(trainable_parameters(minilm), lr=5e-3)
    minilm.train()
    losses = []
    for _ in range(6):
        loss = minilm(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(not torch.equal(p.magnitude, m0[n]) for n, p in delta.parts.items())


def test_embedding_targets_train_where_the_weight_is_not_tied():
    for arch in ("llama", "bert"):
        model = TINY_MODELS[arch]()
        delta = deltatune.attach(model, DoRAConfig(r=2, targets=[EMBEDDING[arch]]))
        (part,) = delta.parts.values()
        assert part.layer is LayerKind.EMBEDDING and tuple(part.magnitude.shape) == (64,)
        model.train()
        model(**tiny_inputs(arch)).loss.backward()
        assert part.lora_B.grad is not None and part.magnitude.grad is not None


# --------------------------------------------------------------------------------------------------
# save / load, merge / revert
# --------------------------------------------------------------------------------------------------
CONFIGS = {
    "linear": DoRAConfig(r=2, alpha=4.0),
    "rslora": DoRAConfig(r=4, alpha=4.0, rslora=True),
}


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip_is_bit_exact(arch, tmp_path):
    model, delta = random_dora(arch, CONFIGS["linear"], seed=3)
    inputs = tiny_inputs(arch)
    want = logits(model, inputs)
    back = deltatune.load_delta(deltatune.save_delta(delta, tmp_path / "d"))
    assert back.method == "dora" and back.config == delta.config
    assert set(back.parts) == set(delta.parts)
    for name, part in delta.parts.items():
        other = back.parts[name]
        assert type(other) is DoRAPart and other.meta() == part.meta()
        for k, v in part.state().items():
            assert torch.equal(other.state()[k], v), f"{name}.{k}"
    fresh = TINY_MODELS[arch]()
    deltatune.apply_delta(fresh, back)
    assert torch.equal(logits(fresh, inputs), want)


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("arch", ARCHS)
def test_merge_equals_unmerged_and_revert_restores(arch, config, tmp_path):
    model, delta = random_dora(arch, CONFIGS[config], seed=4)
    inputs = tiny_inputs(arch)
    attached = logits(model, inputs)
    fresh = TINY_MODELS[arch]()
    bare = logits(fresh, inputs)
    heads = ["classifier"] if arch == "bert" else []
    before = {n: p.detach().clone() for n, p in base_parameters(fresh, heads)}
    deltatune.apply_delta(fresh, delta, merge=True)
    merged = logits(fresh, inputs)
    assert max_diff(merged, attached) <= TOL
    assert max_diff(merged, bare) > 1e-3
    revert_delta(fresh, delta)
    for n, p in base_parameters(fresh, heads):
        assert max_diff(p, before[n]) <= 1e-6, n
    with pytest.raises(NotMergeable, match="was not merged"):  # the recorded norm is used up by the revert
        revert_delta(fresh, delta)


def test_merge_and_revert_of_an_embedding_part():
    model, delta = random_dora("llama", DoRAConfig(r=2, targets=["embed_tokens"]), seed=5)
    inputs = tiny_inputs("llama")
    fresh = TINY_MODELS["llama"]()
    w0 = fresh.model.embed_tokens.weight.detach().clone()
    merge_delta(fresh, delta)
    assert max_diff(logits(fresh, inputs), logits(model, inputs)) <= TOL
    revert_delta(fresh, delta)
    assert max_diff(fresh.model.embed_tokens.weight, w0) <= 1e-6


def test_tied_embedding_target_gpt2():
    model, delta = random_dora("gpt2", DoRAConfig(r=2, targets=["wte"]), seed=6)
    inputs = tiny_inputs("gpt2")
    attached = logits(model, inputs)
    fresh = TINY_MODELS["gpt2"]()
    merge_delta(fresh, delta)
    assert max_diff(logits(fresh, inputs), attached) <= TOL


# --------------------------------------------------------------------------------------------------
# mixed batches beside LoRA, sparse and base rows
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_batch_with_lora_sparse_and_base_rows(arch):
    _, dora = random_dora(arch, DoRAConfig(r=2, alpha=4.0), seed=7)
    lora_model = TINY_MODELS[arch]()
    lora = randomize(deltatune.attach(lora_model, deltatune.LoRAConfig(r=3)), seed=8)
    sparse_model = TINY_MODELS[arch]()
    sparse = deltatune.attach(sparse_model, deltatune.SparseConfig(num_tunable=777, regrow=False, seed=1))
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for part in sparse.parts.values():
            part.values.copy_(torch.randn(part.values.shape, generator=g) * 0.5)
    deltas = {"d": dora, "l": lora, "s": sparse}

    model = TINY_MODELS[arch]()
    for name, delta in deltas.items():
        attach_parts(model, delta.parts, name)
    model.eval()
    rows = ["d", "l", None, "s", "d"]
    inputs = tiny_inputs(arch, batch=len(rows))
    with deltatune.mixed_batch(model, rows):
        mixed = logits(model, inputs)
    bare = logits(TINY_MODELS[arch](), inputs)
    for i, name in enumerate(rows):
        ref_model = TINY_MODELS[arch]()
        if name is not None:
            attach_parts(ref_model, deltas[name].parts, name)
        ref_model.eval()
        row = {k: v[i:i + 1] for k, v in inputs.items()}
        ref = logits(ref_model, row)
        # bit-equal on Llama/GPT-2; BERT's kernels differ by ~1e-8 between batch sizes even on base rows
        assert max_diff(mixed[i:i + 1], ref) <= 1e-6, f"row {i} ({name})"
        if name is not None:
            assert max_diff(ref, bare[i:i + 1]) > 1e-3, f"row {i} ({name}) is vacuous"


def test_mixed_batch_of_two_dora_deltas():
    _, da = random_dora("llama", DoRAConfig(r=2), seed=10)
    _, db = random_dora("llama", DoRAConfig(r=4, targets=["q_proj", "embed_tokens"]), seed=11)
    model = TINY_MODELS["llama"]()
    attach_parts(model, da.parts, "a")
    attach_parts(model, db.parts, "b")
    rows = ["b", None, "a"]
    inputs = tiny_inputs("llama")
    with deltatune.mixed_batch(model, rows):
        mixed = logits(model, inputs)
    for i, delta in enumerate([db, None, da]):
        ref_model = TINY_MODELS["llama"]()
        if delta is not None:
            deltatune.apply_delta(ref_model, delta)
        assert max_diff(mixed[i:i + 1], logits(ref_model, {k: v[i:i + 1] for k, v in inputs.items()})) <= 1e-6


# --------------------------------------------------------------------------------------------------
# algebra: the dense update needs the base; the factors compress
# --------------------------------------------------------------------------------------------------
def test_never_summed_or_compressed_as_plain_lora():
    model, delta = random_dora("llama", DoRAConfig(r=2, targets=["q_proj"]), seed=12)
    a, b = list(delta.parts.values())[:2]
    assert not isinstance(a, LoRAPart) and PART_KINDS["dora"] is DoRAPart
    assert DoRAPart.additive and DoRAPart.base_dependent and DoRAPart.mixed_rows
    assert a.factors() is None  # no s·B·A form: a low-rank refactor must not drop m
    assert a.sum_with([b], "m") is None
    assert a.sum_with([a], "m") is None
    with pytest.raises(NotMergeable, match="depends on the base weight W"):
        a.updates(None)
    assert a.covered_entries() == 64 * 64 and a.touched_parameters() == ("weight",)


def test_compose_with_the_base_missing_is_refused_clearly():
    _, dora = random_dora("llama", DoRAConfig(r=2, targets=["q_proj"]), seed=13)
    lora = randomize(deltatune.attach(TINY_MODELS["llama"](), deltatune.LoRAConfig(r=2, targets=["q_proj"])), 14)
    with pytest.raises(NotMergeable, match="dora part's update .* depends on the base weight W"):
        compose_deltas([dora, lora])
    # modules that do not overlap keep the DoRA part itself
    other = randomize(deltatune.attach(TINY_MODELS["llama"](), deltatune.LoRAConfig(r=2, targets=["k_proj"])), 15)
    out = compose_deltas([dora, other])
    assert all(type(out.parts[n]) is DoRAPart for n in dora.parts)
    for n, p in dora.parts.items():
        assert all(torch.equal(v, out.parts[n].state()[k]) for k, v in p.state().items())


def test_merge_engine_refuses_before_writing(tmp_path):
    _, dora = random_dora("llama", DoRAConfig(r=2, targets=["q_proj"]), seed=16)
    _, other = random_dora("llama", DoRAConfig(r=2, targets=["q_proj"]), seed=17)
    out = tmp_path / "merged"
    with pytest.raises(NotMergeable, match="depends on the base weights"):
        algebra_merge([dora, other], "linear", out=str(out))
    assert not out.exists()


def test_merge_engine_with_the_base_equals_both_attached(tmp_path):
    """task arithmetic (λ = 1) of two DoRA deltas = θ₀ + Δ_a(θ₀) + Δ_b(θ₀), what attaching both computes."""
    _, dora = random_dora("llama", DoRAConfig(r=2, targets=["q_proj", "v_proj"]), seed=16)
    _, other = random_dora("llama", DoRAConfig(r=2, targets=["q_proj"]), seed=17)
    TINY_MODELS["llama"]().save_pretrained(tmp_path / "base")
    merged = algebra_merge([dora, other], "task_arithmetic", params={"lambda": 1.0}, base=str(tmp_path / "base"))
    model, ref = TINY_MODELS["llama"](), TINY_MODELS["llama"]()
    deltatune.apply_delta(model, merged, merge=True)
    attach_parts(ref, dora.parts, "a")
    attach_parts(ref, other.parts, "b")
    inputs = tiny_inputs("llama")
    assert (logits(model, inputs) - logits(ref, inputs)).abs().max() <= 1e-5


def test_compress_acts_on_the_factors_and_keeps_the_magnitude():
    model, delta = random_dora("llama", DoRAConfig(r=4), seed=18)
    small = compress_delta(delta, "dare", density=0.5, seed=0)
    for name, part in delta.parts.items():
        got = small.parts[name]
        assert type(got) is DoRAPart
        assert torch.equal(got.magnitude, part.magnitude)
        kept = (got.lora_A != 0).float().mean().item()
        assert 0.3 < kept < 0.7
    attach_parts(fresh := TINY_MODELS["llama"](), small.parts)
    assert torch.isfinite(logits(fresh, tiny_inputs("llama"))).all()
    with pytest.raises(ConfigError, match="depends on the base weight W"):
        compress_delta(delta, "dare", density=0.5, target="product")
    with pytest.raises(NotMergeable, match="depends on the base weight W"):  # an SVD of ΔW needs ΔW
        compress_delta(delta, "lowrank", rank=2)


def test_quantizing_the_factors_keeps_the_magnitude_exact_through_save_and_load(tmp_path):
    """bf16 factors, ``m`` bit-identical in fp32 (it was cast to bf16: a ~3e-3 relative error per channel)."""
    _, delta = random_dora("llama", DoRAConfig(r=4), seed=19)
    quant = compress_delta(delta, "quantize", dtype="bf16")
    back = deltatune.load_delta(deltatune.save_delta(quant, tmp_path / "d"))
    for name, part in delta.parts.items():
        for got in (quant.parts[name], back.parts[name]):
            assert got.lora_A.dtype == got.lora_B.dtype == torch.bfloat16
            assert got.magnitude.dtype == torch.float32 and torch.equal(got.magnitude, part.magnitude)
            assert torch.equal(got.lora_B, part.lora_B.bfloat16())


def test_compressed_product_form_is_refused_with_the_reason():
    part = _part(_module(LayerKind.LINEAR))
    with pytest.raises(ConfigError, match="compress its factors"):
        part.values_view(product=True)
    assert set(part.values_view()) == {"lora_A", "lora_B"}
    rebuilt = part.with_values({"lora_A": part.lora_A.detach() * 0, "lora_B": part.lora_B.detach()})
    assert torch.equal(rebuilt.magnitude, part.magnitude) and rebuilt.meta() == part.meta()


# --------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("mapping", "match"), [
    ({"r": 0}, "dora config.r must be ≥ 1"),
    ({"alpha": 0.0}, "dora config.alpha must be > 0"),
    ({"dropout": 1.0}, r"dora config.dropout must be in \[0, 1\)"),
    ({"targets": []}, "dora config.targets is empty"),
    ({"init": "pissa"}, "init"),
    ({"rank": 4}, "rank"),
])
def test_bad_config(mapping, match):
    with pytest.raises(ConfigError, match=match):
        deltatune.make_config("dora", mapping)


def test_target_matching_nothing_lists_what_exists():
    with pytest.raises(deltatune.errors.TargetError, match="no_such_module"):
        deltatune.attach(TINY_MODELS["llama"](), DoRAConfig(targets=["no_such_module"]))


@pytest.mark.parametrize(("meta", "error", "match"), [
    ("x", DeltaFormatError, "must be a JSON object"),
    ({"in_features": 4, "out_features": 3, "rank": 2, "scale": 1.0}, DeltaFormatError, "missing field"),
    ({"in_features": 4, "out_features": 3, "rank": 0, "scale": 1.0, "layer": "linear"}, DeltaFormatError, "rank"),
    ({"in_features": 4, "out_features": 3, "rank": 2, "scale": float("nan"), "layer": "linear"},
     deltatune.errors.NonFiniteError, "scale"),
    ({"in_features": 4, "out_features": 3, "rank": 2, "scale": 1.0, "layer": "conv2d"}, DeltaFormatError, "layer"),
    ({"in_features": 4, "out_features": 3, "rank": 2, "scale": 1.0, "layer": "linear", "magnitude": 1},
     DeltaFormatError, "unknown field"),
])
def test_expected_state_validates_meta(meta, error, match):
    with pytest.raises(error, match=match):
        DoRAPart.expected_state(meta)


def test_expected_state_and_from_state():
    meta = {"in_features": 4, "out_features": 3, "rank": 2, "scale": 1.0, "layer": "conv1d"}
    assert DoRAPart.expected_state(meta) == {"lora_A": (2, 4), "lora_B": (3, 2), "magnitude": (3,)}
    state = {"lora_A": torch.ones(2, 4), "lora_B": torch.ones(3, 2), "magnitude": torch.ones(4)}
    with pytest.raises(ShapeMismatch, match="magnitude"):
        DoRAPart.from_state(state, meta)
    state["magnitude"] = torch.ones(3, dtype=torch.int64)
    with pytest.raises(ShapeMismatch, match="dtype"):
        DoRAPart.from_state(state, meta)


def test_attach_to_a_module_of_another_shape_is_refused():
    model, delta = random_dora("llama", DoRAConfig(r=2, targets=["q_proj"]), seed=19)
    other = TINY_MODELS["llama"]()
    part = delta.parts["model.layers.0.self_attn.q_proj"]
    with pytest.raises(ShapeMismatch, match="DoRA part for a linear 64→64"):
        attach_parts(other, {"model.layers.0.self_attn.k_proj": part})
    with pytest.raises(ShapeMismatch, match="base weight has shape"):
        part.updates(get_module(other, "model.layers.0.self_attn.k_proj"))
    with pytest.raises(NotImplementedError, match="updates\\(base\\)"):
        part.delta_weight()


def test_copies_and_pickles_carry_the_tensors_not_the_merge_records():
    import pickle

    module = _module(LayerKind.LINEAR)
    part = _part(module)
    part.merge_into(module)
    for other in (copy.deepcopy(part), pickle.loads(pickle.dumps(part))):
        assert other.meta() == part.meta()
        assert all(torch.equal(v, other.state()[k]) for k, v in part.state().items())
        with pytest.raises(NotMergeable, match="was not merged"):
            other.unmerge_from(module)
    part.unmerge_from(module)
