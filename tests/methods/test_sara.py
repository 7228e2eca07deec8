"""SaRA: the smallest-|W| entries train (fraction or threshold), a nuclear-norm penalty λ‖W ⊙ M‖_* on one drawn
matrix per step through the auxiliary loss, and progressive reselection that stops training entries grown past
the threshold (they keep their value; weight decay never moves them)."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_MODELS, logits, max_diff, tiny_inputs

import deltatune
from deltatune.errors import ConfigError
from deltatune.methods import get_method
from deltatune.methods.sara import nuclear_norm, small_entries
from deltatune.model import get_module
from deltatune.parts.sparse import scatter_delta

pytestmark = pytest.mark.usefixtures("one_thread")


def test_small_entries_by_fraction_and_by_threshold():
    w = torch.tensor([[0.5, -0.01, 0.2], [0.003, -0.4, 0.02]])
    idx, thr = small_entries(w, fraction=0.5, threshold=None)
    assert idx.tolist() == [1, 3, 5] and thr == pytest.approx(0.02)
    idx, thr = small_entries(w, fraction=0.5, threshold=0.015)
    assert idx.tolist() == [1, 3] and thr == 0.015
    assert small_entries(w, fraction=1e-6, threshold=None)[0].tolist() == [3]  # at least one entry


def test_nuclear_norm_is_the_sum_of_singular_values():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(6, 4, generator=g)
    assert nuclear_norm(m).item() == pytest.approx(float(torch.linalg.svdvals(m).sum()), rel=1e-5)


def setup(config_map: dict, arch: str = "llama", wd: float = 0.0, total: int = 50):
    model = TINY_MODELS[arch]()
    base = {n: m.weight.detach().clone() for n, m in model.named_modules() if hasattr(m, "weight")}
    config = deltatune.make_config("sara", config_map)
    delta = deltatune.attach(model, config)
    method = get_method("sara")
    opt = method.optimizer([p for p in model.parameters() if p.requires_grad], 2e-2, wd, config)
    (sched,) = method.hooks(model, delta, config, opt, total, 1)
    return model, base, delta, opt, sched


def run(model, delta, opt, sched, start: int, steps: int, arch: str = "llama"):
    inputs = tiny_inputs(arch)
    model.train()
    for step in range(start, start + steps):
        sched.before_step(step)
        loss = model(**inputs).loss
        aux = delta.aux_loss()
        (loss if aux is None else loss + aux).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.after_step(step + 1)


def test_parts_cover_exactly_the_smallest_entries():
    model, base, delta, opt, sched = setup({"fraction": 0.05, "progressive_step": 0})
    assert delta.parts and "lm_head" not in delta.parts
    for name, part in delta.parts.items():
        w = base[name]
        k = int(0.05 * w.numel())
        assert part.kind == "sara" and part.indices.numel() == k
        chosen = w.reshape(-1).abs()[part.indices]
        others = w.reshape(-1).abs()[~torch.isin(torch.arange(w.numel()), part.indices)]
        assert float(chosen.max()) <= float(others.min())


def test_one_matrix_per_step_adds_the_weighted_nuclear_norm_of_its_masked_weights():
    model, base, delta, opt, sched = setup({"fraction": 0.05, "nuclear_weight": 0.1, "progressive_step": 0,
                                            "nuclear_min_dim": 16})
    run(model, delta, opt, sched, 0, 2)  # non-zero deltas
    model.train()
    chosen = []
    for step in range(2, 8):
        sched.before_step(step)
        flagged = [n for n, p in delta.parts.items() if p.penalize]
        assert len(flagged) == 1
        chosen.append(flagged[0])
        model(**tiny_inputs("llama"))
        part = delta.parts[flagged[0]]
        masked = base[flagged[0]].reshape(-1)[part.indices] + part.values.detach()
        expect = 0.1 * nuclear_norm(scatter_delta(part.weight_shape, part.indices, masked))
        assert float(delta.aux_loss().detach()) == pytest.approx(float(expect), rel=1e-5) and float(expect) > 0
    assert len(set(chosen)) > 1, "the penalised matrix is drawn anew each step"
    # its gradient reaches the values: the penalty alone shrinks the drawn matrix's masked nuclear norm
    part = delta.parts[chosen[-1]]
    w0 = base[chosen[-1]].reshape(-1)[part.indices]

    def masked_norm() -> float:
        return float(nuclear_norm(scatter_delta(part.weight_shape, part.indices, w0 + part.values.detach())))

    before = masked_norm()
    for p in model.parameters():
        p.grad = None
    delta.aux_loss().backward()
    with torch.no_grad():
        part.values -= 1e-3 * part.values.grad
    assert masked_norm() < before


def test_penalty_gradient_at_a_zero_delta_is_that_of_the_masked_weights():
    # ΔW = 0 at the start: ‖ΔW‖_* would give SVD's arbitrary subgradient (the identity on the mask); the reference's
    # ‖W ⊙ M‖_* gives λ·(U Vᵀ)[M] of the masked pretrained weights
    model, base, delta, opt, sched = setup({"fraction": 0.2, "nuclear_weight": 1.0, "progressive_step": 0,
                                            "nuclear_min_dim": 16})
    model.train()
    sched.before_step(0)
    (name,) = [n for n, p in delta.parts.items() if p.penalize]
    part = delta.parts[name]
    delta.aux_loss().backward()
    masked = scatter_delta(part.weight_shape, part.indices, base[name].reshape(-1)[part.indices])
    u, _, vh = torch.linalg.svd(masked.reshape(masked.shape[0], -1), full_matrices=False)
    assert torch.allclose(part.values.grad, (u @ vh).reshape(-1)[part.indices], atol=1e-5)


def test_matrices_with_a_short_side_of_64_are_not_penalised():
    # the reference draws among 2-D weights whose min dimension is > 64: the tiny Llama's are all ≤ 64
    model, base, delta, opt, sched = setup({"fraction": 0.05, "nuclear_weight": 0.1, "progressive_step": 0})
    assert sched.eligible == []
    assert setup({"fraction": 0.05, "nuclear_weight": 0.1, "nuclear_min_dim": 63})[4].eligible


def test_no_penalty_when_off_or_in_eval():
    model, base, delta, opt, sched = setup({"fraction": 0.05, "nuclear_weight": 0.0, "progressive_step": 0})
    sched.before_step(0)
    assert delta.aux_loss() is None
    model, base, delta, opt, sched = setup({"fraction": 0.05, "progressive_step": 0})
    sched.before_step(0)
    model.eval()
    assert delta.aux_loss() is None


def test_progressive_reselection_freezes_entries_that_grew_past_the_threshold():
    cfg = {"threshold": 0.01, "progressive_step": 3, "nuclear_weight": 0.0}
    model, base, delta, opt, sched = setup(cfg, wd=0.5)
    run(model, delta, opt, sched, 0, 3)  # the reselection runs after step 3
    assert sched.active is not None
    out_total = 0
    frozen = {}
    for name, part in delta.parts.items():
        w = base[name].reshape(-1)[part.indices] + part.values.detach()
        small = w.abs() < 0.01
        positions = sched.active[name]
        assert torch.equal(positions, small.nonzero().reshape(-1))
        assert opt.state_of(part.values)["age"].numel() == positions.numel()  # state only for trained entries
        assert part.indices.dtype == torch.int32 and bool((part.indices.diff() > 0).all())
        frozen[name] = (~small, part.values.detach()[~small].clone(), part.values.detach()[small].clone())
        out_total += int((~small).sum())
    assert out_total > 0, "vacuous: no entry grew past the threshold"
    run(model, delta, opt, sched, 3, 2)
    for name, part in delta.parts.items():
        out, vals, kept = frozen[name]
        assert torch.equal(part.values.detach()[out], vals), f"{name}: a frozen entry moved (weight decay?)"
    assert any(not torch.equal(part.values.detach()[~frozen[n][0]], frozen[n][2]) for n, part in delta.parts.items())


def test_after_the_reselection_the_penalty_is_on_the_entries_still_trained():
    # SaRA's current_mask: ‖W ⊙ M‖_* over the entries that stayed small, none of those frozen at the reselection
    cfg = {"threshold": 0.01, "progressive_step": 3, "nuclear_weight": 1.0, "nuclear_min_dim": 16}
    model, base, delta, opt, sched = setup(cfg)
    run(model, delta, opt, sched, 0, 3)
    assert sched.active is not None
    sched.before_step(3)
    (name,) = [n for n, p in delta.parts.items() if p.penalize]
    part, trained = delta.parts[name], sched.active[name]
    frozen = torch.ones(part.values.numel(), dtype=torch.bool)
    frozen[trained] = False
    assert frozen.any(), "vacuous: no entry of the penalised matrix was frozen"
    w = base[name].reshape(-1)[part.indices] + part.values.detach()
    want = nuclear_norm(scatter_delta(part.weight_shape, part.indices[trained], w[trained]))
    aux = delta.aux_loss()
    assert torch.allclose(aux, want, rtol=1e-5)
    aux.backward()
    assert torch.count_nonzero(part.values.grad[frozen]) == 0
    assert torch.count_nonzero(part.values.grad[trained]) > 0


def test_resume_after_reselection_and_roundtrip(tmp_path):
    cfg = {"fraction": 0.05, "progressive_step": 2, "nuclear_weight": 1e-3, "nuclear_min_dim": 16}
    model, base, delta, opt, sched = setup(cfg, arch="gpt2")
    run(model, delta, opt, sched, 0, 3, arch="gpt2")
    model2, _, delta2, opt2, sched2 = setup(cfg, arch="gpt2")
    sched2.load_state_dict(sched.state_dict())
    assert all(torch.equal(opt2.active[delta2.parts[n].values], opt.active[p.values]) for n, p in delta.parts.items())
    loaded = deltatune.load_delta(deltatune.save_delta(delta, tmp_path / "d"))
    assert {p.kind for p in loaded.parts.values()} == {"sara"}
    fresh = TINY_MODELS["gpt2"]()
    deltatune.merge_delta(fresh, loaded)
    assert max_diff(logits(fresh, tiny_inputs("gpt2")), logits(model.eval(), tiny_inputs("gpt2"))) <= 1e-5
    deltatune.revert_delta(fresh, loaded)
    name = "transformer.h.0.attn.c_attn"
    assert max_diff(get_module(fresh, name).weight, base[name]) <= 1e-6


@pytest.mark.parametrize("bad", [{"fraction": 0.0}, {"fraction": 1.5}, {"threshold": -1.0},
                                 {"nuclear_weight": -1.0}, {"progressive_step": -1}, {"nuclear_min_dim": 0}])
def test_bad_config_is_a_typed_error(bad):
    with pytest.raises(ConfigError, match="sara config"):
        deltatune.make_config("sara", bad)


def test_threshold_selecting_nothing_is_refused():
    with pytest.raises(ConfigError, match="selects no entry"):
        deltatune.attach(TINY_MODELS["llama"](), deltatune.make_config("sara", {"threshold": 1e-12}))


@pytest.mark.slow
def test_minilm_run_resumes_bit_exactly_across_the_reselection(tmp_path, monkeypatch, data_dir):
    from schedule_resume import crash_and_resume

    crash_and_resume(tmp_path, monkeypatch, "sara", {"fraction": 0.01, "progressive_step": 2})
