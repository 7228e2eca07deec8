"""LIFT: principal-weight masks (top-k of a rank-r approximation), refresh of the mask from the current weights,
optimizer state only for the masked entries, and the sparse-part invariants (sorted indices, exact size on disk,
weight decay never moving an entry that is not trained)."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from conftest import TINY_MODELS, hooked_steps, logits, max_diff, tiny_inputs
from torch import nn

import deltatune
from deltatune.errors import ConfigError
from deltatune.io.delta_format import PARTS_FILE
from deltatune.methods import get_method
from deltatune.methods.lift import LiftConfig, budget, lowrank_approx, principal_mask
from deltatune.methods.sparse_optim import SparseAdamW
from deltatune.model import get_module
from deltatune.parts.sparse import effective_weight

pytestmark = pytest.mark.usefixtures("one_thread")


def test_lowrank_approx_is_the_truncated_svd():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(12, 3, generator=g), torch.randn(3, 9, generator=g)
    low = a @ b
    assert torch.allclose(lowrank_approx(low, 3), low, atol=1e-4)  # a rank-3 matrix is its own rank-3 approx
    w = torch.randn(12, 9, generator=g)
    u, s, vh = torch.linalg.svd(w)
    ref = u[:, :2] @ torch.diag(s[:2]) @ vh[:2]
    assert torch.allclose(lowrank_approx(w, 2), ref, atol=1e-5)
    noisy = low + 1e-3 * w  # a decaying spectrum: the randomized SVD finds the same leading subspace
    assert torch.allclose(lowrank_approx(noisy, 3, svd="randomized", niter=4), lowrank_approx(noisy, 3), atol=1e-3)


def test_principal_mask_follows_the_low_rank_part_not_the_raw_magnitude():
    """W = rank-1 pattern + a few large spikes: |W| top-k takes the spikes, |W'| top-k the principal pattern."""
    g = torch.Generator().manual_seed(1)
    u, v = torch.rand(10, generator=g) + 0.5, torch.rand(8, generator=g) + 0.5
    w = torch.outer(u, v)
    spikes = torch.tensor([3, 17, 42, 61])
    w.view(-1)[spikes] += 20.0
    mask = principal_mask(w, 4, rank=1)
    assert mask.tolist() == sorted(mask.tolist()) and mask.dtype == torch.int64
    assert set((w.abs().reshape(-1).topk(4).indices).tolist()) == set(spikes.tolist())
    ref = lowrank_approx(w, 1).reshape(-1).abs().topk(4).indices
    assert set(mask.tolist()) == set(ref.tolist())
    # the same entries whatever the layout (Conv1D stores Wᵀ)
    assert set(principal_mask(w.T.contiguous(), 4, rank=1).tolist()) == {
        (i % 8) * 10 + i // 8 for i in mask.tolist()}


def test_budget_matches_lora_and_is_capped():
    assert budget((64, 32), LiftConfig(lora_rank=2)) == (64 + 32) * 2
    assert budget((4, 3), LiftConfig(lora_rank=8)) == 12  # never more than the matrix
    assert budget((100, 10), LiftConfig(density=0.05)) == 50


@pytest.mark.parametrize("bad", [{"density": 0.0}, {"density": 1.5}, {"lora_rank": 0}, {"filter_rank": 0},
                                 {"update_interval": -1}, {"svd": "qr"}, {"betas": (0.9, 1.0)}])
def test_bad_config_is_a_typed_error(bad):
    with pytest.raises(ConfigError, match="lift config"):
        deltatune.make_config("lift", bad)


def _trained(steps: int, interval: int, wd: float = 0.0, lr: float = 5e-2, arch: str = "llama"):
    model = TINY_MODELS[arch]()
    config = deltatune.make_config("lift", {"lora_rank": 2, "filter_rank": 2, "update_interval": interval})
    delta = deltatune.attach(model, config)
    method = get_method("lift")
    opt = method.optimizer([p for p in model.parameters() if p.requires_grad], lr, wd, config)
    hooks = method.hooks(model, delta, config, opt, 100, 1)
    inputs = tiny_inputs(arch)
    model.train()

    def run(n: int, start: int) -> None:
        hooked_steps(model, opt, hooks, inputs, start, start + n)

    run(steps, 0)
    return model, delta, opt, hooks, run


def test_initial_mask_is_the_principal_mask_of_the_pretrained_weight():
    model = TINY_MODELS["llama"]()
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    delta = deltatune.attach(model, deltatune.make_config("lift", {"lora_rank": 2, "filter_rank": 2}))
    assert "lm_head" not in delta.parts and delta.parts
    for name, part in delta.parts.items():
        w = weights[name]
        assert part.indices.numel() == (w.shape[0] + w.shape[1]) * 2
        assert torch.equal(part.indices, principal_mask(w, part.indices.numel(), 2))


def test_refresh_recomputes_the_mask_from_the_current_weight_and_keeps_left_entries():
    model, delta, opt, hooks, run = _trained(3, interval=50)  # no refresh of its own yet
    (refresh,) = hooks
    before = {n: (p.indices.clone(), p.values.detach().clone()) for n, p in delta.parts.items()}
    masks_before = {n: m.clone() for n, m in refresh.mask.items()}
    refresh.refresh()
    grew = 0
    for name, part in delta.parts.items():
        idx, vals = before[name]
        w = get_module(model, name).weight
        # the new mask is the principal mask of W + ΔW (ΔW unchanged by the refresh itself)
        expect = principal_mask(effective_weight(w, idx, vals).float(), masks_before[name].numel(), 2)
        assert torch.equal(refresh.mask[name], expect)
        # the part covers every entry ever trained, sorted and distinct; old values are kept
        assert torch.equal(part.indices, torch.unique(torch.cat([idx, expect])))
        assert torch.equal(part.values.detach()[torch.searchsorted(part.indices, idx)], vals)
        # optimizer state only for the masked entries
        st = opt.state_of(part.values)
        assert all(st[k].numel() == expect.numel() for k in ("exp_avg", "exp_avg_sq", "age"))
        assert torch.equal(part.indices[opt.active[part.values]], expect)
        # survivors keep their age, newcomers start at 0 (own bias correction)
        survived = torch.isin(expect, masks_before[name])
        assert bool((st["age"][survived] == 3).all()) and bool((st["age"][~survived] == 0).all())
        grew += int((~survived).sum())
    assert grew > 0, "vacuous: the refresh changed no mask"


def test_entries_out_of_the_mask_never_move_even_with_weight_decay():
    model, delta, opt, hooks, run = _trained(2, interval=2, wd=0.5)  # a refresh after step 2
    frozen = {}
    for name, part in delta.parts.items():
        out = ~torch.isin(part.indices, hooks[0].mask[name])
        frozen[name] = (out, part.values.detach()[out].clone(), part.values.detach()[~out].clone())
    assert any(bool(o.any() and (v != 0).any()) for o, v, _ in frozen.values()), "vacuous: no trained entry left"
    run(1, 2)  # no refresh at step 3
    for name, part in delta.parts.items():
        out, vals, trained = frozen[name]
        assert torch.equal(part.values.detach()[out], vals), f"{name}: an entry out of the mask moved"
        assert not torch.equal(part.values.detach()[~out], trained)


def test_sparse_adamw_decays_only_active_entries():
    p = nn.Parameter(torch.ones(6))
    opt = SparseAdamW([p], lr=0.1, weight_decay=1.0)
    opt.set_active(p, torch.tensor([1, 4]))
    p.grad = torch.zeros(6)
    opt.step()
    assert p[[0, 2, 3, 5]].tolist() == [1.0] * 4
    assert torch.allclose(p[[1, 4]], torch.full((2,), 0.9))
    assert opt.state_bytes() == 3 * 2 * 4


def test_trained_delta_roundtrips_and_its_size_on_disk_is_exact(tmp_path):
    model, delta, opt, hooks, run = _trained(4, interval=2, arch="gpt2")
    for part in delta.parts.values():
        steps = part.indices[1:] - part.indices[:-1]
        assert bool((steps > 0).all()), "indices not sorted and distinct"
    path = deltatune.save_delta(delta, tmp_path / "d")
    raw = (path / PARTS_FILE).read_bytes()
    header = struct.unpack("<Q", raw[:8])[0]
    assert len(raw) - 8 - header == delta.nbytes == sum(p.indices.numel() * (4 + 4) for p in delta.parts.values())
    assert all(v["dtype"] in ("I32", "F32") for k, v in json.loads(raw[8:8 + header]).items() if k != "__metadata__")
    fresh = TINY_MODELS["gpt2"]()
    deltatune.apply_delta(fresh, deltatune.load_delta(path))
    assert max_diff(logits(fresh, tiny_inputs("gpt2")), logits(model.eval(), tiny_inputs("gpt2"))) <= 1e-5


@pytest.mark.slow
def test_minilm_run_resumes_bit_exactly_across_a_refresh(tmp_path, monkeypatch, data_dir):
    from schedule_resume import crash_and_resume

    delta = crash_and_resume(tmp_path, monkeypatch, "lift", {"lora_rank": 2, "filter_rank": 4, "update_interval": 2})
    assert any(p.indices.numel() > (p.weight_shape[0] + p.weight_shape[1]) * 2 for p in delta.parts.values())


class Wrapper:
    """Like accelerate's AcceleratedOptimizer: the optimizer as ``.optimizer``."""

    def __init__(self, optimizer) -> None:
        self.optimizer = optimizer


def test_a_foreign_optimizer_is_refused_and_a_wrapped_one_accepted():
    model = TINY_MODELS["llama"]()
    config = deltatune.make_config("lift", {"lora_rank": 2, "filter_rank": 2, "update_interval": 1})
    delta = deltatune.attach(model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    with pytest.raises(ConfigError, match="SparseAdamW"):
        get_method("lift").hooks(model, delta, config, torch.optim.AdamW(params), 10, 1)
    opt = get_method("lift").optimizer(params, 1e-2, 0.0, config)
    (hook,) = get_method("lift").hooks(model, delta, config, Wrapper(opt), 10, 1)
    assert hook.optimizer is opt
