"""SpIEL pieces: allocation, per-element-age AdamW, and the drop/regrow event."""

from __future__ import annotations

import torch
from torch import nn

from deltatune.methods.sparse import SparseConfig, allocate
from deltatune.methods.sparse_optim import SparseAdamW
from deltatune.methods.spiel_selector import SpIELSelector
from deltatune.parts import SparsePart
from deltatune.parts.layers import LayerKind


def test_allocate_is_proportional_and_exact():
    assert allocate(10, [100, 100, 200]) == [3, 2, 5] or allocate(10, [100, 100, 200]) == [2, 3, 5]
    counts = allocate(1001, [7, 300, 5000, 123])
    assert sum(counts) == 1001
    assert all(c <= s for c, s in zip(counts, [7, 300, 5000, 123], strict=True))
    assert allocate(5, [2, 2]) == [2, 2]  # capped by sizes


def test_sparse_adamw_equals_adamw_without_regrowth():
    """With every element the same age, per-element bias correction is AdamW's scalar one."""
    torch.manual_seed(0)
    a = nn.Parameter(torch.randn(20))
    b = nn.Parameter(a.detach().clone())
    opt_a = SparseAdamW([a], lr=1e-2, weight_decay=0.1)
    opt_b = torch.optim.AdamW([b], lr=1e-2, weight_decay=0.1, eps=1e-8)
    for step in range(5):
        g = torch.randn(20, generator=torch.Generator().manual_seed(step))
        a.grad, b.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    assert torch.allclose(a, b, atol=1e-6)


def test_sparse_adamw_foreach_step_equals_the_per_parameter_step_bit_for_bit():
    """Parameters that train every element take one foreach update; it does the per-parameter update's
    arithmetic exactly, with weight decay and with elements of different ages (a regrown entry)."""
    gen = torch.Generator().manual_seed(9)
    shapes = [(7,), (3, 5), (1,)]
    fast = [nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    slow = [nn.Parameter(p.detach().clone()) for p in fast]
    opt_fast = SparseAdamW(fast, lr=3e-2, weight_decay=0.05)
    opt_slow = SparseAdamW(slow, lr=3e-2, weight_decay=0.05)
    for step in range(6):
        for pf, ps in zip(fast, slow, strict=True):
            pf.grad = torch.randn(pf.shape, generator=gen)
            ps.grad = pf.grad.clone()
        if step == 3:  # a regrown element: its age restarts in both
            for opt, p in ((opt_fast, fast[1]), (opt_slow, slow[1])):
                opt.state_of(p)["age"][1, 2] = 0
        opt_fast.step()
        with torch.no_grad():
            for p in slow:
                opt_slow._step_one(p, opt_slow.param_groups[0])
    for pf, ps in zip(fast, slow, strict=True):
        assert torch.equal(pf, ps)
        for key in ("exp_avg", "exp_avg_sq", "age"):
            assert torch.equal(opt_fast.state[pf][key], opt_slow.state[ps][key])


def test_sparse_adamw_new_element_gets_fresh_bias_correction():
    p = nn.Parameter(torch.zeros(2))
    opt = SparseAdamW([p], lr=0.1)
    for _ in range(3):
        p.grad = torch.ones(2)
        opt.step()
    st = opt.state_of(p)
    st["exp_avg"][1] = 0
    st["exp_avg_sq"][1] = 0
    st["age"][1] = 0
    before = p.detach().clone()
    p.grad = torch.ones(2)
    opt.step()
    # a fresh element's first Adam step is exactly lr·sign(g) (bias-corrected m/√v = 1)
    assert torch.allclose(before[1] - p[1], torch.tensor(0.1), atol=1e-6)


def _layer_and_part(k: int = 4):
    torch.manual_seed(0)
    base = nn.Linear(6, 5).requires_grad_(False)
    part = SparsePart((5, 6), torch.arange(k), LayerKind.LINEAR)
    return base, part


def test_first_event_replaces_the_whole_random_support_with_top_gradient_positions():
    base, part = _layer_and_part()
    opt = SparseAdamW(part.parameters(), lr=1e-2)
    cfg = SparseConfig(reselection_steps=10, accumulation_steps=2)
    sel = SpIELSelector({"l": part}, opt, cfg, total_steps=100, grad_accum=1)
    x = torch.randn(8, 6)
    target_grad = None
    for step in range(2):
        sel.before_step(step)
        out = part(x, base)
        out.square().sum().backward()
        opt.step()
        opt.zero_grad()
        if step == 0:  # window candidates take the part's compact index dtype, as its indices do
            assert sel.windows["l"].candidates.dtype == part.indices.dtype == torch.int32
        sel.after_step(step + 1)
        if target_grad is None:
            w = (base.weight + part.delta_weight()).detach().requires_grad_()
            torch.nn.functional.linear(x, w, base.bias).square().sum().backward()
            target_grad = w.grad
    assert sel.events[0]["rate"] == 1.0 and sel.events[0]["step"] == 2
    # every original index (0..3) was replaced; new ones are among the largest |∂L/∂W| positions
    assert not set(part.indices.tolist()) & {0, 1, 2, 3}
    assert part.indices.tolist() == sorted(part.indices.tolist())
    top = set(target_grad.abs().reshape(-1).topk(8).indices.tolist())
    assert set(part.indices.tolist()) <= top
    assert torch.all(part.values == 0)
    age = opt.state_of(part.values)["age"]
    assert torch.all(age == 2)


def test_later_event_drops_smallest_magnitudes_at_the_scheduled_rate():
    base, part = _layer_and_part(k=10)
    opt = SparseAdamW(part.parameters(), lr=1e-2)
    cfg = SparseConfig(reselection_steps=4, accumulation_steps=1, initial_reselection_rate=0.5)
    sel = SpIELSelector({"l": part}, opt, cfg, total_steps=20, grad_accum=1)
    assert sel.rate(1) == 1.0
    assert abs(sel.rate(5) - 0.5 * (1 - 5 / 20)) < 1e-12
    with torch.no_grad():
        part.values.copy_(torch.arange(1.0, 11.0))
    kept_before = part.indices[part.values.abs() > 3].tolist()
    sel.windows = None
    sel.before_step(4)
    part(torch.randn(8, 6), base)[:, 2:].square().sum().backward()  # gradient only off the support
    sel.after_step(5)
    # rate 0.375 → floor(10·0.375) = 3 smallest |values| (1, 2, 3) dropped, 3 grown with value 0
    assert int((part.values == 0).sum()) == 3
    assert set(kept_before) <= set(part.indices.tolist())
    assert sel.events[-1]["moved"] == 3


def _event(values: list[float], cand: list[int], gsum: list[float], rate: float) -> tuple[SparsePart, SparseAdamW, int]:
    """One drop/regrow event on a 4×4 part with support 0..3 and the given window (candidates and sums)."""
    part = SparsePart((4, 4), torch.tensor([0, 1, 2, 3]))
    with torch.no_grad():
        part.values.copy_(torch.tensor(values))
    opt = SparseAdamW([part.values])
    opt.state_of(part.values)["exp_avg"].fill_(7.0)
    sel = SpIELSelector({"w": part}, opt, SparseConfig(), total_steps=100, grad_accum=1)
    g = torch.tensor(gsum)
    moved = sel._regrow_part(part, torch.tensor(cand, dtype=torch.int32), g, g * g, 1.0, rate, 0.9, 0.999)
    return part, opt, moved


def test_a_window_of_fractional_steps_seeds_whole_step_ages_and_means_over_its_steps():
    # a layer that missed a micro-batch: 5 samples at grad_accum 2 are 2.5 steps; the bias table counts whole steps
    part = SparsePart((4, 4), torch.tensor([0, 1, 2, 3]))
    with torch.no_grad():
        part.values.copy_(torch.tensor([0.1, 5.0, 6.0, 7.0]))
    opt = SparseAdamW([part.values])
    sel = SpIELSelector({"w": part}, opt, SparseConfig(), total_steps=100, grad_accum=2)
    g = torch.tensor([3.0])
    assert sel._regrow_part(part, torch.tensor([9], dtype=torch.int32), g, g * g, 2.5, 0.25, 0.9, 0.999) == 1
    st, slot = opt.state_of(part.values), int((part.indices == 9).nonzero())
    assert float(st["age"][slot]) == 2.0
    assert torch.allclose(st["exp_avg"][slot], torch.tensor(3.0 / 2.5 * (1 - 0.9**2)))
    assert torch.allclose(st["exp_avg_sq"][slot], torch.tensor(9.0 * 2 / 2.5 * (1 - 0.999**2)))


def test_the_cosine_schedule_has_no_whole_replacement_at_the_first_event():
    # the reference's SftSelector: p = 1 at step A under the linear policy only; cosine is ρ₀(1 + cos(πt/T))/2 always
    import math

    _, part = _layer_and_part(k=10)
    opt = SparseAdamW(part.parameters(), lr=1e-2)
    cfg = SparseConfig(reselection_steps=4, accumulation_steps=1, initial_reselection_rate=0.5, schedule="cosine")
    sel = SpIELSelector({"l": part}, opt, cfg, total_steps=20, grad_accum=1)
    for step in (1, 5):
        assert abs(sel.rate(step) - 0.5 * (1 + math.cos(math.pi * step / 20)) / 2) < 1e-12


def test_a_dropped_entry_with_a_top_gradient_wins_its_place_back_and_keeps_its_value():
    # select_rigl: candidates are those not *remaining* active; entry 0 is dropped (smallest |value|) but has the
    # largest accumulated gradient, so it stays, with its value and moments; only one entry moves
    part, opt, moved = _event([0.01, 0.5, 0.4, 0.3], [0, 8, 9, 10], [100.0, 1.0, 0.5, 0.1], 0.5)
    assert moved == 1
    assert part.indices.tolist() == [0, 1, 2, 8]
    assert part.values.tolist()[0] == torch.tensor(0.01).item() and part.values.tolist()[3] == 0.0
    assert opt.state_of(part.values)["exp_avg"][0] == 7.0


def test_first_event_keeps_random_support_entries_that_are_top_gradient_candidates():
    # p = 1: the support becomes exactly the top-k candidates, even where one of them was already in it
    part, _, moved = _event([0.1, 0.5, 0.2, 0.3], [0, 5, 6, 7], [10.0, 3.0, 2.0, 1.0], 1.0)
    assert moved == 3
    assert part.indices.tolist() == [0, 5, 6, 7]
    assert part.values.tolist() == [torch.tensor(0.1).item(), 0.0, 0.0, 0.0]


def _rigl_reference(active: list[int], values: list[float], cand: list[int], gsum: list[float],
                    n: int) -> tuple[set[int], set[int]]:
    """select_rigl on Python sets: the support after the event and the entries grown at value 0."""
    by_size = sorted(range(len(active)), key=lambda i: abs(values[i]))
    dropped = [active[i] for i in by_size[:n]]
    remaining = set(active) - set(dropped)
    eligible = sorted((c for c in cand if c not in remaining), key=lambda c: -abs(gsum[cand.index(c)]))
    incoming = eligible[:n]
    grown = [c for c in incoming if c not in dropped]
    replaced = [d for d in dropped if d not in incoming][:len(grown)]
    return (set(active) - set(replaced)) | set(grown), set(grown)


def test_regrowth_matches_a_set_based_reference_on_random_events():
    gen = torch.Generator().manual_seed(0)
    for trial in range(40):
        numel, k = 200, int(torch.randint(5, 40, (1,), generator=gen))
        active = torch.randperm(numel, generator=gen)[:k].sort().values
        cand = torch.randperm(numel, generator=gen)[:int(torch.randint(1, 60, (1,), generator=gen))].sort().values
        values, gsum = torch.randn(k, generator=gen), torch.randn(cand.numel(), generator=gen)
        rate = [1.0, 0.5, 0.2][trial % 3]
        part = SparsePart((10, 20), active)
        with torch.no_grad():
            part.values.copy_(values)
        opt = SparseAdamW([part.values])
        sel = SpIELSelector({"w": part}, opt, SparseConfig(), total_steps=100, grad_accum=1)
        moved = sel._regrow_part(part, cand.to(torch.int32), gsum, gsum * gsum, 1.0, rate, 0.9, 0.999)
        support, grown = _rigl_reference(active.tolist(), values.tolist(), cand.tolist(), gsum.tolist(),
                                         int(k * rate))
        assert set(part.indices.tolist()) == support and moved == len(grown)
        after = dict(zip(part.indices.tolist(), part.values.tolist(), strict=True))
        before = dict(zip(active.tolist(), values.tolist(), strict=True))
        assert all(after[i] == (0.0 if i in grown else before[i]) for i in support)


def test_spiel_optimizer_uses_sftadamw_defaults():
    from deltatune.methods import get_method

    opt = get_method("sparse").optimizer([nn.Parameter(torch.zeros(3))], 1e-3, 0.0, SparseConfig())
    assert isinstance(opt, SparseAdamW)
    assert opt.param_groups[0]["eps"] == 1e-6 and opt.param_groups[0]["betas"] == (0.9, 0.999)


def _window_steps(monkeypatch, shapes: list[tuple[int, int]], k: int, steps: int = 3) -> tuple[list[int], list]:
    """A selection window of ``steps`` steps over layers of ``shapes`` with ``k`` entries each: the step of every dense
    weight gradient formed, and after each step whether the window buffers are still held."""
    from deltatune.parts import sparse as sparse_mod
    from deltatune.parts import sparse_grad

    layers = [nn.Linear(d_in, d_out, bias=False) for d_out, d_in in shapes]
    parts = {f"l{i}": SparsePart((d_out, d_in), torch.randperm(d_out * d_in)[:k]) for i, (d_out, d_in) in
             enumerate(shapes)}
    opt = SparseAdamW([p.values for p in parts.values()], lr=1e-2)
    sel = SpIELSelector(parts, opt, SparseConfig(reselection_steps=10, accumulation_steps=steps), 100, 1)
    dense_at: list[int] = []
    held = []
    step_now = [0]
    real = sparse_mod.weight_grad
    monkeypatch.setattr(sparse_mod, "weight_grad", lambda *a, **kw: dense_at.append(step_now[0]) or real(*a, **kw))
    x = torch.randn(5, shapes[0][1])
    for step in range(steps):
        step_now[0] = step
        sel.before_step(step)
        h = x
        for i, layer in enumerate(layers):
            h = parts[f"l{i}"](h, layer)
        h.square().sum().backward()
        opt.step()
        opt.zero_grad()
        sel.after_step(step + 1)
        held.append(sorted({role for role, _ in sparse_grad._SCRATCH if role in sparse_grad.WINDOW_ROLES}))
    assert sel.events and sel.windows is None
    return dense_at, held


def test_a_window_forms_dense_gradients_only_in_its_first_step(monkeypatch):
    dense_at, held = _window_steps(monkeypatch, [(40, 64), (96, 40)], k=20)  # 0.8 % and 0.5 % dense
    assert dense_at == [0, 0]  # both layers, first step only
    assert held == [[], [], []]  # freed after the first step (and at the event)


def test_a_window_on_dense_supports_keeps_its_gradient_buffer_until_the_event(monkeypatch):
    dense_at, held = _window_steps(monkeypatch, [(8, 6), (3, 8)], k=4)  # 8 % and 17 %: with candidates above 11 %
    assert dense_at == [0, 0, 1, 1, 2, 2]  # gathered from the dense gradient at every step
    assert held == [["grad"], ["grad"], []]  # one buffer through the window, not one per step


def test_layers_of_a_window_share_one_dense_buffer():
    layers = [nn.Linear(6, 3, bias=False), nn.Linear(3, 8, bias=False)]  # the backward sees the larger first
    parts = {f"l{i}": SparsePart(tuple(m.weight.shape), torch.arange(3)) for i, m in enumerate(layers)}
    sel = SpIELSelector(parts, SparseAdamW([p.values for p in parts.values()]), SparseConfig(), 100, 1)
    sel.before_step(0)
    seen: list[tuple[int, tuple[int, ...]]] = []
    for window in sel.windows.values():
        window.observe = lambda g, o=window.observe: seen.append((g.data_ptr(), tuple(g.shape))) or o(g)
    (parts["l1"](parts["l0"](torch.randn(5, 6), layers[0]), layers[1])).square().sum().backward()
    assert [s for _, s in seen] == [(8, 3), (3, 6)] and seen[0][0] == seen[1][0]


def test_a_window_saved_with_unsorted_candidates_loads_sorted_with_its_sums():
    """Checkpoints written before the candidates were kept sorted hold them in topk order; loading sorts them and
    their sums together, and builds the support the later backwards sample."""
    part = SparsePart((4, 5), torch.tensor([1, 7]))
    sel = SpIELSelector({"w": part}, SparseAdamW([part.values]), SparseConfig(), total_steps=100, grad_accum=1)
    window = {"candidates": torch.tensor([9, 2, 14], dtype=torch.int32), "grad_sum": torch.tensor([0.9, 0.2, 1.4]),
              "grad_sq": torch.tensor([9.0, 2.0, 14.0]), "samples": 2}
    sel.load_state_dict({"windows": {"w": window}, "events": []})
    loaded = sel.windows["w"]
    assert loaded.candidates.tolist() == [2, 9, 14] and loaded.samples == 2
    assert torch.allclose(loaded.grad_sum, torch.tensor([0.2, 0.9, 1.4]))
    assert loaded.grad_sq.tolist() == [2.0, 9.0, 14.0]
    assert part.grad_observer is loaded and loaded.wanted[1].col.tolist() == [2, 4, 4]


def test_sparse_adamw_bias_correction_matches_float64_at_every_age_the_table_grows_to():
    """``1 − β^age`` comes from a table computed in float64 and rounded once (AdamW's scalar ``1 − β^step``), grown
    past its first size when an element is older than it holds (a checkpoint from a long run)."""
    p = nn.Parameter(torch.zeros(4))
    opt = SparseAdamW([p], lr=0.1, betas=(0.9, 0.999))
    ages = torch.tensor([0.0, 1.0, 700.0, 5000.0])
    bc1, bc2 = opt.bias_corrections([ages], (0.9, 0.999))
    for beta, got in ((0.9, bc1[0]), (0.999, bc2[0])):
        want = torch.tensor([1 - beta ** int(a) for a in ages.tolist()], dtype=torch.float64).float()
        assert torch.equal(got, want)
    st = opt.state_of(p)
    st["age"].copy_(torch.tensor([0.0, 9.0, 2999.0, 12000.0]))  # resumed: ages beyond the table's 5001 entries
    st["exp_avg"].fill_(0.5)
    st["exp_avg_sq"].fill_(0.25)
    p.grad = torch.ones(4)
    opt.step()
    age = torch.tensor([1.0, 10.0, 3000.0, 12001.0], dtype=torch.float64)
    m = 0.9 * 0.5 + 0.1
    v = 0.999 * 0.25 + 0.001
    want = -0.1 * (m / (1 - 0.9 ** age)) / ((v / (1 - 0.999 ** age)).sqrt() + 1e-8)
    assert torch.allclose(p.detach().double(), want, rtol=1e-6, atol=0)


def test_sparse_adamw_resumes_a_bf16_parameter_bit_for_bit():
    # torch's load_state_dict casts floating state to the parameter's dtype; the moments and ages stay fp32
    def make():
        torch.manual_seed(0)
        p = nn.Parameter(torch.randn(300).to(torch.bfloat16))
        return p, SparseAdamW([p], lr=1e-3, weight_decay=0.1)

    def steps(p, opt, a, b):
        for s in range(a, b):
            p.grad = torch.randn(300, generator=torch.Generator().manual_seed(s)).to(torch.bfloat16)
            opt.step()
            p.grad = None

    p, opt = make()
    steps(p, opt, 0, 30)
    straight = p.detach().clone()
    p, opt = make()
    steps(p, opt, 0, 20)
    saved, at = opt.state_dict(), p.detach().clone()
    p2, opt2 = make()
    with torch.no_grad():
        p2.copy_(at)
    opt2.load_state_dict(saved)
    assert {v.dtype for v in opt2.state[p2].values()} == {torch.float32}
    steps(p2, opt2, 20, 30)
    assert torch.equal(p2.detach(), straight)
