"""LT-SFT: the three phases happen at the right steps, the final delta holds exactly K entries at the top-K positions
of phase 1's |Δ|, it merges exactly, and bad budgets are typed errors."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY_MODELS, base_state, hooked_steps, logits, max_diff, tiny_inputs

import deltatune
from deltatune.errors import ConfigError, NonFiniteError, TrainingDiverged
from deltatune.fingerprint import base_parameters
from deltatune.methods import get_method
from deltatune.methods.lt_sft import LTSFTAdamW, top_k_positions
from deltatune.parts.dense import DensePart
from deltatune.parts.sparse import SparsePart

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(model, delta, config, inputs, steps, total, weight_decay=0.0, observe=None):
    method = get_method(config.method)
    opt = method.optimizer([p for p in model.parameters() if p.requires_grad], 1e-2, weight_decay, config)
    hooks = method.hooks(model, delta, config, opt, total, 1)
    model.train()
    hooked_steps(model, opt, hooks, inputs, 0, steps, observe)
    model.eval()
    return opt, hooks


def test_top_k_positions_equals_topk_of_the_concatenation() -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(7, 5, generator=g), "b": torch.randn(13, generator=g), "c": torch.randn(3, 4, 2,
                                                                                                     generator=g)}
    flat = torch.cat([t.reshape(-1) for t in tensors.values()])
    offsets = {"a": 0, "b": 35, "c": 48}
    for k in (1, 10, 40, flat.numel()):
        got = top_k_positions(tensors, k)
        assert sum(v.numel() for v in got.values()) == k
        picked = torch.cat([got[n] + offsets[n] for n in tensors]).sort().values
        assert torch.equal(picked, flat.abs().topk(k).indices.sort().values)
        assert all(torch.equal(v, v.sort().values) for v in got.values())


def test_top_k_positions_breaks_ties_in_order_and_keeps_exactly_k() -> None:
    tensors = {"a": torch.tensor([0.0, 2.0, 1.0, 1.0]), "b": torch.tensor([1.0, 3.0, 1.0])}
    got = top_k_positions(tensors, 4)
    assert got["a"].tolist() == [1, 2, 3] and got["b"].tolist() == [1]
    got = top_k_positions({"a": torch.zeros(5)}, 2)  # nothing moved: still exactly k, first positions
    assert got["a"].tolist() == [0, 1]


def test_top_k_positions_ranks_inf_first_and_refuses_nan_instead_of_returning_fewer() -> None:
    a = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    got = top_k_positions({"w": a.clone().index_fill_(0, torch.tensor([5]), float("inf"))}, 10)
    assert got["w"].numel() == 10 and 5 in got["w"].tolist()
    for where in (torch.tensor([5]), torch.arange(0, 1000, 3)):  # a short selection (9 of 10), an empty one (0)
        with pytest.raises(NonFiniteError, match=r"10 entries: w hold"):
            top_k_positions({"v": torch.ones(4), "w": a.clone().index_fill_(0, where, float("nan"))}, 10)


@pytest.mark.parametrize("in_place", [True, False])
def test_phase_switch_refuses_a_non_finite_phase_one_delta_naming_the_module(in_place: bool) -> None:
    # the last phase-1 step's NaN is never seen by the loop's loss check (the rewind comes before the next forward);
    # the selection used to come back short of K (empty with many NaN) and phase 2 trained nothing
    from deltatune.model import get_module

    model = TINY_MODELS["gpt2"]()
    base = base_state(model, [])
    config = deltatune.make_config("lt-sft", {"num_tunable": 300, "full_steps": 2, "in_place": in_place})
    delta = deltatune.attach(model, config)
    method = get_method("lt-sft")
    opt = method.optimizer([p for p in model.parameters() if p.requires_grad], 1e-2, 0.0, config)
    hooks = method.hooks(model, delta, config, opt, 4, 1)
    bad = "transformer.h.1.mlp.c_fc"

    def poison(step: int) -> None:  # after the optimiser's step, before the hooks': a diverged last phase-1 step
        if step == 2:
            with torch.no_grad():
                next(delta.parts[bad].parameters()).view(-1)[7] = float("nan")

    model.train()
    with pytest.raises(TrainingDiverged, match=rf"{bad}.* at optimizer step 2"):
        hooked_steps(model, opt, hooks, tiny_inputs("gpt2"), 0, 2, observe=poison)
    for hook in hooks:  # the loop closes its hooks however training ends
        hook.close()
    assert all(isinstance(p, DensePart) for p in delta.parts.values()), "no switch on a non-finite Δ"
    assert torch.equal(get_module(model, bad).weight, base[f"{bad}.weight"]), "θ₀ is back in the base"


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_phases_switch_at_the_step_and_keep_the_top_k_of_phase_one(arch: str) -> None:
    model = TINY_MODELS[arch]()
    base = copy.deepcopy(model)
    inputs = tiny_inputs(arch)
    config = deltatune.make_config("lt-sft", {"num_tunable": 500, "full_steps": 2})
    delta = deltatune.attach(model, config)
    seen: dict[int, dict] = {}

    def observe(step: int) -> None:  # after optimizer.step, before the hooks run
        seen[step] = {n: (type(p), p.delta_for("weight").detach().clone() if isinstance(p, DensePart) else None)
                      for n, p in delta.parts.items()}

    _run(model, delta, config, inputs, 2, total=4, observe=observe)
    assert all(kind is SparsePart for kind in map(type, delta.parts.values())), "no switch after step 2"
    assert all(kind is DensePart for kind, _ in seen[1].values()) and all(k is DensePart for k, _ in seen[2].values())
    phase1 = {n: d for n, (_, d) in seen[2].items()}
    flat = torch.cat([d.reshape(-1) for d in phase1.values()])
    want = set(flat.abs().topk(500).indices.tolist())
    offsets, start = {}, 0
    for n, d in phase1.items():
        offsets[n], start = start, start + d.numel()
    got = {offsets[n] + i for n, p in delta.parts.items() for i in p.indices.tolist()}
    assert got == want
    assert all(torch.count_nonzero(p.values) == 0 for p in delta.parts.values()), "not rewound to θ₀"
    if arch != "bert":  # no head: the rewound model is the base
        assert max_diff(logits(model, inputs), logits(base, inputs)) == 0.0
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    heads = {id(p) for h in delta.heads for p in model.get_submodule(h).parameters()}
    assert trainable == {id(p.values) for p in delta.parts.values()} | heads


def test_final_delta_has_k_entries_at_the_support_and_merges_exactly(tmp_path) -> None:
    arch = "bert"
    model = TINY_MODELS[arch]()
    base = copy.deepcopy(model)
    inputs = tiny_inputs(arch)
    config = deltatune.make_config("lt-sft", {"num_tunable": 300, "full_steps": 1})
    delta = deltatune.attach(model, config)
    opt, hooks = _run(model, delta, config, inputs, 1, total=3)
    support = {n: p.indices.clone() for n, p in delta.parts.items()}
    _run_rest(model, delta, opt, hooks, inputs, 1, 3, weight_decay=0.1)
    assert sum(p.indices.numel() for p in delta.parts.values()) == 300
    assert {n: p.indices for n, p in delta.parts.items()}.keys() == support.keys()
    assert all(torch.equal(delta.parts[n].indices, support[n]) for n in support)
    assert all(torch.count_nonzero(p.values) > 0 for p in delta.parts.values())
    # optimiser state only for the K values and the head
    states = [opt.state[p] for g in opt.param_groups for p in g["params"] if opt.state[p]]
    assert sum(s["exp_avg"].numel() for s in states) == 300 + sum(
        p.numel() for h in delta.heads for p in model.get_submodule(h).parameters())
    after = logits(model, inputs)
    delta.snapshot_heads(model)
    loaded = deltatune.load_delta(deltatune.save_delta(delta, tmp_path / "d"))
    for p in loaded.parts.values():
        assert p.kind == "sparse" and torch.equal(p.indices, p.indices.sort().values)
    fresh = copy.deepcopy(base)
    ref = base_state(base, ["classifier"])
    deltatune.merge_delta(fresh, loaded)
    assert max_diff(logits(fresh, inputs), after) <= 1e-5
    changed = sum(int(torch.count_nonzero(p != ref[n])) for n, p in base_parameters(fresh, ["classifier"]))
    assert changed <= 300, "weight decay or the merge moved entries outside the support"
    deltatune.revert_delta(fresh, loaded)
    assert max(max_diff(p, ref[n]) for n, p in base_parameters(fresh, ["classifier"])) <= 1e-6


def _run_rest(model, delta, opt, hooks, inputs, start, stop, weight_decay):
    for g in opt.param_groups:
        g["weight_decay"] = weight_decay
    model.train()
    hooked_steps(model, opt, hooks, inputs, start, stop)
    model.eval()


def test_l1_pull_adds_the_sign_subgradient_once_per_step() -> None:
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.0]))
    opt = LTSFTAdamW([p], lr=0.0)
    opt.l1_weight, opt.l1_params = 0.5, {id(p)}
    p.grad = torch.zeros(3)
    opt.step()
    assert p.grad.tolist() == [0.5, -0.5, 0.0]


def test_l1_weight_divides_lambda_by_the_base_models_parameter_count() -> None:
    # the reference's L_reg = λ·Σ|θ − θ₀| / N_total_params: N counts every base parameter (head, embeddings, norms;
    # a tied weight once), not only the target weights, so the reference scripts' λ mean the same here
    model = TINY_MODELS["gpt2"]()
    n_total = sum(p.numel() for p in model.parameters())
    config = deltatune.make_config("lt-sft", {"num_tunable": 50, "full_steps": 1, "l1_full": 0.1, "l1_sparse": 0.2})
    delta = deltatune.attach(model, config)
    opt, _ = _run(model, delta, config, tiny_inputs("gpt2"), 0, total=4)
    targets = sum(p.delta_for("weight").numel() for p in delta.parts.values())
    assert targets < n_total and opt.l1_weight == pytest.approx(0.1 / n_total, rel=1e-12)


def test_all_linear_widens_with_other_targets_as_the_docstring_says() -> None:
    # the reference's maskable set includes the embeddings: ``all-linear`` + ``type:Embedding`` gives both
    from deltatune.methods.targets import select_modules

    model = TINY_MODELS["llama"]()
    linear, embedding = select_modules(model, ["all-linear"]), select_modules(model, ["type:Embedding"])
    both = select_modules(model, ["all-linear", "type:Embedding"])
    assert set(both) == set(linear) | set(embedding) and set(embedding) - set(linear)
    delta = deltatune.attach(model, deltatune.make_config("lt-sft", {"num_tunable": 100,
                                                                   "targets": ["all-linear", "type:Embedding"]}))
    assert set(delta.parts) == set(both)


@pytest.mark.parametrize("bad", [{"density": 0.0}, {"density": 1.5}, {"density": -0.1}, {"num_tunable": 0},
                                 {"full_fraction": 1.0}, {"full_steps": 0}, {"l1_full": -1.0}])
def test_bad_config_is_a_config_error(bad: dict) -> None:
    with pytest.raises(ConfigError):
        deltatune.make_config("lt-sft", bad)


def test_budget_larger_than_the_targets_and_no_masked_phase_are_refused() -> None:
    model = TINY_MODELS["llama"]()
    with pytest.raises(ConfigError, match="targets hold only"):
        deltatune.attach(model, deltatune.make_config("lt-sft", {"num_tunable": 10**9}))
    model = TINY_MODELS["llama"]()
    config = deltatune.make_config("lt-sft", {"num_tunable": 10, "full_steps": 3})
    delta = deltatune.attach(model, config)
    method = get_method("lt-sft")
    opt = method.optimizer([p for p in model.parameters() if p.requires_grad], 1e-3, 0.0, config)
    with pytest.raises(ConfigError, match="leaving none for the masked phase"):
        method.hooks(model, delta, config, opt, 3, 1)


def test_training_loop_writes_a_sparse_delta_of_k_entries(tmp_path, data_dir) -> None:
    from deltatune.train import loop
    from deltatune.train.config import TrainConfig

    cfg = TrainConfig(out_dir=str(tmp_path / "run"), task="sst2", max_steps=4, train_limit=32, eval_limit=16,
                      eval_every=0, eval_before=False, max_length=24, batch_size=8, progress=False,
                      checkpoint_every=0, lr=1e-3)
    used: list[float] = []
    parent = torch.optim.AdamW.step

    def parent_step(self, closure=None):  # the LR the parent AdamW step really uses (LT-SFT's override in place)
        used.append(self.param_groups[0]["lr"])
        return parent(self, closure)

    torch.optim.AdamW.step = parent_step
    try:
        result = loop.train(cfg, deltatune.make_config("lt-sft", {"density": 0.001, "full_steps": 2}))
    finally:
        torch.optim.AdamW.step = parent
    # each record's lr is the one its step used — in the masked phase the replayed schedule, not the run's
    assert [r["lr"] for r in result.history] == pytest.approx(used) and len(used) == 4
    assert used[2] == pytest.approx(used[0])  # the masked phase restarts the schedule
    saved = deltatune.load_delta(result.delta_dir)
    assert {p.kind for p in saved.parts.values()} == {"sparse"}
    entries = sum(p.indices.numel() for p in saved.parts.values())
    assert entries == int(0.001 * sum(m.weight.numel() for _, m in _minilm_linears(saved)))
    assert saved.metrics["steps"] == 4


def test_best_is_kept_only_from_the_masked_phase(tmp_path, data_dir, monkeypatch) -> None:
    """An evaluation during the dense phase 1 scores the full fine-tune: it is neither saved as ``best`` (a dense
    delta the size of the model) nor the score the masked phase must beat (here phase 1 scores higher)."""
    from deltatune.train import loop
    from deltatune.train.config import TrainConfig

    scores = iter([0.9, 0.8, 0.6, 0.7])
    monkeypatch.setattr(loop, "evaluate", lambda *args, **kwargs: {"accuracy": next(scores)})

    cfg = TrainConfig(out_dir=str(tmp_path / "run"), task="sst2", max_steps=4, train_limit=32, eval_limit=16,
                      eval_every=1, eval_before=False, max_length=24, batch_size=8, progress=False,
                      checkpoint_every=0, lr=1e-3)
    reported: list[int] = []
    result = loop.train(cfg, deltatune.make_config("lt-sft", {"num_tunable": 500, "full_steps": 2}),
                        on_eval=lambda step, metrics: reported.append(step))
    assert [("eval" in r) for r in result.history] == [True] * 4
    assert reported == [2, 3, 4]  # search's pruner is not shown the dense phase's scores either
    assert result.best == {"accuracy": 0.8, "step": 2}  # step 2 evaluates the rewound support (phase 2)
    best = deltatune.load_delta(result.best_dir)
    assert {p.kind for p in best.parts.values()} == {"sparse"}
    assert sum(p.indices.numel() for p in best.parts.values()) == 500


def _minilm_linears(delta):
    from deltatune.api import load_base_for
    from deltatune.methods.targets import select_modules
    from deltatune.model import get_module

    net = load_base_for(delta)
    names = select_modules(net, ["all-linear"], list(delta.heads))
    return [(n, get_module(net, n)) for n in names]


def test_plain_loop_through_prepare_switches_inside_the_delta_group() -> None:
    from deltatune.train.integration import prepare

    model = TINY_MODELS["bert"]()
    inputs = tiny_inputs("bert")
    delta = deltatune.attach(model, deltatune.make_config("lt-sft", {"num_tunable": 200, "full_steps": 2}))
    optimizer, schedule = prepare(model, delta, lr=1e-2, total_steps=4)
    heads = {id(p) for p in model.classifier.parameters()}
    model.train()
    for step in range(4):
        with schedule.step(step):
            model(**inputs).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    values = {id(p.values) for p in delta.parts.values()}
    groups = [{id(p) for p in g["params"]} for g in optimizer.param_groups]
    assert values in groups and all(g == values or g <= heads for g in groups)
    assert sum(p.indices.numel() for p in delta.parts.values()) == 200
    assert all(torch.count_nonzero(p.values) for p in delta.parts.values())


def test_phase_switch_selects_on_the_parts_own_storage_after_freeing_phase_one_state(monkeypatch) -> None:
    # no second dense Δ of every layer at the switch: phase 1's moments are freed and θ₀ restored first, then the
    # top-K reads each part's own tensor (Δθ in the storage θ trained in), not a fresh θ − θ₀ copy
    import deltatune.methods.lt_sft as lt_sft

    model = TINY_MODELS["llama"]()
    config = deltatune.make_config("lt-sft", {"num_tunable": 500, "full_steps": 2})
    delta = deltatune.attach(model, config)
    calls = []
    real = lt_sft.top_k_positions

    def spy(tensors, k):
        parts = delta.parts
        calls.append((all(t.data_ptr() == parts[n].delta_for("weight").data_ptr() for n, t in tensors.items()),
                      all(not p.bound for p in parts.values()), len(opt.state)))
        return real(tensors, k)

    monkeypatch.setattr(lt_sft, "top_k_positions", spy)
    method = get_method("lt-sft")
    opt = method.optimizer([p for p in model.parameters() if p.requires_grad], 1e-2, 0.0, config)
    hooks = method.hooks(model, delta, config, opt, 4, 1)
    assert all(p.bound for p in delta.parts.values()), "phase 1 should train θ in place"
    model.train()
    hooked_steps(model, opt, hooks, tiny_inputs("llama"), 0, 2)
    assert calls == [(True, True, 0)]
    assert all(isinstance(p, SparsePart) for p in delta.parts.values())
