"""BitFit (existing and added biases), DSEE (low rank + sparse on a decomposition support) and the random-subset
sparse baseline: what each trains, exact merges, the math against dense references, and bad input."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import TINY_MODELS, hooked_steps, logits, max_diff, randomize_delta, tiny_inputs
from torch import nn

import deltatune
from deltatune.algebra.sum_deltas import compose_deltas
from deltatune.errors import ConfigError, DeltaFormatError, TargetError
from deltatune.methods import get_method
from deltatune.methods.dsee import sparse_support
from deltatune.parts.bias import BiasPart
from deltatune.parts.dsee import DSEEPart
from deltatune.parts.layers import LayerKind
from deltatune.parts.sparse import SparsePart

pytestmark = pytest.mark.usefixtures("one_thread")


def _train(model, delta, config, inputs, steps=3, lr=1e-2):
    method = get_method(config.method)
    opt = method.optimizer([p for p in model.parameters() if p.requires_grad], lr, 0.0, config)
    hooks = method.hooks(model, delta, config, opt, steps, 1)
    model.train()
    hooked_steps(model, opt, hooks, inputs, 0, steps)
    model.eval()
    return opt


# --- BitFit ---------------------------------------------------------------------------------------
def test_bitfit_trains_exactly_the_biases_of_bert() -> None:
    model = TINY_MODELS["bert"]()
    biases = {n.rsplit(".", 1)[0]: p.numel() for n, p in model.named_parameters()
              if n.endswith(".bias") and not n.startswith("classifier")}
    delta = deltatune.attach(model, deltatune.make_config("bitfit", {}))
    assert set(delta.parts) == set(biases)
    assert all(p.has_bias for p in delta.parts.values())
    assert delta.trainable_count == sum(biases.values())


def test_bitfit_adds_biases_to_llama_and_a_merge_revert_removes_them() -> None:
    model = TINY_MODELS["llama"]()
    base = copy.deepcopy(model)
    inputs = tiny_inputs("llama")
    delta = deltatune.attach(model, deltatune.make_config("bitfit", {}))
    assert delta.parts and not any(p.has_bias for p in delta.parts.values())
    assert "lm_head" not in delta.parts
    _train(model, delta, deltatune.make_config("bitfit", {}), inputs)
    after = logits(model, inputs)
    fresh = copy.deepcopy(base)
    deltatune.merge_delta(fresh, delta)
    q = fresh.model.layers[0].self_attn.q_proj
    assert q.bias is not None and torch.equal(q.bias, delta.parts["model.layers.0.self_attn.q_proj"].bias_delta)
    assert max_diff(logits(fresh, inputs), after) <= 1e-5
    deltatune.merge_delta(fresh, delta, force=True)  # stacked twice, reverted twice
    deltatune.revert_delta(fresh, delta)
    assert q.bias is not None
    deltatune.revert_delta(fresh, delta)
    assert q.bias is None and dict(fresh.named_parameters()).keys() == dict(base.named_parameters()).keys()
    assert max_diff(logits(fresh, inputs), logits(base, inputs)) <= 1e-6


def test_bitfit_deltas_sum_exactly_and_bad_targets_are_refused() -> None:
    a = randomize_delta(TINY_MODELS["gpt2"](), deltatune.make_config("bitfit", {}), 1, 0.1)
    b = randomize_delta(TINY_MODELS["gpt2"](), deltatune.make_config("bitfit", {}), 2, 0.1)
    total = compose_deltas([a, b])
    for name, part in total.parts.items():
        assert isinstance(part, BiasPart)
        assert torch.equal(part.bias_delta, a.parts[name].bias_delta + b.parts[name].bias_delta)
    with pytest.raises(TargetError, match="matched no module with a bias"):
        deltatune.attach(TINY_MODELS["bert"](), deltatune.make_config("bitfit", {"targets": ["nonexistent"]}))
    with pytest.raises(TargetError, match="no module with a bias"):
        deltatune.attach(TINY_MODELS["llama"](), deltatune.make_config("bitfit", {"add_missing": False}))


def test_bitfit_shifts_conv_and_group_norm_channels_on_axis_1_and_merges_exactly() -> None:
    # (N, C, H, W) outputs: Δb belongs on the channel axis, as the modules' own biases; with W == C a last-axis shift
    # would run silently and differ from the merged model
    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.GroupNorm(2, 4), nn.Conv2d(4, 4, 1, bias=False))
    base = copy.deepcopy(model)
    delta = deltatune.attach(model, deltatune.make_config("bitfit", {}))
    assert set(delta.parts) == {"0", "1"}  # a bias-free Conv2d gets none added (add_missing is for Linear layers)
    with torch.no_grad():
        for part in delta.parts.values():
            part.bias_delta.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    x = torch.randn(2, 3, 5, 4)
    out = model(x)
    conv, norm = base[0], base[1]
    ref = base[2](torch.nn.functional.group_norm(
        torch.nn.functional.conv2d(x, conv.weight, conv.bias + torch.tensor([1.0, 2.0, 3.0, 4.0])), 2, norm.weight,
        norm.bias + torch.tensor([1.0, 2.0, 3.0, 4.0]), norm.eps))
    assert max_diff(out, ref) <= 1e-5
    merged = copy.deepcopy(base)
    deltatune.merge_delta(merged, delta)
    assert max_diff(merged(x), ref) <= 1e-5
    unbatched = torch.randn(3, 5, 4)  # Conv2d takes (C, H, W) too: the channel axis is then 0
    wrapped = nn.Sequential(copy.deepcopy(base[0]))
    conv_delta = deltatune.attach(wrapped, deltatune.make_config("bitfit", {}))
    with torch.no_grad():
        next(iter(conv_delta.parts.values())).bias_delta.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    want = torch.nn.functional.conv2d(unbatched, conv.weight, conv.bias + torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert max_diff(wrapped(unbatched), want) <= 1e-5


def test_bias_part_meta_is_checked() -> None:
    with pytest.raises(DeltaFormatError):
        BiasPart.expected_state({"features": 4, "has_bias": "yes"})
    with pytest.raises(DeltaFormatError):
        BiasPart.expected_state({"features": 0, "has_bias": True})


# --- DSEE -----------------------------------------------------------------------------------------
def test_sparse_support_recovers_planted_spikes_beside_a_low_rank_matrix() -> None:
    g = torch.Generator().manual_seed(0)
    low = torch.randn(40, 3, generator=g) @ torch.randn(3, 30, generator=g)
    spikes = torch.randperm(1200, generator=g)[:15].sort().values
    w = low.reshape(-1).clone()
    w[spikes] += 25.0 * torch.sign(torch.randn(15, generator=g))
    got = sparse_support(w.view(40, 30), 15, rank=3, iters=3)
    assert torch.equal(got, spikes)


@pytest.mark.parametrize("layer", [LayerKind.LINEAR, LayerKind.CONV1D])
def test_dsee_forward_and_gradients_equal_the_dense_reference(layer: LayerKind) -> None:
    torch.manual_seed(0)
    if layer is LayerKind.LINEAR:
        module = torch.nn.Linear(6, 5)
    else:
        from transformers.pytorch_utils import Conv1D

        module = Conv1D(5, 6)
    idx = torch.tensor([0, 7, 13, 29])
    part = DSEEPart(6, 5, 2, 1.5, tuple(module.weight.shape), idx, layer)
    with torch.no_grad():
        part.lora_B.normal_()
        part.values.normal_()
    x = torch.randn(3, 6)
    out = part(x, module)
    dw = part.delta_weight()
    low = 1.5 * part.lora_B.detach() @ part.lora_A.detach()
    expect = low if layer is LayerKind.LINEAR else low.t()
    # ΔW = s·(BA + S) (reference forward and merge): the sparse term carries s = 1.5 too
    sparse = torch.zeros(dw.numel()).index_put_((idx,), 1.5 * part.values.detach()).view(dw.shape)
    assert torch.allclose(dw - expect, sparse, atol=1e-6)
    dense = torch.zeros_like(module.weight, requires_grad=True)
    w_eff = module.weight.detach() + dw.detach() + dense
    ref = x @ w_eff.t() + module.bias if layer is LayerKind.LINEAR else x @ w_eff + module.bias
    assert max_diff(out, ref) <= 1e-5
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    assert torch.allclose(part.values.grad, 1.5 * dense.grad.reshape(-1)[idx], atol=1e-5)
    assert part.lora_A.grad is not None and part.lora_B.grad is not None


def test_dsee_file_without_sparse_scale_loads_as_it_was_written() -> None:
    # files written before ``sparse_scale`` was recorded hold ΔW = s·BA + S: they load with S unscaled
    part = DSEEPart(6, 5, 2, 2.0, (5, 6), torch.tensor([1, 4]))
    with torch.no_grad():
        part.values.copy_(torch.tensor([0.5, -1.0]))
    meta = part.meta()
    assert meta["sparse_scale"] == 2.0 and part.delta_weight().reshape(-1)[[1, 4]].tolist() == [1.0, -2.0]
    state = {k: v.detach() for k, v in part.state_dict().items()}
    legacy = DSEEPart.from_state(state, {k: v for k, v in meta.items() if k != "sparse_scale"})
    assert legacy.delta_weight().reshape(-1)[[1, 4]].tolist() == [0.5, -1.0]
    assert torch.equal(DSEEPart.from_state(state, meta).delta_weight(), part.delta_weight())


def test_dsee_round_trip_compress_form_and_bad_input(tmp_path) -> None:
    model = TINY_MODELS["llama"]()
    config = deltatune.make_config("dsee", {"r": 2, "num_sparse": 10})
    delta = randomize_delta(model, config, 3, 0.1)
    assert set(delta.parts) == {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")}
    loaded = deltatune.load_delta(deltatune.save_delta(delta, tmp_path / "d"))
    for name, part in delta.parts.items():
        assert torch.equal(loaded.parts[name].delta_weight(), part.delta_weight())
        assert part.indices.dtype == loaded.parts[name].indices.dtype == torch.int32  # as every sparse support
        wide = {k: v.detach() for k, v in part.state_dict().items()} | {"indices": part.indices.long()}
        assert DSEEPart.from_state(wide, part.meta()).indices.dtype == torch.int32  # an int64 file loads narrowed
        dense = part.values_view(product=True)
        sparse = part.with_values(dense, product=True)
        assert isinstance(sparse, SparsePart) and torch.equal(sparse.delta_weight(), part.delta_weight())
    with pytest.raises(ConfigError, match="more than the"):
        deltatune.attach(TINY_MODELS["llama"](), deltatune.make_config("dsee", {"num_sparse": 10**7}))
    for bad in ({"r": 0}, {"num_sparse": 0}, {"selection": "best"}, {"alpha": -1.0}, {"dropout": 1.0}):
        with pytest.raises(ConfigError):
            deltatune.make_config("dsee", bad)
    meta = next(iter(delta.parts.values())).meta()
    with pytest.raises(DeltaFormatError):
        DSEEPart.expected_state({**meta, "k": 10**6})
    with pytest.raises(DeltaFormatError):
        DSEEPart.expected_state({**meta, "weight_shape": [3, 3]})


# --- random-subset sparse ------------------------------------------------------------------------
def test_random_sparse_keeps_its_support_and_refuses_bad_budgets() -> None:
    model = TINY_MODELS["gpt2"]()
    config = deltatune.make_config("random-sparse", {"num_tunable": 500, "seed": 4})
    delta = deltatune.attach(model, config)
    support = {n: p.indices.clone() for n, p in delta.parts.items()}
    assert sum(v.numel() for v in support.values()) == 500
    opt = _train(model, delta, config, tiny_inputs("gpt2"))
    assert all(torch.equal(delta.parts[n].indices, support[n]) for n in support)
    assert type(opt) is torch.optim.AdamW
    assert sum(s["exp_avg"].numel() for s in opt.state.values()) == 500
    again = deltatune.attach(TINY_MODELS["gpt2"](), config)
    assert all(torch.equal(again.parts[n].indices, support[n]) for n in support), "the seed fixes the support"
    for bad in ({"density": 0.0}, {"density": 1.01}, {"num_tunable": 0}):
        with pytest.raises(ConfigError):
            deltatune.make_config("random-sparse", bad)
    with pytest.raises(ConfigError, match="random-sparse config asks for num_tunable 100000000 but the targets hold"):
        deltatune.attach(TINY_MODELS["gpt2"](), deltatune.make_config("random-sparse", {"num_tunable": 10**8}))
    for method in ("random-sparse", "sparse"):  # a density that rounds to no entry at all trained nothing
        with pytest.raises(ConfigError, match=f"{method} config.density: density 1e-07 of .* = 0 trainable"):
            deltatune.attach(TINY_MODELS["gpt2"](), deltatune.make_config(method, {"density": 1e-7}))


def test_a_checkpoint_whose_parts_another_version_built_is_refused_on_resume(tmp_path, monkeypatch) -> None:
    """A DSEE run checkpointed by a deltatune whose sparse term was unscaled (``ΔW = s·BA + S``, before
    ``sparse_scale``) would resume with ``S`` scaled by ``s``: the part meta it recorded refuses it, naming the part
    and the field."""
    from schedule_resume import SMALL

    from deltatune.methods.registry import TrainHook
    from deltatune.train import loop
    from deltatune.train.config import TrainConfig

    armed = [True]

    class Crash(TrainHook):
        def after_step(self, step: int) -> None:
            if armed[0] and step == 5:  # past the checkpoint at step 3
                raise KeyboardInterrupt

    mc = deltatune.make_config("dsee", {"r": 2, "num_sparse": 20})
    cfg = TrainConfig(out_dir=str(tmp_path / "o"), **SMALL)
    original_init, original_hooks = DSEEPart.__init__, type(get_method("dsee")).hooks
    monkeypatch.setattr(type(get_method("dsee")), "hooks", lambda self, *a, **k: original_hooks(self, *a, **k)
                        + [Crash()])

    def as_before(self, *args, sparse_scale=None, **kwargs):
        original_init(self, *args, sparse_scale=1.0 if sparse_scale is None else sparse_scale, **kwargs)

    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(DSEEPart, "__init__", as_before)
        loop.train(cfg, mc)
    armed[0] = False
    with pytest.raises(DeltaFormatError, match=r"part '[^']+' \(dsee\) was written with sparse_scale = 1\.0 and is "
                                               r"built with 8\.0 now"):
        loop.train(TrainConfig(out_dir=str(tmp_path / "o"), resume=True, **SMALL), mc)
    assert loop.train(TrainConfig(out_dir=str(tmp_path / "p"), **SMALL), mc).delta.parts  # the same run, afresh


def test_a_module_s_own_bias_survives_the_revert_of_a_bias_part_made_for_a_bias_free_module() -> None:
    # a part trained where the layer had no bias (Llama), merged where it has one: the revert must not remove it
    layer = nn.Linear(4, 3)
    with torch.no_grad():
        layer.bias.copy_(torch.tensor([0.25, -0.5, 1.0]))  # (b + Δb) − Δb is b exactly for these
    own = layer.bias.detach().clone()
    part = BiasPart(3, has_bias=False)
    with torch.no_grad():
        part.bias_delta.copy_(torch.tensor([0.5, -1.0, 2.0]))
    part.merge_into(layer)
    assert torch.equal(layer.bias.detach(), own + part.bias_delta.detach())
    part.unmerge_from(layer)
    assert layer.bias is not None and torch.equal(layer.bias.detach(), own)


@pytest.mark.parametrize("output", ["dense", "sparse"])
def test_merged_bitfit_deltas_of_a_bias_free_base_apply_as_bias_parts(output: str) -> None:
    # Llama has no biases: a merge of BitFit deltas keeps each module's new bias a bias part, which creates it
    from deltatune.algebra.engine import merge

    a = randomize_delta(TINY_MODELS["llama"](), deltatune.make_config("bitfit", {}), 1, 0.1)
    b = randomize_delta(TINY_MODELS["llama"](), deltatune.make_config("bitfit", {}), 2, 0.1)
    merged = merge([a, b], "task_arithmetic", output=output)
    assert merged.part_kinds() == {"bias": len(a.parts)}
    model, live = TINY_MODELS["llama"](), TINY_MODELS["llama"]()
    deltatune.merge_delta(model, merged)
    deltatune.merge_delta(live, compose_deltas([a, b]))  # a sum of the two: what task arithmetic at weight 1 gives
    assert max_diff(logits(model, tiny_inputs("llama")), logits(live, tiny_inputs("llama"))) <= 1e-5


def test_a_bitfit_bias_of_a_bias_free_module_and_another_kind_are_not_summed_into_an_unusable_part() -> None:
    a = randomize_delta(TINY_MODELS["llama"](), deltatune.make_config("bitfit", {}), 1, 0.1)
    b = randomize_delta(TINY_MODELS["llama"](), deltatune.SparseConfig(num_tunable=500, regrow=False), 2, 0.1)
    with pytest.raises(ConfigError, match="bias added to a bias-free module"):
        compose_deltas([a, b])


# --- BitFit biases of a bias-free base written as a checkpoint ----------------------------------------------------
def _saved_llama(root) -> str:
    TINY_MODELS["llama"]().save_pretrained(root / "base")
    return str(root / "base")


def _loaded_logits(path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    return logits(AutoModelForCausalLM.from_pretrained(path).eval(), tiny_inputs("llama"))


def test_apply_of_a_llama_bitfit_delta_writes_a_checkpoint_that_loads_its_added_biases(tmp_path) -> None:
    # the config's attention_bias / mlp_bias create the biases on load; a group the delta leaves partly alone
    # (here only q_proj of the attention group) gets zero biases on the other modules
    from deltatune.api import apply_to_checkpoint

    base = _saved_llama(tmp_path)
    for name, config in (("all", {}), ("q", {"targets": [r".*q_proj"]})):
        model = TINY_MODELS["llama"]()
        delta = randomize_delta(model, deltatune.make_config("bitfit", config), 7, 0.05)
        apply_to_checkpoint(delta, tmp_path / name, model=base)
        written = json.loads((tmp_path / name / "config.json").read_text())
        assert written["attention_bias"] is True and written["mlp_bias"] is (name == "all")
        assert max_diff(_loaded_logits(tmp_path / name), logits(model, tiny_inputs("llama"))) <= 1e-5


def test_apply_refuses_an_added_bias_the_config_cannot_create_before_writing(tmp_path, monkeypatch) -> None:
    from deltatune.algebra import delta_checkpoint
    from deltatune.api import apply_to_checkpoint
    from deltatune.errors import NotMergeable

    base = _saved_llama(tmp_path)
    delta = randomize_delta(TINY_MODELS["llama"](), deltatune.make_config("bitfit", {}), 7, 0.05)
    # a config with no attention_bias flag (raising=False: the old code had no BIAS_FLAGS and wrote the checkpoint)
    monkeypatch.setattr(delta_checkpoint, "BIAS_FLAGS", ("mlp_bias",), raising=False)
    with pytest.raises(NotMergeable, match=r"model\.layers\.0\.self_attn\.q_proj") as caught:
        apply_to_checkpoint(delta, tmp_path / "out", model=base)
    assert caught.value.module == "model.layers.0.self_attn.q_proj" and not (tmp_path / "out").exists()


def test_a_merge_of_llama_bitfit_deltas_written_as_a_checkpoint_loads_its_added_biases(tmp_path) -> None:
    from deltatune.algebra.engine import merge

    base = _saved_llama(tmp_path)
    a = randomize_delta(TINY_MODELS["llama"](), deltatune.make_config("bitfit", {}), 1, 0.1)
    b = randomize_delta(TINY_MODELS["llama"](), deltatune.make_config("bitfit", {}), 2, 0.1)
    merge([a, b], "task_arithmetic", output="checkpoint", out=tmp_path / "ck", base=base)
    live = TINY_MODELS["llama"]()
    deltatune.merge_delta(live, compose_deltas([a, b]))
    assert max_diff(_loaded_logits(tmp_path / "ck"), logits(live, tiny_inputs("llama"))) <= 1e-5
