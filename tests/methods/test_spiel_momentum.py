"""SpIEL-MA: SM3 row/column accumulators as the growth criterion of the ``sparse`` method (``regrow_by="momentum"``).

The accumulators are O(d_out + d_in) per matrix and are fed only by the active values' gradients; at an event
the smallest-|value| entries are dropped and the inactive entries of largest ``r_i · c_j`` grown (values 0,
fresh Adam state with age 0)."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_MODELS, tiny_inputs
from torch import nn

import deltatune
from deltatune.errors import ConfigError
from deltatune.methods import get_method
from deltatune.methods.sparse import SparseConfig
from deltatune.methods.sparse_optim import SparseAdamW
from deltatune.methods.spiel_selector import MomentumSelector, SM3Accumulator, sm3_scores, sm3_update
from deltatune.parts import SparsePart
from deltatune.parts.layers import LayerKind

pytestmark = pytest.mark.usefixtures("one_thread")


def test_sm3_update_by_hand():
    row, col = torch.tensor([1.0, 0.0, 5.0]), torch.tensor([2.0, 3.0])
    # active entries (0,0), (0,1), (2,1) with gradients 1, 2, 1
    sm3_update(row, col, torch.tensor([0, 0, 2]), torch.tensor([0, 1, 1]), torch.tensor([1.0, 2.0, 1.0]))
    # ν = min(r,c)+g²: (0,0) min(1,2)+1 = 2; (0,1) min(1,3)+4 = 5; (2,1) min(5,3)+1 = 4
    assert row.tolist() == [5.0, 0.0, 4.0]  # row 1 has no active entry: unchanged
    assert col.tolist() == [2.0, 5.0]
    assert sm3_scores(row, col).tolist() == [10.0, 25.0, 0.0, 0.0, 8.0, 20.0]


def _part_and_selector(k: int = 4, rate: float = 0.5):
    torch.manual_seed(0)
    base = nn.Linear(6, 5).requires_grad_(False)
    part = SparsePart((5, 6), torch.arange(k), LayerKind.LINEAR)
    opt = SparseAdamW(part.parameters(), lr=1e-2)
    cfg = SparseConfig(reselection_steps=4, accumulation_steps=1, initial_reselection_rate=rate,
                       regrow_by="momentum")
    return base, part, opt, MomentumSelector({"l": part}, opt, cfg, total_steps=20, grad_accum=1)


def test_accumulators_are_one_row_and_one_column_vector_per_matrix():
    model = TINY_MODELS["llama"]()
    config = deltatune.make_config("sparse", {"num_tunable": 500, "regrow_by": "momentum",
                                              "reselection_steps": 3, "accumulation_steps": 1})
    delta = deltatune.attach(model, config)
    opt = get_method("sparse").optimizer([p for p in model.parameters() if p.requires_grad], 1e-2, 0.0, config)
    *_, sel = get_method("sparse").hooks(model, delta, config, opt, 10, 1)  # in-place training, then the selector
    assert type(sel) is MomentumSelector
    extra = 0
    for name, part in delta.parts.items():
        acc = sel.acc[name]
        assert tuple(acc.row.shape) == (part.weight_shape[0],) and tuple(acc.col.shape) == (part.weight_shape[1],)
        extra += acc.row.numel() + acc.col.numel()
    assert extra == sum(sum(p.weight_shape) for p in delta.parts.values())
    state = sel.state_dict()
    assert set(state) == {"events", "acc"}  # no candidate buffers, no dense gradient kept
    model.train()
    model(**tiny_inputs("llama")).loss.backward()
    assert all(float(a.row.sum()) == 0 for a in sel.acc.values()), "fed before the optimiser's step"
    opt.step()
    assert all(float(a.row.sum()) > 0 for a in sel.acc.values()), "the step did not feed the accumulators"
    for name, part in delta.parts.items():  # only rows/columns holding an active entry were touched
        rows = torch.unique(part.indices // part.weight_shape[1])
        touched = (sel.acc[name].row > 0).nonzero().reshape(-1)
        assert set(touched.tolist()) <= set(rows.tolist())


def test_accumulators_see_only_the_active_gradients_of_each_step():
    """SM3 updates its accumulators once per optimiser step with the step's gradient: with two micro-batches,
    ``ν = min(r, c) + (g₁ + g₂)²``, not two updates with ``g₁`` and ``g₂``."""
    base, part, opt, sel = _part_and_selector()
    for _ in range(2):  # gradient accumulation: two micro-batches, one step
        part(torch.randn(8, 6), base).square().sum().backward()
    g = part.values.grad.detach().clone()
    opt.step()
    row, col = torch.zeros(5), torch.zeros(6)
    sm3_update(row, col, part.indices // 6, part.indices % 6, g)
    assert torch.equal(sel.acc["l"].row, row) and torch.equal(sel.acc["l"].col, col)


def test_close_removes_the_accumulator_hook_and_the_window_observer():
    base, part, opt, sel = _part_and_selector()
    sel.close()
    before = (sel.acc["l"].row.clone(), sel.acc["l"].col.clone())
    part(torch.randn(8, 6), base).square().sum().backward()
    opt.step()
    assert torch.equal(sel.acc["l"].row, before[0]) and torch.equal(sel.acc["l"].col, before[1])
    # SpIEL-AG: a run that stops inside a selection window leaves no observer behind (it forced the dense gradient)
    from deltatune.methods.spiel_selector import SpIELSelector

    ag = SpIELSelector({"l": part}, opt, SparseConfig(reselection_steps=10, accumulation_steps=2), 100, 1)
    ag.before_step(0)
    assert part.grad_observer is not None
    ag.close()
    assert part.grad_observer is None and ag.windows is None


def test_first_event_grows_the_top_outer_product_entries():
    base, part, opt, sel = _part_and_selector(k=4)
    acc: SM3Accumulator = sel.acc["l"]
    acc.row.copy_(torch.tensor([0.1, 3.0, 0.2, 2.0, 0.3]))
    acc.col.copy_(torch.tensor([1.0, 0.5, 4.0, 0.1, 0.2, 3.0]))
    with torch.no_grad():
        part.values.copy_(torch.tensor([0.4, -0.1, 0.3, 0.2]))
    sel.after_step(1)  # the first event (step A = 1): rate 1, the whole random support is replaced
    score = torch.outer(acc.row, acc.col).reshape(-1)
    score[:4] = -float("inf")
    assert part.indices.tolist() == sorted(score.topk(4).indices.tolist())
    assert part.indices.tolist() == [8, 11, 20, 23]  # rows 1 and 3 × columns 2 and 5
    assert torch.all(part.values == 0) and sel.events[-1] == {"step": 1, "rate": 1.0, "moved": 4}


def test_later_event_drops_smallest_values_and_grown_entries_start_fresh():
    base, part, opt, sel = _part_and_selector(k=4, rate=0.6)
    x = torch.randn(8, 6)
    for _ in range(2):  # two Adam steps: the support has age 2
        part(x, base).square().sum().backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        part.values.copy_(torch.tensor([0.4, -0.1, 0.3, 0.02]))
    sel.acc["l"].row.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0, 9.0]))
    sel.acc["l"].col.copy_(torch.tensor([0.0, 0.0, 0.0, 7.0, 8.0, 0.0]))
    sel.after_step(5)  # rate 0.6·(1 − 5/20) = 0.45 → ⌊4·0.45⌋ = 1 moved
    assert sel.events[-1]["moved"] == 1
    assert part.indices.tolist() == [0, 1, 2, 28]  # |0.02| at index 3 dropped; (4, 4) = 9·8 grown
    assert part.indices.dtype == torch.int32  # regrowth keeps the narrow index type
    st = opt.state_of(part.values)
    assert st["age"].tolist() == [2.0, 2.0, 2.0, 0.0] and float(st["exp_avg"][3]) == 0.0
    assert part.values.detach().tolist() == pytest.approx([0.4, -0.1, 0.3, 0.0])
    part(x, base).square().sum().backward()
    before = part.values.detach().clone()
    opt.step()
    # the grown entry's first Adam step is exactly lr·sign(g) (bias correction of its own age)
    assert abs(float(before[3] - part.values.detach()[3])) == pytest.approx(1e-2, abs=1e-6)


def test_momentum_regrowth_trains_and_resumes_state():
    model = TINY_MODELS["gpt2"]()
    config = deltatune.make_config("sparse", {"num_tunable": 300, "regrow_by": "momentum",
                                              "reselection_steps": 2, "accumulation_steps": 1})
    delta = deltatune.attach(model, config)
    method = get_method("sparse")
    opt = method.optimizer([p for p in model.parameters() if p.requires_grad], 1e-2, 0.0, config)
    *_, sel = method.hooks(model, delta, config, opt, 6, 1)
    inputs = tiny_inputs("gpt2")
    model.train()
    for step in range(4):
        sel.before_step(step)
        model(**inputs).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sel.after_step(step + 1)
    assert [e["step"] for e in sel.events] == [1, 3] and all(e["moved"] > 0 for e in sel.events)
    assert sum(p.indices.numel() for p in delta.parts.values()) == 300
    for part in delta.parts.values():
        assert bool((part.indices[1:] > part.indices[:-1]).all())
    state = sel.state_dict()
    other = MomentumSelector(delta.parts, opt, config, 6, 1)
    other.load_state_dict(state)
    assert all(torch.equal(other.acc[n].row, sel.acc[n].row) for n in sel.acc)
    with pytest.raises(ValueError, match="accumulators"):
        other.load_state_dict({"events": [], "acc": {n: (torch.zeros(1), torch.zeros(1)) for n in sel.acc}})


def test_bad_criterion_is_a_typed_error():
    with pytest.raises(ConfigError, match="regrow_by"):
        deltatune.make_config("sparse", {"regrow_by": "magic"})


@pytest.mark.slow
def test_minilm_run_resumes_bit_exactly_across_an_event(tmp_path, monkeypatch, data_dir):
    from schedule_resume import crash_and_resume

    crash_and_resume(tmp_path, monkeypatch, "sparse", {"density": 0.002, "regrow_by": "momentum",
                                                       "reselection_steps": 2, "accumulation_steps": 1})
