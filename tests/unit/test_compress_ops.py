"""Compression ops (ComPEFT, DAREx-q, int8, low rank) and the Delta-level API, against hand-computed values."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch
from conftest import tiny_gpt2, tiny_inputs, tiny_llama

import deltatune as dt
from deltatune.algebra.compress import compress_delta, output_change_score
from deltatune.delta import Delta
from deltatune.errors import ConfigError
from deltatune.ops import compress as ops
from deltatune.ops.sparsify import dare
from deltatune.parts import LoRAPart, SparsePart
from deltatune.parts.dense import DensePart
from deltatune.parts.layers import LayerKind

TAU = torch.tensor([0.5, -1.0, 2.0, -3.0, 0.25, 4.0, -0.5, 1.5, -2.5, 0.0])
# Σx = 1.25, x̄ = 0.125, Σx² = 39.0625, Σ(x − x̄)² = 39.0625 − 10·0.125² = 38.90625
SIGMA = math.sqrt(38.90625 / 9)


# --------------------------------------------------------------------------------------------------
# ops
# --------------------------------------------------------------------------------------------------
def test_compeft_hand_computed_ten_entries():
    out = ops.compeft(TAU, density=0.3, alpha=0.5)  # k = 3: |4|, |−3|, |−2.5| → threshold 2.5
    s = torch.tensor(0.5 * SIGMA, dtype=torch.float32).item()
    assert out.tolist() == [0.0, 0.0, 0.0, -s, 0.0, s, 0.0, 0.0, -s, 0.0]
    # σ is the dense update's (before sparsification), not the survivors'
    assert abs(SIGMA - float(TAU[[3, 5, 8]].std())) > 0.1
    assert ops.sample_std(TAU) == pytest.approx(SIGMA, rel=1e-12)


def test_compeft_with_global_sigma_and_threshold_and_ties():
    out = ops.compeft(TAU, density=0.3, alpha=2.0, sigma=1.0, threshold=1.5)
    assert out.tolist() == [0.0, 0.0, 2.0, -2.0, 0.0, 2.0, 0.0, 2.0, -2.0, 0.0]
    tied = ops.compeft(torch.tensor([1.0, -1.0, 1.0, 0.5]), density=0.25, alpha=1.0, sigma=1.0)
    assert tied.tolist() == [1.0, -1.0, 1.0, 0.0]  # k = 1 but three entries tie at |τ| = 1
    assert ops.compeft(torch.zeros(5), 0.5, 1.0).tolist() == [0.0] * 5  # zeros are never "kept"
    half = ops.compeft(TAU.bfloat16(), 0.3, 0.5)
    assert half.dtype is torch.bfloat16 and half.abs().unique().tolist() == [0.0, float(torch.tensor(
        0.5 * SIGMA).bfloat16())]


def test_dare_q_rescales_by_one_over_q():
    tau = torch.arange(1.0, 1001.0)
    out = ops.dare_q(tau, density=0.3, q=0.5, generator=torch.Generator().manual_seed(7))
    mask = dare(tau, 0.3, torch.Generator().manual_seed(7), rescale="none") != 0
    assert torch.equal(out != 0, mask)
    assert torch.equal(out[mask], tau[mask] * 2.0)  # 1/q = 2, not DARE's 1/ρ = 3.33
    plain = ops.dare_q(tau, 0.25, 0.25, torch.Generator().manual_seed(1))
    assert torch.equal(plain, dare(tau, 0.25, torch.Generator().manual_seed(1)))  # q = ρ is DARE


def test_choose_q_and_grid():
    grid = ops.q_grid(0.1, 10)
    assert grid == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]  # rounded: clean keys in the recorded sweep
    choice = ops.choose_q([0.3, 0.5, 1.0], lambda q: (q - 0.55) ** 2)
    assert choice.q == 0.5 and set(choice.scores) == {0.3, 0.5, 1.0}
    assert ops.choose_q([0.3, 0.5], lambda q: math.nan if q == 0.3 else 1.0).q == 0.5
    with pytest.raises(ConfigError, match="at least one"):
        ops.choose_q([], lambda q: 0.0)


def test_int8_hand_computed_and_error_bound():
    q, s = ops.quantize_int8(torch.tensor([[1.0, -0.5], [0.0, 0.0]]), per_row=True)
    assert q.tolist() == [[127, -64], [0, 0]]  # −0.5·127 = −63.5 rounds half to even → −64
    assert s.tolist() == [pytest.approx(1 / 127), 0.0]
    assert ops.dequantize_int8(q, s)[1].tolist() == [0.0, 0.0]
    t = torch.randn(8, 16, generator=torch.Generator().manual_seed(0)) * 3
    for per_row in (False, True):
        q, s = ops.quantize_int8(t, per_row=per_row)
        assert q.dtype is torch.int8 and int(q.abs().max()) == 127
        bound = (s[:, None] if per_row else s) / 2 + 1e-6
        assert bool(((ops.dequantize_int8(q, s) - t).abs() <= bound).all())
    assert ops.quantize_int8(torch.ones(3), per_row=True)[1].shape == ()  # 1-D: one scale


def test_cast_values():
    assert ops.cast_values(torch.tensor([1 + 2 ** -10]), "bf16").tolist() == [1.0]
    with pytest.raises(ConfigError, match="overflow fp16"):
        ops.cast_values(torch.tensor([1e6]), "fp16")
    with pytest.raises(ConfigError, match="dtype"):
        ops.cast_values(torch.ones(1), "fp8")
    big = Delta("sparse", {}, {"a.b": _sparse((4, 4), [1, 2], [1e6, 1.0])})
    with pytest.raises(ConfigError, match=r"^a\.b: values up to .* overflow fp16"):  # names the tensor
        compress_delta(big, "quantize", dtype="fp16")


def test_lowrank_recovers_rank_two_exactly():
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(12, 2, generator=g))
    v, _ = torch.linalg.qr(torch.randn(9, 2, generator=g))
    m = 3.0 * torch.outer(u[:, 0], v[:, 0]) + 1.0 * torch.outer(u[:, 1], v[:, 1])
    for method in ("exact", "randomized"):
        a, b = ops.lowrank_factorize(m, 2, method=method, seed=3)
        assert a.shape == (2, 9) and b.shape == (12, 2)
        assert torch.allclose(b @ a, m, atol=1e-5)
        # distribute-scale: both factors carry √s
        assert a.norm(dim=1).tolist() == pytest.approx([math.sqrt(3.0), 1.0], abs=1e-5)
        assert b.norm(dim=0).tolist() == pytest.approx([math.sqrt(3.0), 1.0], abs=1e-5)
    a, b = ops.lowrank_factorize(m, 50, method="exact")
    assert a.shape == (9, 9)  # capped at min(out, in)
    a1, b1 = ops.lowrank_factorize(m, 1, method="exact")
    assert torch.allclose(b1 @ a1, 3.0 * torch.outer(u[:, 0], v[:, 0]), atol=1e-5)
    assert torch.equal(ops.lowrank_factorize(m, 2, seed=5)[0], ops.lowrank_factorize(m, 2, seed=5)[0])


def test_lowrank_refactor_matches_svd_of_the_product():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 10, generator=g), torch.randn(7, 4, generator=g)
    dense = 0.5 * b @ a
    new_a, new_b = ops.lowrank_refactor(a, b, 0.5, 2)
    ref_a, ref_b = ops.lowrank_factorize(dense, 2, method="exact")
    assert torch.allclose(new_b @ new_a, ref_b @ ref_a, atol=1e-5)
    exact = (0.5 * b.double() @ a.double()).pow(2).sum()
    assert ops.factor_norm_sq(a, b, 0.5) == pytest.approx(float(exact), rel=1e-12)


def test_stable_seed_is_blake2b_of_seed_and_name():
    expected = int.from_bytes(hashlib.blake2b(b"3\x00layer.0.q", digest_size=8).digest(), "little") & (2 ** 63 - 1)
    assert ops.stable_seed(3, "layer.0.q") == expected
    assert ops.stable_seed(3, "layer.0.k") != expected and ops.stable_seed(4, "layer.0.q") != expected


@pytest.mark.parametrize("call, match", [
    (lambda: ops.compeft(TAU, 0.0, 1.0), "density"),
    (lambda: ops.compeft(TAU, 1.5, 1.0), "density"),
    (lambda: ops.compeft(TAU, 0.5, 0.0), "alpha"),
    (lambda: ops.compeft(TAU, 0.5, -1.0), "alpha"),
    (lambda: ops.dare_q(TAU, 0.5, 0.0), "q must"),
    (lambda: ops.dare_q(TAU, 0.5, 1.2), "q must"),
    (lambda: ops.lowrank_factorize(torch.ones(3, 3), 0), "rank"),
    (lambda: ops.lowrank_factorize(torch.ones(3, 3), -2), "rank"),
    (lambda: ops.lowrank_factorize(torch.ones(3, 3), 1.5), "rank"),
    (lambda: ops.lowrank_factorize(torch.ones(3), 1), "2-D"),
])
def test_bad_op_parameters(call, match):
    with pytest.raises(ConfigError, match=match):
        call()


# --------------------------------------------------------------------------------------------------
# Delta level
# --------------------------------------------------------------------------------------------------
def _sparse(shape, indices, values) -> SparsePart:
    part = SparsePart(shape, torch.tensor(indices))
    with torch.no_grad():
        part.values.copy_(torch.tensor(values))
    return part


def _two_sparse() -> Delta:
    return Delta("sparse", {"density": 0.1}, {"a": _sparse((4, 4), [1, 5, 9], [1.0, -2.0, 3.0]),
                                              "b": _sparse((2, 3), [0, 4], [-4.0, 0.5])},
                 fingerprint={"num_params": 22}, heads={"h": {"weight": torch.ones(2)}})


def test_compeft_global_scope_uses_one_sigma_and_threshold():
    # ComPEFT's σ and k = ⌊ρ·n⌋ are over every entry of the update: a sparse part's unstored entries are zeros
    d = _two_sparse()  # a: 3 of 4×4 entries stored, b: 2 of 2×3; n = 22
    c = compress_delta(d, "compeft", density=0.1, alpha=1.0)  # k = 2 → keep |3|, |−4|
    dense = torch.tensor([1.0, -2.0, 3.0, -4.0, 0.5] + [0.0] * 17)
    sigma = ops.sample_std(dense)  # Σ(x − x̄)² = 30.25 − 1.5²/22, over 21
    assert sigma == pytest.approx(math.sqrt((30.25 - 1.5**2 / 22) / 21), rel=1e-12)
    s = float(torch.tensor(sigma))
    assert c.parts["a"].indices.tolist() == [9] and c.parts["a"].values.tolist() == [pytest.approx(s)]
    assert c.parts["b"].indices.tolist() == [0] and c.parts["b"].values.tolist() == [pytest.approx(-s)]
    result = c.metrics["compression"][-1]
    assert result["threshold"] == 3.0 and result["sigma"] == pytest.approx(sigma, rel=1e-12)
    assert result["kept"] == 2 and result["density_achieved"] == pytest.approx(2 / 22)
    assert c.config["compression"][-1]["method"] == "compeft" and c.config["density"] == 0.1
    assert c.fingerprint == d.fingerprint and torch.equal(c.heads["h"]["weight"], d.heads["h"]["weight"])
    assert d.parts["a"].values.tolist() == [1.0, -2.0, 3.0]  # input untouched
    per = compress_delta(d, "compeft", density=0.1, alpha=1.0, scope="tensor")  # k = 1 per part
    sa = ops.sample_std(torch.tensor([1.0, -2.0, 3.0] + [0.0] * 13))
    assert per.parts["a"].values.tolist() == [pytest.approx(sa)]
    assert per.parts["b"].values.tolist() == [pytest.approx(-ops.sample_std(torch.tensor([-4.0, 0.5] + [0.0] * 4)))]


def test_a_sparse_part_compresses_as_the_dense_update_it_stands_for():
    torch.manual_seed(0)
    w = torch.zeros(10, 10)
    idx = torch.tensor([3, 17, 42, 58])
    w.view(-1)[idx] = torch.tensor([0.5, -1.5, 2.0, -0.25])
    dense = DensePart({"weight": (10, 10)})
    with torch.no_grad():
        dense.delta_for("weight").copy_(w)
    as_dense = compress_delta(Delta("full", {}, {"m": dense}), "compeft", density=0.02, alpha=1.0)
    as_sparse = compress_delta(Delta("sparse", {}, {"m": _sparse((10, 10), idx.tolist(), w.view(-1)[idx].tolist())}),
                               "compeft", density=0.02, alpha=1.0)
    assert torch.allclose(as_dense.parts["m"].delta_weight(), as_sparse.parts["m"].delta_weight(), atol=1e-6)


def test_dsee_s_sparse_values_compress_as_the_weight_sized_update_they_stand_for():
    # ComPEFT's σ and k = ⌊ρ·n⌋ are over the whole update: DSEE's sparse term as a sparse part's, its factors alone
    from deltatune.parts.dsee import DSEEPart

    idx, vals = [3, 17, 42, 58], [0.5, -1.5, 2.0, -0.25]
    dsee = DSEEPart(10, 10, 2, 1.0, (10, 10), torch.tensor(idx))
    with torch.no_grad():
        dsee.values.copy_(torch.tensor(vals))
    assert dsee.values_domain() == {"values": 100} and dsee.values_domain(product=True) == {}
    got = compress_delta(Delta("dsee", {}, {"m": dsee}), "compeft", density=0.02, alpha=1.0).parts["m"]
    want = compress_delta(Delta("sparse", {}, {"m": _sparse((10, 10), idx, vals)}), "compeft", density=0.02,
                          alpha=1.0).parts["m"]
    assert torch.equal(got.indices, want.indices) and got.indices.tolist() == [17, 42]  # k = ⌊0.02 · 100⌋ = 2
    assert torch.equal(got.values.detach().sign(), torch.tensor([-1.0, 1.0]))  # (σ also sees the factors)


def test_a_dsee_part_drops_the_sparse_entries_compression_zeroed():
    from deltatune.parts.dsee import DSEEPart

    dsee = DSEEPart(10, 10, 2, 1.0, (10, 10), torch.tensor([3, 17, 42, 58]))
    with torch.no_grad():
        dsee.values.copy_(torch.tensor([0.5, -1.5, 2.0, -0.25]))
    got = compress_delta(Delta("dsee", {}, {"m": dsee}), "magnitude", density=0.02, scope="tensor").parts["m"]
    assert got.indices.tolist() == [17, 42] and bool((got.values != 0).all())  # the zeros are not stored


def test_a_slice_part_compresses_as_the_dense_update_it_stands_for():
    from deltatune.parts.slice import SlicePart

    part = SlicePart(10, 8, "out", torch.tensor([1, 6]))
    with torch.no_grad():
        part.block.copy_(torch.randn(part.block.shape, generator=torch.Generator().manual_seed(0)))
    dense = DensePart({"weight": (8, 10)})
    with torch.no_grad():
        dense.delta_for("weight").copy_(part.delta_weight())
    as_dense = compress_delta(Delta("full", {}, {"m": dense}), "compeft", density=0.05, alpha=1.0)
    as_slice = compress_delta(Delta("s2ft", {}, {"m": part}), "compeft", density=0.05, alpha=1.0)
    assert torch.allclose(as_dense.parts["m"].delta_weight(), as_slice.parts["m"].delta_weight(), atol=1e-6)


def test_magnitude_keeps_values_and_dare_drops_zeros():
    d = _two_sparse()
    m = compress_delta(d, "magnitude", density=0.1)  # k = ⌊0.1·22⌋ = 2 of the update's entries
    assert m.parts["a"].values.tolist() == [3.0] and m.parts["b"].values.tolist() == [-4.0]
    q8 = compress_delta(d, "quantize", dtype="int8", scope="tensor")
    assert q8.parts["b"].values.tolist() == [-4.0, pytest.approx(4 / 127 * 16)]  # round(0.5·127/4) = 16


def _lora_delta(model, layer_targets=("all-linear",), r=4, seed=0) -> Delta:
    d = dt.attach(model, dt.LoRAConfig(r=r, targets=list(layer_targets)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in d.parts.values():
            p.lora_B.copy_(torch.randn(p.lora_B.shape, generator=g) * 0.05)
    dt.detach(model)
    return d


def test_lora_factors_versus_product_on_conv1d():
    d = _lora_delta(tiny_gpt2(), ["c_attn"])
    factors = compress_delta(d, "compeft", density=0.2, alpha=2.0)
    assert all(isinstance(p, LoRAPart) for p in factors.parts.values())
    a_vals = {v for p in factors.parts.values() for v in p.lora_A.abs().unique().tolist()} - {0.0}
    assert len(a_vals) == 1  # one global magnitude α·σ for every factor
    prod = compress_delta(d, "compeft", density=0.2, alpha=2.0, target="product", scope="tensor")
    for name, part in prod.parts.items():
        src = d.parts[name]
        assert isinstance(part, SparsePart) and part.layer is LayerKind.CONV1D
        assert part.weight_shape == tuple(src.delta_weight().shape)  # native (in, out) layout
        expected = ops.compeft(src.delta_weight(), 0.2, 2.0)
        assert torch.equal(part.delta_weight(), expected)


def test_dense_parts_stay_dense_and_include_biases():
    model = tiny_gpt2()
    d = dt.attach(model, dt.FullConfig(targets=["h.0.attn.c_attn"]))
    with torch.no_grad():
        for t in d.parts["transformer.h.0.attn.c_attn"].parameters():
            t.copy_(torch.randn(t.shape, generator=torch.Generator().manual_seed(2)))
    dt.detach(model)
    c = compress_delta(d, "dare", density=0.5, seed=1)
    part = c.parts["transformer.h.0.attn.c_attn"]
    assert isinstance(part, DensePart) and set(part.shapes) == {"weight", "bias"}
    bias = part.delta_for("bias")
    src = d.parts["transformer.h.0.attn.c_attn"].delta_for("bias")
    assert torch.equal(bias[bias != 0], src[bias != 0] * 2.0)


def test_masks_are_seeded_per_tensor_name_not_by_order():
    d = _two_sparse()
    reordered = Delta("sparse", {}, dict(reversed(list(d.parts.items()))))
    one = compress_delta(d, "dare", density=0.5, seed=4)
    two = compress_delta(reordered, "dare", density=0.5, seed=4)
    for name in d.parts:
        assert torch.equal(one.parts[name].indices, two.parts[name].indices)
    big = Delta("sparse", {}, {"a": _sparse((40, 40), list(range(1600)), [1.0] * 1600)})
    x = compress_delta(big, "dare", density=0.5, seed=4).parts["a"].indices
    y = compress_delta(big, "dare", density=0.5, seed=5).parts["a"].indices
    assert not torch.equal(x, y)
    mask = dare(torch.ones(1600), 0.5, ops.generator_for(4, "a"), rescale="none") != 0
    assert torch.equal(x, mask.nonzero().reshape(-1))


def test_alpha_sweep_by_eval_fn_and_q_calibration():
    d = _two_sparse()
    sigma = ops.sample_std(torch.tensor([1.0, -2.0, 3.0, -4.0, 0.5] + [0.0] * 17))  # the 22 entries of the update

    def eval_fn(cand: Delta) -> float:  # best when the kept magnitude is 2σ
        return -abs(float(cand.parts["a"].values.detach().abs().max()) / sigma - 2.0)

    c = compress_delta(d, "compeft", density=0.4, eval_fn=eval_fn, alphas=(0.5, 1.0, 2.0, 4.0))
    result = c.metrics["compression"][-1]
    assert result["alpha"] == 2.0 and list(result["alpha_sweep"]) == ["0.5", "1.0", "2.0", "4.0"]
    assert c.parts["a"].values.abs().max().item() == pytest.approx(2 * sigma)

    big = Delta("sparse", {}, {"a": _sparse((40, 40), list(range(1600)), [1.0] * 1600)})

    def calibration_fn(cand: Delta) -> float:  # values are 1/q: best q closest to 0.7
        return abs(1.0 / float(cand.parts["a"].values.detach()[0]) - 0.7)

    x = compress_delta(big, "darex-q", density=0.1, calibration_fn=calibration_fn)
    result = x.metrics["compression"][-1]
    assert list(result["q_sweep"]) == [repr(q) for q in ops.q_grid(0.1)] and result["q"] == 0.7
    assert x.parts["a"].values.unique().tolist() == [pytest.approx(1 / 0.7)]
    with pytest.raises(ConfigError, match="calibration_fn"):
        compress_delta(big, "darex-q", density=0.1)


def test_output_change_score_is_zero_for_the_reference():
    model = tiny_llama()
    d = _lora_delta(model, ["q_proj", "v_proj"])
    batch = tiny_inputs("llama")
    score = output_change_score(model, d, batch)
    assert score(d) == 0.0
    pruned = compress_delta(d, "darex-q", density=0.3, q=0.3)
    assert score(pruned) > 0.0
    assert not any(type(m).__name__ == "DeltaLayer" for m in model.modules())  # candidates are detached


def test_lowrank_from_lora_sparse_and_dense(tmp_path):
    model = tiny_llama()
    d = _lora_delta(model, ["q_proj"], r=4)
    low = compress_delta(d, "lowrank", rank=2)
    assert low.method == "lora" and low.config["rslora"] is False
    for name, part in low.parts.items():
        src = d.parts[name]
        ref_a, ref_b = ops.lowrank_factorize(src.delta_weight(), 2, method="exact")
        assert part.rank == 2 and part.scale == 1.0
        assert torch.allclose(part.delta_weight(), ref_b @ ref_a, atol=1e-5)
        assert low.metrics["compression"][-1]["modules"][name]["relative_error"] > 0
    emb = _sparse((128, 64), [0, 65, 130], [1.0, 2.0, 3.0])
    emb.layer = LayerKind.EMBEDDING
    sp = compress_delta(Delta("sparse", {}, {"model.embed_tokens": emb}), "lowrank", rank=3)
    part = sp.parts["model.embed_tokens"]
    assert (part.in_features, part.out_features, part.layer) == (128, 64, LayerKind.EMBEDDING)
    assert torch.allclose(part.delta_weight(), emb.delta_weight(), atol=1e-6)  # rank 3 is exact here

    full = dt.attach(model, dt.FullConfig())
    with torch.no_grad():
        for p in full.parts.values():
            for t in p.parameters():
                t.copy_(torch.randn(t.shape, generator=torch.Generator().manual_seed(3)) * 0.01)
    dt.detach(model)
    with pytest.raises(ConfigError, match="needs model="):
        compress_delta(full, "lowrank", rank=2)
    with pytest.warns(UserWarning, match="dropped"):
        ext = compress_delta(full, "lowrank", rank=2, model=model)
    kinds = {n: p.layer for n, p in ext.parts.items()}
    assert kinds["model.embed_tokens"] is LayerKind.EMBEDDING and kinds["lm_head"] is LayerKind.LINEAR
    assert "model.norm.weight" in ext.metrics["compression"][-1]["dropped"]
    one = compress_delta(Delta("full", {}, {"lm_head": full.parts["lm_head"]}), "lowrank", rank=1, model=model)
    ext.parts["lm_head"] = one.parts["lm_head"]  # per-module ranks → PEFT rank_pattern / alpha_pattern
    dt.export_peft(ext, tmp_path / "peft")
    back = dt.load_peft_adapter(tmp_path / "peft", model=model)
    for name, part in ext.parts.items():
        assert torch.allclose(back.parts[name].delta_weight(), part.delta_weight(), atol=1e-6)
    peft = pytest.importorskip("peft")
    merged = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "peft")).merge_and_unload()
    own = dict(merged.named_modules())
    base = dict(tiny_llama().named_modules())
    for name, part in ext.parts.items():  # embedding (transposed native layout) and linear alike
        expected = base[name].weight + part.delta_weight()
        assert torch.allclose(own[name].weight, expected, atol=1e-6), name


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="compeft", density=0.0), "density"),
    (dict(method="compeft", density=1.5), "density"),
    (dict(method="compeft"), "density"),
    (dict(method="compeft", density=0.1, alpha=0.0), "alpha"),
    (dict(method="compeft", density=0.1, alpha=-2.0), "alpha"),
    (dict(method="compeft", density=0.1, alphas=()), "alphas"),
    (dict(method="compeft", density=0.1, dtype="int8"), r"compress \(compeft\): unknown field.*'dtype'"),
    (dict(method="compeft", density=0.1, scope="row"), "scope"),
    (dict(method="dare", density=0.1, alpha=1.0), r"compress \(dare\): unknown field.*'alpha'.*valid fields"),
    (dict(method="darex-q", density=0.1, q=0.0), "q must"),
    (dict(method="lowrank", rank=0), "rank"),
    (dict(method="lowrank", rank=-1), "rank"),
    (dict(method="lowrank"), "rank"),
    (dict(method="lowrank", rank=2, target="product"), "target"),
    (dict(method="quantize"), "needs dtype"),
    (dict(method="quantize", dtype="int4"), "dtype"),
    (dict(method="zip", density=0.1), "unknown compression method"),
])
def test_bad_compress_parameters(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        compress_delta(_two_sparse(), **kwargs)


def test_non_finite_delta_is_refused():
    d = Delta("sparse", {}, {"a": _sparse((2, 2), [0, 3], [1.0, float("nan")])})
    with pytest.raises(ConfigError, match="'a'.*NaN|a: .*NaN"):
        compress_delta(d, "compeft", density=0.5)
