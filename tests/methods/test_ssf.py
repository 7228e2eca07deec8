"""SSF: ``y = γ ⊙ out + β`` on Linear/Conv1D and LayerNorm/RMSNorm modules — the math against hand formulas,
default and type targets, training on tiny Llama / GPT-2 / BERT and MiniLM, save/load, exact merge into weight
*and* bias (scale only where the module has no bias), revert, mixed batches beside LoRA and sparse rows, the
algebra and bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY_MODELS, logits, max_diff, tiny_inputs
from torch import nn
from torch.func import functional_call
from transformers.models.llama.modeling_llama import LlamaRMSNorm

import deltatune
from deltatune.algebra.compress import compress_delta
from deltatune.algebra.engine import merge as merge_engine
from deltatune.algebra.sum_deltas import compose_deltas
from deltatune.config import parse_config
from deltatune.delta import Delta
from deltatune.errors import ConfigError, DeltaFormatError, NotMergeable, ShapeMismatch, TargetError
from deltatune.fingerprint import base_parameters
from deltatune.methods.ssf import SSFConfig
from deltatune.model import attach_parts, detach, get_module, load_heads, routed_batch
from deltatune.parts.ssf import SSFPart, norm_is_affine_in_weight, site_of
from deltatune.routing import Routing

pytestmark = pytest.mark.usefixtures("one_thread")

ARCHS = ("llama", "gpt2", "bert")
HEADS = {"llama": [], "gpt2": [], "bert": ["classifier"]}
TOL = 1e-5


def randomise(delta: Delta, seed: int, std: float = 0.2) -> Delta:
    """γ ~ N(1, std²), β ~ N(0, std²) (seeded) on every part."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in sorted(delta.parts):
            part = delta.parts[name]
            part.ssf_scale.copy_(1 + torch.randn(part.features, generator=g) * std)
            if part.ssf_shift is not None:
                part.ssf_shift.copy_(torch.randn(part.features, generator=g) * std)
    return delta


def random_ssf(arch: str, seed: int, config: SSFConfig | None = None) -> Delta:
    model = TINY_MODELS[arch]()
    delta = randomise(deltatune.attach(model, config or SSFConfig()), seed)
    delta.snapshot_heads(model)
    return delta


def train(model: nn.Module, inputs: dict[str, torch.Tensor], steps: int = 3, lr: float = 3e-2) -> None:
    opt = deltatune.get_method("ssf").optimizer([p for p in model.parameters() if p.requires_grad], lr, 0.0, None)
    for _ in range(steps):
        model(**inputs).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


# --------------------------------------------------------------------------------------------------
# math: every site, with and without a bias
# --------------------------------------------------------------------------------------------------
def _conv1d() -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    m = Conv1D(3, 5)
    with torch.no_grad():
        m.weight.normal_()
        m.bias.normal_()
    return m


def _layer_norm() -> nn.Module:
    m = nn.LayerNorm(3)
    with torch.no_grad():
        m.weight.normal_()
        m.bias.normal_()
    return m


def _rms_norm() -> nn.Module:
    m = LlamaRMSNorm(3)
    with torch.no_grad():
        m.weight.normal_()
    return m


SITES = {
    "linear": (lambda: nn.Linear(5, 3), 5),
    "linear-no-bias": (lambda: nn.Linear(5, 3, bias=False), 5),
    "conv1d": (_conv1d, 5),
    "layernorm": (_layer_norm, 3),
    "rmsnorm": (_rms_norm, 3),
}


@pytest.mark.parametrize("site", list(SITES))
def test_part_matches_hand_formula_update_and_merge(site: str) -> None:
    torch.manual_seed(0)
    make, d_in = SITES[site]
    base = make()
    kind, n, part_in = site_of(base)
    has_bias = getattr(base, "bias", None) is not None
    part = SSFPart(n, kind, part_in, bias=has_bias, shift=has_bias)
    assert part.shift == has_bias  # a module without a bias holds only the scale
    randomise(Delta("ssf", {}, {"m": part}), 1)
    x = torch.randn(2, 4, d_in)
    with torch.no_grad():
        out = base(x)
        beta = part.ssf_shift if part.shift else torch.zeros(n)
        expected = part.ssf_scale * out + beta  # y = γ ⊙ out + β
        got = part(x, base)
        ups = part.updates(base)
        summed = functional_call(base, {k: getattr(base, k) + v for k, v in ups.items()}, (x,))
    assert max_diff(got, expected) <= 1e-6
    assert max_diff(summed, expected) <= 1e-5
    assert set(ups) == ({"weight", "bias"} if has_bias else {"weight"})
    assert part.update_shapes() == {k: tuple(v.shape) for k, v in ups.items()}
    # merging folds γ into the weight and γ, β into the bias: W' = γ ⊙_out W, b' = γ ⊙ b + β
    w0 = base.weight.detach().clone()
    b0 = base.bias.detach().clone() if has_bias else None
    part.merge_into(base)
    g = part.ssf_scale.detach()
    g_w = {"linear": g.reshape(-1, 1), "conv1d": g.reshape(1, -1), "norm": g}[kind]
    assert torch.allclose(base.weight, g_w * w0, atol=1e-6)
    if has_bias:
        assert torch.allclose(base.bias, g * b0 + part.ssf_shift.detach(), atol=1e-6)
    with torch.no_grad():
        assert max_diff(base(x), expected) <= 1e-5
    part.unmerge_from(base)
    assert max_diff(base.weight, w0) <= 1e-6
    if has_bias:
        assert max_diff(base.bias, b0) <= 1e-6


def test_updates_need_the_base_module() -> None:
    with pytest.raises(NotMergeable, match="base module"):
        SSFPart(3, "norm", None, bias=True).updates()


# --------------------------------------------------------------------------------------------------
# targets
# --------------------------------------------------------------------------------------------------
def _expected_default(model: nn.Module, heads: list[str]) -> set[str]:
    skip = {"lm_head", *heads}
    out = set()
    for name, m in model.named_modules():
        if name in skip:
            continue
        if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D" or type(m).__name__.endswith(("LayerNorm",
                                                                                                   "RMSNorm")):
            out.add(name)
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_default_targets_every_linear_and_norm(arch: str) -> None:
    model = TINY_MODELS[arch]()
    expected = _expected_default(model, HEADS[arch])
    delta = deltatune.attach(model, SSFConfig())
    assert set(delta.parts) == expected
    norms = {n for n, p in delta.parts.items() if p.site == "norm"}
    assert norms and all(("norm" in n.lower() or n.split(".")[-1].startswith("ln")) for n in norms)
    for name, part in delta.parts.items():
        module = get_module(model, name)
        assert part.shift == (getattr(module, "bias", None) is not None)
        assert torch.equal(part.ssf_scale, torch.ones(part.features))
    if arch == "llama":  # no bias anywhere: scale only
        assert not any(p.shift for p in delta.parts.values())
    else:
        assert all(p.shift for p in delta.parts.values())


def test_type_targets_select_norms() -> None:
    delta = deltatune.attach(TINY_MODELS["gpt2"](), SSFConfig(targets=["type:LayerNorm"]))
    assert set(delta.parts) == {"transformer.h.0.ln_1", "transformer.h.0.ln_2", "transformer.h.1.ln_1",
                                "transformer.h.1.ln_2", "transformer.ln_f"}
    delta = deltatune.attach(TINY_MODELS["llama"](), SSFConfig(targets=["type:RMSNorm", "q_proj"]))
    assert {p.site for p in delta.parts.values()} == {"norm", "linear"}
    assert len(delta.parts) == 5 + 2


_TRAINED: dict[str, tuple] = {}


def trained(arch: str):
    """(base copy, model with a trained SSF delta, delta, inputs, base logits, logits at attach, after)."""
    if arch not in _TRAINED:
        model = TINY_MODELS[arch]()
        base = copy.deepcopy(model)
        inputs = tiny_inputs(arch)
        before = logits(model, inputs)
        delta = deltatune.attach(model, SSFConfig())
        at_init = logits(model, inputs)
        train(model, inputs)
        delta.snapshot_heads(model)
        _TRAINED[arch] = (base, model, delta, inputs, before, at_init, logits(model, inputs))
    return _TRAINED[arch]


@pytest.mark.parametrize("arch", ARCHS)
def test_trains_only_its_vectors(arch: str) -> None:
    base, model, delta, _, before, at_init, after = trained(arch)
    assert torch.equal(at_init, before), "γ = 1, β = 0 must leave the output unchanged at attach"
    assert max_diff(after, before) > 1e-3
    heads = HEADS[arch]
    ref = dict(base_parameters(base, heads))
    assert all(torch.equal(p, ref[n]) for n, p in base_parameters(model, heads)), "a base tensor changed"
    part_ids = {id(p) for part in delta.parts.values() for p in part.parameters()}
    head_ids = {id(p) for h in heads for p in model.get_submodule(h).parameters()}
    assert {id(p) for p in model.parameters() if p.requires_grad} == part_ids | head_ids


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip_is_bit_exact(arch: str, tmp_path) -> None:
    base, _, delta, inputs, _, _, after = trained(arch)
    loaded = deltatune.load_delta(deltatune.save_delta(delta, tmp_path / "d"))
    assert loaded.method == "ssf" and set(loaded.parts) == set(delta.parts)
    for name, part in delta.parts.items():
        assert loaded.parts[name].meta() == part.meta()
        assert all(torch.equal(a, b) for a, b in zip(loaded.parts[name].state().values(), part.state().values(),
                                                     strict=True))
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
    changed = {n for n, p in base_parameters(fresh, HEADS[arch]) if not torch.equal(p, before[n])}
    assert any(n.endswith(".bias") for n in changed) == (arch != "llama")  # the shift went into the biases
    assert max_diff(logits(fresh, inputs), after) <= TOL
    deltatune.revert_delta(fresh, delta)
    assert max(max_diff(p, before[n]) for n, p in base_parameters(fresh, HEADS[arch])) <= 1e-6


def test_trains_and_merges_on_minilm(minilm, tokenizer) -> None:
    batch = tokenizer(["a gripping, beautiful film", "dull and far too long"], return_tensors="pt", padding=True)
    batch["labels"] = torch.tensor([1, 0])
    base = copy.deepcopy(minilm)
    before = logits(minilm, batch)
    delta = deltatune.attach(minilm, SSFConfig())
    assert sum(p.site == "norm" for p in delta.parts.values()) == 1 + 2 * 6  # embeddings + 2 per layer
    assert torch.equal(logits(minilm, batch), before)
    train(minilm, batch, steps=3, lr=2e-2)
    delta.snapshot_heads(minilm)
    after = logits(minilm, batch)
    assert max_diff(after, before) > 1e-3
    merged = copy.deepcopy(base)
    deltatune.apply_delta(merged, delta, merge=True)
    assert max_diff(logits(merged, batch), after) <= TOL


def test_init_std_is_the_papers_noisy_init() -> None:
    inputs = tiny_inputs("bert")
    before = logits(TINY_MODELS["bert"](), inputs)
    a = deltatune.attach(TINY_MODELS["bert"](), SSFConfig(init_std=0.02, seed=3))
    b = deltatune.attach(TINY_MODELS["bert"](), SSFConfig(init_std=0.02, seed=3))
    gammas = torch.cat([p.ssf_scale.detach() for p in a.parts.values()])
    betas = torch.cat([p.ssf_shift.detach() for p in a.parts.values()])
    assert 0.01 < float(gammas.std()) < 0.03 and abs(float(gammas.mean()) - 1) < 0.005
    assert 0.01 < float(betas.std()) < 0.03
    assert all(torch.equal(x, y) for n in a.parts for x, y in zip(a.parts[n].state().values(),
                                                                   b.parts[n].state().values(), strict=True))
    model = TINY_MODELS["bert"]()
    deltatune.apply_delta(model, a)
    assert max_diff(logits(model, inputs), before) > 0


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
    ssf_a, ssf_b = random_ssf(arch, 3), random_ssf(arch, 4, SSFConfig(targets=["all-linear"]))
    lora, sparse = _others(arch)
    deltas = {"ssf_a": ssf_a, "ssf_b": ssf_b, "lora": lora, "sparse": sparse}
    model = TINY_MODELS[arch]()
    for name, d in deltas.items():
        attach_parts(model, d.parts, name)
    rows = ["ssf_a", None, "lora", "ssf_b", "sparse", "ssf_a"]
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
        if name is not None and name.startswith("ssf"):
            assert max_diff(ref, logits(bare, row)) > 1e-4, "the SSF delta does not change this row (vacuous)"


def test_per_token_routing() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.LayerNorm(4))
    parts: dict[str, dict[str, SSFPart]] = {}
    for name, seed in (("a", 1), ("b", 2)):
        parts[name] = {"0": SSFPart(4, "linear", 6, bias=True), "1": SSFPart(4, "norm", None, bias=True)}
        randomise(Delta("ssf", {}, parts[name]), seed)
        attach_parts(model, parts[name], name)
    x = torch.randn(2, 3, 6)
    tokens = [["a", None, "b"], ["b", "b", "a"]]
    with torch.no_grad(), routed_batch(model, Routing.per_token(tokens)):
        out = model(x)
    lin, norm = model[0].base, model[1].base
    for i, row in enumerate(tokens):
        for t, name in enumerate(row):
            with torch.no_grad():
                own = parts.get(name)
                ref = norm(lin(x[i, t])) if own is None else own["1"](own["0"](x[i, t], lin), norm)
            assert max_diff(out[i, t], ref) <= 1e-6


# --------------------------------------------------------------------------------------------------
# the algebra
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_compose_sums_exactly_and_equals_both_active(arch: str) -> None:
    a, b = random_ssf(arch, 1), random_ssf(arch, 2)
    composed = compose_deltas([a, b])
    assert {p.kind for p in composed.parts.values()} == {"ssf"}
    for name, part in composed.parts.items():
        assert torch.allclose(part.ssf_scale, a.parts[name].ssf_scale + b.parts[name].ssf_scale - 1, atol=1e-6)
        if part.shift:
            assert torch.allclose(part.ssf_shift, a.parts[name].ssf_shift + b.parts[name].ssf_shift, atol=1e-6)
    inputs = tiny_inputs(arch)
    both = TINY_MODELS[arch]()
    deltatune.apply_delta(both, a, name="a")
    deltatune.apply_delta(both, b, name="b", force=True)  # the layer sums the two parts' updates
    alone = TINY_MODELS[arch]()
    deltatune.apply_delta(alone, composed)
    assert max_diff(logits(both, inputs), logits(alone, inputs)) <= TOL
    merged = TINY_MODELS[arch]()
    load_heads(merged, composed)
    deltatune.merge_delta(merged, composed)
    assert max_diff(logits(merged, inputs), logits(alone, inputs)) <= TOL


def test_compress_and_lowrank() -> None:
    delta = random_ssf("gpt2", 6)
    kept = compress_delta(delta, "dare", density=0.5, seed=1)
    for name, part in kept.parts.items():
        dev, orig = part.ssf_scale - 1, delta.parts[name].ssf_scale - 1
        on = dev != 0
        assert torch.allclose(dev[on], orig[on] / 0.5, atol=1e-5)  # DARE rescales the kept deviations by 1/ρ
        assert 0 < int(on.sum()) < part.features
    with pytest.raises((NotMergeable, ConfigError), match="model=|base module"):
        compress_delta(delta, "lowrank", rank=2)  # ΔW = (γ−1)·W needs the base
    with pytest.warns(UserWarning, match=r"no low-rank form.*bias"):  # SSF's shift changes the bias: named, not lost
        low = compress_delta(delta, "lowrank", rank=2, model=TINY_MODELS["gpt2"]())
    assert "lora" in {p.kind for p in low.parts.values()}


def test_dare_with_bf16_rounds_the_deviation_not_the_scale() -> None:
    """``γ = 1 + round(DARE(γ − 1))`` kept in fp32 and ``β`` its bf16 rounding: rounding ``γ`` in bf16 (spacing 2⁻⁷
    near 1) erased small deviations (relative error 0.3 on ``γ − 1`` with std 3e-3)."""
    delta = randomise(random_ssf("gpt2", 6), seed=6, std=3e-3)
    exact = compress_delta(delta, "dare", density=0.5, seed=1)
    rounded = compress_delta(delta, "dare", density=0.5, seed=1, dtype="bf16")
    for name, part in rounded.parts.items():
        want = exact.parts[name]
        assert part.ssf_scale.dtype == torch.float32
        assert torch.equal(part.ssf_scale - 1, (want.ssf_scale - 1).bfloat16().float())
        assert torch.equal(part.ssf_shift, want.ssf_shift.bfloat16().float())


def test_engine_merge_needs_the_base_and_is_exact_with_it(tmp_path) -> None:
    a, b = random_ssf("bert", 7), random_ssf("bert", 8)
    with pytest.raises(NotMergeable, match="base weights") as err:
        merge_engine([a, b], "linear", weights=[0.5, 0.5], heads="first")
    assert err.value.kind == "ssf"
    TINY_MODELS["bert"]().save_pretrained(tmp_path / "base")
    merged = merge_engine([a, b], "linear", weights=[0.5, 0.5], heads="first", base=str(tmp_path / "base"))
    if True:  # densified against the base: θ₀ + ½(Δ_a + Δ_b), i.e. γ = 1 + ½Σ(γ_t − 1), β = ½Σβ_t
        average = compose_deltas([a, b])
        with torch.no_grad():
            for p in average.parts.values():
                p.ssf_scale.copy_(1 + (p.ssf_scale - 1) / 2)
                p.ssf_shift.copy_(p.ssf_shift / 2)
        inputs = tiny_inputs("bert")
        model, ref = TINY_MODELS["bert"](), TINY_MODELS["bert"]()
        deltatune.apply_delta(model, merged, merge=True, force=True)
        deltatune.apply_delta(ref, average)
        assert max_diff(logits(model, inputs), logits(ref, inputs)) <= TOL


# --------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------
def test_config_values_are_checked() -> None:
    with pytest.raises(ConfigError, match="targets is empty"):
        SSFConfig(targets=[])
    with pytest.raises(ConfigError, match="init_std"):
        SSFConfig(init_std=-0.1)
    with pytest.raises(ConfigError, match="unknown field"):
        parse_config(SSFConfig, {"scale": 1})
    with pytest.raises(ConfigError, match="shift"):
        parse_config(SSFConfig, {"shift": "maybe"})


def test_targets_matching_nothing_or_the_wrong_module_are_refused() -> None:
    with pytest.raises(TargetError, match="type:RMSNorm.*Module types in this model.*LayerNorm"):
        deltatune.attach(TINY_MODELS["bert"](), SSFConfig(targets=["type:RMSNorm"]))
    model = TINY_MODELS["llama"]()
    with pytest.raises(TargetError, match="'model.layers.0.mlp' is a LlamaMLP; SSF attaches to Linear"):
        deltatune.attach(model, SSFConfig(targets=["mlp"]))
    assert not any(isinstance(m, deltatune.layer.DeltaLayer) for m in model.modules())


class OffsetRMSNorm(nn.Module):
    """Gemma-style ``(1 + w) ⊙ x / rms(x)``: a scale cannot be folded into ``w``."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (1 + self.weight) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def test_a_norm_not_linear_in_its_weight_is_refused() -> None:
    model = nn.Sequential(nn.Linear(4, 4), OffsetRMSNorm(4))
    assert not norm_is_affine_in_weight(model[1]) and norm_is_affine_in_weight(_rms_norm())
    with pytest.raises(TargetError, match="does not compute w ⊙ norm"):
        deltatune.attach(model, SSFConfig(targets=["type:RMSNorm"]))


def test_check_base_meta_and_revert_are_validated() -> None:
    part = SSFPart(3, "linear", 5, bias=True)
    with pytest.raises(ShapeMismatch, match="with a bias, but the base module has none"):
        part.check_base(nn.Linear(5, 3, bias=False), "m")
    with pytest.raises(ShapeMismatch, match="norm site"):
        part.check_base(nn.LayerNorm(3), "m")
    with pytest.raises(ShapeMismatch, match="Linear, Conv1D, LayerNorm or RMSNorm"):
        part.check_base(nn.Embedding(4, 3), "m")
    with pytest.raises(ValueError, match="bias"):
        SSFPart(3, "linear", 5, bias=False, shift=True)
    good = part.meta()
    assert SSFPart.expected_state(good) == {"ssf_scale": (3,), "ssf_shift": (3,)}
    for bad in ({**good, "site": "conv2d"}, {**good, "features": 0}, {**good, "in_features": None},
                {**good, "bias": False}, {**good, "shift": 1}, {**good, "site": "norm"}, {**good, "x": 1}, "meta"):
        with pytest.raises(DeltaFormatError):
            SSFPart.expected_state(bad)
    with pytest.raises(ShapeMismatch):
        SSFPart.from_state({"ssf_scale": torch.ones(3)}, good)
    base = nn.Linear(5, 3)
    with torch.no_grad():
        part.ssf_scale.copy_(torch.tensor([1.0, 0.0, 2.0]))
    part.merge_into(base)
    snapshot = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(NotMergeable, match="zero"):
        part.unmerge_from(base)
    assert all(torch.equal(base.state_dict()[k], v) for k, v in snapshot.items())


def test_detach_restores_the_base() -> None:
    model = TINY_MODELS["llama"]()
    ref = {n: p.clone() for n, p in model.state_dict().items()}
    randomise(deltatune.attach(model, SSFConfig()), 9)
    detach(model)
    assert all(torch.equal(p, ref[n]) for n, p in model.state_dict().items())


def test_default_targets_leave_out_norms_a_scale_cannot_fold_into() -> None:
    # Gemma's norms compute (1 + w) ⊙ n(x): the default takes its linear layers (the method was refused outright)
    import transformers

    torch.manual_seed(0)
    model = transformers.GemmaForCausalLM(transformers.GemmaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8)).eval()
    inputs = {"input_ids": torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(1))}
    delta = deltatune.attach(model, SSFConfig(init_std=0.2))
    names = list(delta.parts)
    assert names and all(isinstance(deltatune.model.get_module(model, n), nn.Linear) for n in names)
    with torch.no_grad():
        want = model(**inputs).logits
    merged = copy.deepcopy(model)
    deltatune.detach(merged)
    deltatune.merge_delta(merged, delta)
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, want, rtol=0, atol=1e-5)
