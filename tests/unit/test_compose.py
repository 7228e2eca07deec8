"""Compose: attach == merge == compose_deltas == θ₀ + ΣΔ by hand; exact revert; push/pop; errors."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from conftest import TINY_MODELS, tiny_inputs
from torch import nn

from deltatune.algebra.compose import DeltaStack, compose
from deltatune.algebra.sum_deltas import compose_deltas, sum_lora, sum_sparse
from deltatune.delta import Delta
from deltatune.errors import ConfigError, FingerprintMismatch, ShapeMismatch
from deltatune.fingerprint import fingerprint
from deltatune.layer import DeltaLayer
from deltatune.model import apply_delta, get_module
from deltatune.parts.dense import DensePart
from deltatune.parts.layers import in_out_features, layer_kind
from deltatune.parts.lora import LoRAPart
from deltatune.parts.sparse import SparsePart

# modules per tiny model: LoRA targets, sparse targets, dense (weight only) targets that overlap them,
# and dense (every parameter: bias, norms) targets no other delta touches.  GPT-2's lm_head is tied to wte.
SPEC = {
    "llama": dict(lora=["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "lm_head"],
                  sparse=["model.layers.0.self_attn.q_proj", "model.embed_tokens", "model.layers.1.mlp.down_proj"],
                  dense_w=["model.layers.0.self_attn.q_proj", "lm_head"],
                  dense_all=["model.norm", "model.layers.1.self_attn.o_proj"]),
    "gpt2": dict(lora=["transformer.h.0.attn.c_attn", "lm_head"],
                 sparse=["transformer.wte", "transformer.h.0.attn.c_attn"],
                 dense_w=["transformer.h.0.attn.c_attn", "transformer.wte"],
                 dense_all=["transformer.h.1.mlp.c_proj", "transformer.ln_f"]),
    "bert": dict(lora=["bert.encoder.layer.0.attention.self.query", "bert.embeddings.word_embeddings"],
                 sparse=["bert.encoder.layer.0.attention.self.query", "bert.embeddings.word_embeddings",
                         "bert.encoder.layer.1.output.dense"],
                 dense_w=["bert.encoder.layer.0.attention.self.query"],
                 dense_all=["bert.encoder.layer.1.attention.output.LayerNorm", "bert.pooler.dense"]),
}


def _randn(shape, gen: torch.Generator, std: float) -> torch.Tensor:
    return torch.randn(shape, generator=gen) * std


def lora_part(module: nn.Module, rank: int, scale: float, gen: torch.Generator) -> LoRAPart:
    fin, fout = in_out_features(module)
    part = LoRAPart(fin, fout, rank, scale, layer=layer_kind(module))
    with torch.no_grad():
        part.lora_A.copy_(_randn((rank, fin), gen, 0.2))
        part.lora_B.copy_(_randn((fout, rank), gen, 0.2))
    return part


def sparse_part(module: nn.Module, k: int, gen: torch.Generator) -> SparsePart:
    w = module.weight
    part = SparsePart(tuple(w.shape), torch.randperm(w.numel(), generator=gen)[:k], layer=layer_kind(module))
    with torch.no_grad():
        part.values.copy_(_randn((k,), gen, 0.1))
    return part


def dense_part(module: nn.Module, gen: torch.Generator, names: list[str] | None = None) -> DensePart:
    part = DensePart.for_module(module, names=names)
    with torch.no_grad():
        for k in part.shapes:
            part.delta_for(k).copy_(_randn(part.shapes[k], gen, 0.02))
    return part


def make_deltas(model: nn.Module, arch: str, seed: int = 0) -> list[Delta]:
    """A LoRA, a sparse and a dense delta (the dense one carries the task head, if any) on ``model``."""
    gen = torch.Generator().manual_seed(seed)
    spec = SPEC[arch]
    heads = [h for h in ("classifier", "score") if h in dict(model.named_children())]
    fp_plain = fingerprint(model)
    lora = Delta("lora", {}, {m: lora_part(get_module(model, m), 2, 0.5, gen) for m in spec["lora"]},
                 fingerprint=fp_plain)
    sparse = Delta("sparse", {}, {m: sparse_part(get_module(model, m), 40, gen) for m in spec["sparse"]},
                   fingerprint=fp_plain)
    dense_parts = {m: dense_part(get_module(model, m), gen, ["weight"]) for m in spec["dense_w"]}
    dense_parts.update({m: dense_part(get_module(model, m), gen) for m in spec["dense_all"]})
    head_tensors = {h: {k: _randn(v.shape, gen, 0.5) for k, v in model.get_submodule(h).state_dict().items()}
                    for h in heads}
    dense = Delta("full", {}, dense_parts, heads=head_tensors, fingerprint=fingerprint(model, exclude=heads))
    return [lora, sparse, dense]


def by_hand(model: nn.Module, deltas: list[Delta]) -> nn.Module:
    """θ₀ + Σ_t Δ_t written into a copy's tensors directly (heads loaded), the reference for every mode."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for d in deltas:
            for name, part in d.parts.items():
                module = ref.get_submodule(name)
                if isinstance(part, DensePart):
                    for k in part.shapes:
                        getattr(module, k).add_(part.delta_for(k))
                else:
                    module.weight.add_(part.delta_weight())
            for head, tensors in d.heads.items():
                ref.get_submodule(head).load_state_dict(tensors)
    return ref


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert torch.equal(got[k], v), f"{k} differs"


def logits(model: nn.Module, arch: str) -> torch.Tensor:
    inputs = {k: v for k, v in tiny_inputs(arch).items() if k != "labels"}
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("arch", sorted(TINY_MODELS))
def test_attach_merge_and_compose_deltas_agree_and_revert_exactly(arch, one_thread, tmp_path):
    model = TINY_MODELS[arch]()
    base = state(model)
    deltas = make_deltas(model, arch)
    expected = logits(by_hand(model, deltas), arch)
    assert (expected - logits(model, arch)).abs().max() > 1e-3  # the deltas do change the output

    for mode in ("attach", "merge"):
        with compose(model, deltas, mode=mode) as stack:
            assert len(stack) == 3
            assert torch.allclose(logits(model, arch), expected, atol=1e-5), mode
        assert not any(isinstance(m, DeltaLayer) for m in model.modules())
        assert_same_state(model, base)

    combined = compose_deltas(deltas).save(tmp_path / "sum")  # the sum survives a save/load round trip
    combined = Delta.load(combined)
    # bert: the dense delta carries the classifier head, so its fingerprint (head excluded) is the sum's
    assert combined.fingerprint == deltas[2].fingerprint and combined.heads.keys() == deltas[2].heads.keys()
    for mode in ("attach", "merge"):
        with DeltaStack(model, mode=mode) as stack:
            stack.push(combined)
            assert torch.allclose(logits(model, arch), expected, atol=1e-5), mode
        assert_same_state(model, base)


def test_gpt2_tied_embedding_sees_the_sum_in_both_modules(one_thread):
    """A LoRA on lm_head and a sparse delta on wte (the same tensor): both modules see both deltas."""
    model = TINY_MODELS["gpt2"]()
    assert model.lm_head.weight is model.transformer.wte.weight
    deltas = make_deltas(model, "gpt2")[:2]
    total = sum(d.parts[m].delta_weight() for d, m in zip(deltas, ["lm_head", "transformer.wte"], strict=True))
    ids = torch.tensor([[3, 7, 11]])
    with compose(model, deltas, mode="attach"):
        emb = model.transformer.wte(ids)
        head = model.lm_head(emb)
    w = model.transformer.wte.weight + total
    assert torch.allclose(emb, w[ids], atol=1e-6)
    assert torch.allclose(head, emb @ w.t(), atol=1e-5)


def test_compose_deltas_lora_concatenates_ranks_exactly():
    gen = torch.Generator().manual_seed(0)
    lin = nn.Linear(5, 3)
    p1, p2 = lora_part(lin, 2, 0.5, gen), lora_part(lin, 3, 2.0, gen)
    out = sum_lora([p1, p2], "m")
    assert out.rank == 5 and out.scale == 1.0
    assert torch.equal(out.lora_A, torch.cat([p1.lora_A, p2.lora_A]))
    assert torch.equal(out.lora_B, torch.cat([p1.lora_B * 0.5, p2.lora_B * 2.0], dim=1))
    assert torch.allclose(out.delta_weight(), 0.5 * p1.lora_B @ p1.lora_A + 2.0 * p2.lora_B @ p2.lora_A, atol=1e-6)
    same = sum_lora([p1, lora_part(lin, 1, 0.5, gen)], "m")
    assert same.scale == 0.5 and same.rank == 3  # a shared scale is kept, B is concatenated as is
    half = [p.to(torch.bfloat16) for p in (p1, p2)]  # s_t·B_t rounded back to bf16 would not be exact
    summed = sum_lora(half, "m")
    assert summed.lora_B.dtype == torch.float32
    want = sum(p.scale * p.lora_B.float() @ p.lora_A.float() for p in half)
    assert torch.allclose(summed.delta_weight(), want, rtol=0, atol=1e-6)  # bf16 B·s was off by ~5e-4


def test_compose_deltas_sparse_unites_indices_and_adds_values():
    a = SparsePart((2, 4), torch.tensor([4, 1]))
    b = SparsePart((2, 4), torch.tensor([7, 4]))
    with torch.no_grad():
        a.values.copy_(torch.tensor([1.0, 2.0]))  # sorted indices [1, 4] → values at 1: 1, at 4: 2
        b.values.copy_(torch.tensor([10.0, 20.0]))  # sorted [4, 7] → at 4: 10, at 7: 20
    out = sum_sparse([a, b], "m")
    assert out.indices.tolist() == [1, 4, 7]
    assert out.values.tolist() == [1.0, 12.0, 20.0]


def test_cli_compose_keeps_compressed_inputs_compressed(one_thread, tmp_path):
    """``deltatune compose`` of compressed (compact) deltas writes the compact format, the exact sum; a standard
    input among them gives the standard format."""
    from conftest import tiny_llama
    from typer.testing import CliRunner

    from deltatune.algebra.compress import compress_delta
    from deltatune.cli import app
    from deltatune.io.compact_format import save_compact
    from deltatune.io.delta_format import is_compact, load_delta

    model = tiny_llama()
    sparse = make_deltas(model, "llama", 0)[1]
    other = make_deltas(model, "llama", 1)[1]
    for name, d in (("a", sparse), ("b", other)):
        save_compact(compress_delta(d, "quantize", dtype="int8"), tmp_path / name)
    other.save(tmp_path / "plain")
    runner = CliRunner()
    for inputs, out, compact in ((["a", "b"], "ab", True), (["a", "plain"], "a_plain", False)):
        res = runner.invoke(app, ["compose", *(str(tmp_path / i) for i in inputs), "--out", str(tmp_path / out)])
        assert res.exit_code == 0, res.output
        assert is_compact(tmp_path / out) is compact
        want = compose_deltas([load_delta(tmp_path / i) for i in inputs])
        got = load_delta(tmp_path / out)
        assert got.parts.keys() == want.parts.keys()
        assert all(torch.equal(t, want.parts[n].state()[k]) for n, p in got.parts.items()
                   for k, t in p.state().items())


def test_a_sara_part_sums_with_a_sparse_part_into_one_sparse_part():
    # SaRA's part is stored as a sparse part is (indices, values): its sum family is the sparse part's
    from deltatune.methods.sara import SaRAPart

    a = SparsePart((2, 4), torch.tensor([1, 4]))
    b = SaRAPart((2, 4), torch.tensor([4, 7]), nuclear_weight=1e-3)
    with torch.no_grad():
        a.values.copy_(torch.tensor([1.0, 2.0]))
        b.values.copy_(torch.tensor([10.0, 20.0]))
    for first, second in ((a, b), (b, a)):
        out = first.sum_with([second], "m")
        assert type(out) is SparsePart and out.indices.tolist() == [1, 4, 7]
        assert out.values.tolist() == [1.0, 12.0, 20.0]


@pytest.mark.parametrize("sparse_scales", [(2.0, 2.0), (2.0, 0.5)])
def test_dsee_parts_sum_into_one_dsee_part(sparse_scales):
    # ranks concatenated and index sets united, the scales folded where they differ: not a dense part
    from deltatune.parts.dsee import DSEEPart

    torch.manual_seed(0)
    parts = []
    for (scale, sparse_scale), idx in zip(((2.0, sparse_scales[0]), (0.5, sparse_scales[1])),
                                          ([1, 5, 9], [5, 20]), strict=True):
        p = DSEEPart(6, 4, 2, scale, (4, 6), torch.tensor(idx), sparse_scale=sparse_scale)
        with torch.no_grad():
            for t in (p.lora_A, p.lora_B, p.values):
                t.copy_(torch.randn(t.shape))
        parts.append(p)
    out = parts[0].sum_with(parts[1:], "m")
    assert type(out) is DSEEPart and out.rank == 4 and out.indices.tolist() == [1, 5, 9, 20]
    torch.testing.assert_close(out.delta_weight(), parts[0].delta_weight() + parts[1].delta_weight())


def test_compose_deltas_mixed_kinds_become_dense_with_every_parameter():
    gen = torch.Generator().manual_seed(0)
    lin = nn.Linear(4, 3)
    lora, dense = lora_part(lin, 2, 1.0, gen), dense_part(lin, gen)
    sparse = SparsePart((3, 4), torch.tensor([0, 11]))
    with torch.no_grad():
        sparse.values.copy_(torch.tensor([1.0, -1.0]))
    d = compose_deltas([Delta("a", {}, {"m": lora}), Delta("b", {}, {"m": dense}), Delta("c", {}, {"m": sparse})])
    part = d.parts["m"]
    assert isinstance(part, DensePart) and set(part.shapes) == {"weight", "bias"}
    hand = lora.lora_B @ lora.lora_A + dense.delta_for("weight")
    hand[0, 0] += 1.0
    hand[2, 3] -= 1.0
    assert torch.allclose(part.delta_for("weight"), hand, atol=1e-6)
    assert torch.equal(part.delta_for("bias"), dense.delta_for("bias"))
    assert d.method == "compose" and [c["method"] for c in d.config["inputs"]] == ["a", "b", "c"]


def test_compose_deltas_single_parts_are_independent_copies():
    gen = torch.Generator().manual_seed(0)
    part = lora_part(nn.Linear(4, 3), 2, 1.0, gen)
    d = compose_deltas([Delta("lora", {}, {"m": part})])
    assert d.parts["m"] is not part and torch.equal(d.parts["m"].lora_B, part.lora_B)
    with torch.no_grad():
        d.parts["m"].lora_B.add_(1.0)
    assert not torch.equal(d.parts["m"].lora_B, part.lora_B)


def test_compose_deltas_checks_fingerprints_shapes_and_heads():
    m0, m1 = TINY_MODELS["llama"](0), TINY_MODELS["llama"](1)
    gen = torch.Generator().manual_seed(0)
    q = "model.layers.0.self_attn.q_proj"
    d0 = Delta("lora", {}, {q: lora_part(get_module(m0, q), 2, 1.0, gen)}, fingerprint=fingerprint(m0))
    d1 = Delta("lora", {}, {q: lora_part(get_module(m1, q), 2, 1.0, gen)}, fingerprint=fingerprint(m1))
    with pytest.raises(FingerprintMismatch, match=r"delta #0 \(lora\) and delta #2 \(lora\).*values"):
        compose_deltas([d0, Delta("lora", {}, {}), d1])
    with pytest.raises(FingerprintMismatch, match="'en' and 'de'"):
        compose_deltas([d0, d1], names=["'en'", "'de'"])
    assert compose_deltas([d0, Delta("peft", {}, {})]).fingerprint == d0.fingerprint  # None: unknown, not compared

    wide = Delta("lora", {}, {q: lora_part(nn.Linear(64, 32), 2, 1.0, gen)})
    with pytest.raises(ShapeMismatch, match=f"{q}: LoRA parts.*64→64.*64→32"):
        compose_deltas([d0, wide])
    s1, s2 = SparsePart((4, 4), torch.tensor([0])), SparsePart((4, 5), torch.tensor([0]))
    with pytest.raises(ShapeMismatch, match="m: sparse parts for weights"):
        compose_deltas([Delta("s", {}, {"m": s1}), Delta("s", {}, {"m": s2})])
    d5 = DensePart({"weight": (3, 3)})
    with pytest.raises(ShapeMismatch, match=r"m.weight: deltas of shapes \[\(4, 4\), \(3, 3\)\]"):
        compose_deltas([Delta("s", {}, {"m": s1}), Delta("f", {}, {"m": d5})])

    h1 = {"classifier": {"weight": torch.zeros(2, 3)}}
    h2 = {"classifier": {"weight": torch.ones(2, 3)}}
    assert compose_deltas([Delta("a", {}, {}, heads=h1), Delta("b", {}, {}, heads=copy.deepcopy(h1))]).heads
    with pytest.raises(ConfigError, match="different task heads 'classifier'"):
        compose_deltas([Delta("a", {}, {}, heads=h1), Delta("b", {}, {}, heads=h2)])
    with pytest.raises(ConfigError, match="at least one"):
        compose_deltas([])


@pytest.mark.parametrize("mode", ["attach", "merge"])
def test_push_pop_in_every_order_restores_each_state_exactly(mode, one_thread):
    model = TINY_MODELS["llama"]()
    deltas = make_deltas(model, "llama")
    base = state(model)
    for order in itertools.permutations(range(3)):
        stack = DeltaStack(model, mode=mode)
        states = [base]
        for i in order:
            stack.push(deltas[i])
            states.append(state(model))
        expected = logits(by_hand(TINY_MODELS["llama"](), deltas), "llama")
        assert torch.allclose(logits(model, "llama"), expected, atol=1e-5)
        for i in reversed(order):
            assert stack.pop() is deltas[i]
            states.pop()
            assert_same_state(model, states[-1])
    # interleaved: push a, push b, pop, push c, pop, pop
    stack = DeltaStack(model, mode=mode)
    stack.push(deltas[0])
    after_a = state(model)
    stack.push(deltas[1])
    stack.pop()
    assert_same_state(model, after_a)
    stack.push(deltas[2])
    stack.pop()
    assert_same_state(model, after_a)
    stack.pop()
    assert_same_state(model, base)
    with pytest.raises(ConfigError, match="empty"):
        stack.pop()


@pytest.mark.parametrize("mode", ["attach", "merge"])
def test_revert_after_an_exception_inside_the_context(mode, one_thread):
    model = TINY_MODELS["bert"]()
    base = state(model)
    deltas = make_deltas(model, "bert")
    with pytest.raises(RuntimeError, match="boom"), compose(model, deltas, mode=mode):
        assert not torch.equal(model.classifier.weight, base["classifier.weight"])  # the head was loaded
        raise RuntimeError("boom")
    assert_same_state(model, base)
    assert not any(isinstance(m, DeltaLayer) for m in model.modules())


@pytest.mark.parametrize("mode", ["attach", "merge"])
def test_a_failing_push_leaves_the_model_as_it_was(mode):
    model = TINY_MODELS["llama"]()
    base = state(model)
    deltas = make_deltas(model, "llama")
    bad = Delta("sparse", {}, {"model.layers.0.self_attn.q_proj": SparsePart((64, 65), torch.tensor([1]))})
    with pytest.raises(ShapeMismatch, match="delta #1 \\(sparse\\): module 'model.layers.0.self_attn.q_proj'"):
        compose(model, [deltas[0], bad], mode=mode)
    assert_same_state(model, base)
    assert not any(isinstance(m, DeltaLayer) for m in model.modules())


def test_push_checks_fingerprint_against_the_untouched_base_and_force_skips_it():
    model = TINY_MODELS["llama"]()
    base = state(model)
    fp = fingerprint(model)
    lora, sparse, _ = make_deltas(model, "llama")
    stack = DeltaStack(model, mode="merge")
    stack.push(lora)  # touches lm_head.weight, the first tensor the fingerprint samples
    assert fingerprint(model) != fp
    stack.push(sparse)  # still matches: checked against the base before the stack touched it
    other = copy.copy(sparse)
    other.fingerprint = fingerprint(TINY_MODELS["llama"](1))
    with pytest.raises(FingerprintMismatch, match=r"delta #2 \(sparse\) was trained on another base.*values"):
        stack.push(other)
    stack.revert()
    assert_same_state(model, base)
    forced = DeltaStack(model, mode="merge", force=True)
    forced.push(other)
    forced.revert()
    assert_same_state(model, base)


def test_merge_snapshot_memory_is_what_the_docstring_says():
    model = TINY_MODELS["llama"]()
    q = "model.layers.0.self_attn.q_proj"
    gen = torch.Generator().manual_seed(0)
    stack = DeltaStack(model, mode="merge")
    stack.push(Delta("sparse", {}, {q: sparse_part(get_module(model, q), 40, gen)}))
    assert stack.snapshot_bytes == 40 * 4  # only the 40 original fp32 values
    stack.push(Delta("lora", {}, {q: lora_part(get_module(model, q), 2, 1.0, gen)}))
    assert stack.snapshot_bytes == 40 * 4 + 64 * 64 * 4  # plus the whole (bias-free) 64×64 weight
    stack.revert()
    assert stack.snapshot_bytes == 0


def test_a_dense_bias_delta_and_a_lora_on_one_module_compose_in_both_modes():
    """The layer sums every additive update (θ + Σ Δθ through the module's own forward), so a dense delta of a
    weight *and bias* stacks with a LoRA in attach mode and gives what merging gives."""
    model = TINY_MODELS["bert"]()
    base = state(model)
    q = "bert.encoder.layer.0.attention.self.query"
    gen = torch.Generator().manual_seed(0)
    lora = Delta("lora", {}, {q: lora_part(get_module(model, q), 2, 1.0, gen)})
    full = Delta("full", {}, {q: dense_part(get_module(model, q), gen)})  # weight and bias
    with compose(model, [lora, full], mode="merge"):
        hand = base[f"{q}.bias"] + full.parts[q].delta_for("bias")
        assert torch.allclose(get_module(model, q).bias, hand)
        merged = logits(model, "bert")
    assert_same_state(model, base)
    with compose(model, [lora, full], mode="attach"):
        assert torch.allclose(logits(model, "bert"), merged, atol=1e-5)
    assert_same_state(model, base)


def test_composed_heads_must_agree_and_apply_delta_of_the_sum_matches():
    model = TINY_MODELS["bert"]()
    deltas = make_deltas(model, "bert")
    clash = copy.copy(deltas[2])
    clash.heads = {"classifier": {k: v + 1 for k, v in deltas[2].heads["classifier"].items()}}
    with pytest.raises(ConfigError, match="different task heads 'classifier'"):
        compose(model, [deltas[2], clash])
    combined = compose_deltas(deltas)
    ref = logits(by_hand(model, deltas), "bert")
    apply_delta(model, combined)
    assert torch.allclose(logits(model, "bert"), ref, atol=1e-5)


def test_bad_mode_and_names():
    model = TINY_MODELS["llama"]()
    with pytest.raises(ConfigError, match="'attach' or 'merge'"):
        DeltaStack(model, mode="add")
    with pytest.raises(ConfigError, match="1 names for 0 deltas"):
        compose(model, [], names=["x"])


@pytest.mark.parametrize("method", ["dora", "ia3", "ssf"])
def test_merge_mode_gives_base_dependent_parts_the_base_as_attach_mode_does(method):
    """A base-dependent delta pushed onto a merged LoRA on the same modules: its update is computed from the
    base weights (θ₀ + Δ_lora + Δ_m(θ₀)), as attach mode computes it, and the revert is still exact."""
    from conftest import randomize_delta

    import deltatune as dt

    model = TINY_MODELS["llama"]()
    base = state(model)
    lora = randomize_delta(TINY_MODELS["llama"](), dt.LoRAConfig(r=2, targets=["k_proj", "v_proj", "down_proj"]),
                           1, 0.2)
    other = randomize_delta(TINY_MODELS["llama"](), dt.make_config(method, {}), 2, 0.02)
    with torch.no_grad():  # around the identity, as trained deltas are: ΔW stays a small change
        for part in other.parts.values():
            for name, p in part.named_parameters():
                if "scale" in name or "ia3" in name:
                    p.add_(1.0)
    with compose(model, [lora, other], mode="attach"):
        attached = logits(model, "llama")
    with compose(model, [lora, other], mode="merge"):
        merged = logits(model, "llama")
    assert torch.allclose(merged, attached, atol=1e-5)
    assert_same_state(model, base)


def test_deltas_with_different_heads_are_compared_on_probe_tensors():
    # Ansell's case: a language delta without heads plus a task delta with a classifier. Their fingerprints leave out
    # different heads, so num_params/shapes/values differ by construction; the probe tensors (chosen independently
    # of the heads) still tell two bases apart, and the sum keeps a partial fingerprint that is checked on apply
    m0, m1 = TINY_MODELS["bert"](0), TINY_MODELS["bert"](1)
    gen = torch.Generator().manual_seed(0)
    q = "bert.encoder.layer.0.attention.self.query"
    head = {"classifier": {k: v.detach().clone() for k, v in m0.classifier.state_dict().items()}}

    def lang(m):
        return Delta("lora", {}, {q: lora_part(get_module(m, q), 2, 1.0, gen)}, fingerprint=fingerprint(m))

    def task(m):
        return Delta("lora", {}, {q: lora_part(get_module(m, q), 2, 1.0, gen)}, heads=copy.deepcopy(head),
                     fingerprint=fingerprint(m, exclude=["classifier"]))

    with pytest.raises(FingerprintMismatch, match="probe"):
        compose_deltas([lang(m0), task(m1)])
    assert compose_deltas([lang(m0), task(m0)]).fingerprint == task(m0).fingerprint  # the union's own fingerprint
    pooler = {"bert.pooler.dense": {k: v.detach().clone() for k, v in m0.bert.pooler.dense.state_dict().items()}}
    other = Delta("lora", {}, {q: lora_part(get_module(m0, q), 2, 1.0, gen)}, heads=pooler,
                  fingerprint=fingerprint(m0, exclude=["bert.pooler.dense"]))
    summed = compose_deltas([task(m0), other])  # no input carries both heads: a partial fingerprint
    assert set(summed.fingerprint) == {"model_type", "probe"} and summed.fingerprint["probe"]
    apply_delta(TINY_MODELS["bert"](0), summed)  # its own base: accepted
    with pytest.raises(FingerprintMismatch, match="probe"):
        apply_delta(TINY_MODELS["bert"](1), summed)


def test_a_push_with_new_heads_keeps_a_bias_an_earlier_merge_added():
    # the base fingerprint for a new head set is taken with the stack undone; a bias a BitFit merge added to a
    # bias-free Linear must be back afterwards
    from deltatune.parts.bias import BiasPart

    model = TINY_MODELS["llama"]()
    q = "model.layers.0.self_attn.q_proj"
    assert get_module(model, q).bias is None
    bias = BiasPart(get_module(model, q).out_features, has_bias=False)
    with torch.no_grad():
        bias.bias_delta.fill_(1.0)
    d1 = Delta("bitfit", {}, {q: bias}, fingerprint=fingerprint(model))
    head = {"lm_head": {"weight": get_module(model, "lm_head").weight.detach().clone()}}
    d2 = Delta("head", {}, {}, heads=head, fingerprint=fingerprint(model, exclude=["lm_head"]))
    stack = DeltaStack(model, mode="merge")
    stack.push(d1)
    stack.push(d2)
    assert get_module(model, q).bias is not None and torch.all(get_module(model, q).bias == 1.0)
    stack.revert()
    assert get_module(model, q).bias is None


def test_summing_a_base_dependent_part_with_another_names_the_module():
    import deltatune
    from deltatune.errors import NotMergeable

    k = "model.layers.0.self_attn.k_proj"
    a = deltatune.attach(TINY_MODELS["llama"](), deltatune.make_config("ia3", {"targets": [k]}))
    b = deltatune.attach(TINY_MODELS["llama"](), deltatune.LoRAConfig(r=2, targets=[k]))
    with pytest.raises(NotMergeable, match=f"^{k}: ") as err:
        compose_deltas([a, b])
    assert err.value.kind == "ia3"


@pytest.mark.parametrize("other", ["bitfit", "lora", "ia3", "ssf"])
def test_bitfit_biases_added_to_a_bias_free_llama_compose_with_another_delta_in_both_modes(other) -> None:
    """BitFit on Llama adds biases its Linears do not have (``bias=None``).  Live beside another delta on the same
    Linear, the summed update takes the missing bias as 0 (it raised ``KeyError: 'bias'``); merged first, the bias
    it created does not count as the base's for the next delta: (IA)³ and SSF made for bias-free modules fit, and
    scale what they scaled live (they were refused, or scaled BitFit's bias)."""
    from conftest import randomize_delta, tiny_llama

    from deltatune.methods import make_config
    from deltatune.model import detach

    def trained(method, seed):
        model = tiny_llama()
        delta = randomize_delta(model, make_config(method, {"r": 2} if method == "lora" else {}), seed, 0.05)
        detach(model)
        for part in delta.parts.values():  # (IA)³ and SSF scales away from 1: their updates then matter
            for name in ("ia3_l", "ssf_scale"):
                if hasattr(part, name):
                    with torch.no_grad():
                        getattr(part, name).add_(1.0)
        return delta

    bitfit, second = trained("bitfit", 1), trained(other, 2)
    inputs = {k: v for k, v in tiny_inputs("llama").items() if k != "labels"}
    outs = []
    for order in ([bitfit, second], [second, bitfit]):
        for mode in ("attach", "merge"):
            model = tiny_llama()
            with compose(model, order, mode=mode), torch.no_grad():
                outs.append(model(**inputs).logits)
    alone = tiny_llama()
    with torch.no_grad():
        base = alone(**inputs).logits
    assert (outs[0] - base).abs().max().item() > 1e-3  # the deltas matter
    for out in outs[1:]:
        assert (out - outs[0]).abs().max().item() <= 1e-5


def test_half_precision_sparse_and_slice_sums_are_exact_and_run_on_their_half_precision_base() -> None:
    """Values of bf16 sparse (slice) parts that share an index (a channel) are summed in fp32: the composed delta
    is their fp32 sum (exact for these values; bf16 would round it to 8 bits), and it still attaches to and merges
    into a bf16 model as the two deltas composed live do."""
    from conftest import tiny_llama

    from deltatune.parts.layers import layer_kind
    from deltatune.parts.slice import SlicePart

    model = tiny_llama().to(torch.bfloat16)
    name = "model.layers.0.self_attn.q_proj"
    module = get_module(model, name)
    g = torch.Generator().manual_seed(0)

    def delta(seed: int, kind: str) -> Delta:
        if kind == "sparse":
            part = SparsePart(tuple(module.weight.shape), torch.arange(0, 400), layer_kind(module),
                              dtype=torch.bfloat16)
            values = part.values
        else:
            part = SlicePart(module.in_features, module.out_features, "out", torch.tensor([1, 3, 5]),
                             layer_kind(module), dtype=torch.bfloat16)
            values = part.block
        with torch.no_grad():
            values.copy_(torch.randn(values.shape, generator=g) * 0.1 + seed)
        return Delta(kind, {}, {name: part}, fingerprint=fingerprint(model))

    inputs = {k: v for k, v in tiny_inputs("llama").items() if k != "labels"}
    for kind in ("sparse", "slice"):
        one, two = delta(1, kind), delta(2, kind)
        summed = compose_deltas([one, two]).parts[name]
        stored = summed.values if kind == "sparse" else summed.block
        first, second = ((d.parts[name].values if kind == "sparse" else d.parts[name].block) for d in (one, two))
        assert torch.equal(stored, first.float() + second.float())  # exact: bf16 would round
        live = copy.deepcopy(model)
        with compose(live, [one, two], mode="attach"), torch.no_grad():
            want = live(**inputs).logits
        for merge in (False, True):
            target = copy.deepcopy(model)
            apply_delta(target, Delta(kind, {}, {name: summed}, fingerprint=fingerprint(model)), merge=merge)
            with torch.no_grad():
                got = target(**inputs).logits
            assert got.dtype == torch.bfloat16 and (got.float() - want.float()).abs().max().item() <= 0.05
