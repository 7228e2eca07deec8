"""MixLoRA: LoRA experts on the frozen FFN with a top-k router and the load-balancing loss, LoRA on attention.

Checked against independent dense references: each expert's FFN built from explicit ``W + s·B_e A_e`` matrices
(native layouts read from the base modules), routed by a softmax/top-k written out here, and the auxiliary loss
counted by hand.  Then: training on tiny Llama, GPT-2 and BERT (the aux loss reaches the router), the training
loop on MiniLM, save/load, refusal of merge/compose/compress, mixed batches beside LoRA, sparse and base rows,
and a LoRA nested on ``mlp.gate_proj`` under the mixture on ``mlp``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_MODELS, logits, max_diff, randomize_delta, tiny_inputs
from torch import nn

import deltatune
from deltatune.errors import ConfigError, DeltaFormatError, NotMergeable, ShapeMismatch, TargetError
from deltatune.fingerprint import base_parameters
from deltatune.methods.mixlora import MixLoRAConfig
from deltatune.methods.registry import get_method, make_config
from deltatune.model import attach_parts, get_module
from deltatune.parts.mixlora import (
    MixLoRALinkPart,
    MixLoRAPart,
    ffn_parent,
    load_balancing_loss,
    token_mask,
)

ARCHS = ("llama", "gpt2", "bert")
HEADS = {"llama": [], "gpt2": [], "bert": ["classifier"]}
#: the logical name of layer 0's FFN mixture site and of its block (for BERT: the BertLayer)
FFN = {"llama": "model.layers.0.mlp", "gpt2": "transformer.h.0.mlp", "bert": "bert.encoder.layer.0.output"}
BLOCK = {"llama": "model.layers.0.mlp", "gpt2": "transformer.h.0.mlp", "bert": "bert.encoder.layer.0"}
SMALL = dict(num_experts=4, top_k=2, r=2, alpha=2.0, dropout=0.0)

pytestmark = pytest.mark.usefixtures("one_thread")


def small(**kw) -> MixLoRAConfig:
    return MixLoRAConfig(**{**SMALL, **kw})


def mixtures(delta: deltatune.Delta) -> list[MixLoRAPart]:
    return [p for p in delta.parts.values() if isinstance(p, MixLoRAPart)]


# --------------------------------------------------------------------------------------------------
# independent dense reference
# --------------------------------------------------------------------------------------------------
def expert_matrix(weight_out_in: torch.Tensor, part: MixLoRAPart, proj: str, e: int) -> torch.Tensor:
    a, b = getattr(part, f"{proj}_A")[e], getattr(part, f"{proj}_B")[e]
    return weight_out_in + part.scale * (b @ a)


def dense_expert(arch: str, model: nn.Module, part: MixLoRAPart, x: torch.Tensor, e: int) -> torch.Tensor:
    """``FFN_e(x)`` with dense per-expert weights (before BERT's dropout + LayerNorm)."""
    block = get_module(model, BLOCK[arch])
    if arch == "llama":
        g = F.linear(x, expert_matrix(get_module(model, f"{BLOCK[arch]}.gate_proj").weight, part, "gate", e))
        u = F.linear(x, expert_matrix(get_module(model, f"{BLOCK[arch]}.up_proj").weight, part, "up", e))
        return F.linear(block.act_fn(g) * u, expert_matrix(block.down_proj.weight, part, "down", e))
    if arch == "gpt2":  # Conv1D weights are (in, out)
        c_fc, c_proj = block.c_fc, block.c_proj
        h = block.act(F.linear(x, expert_matrix(c_fc.weight.t(), part, "in", e), c_fc.bias))
        return F.linear(h, expert_matrix(c_proj.weight.t(), part, "out", e), c_proj.bias)
    inter = get_module(model, f"{BLOCK[arch]}.intermediate")
    out = get_module(model, f"{BLOCK[arch]}.output")
    h = inter.intermediate_act_fn(F.linear(x, expert_matrix(inter.dense.weight, part, "in", e), inter.dense.bias))
    return F.linear(h, expert_matrix(out.dense.weight, part, "out", e), out.dense.bias)


def dense_mixture(arch: str, model: nn.Module, part: MixLoRAPart, x: torch.Tensor) -> torch.Tensor:
    """``Σ_{e ∈ topk} w_e FFN_e(x)``: every expert on every token, then picked per token."""
    flat = x.reshape(-1, x.shape[-1])
    probs = torch.softmax(flat @ part.router.t(), dim=-1)
    top, idx = torch.topk(probs, part.top_k, dim=-1)
    w = top / top.sum(-1, keepdim=True)
    every = torch.stack([dense_expert(arch, model, part, flat, e) for e in range(part.num_experts)])  # (N, T, d)
    rows = torch.arange(flat.shape[0])
    y = sum(w[:, j:j + 1] * every[idx[:, j], rows] for j in range(part.top_k))
    if arch == "bert":
        out = get_module(model, f"{BLOCK[arch]}.output")
        y = out.LayerNorm(y + flat)
    return y.reshape(x.shape)


def block_output(arch: str, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The (wrapped) FFN block of layer 0 run on ``x`` the way the model runs it."""
    if arch != "bert":
        return model.get_submodule(_physical(model, BLOCK[arch]))(x)
    layer = get_module(model, BLOCK[arch])
    with ffn_parent(layer):
        return layer.output(layer.intermediate(x), x)


def _physical(model: nn.Module, name: str) -> str:
    from deltatune.model import physical_path

    return physical_path(model, name)


def hidden(model: nn.Module, seed: int = 3, shape: tuple[int, int] = (2, 6)) -> torch.Tensor:
    d = model.config.hidden_size
    return torch.randn(*shape, d, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------
# config and construction
# --------------------------------------------------------------------------------------------------
def test_top_k_larger_than_experts_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="top_k = 5 is larger than num_experts = 4"):
        MixLoRAConfig(num_experts=4, top_k=5)
    with pytest.raises(ConfigError, match="top_k = 3 is larger than num_experts = 2"):
        make_config("mixlora", {"num_experts": "2", "top_k": "3"})
    with pytest.raises(ConfigError, match="top_k must be ≥ 1"):
        MixLoRAConfig(top_k=0)
    for bad in ({"r": 0}, {"alpha": 0.0}, {"dropout": 1.0}, {"aux_loss_coef": -1.0}, {"router_init_range": 0.0},
                {"jitter_noise": 1.0}, {"num_experts": 0}):
        with pytest.raises(ConfigError, match="mixlora config"):
            MixLoRAConfig(**bad)
    with pytest.raises(DeltaFormatError, match="larger than num_experts"):
        MixLoRAPart.expected_state({"layout": "gated", "d_model": 4, "d_ff": 8, "num_experts": 2, "top_k": 3,
                                    "rank": 1, "scale": 1.0})
    with pytest.raises(DeltaFormatError, match="layout"):
        MixLoRAPart.expected_state({"layout": "moe", "d_model": 4, "d_ff": 8, "num_experts": 2, "top_k": 1,
                                    "rank": 1, "scale": 1.0})
    with pytest.raises(DeltaFormatError):
        MixLoRALinkPart.expected_state({"extra": 1})


@pytest.mark.parametrize("arch", ARCHS)
def test_sites_shapes_and_unchanged_output_at_attach(arch: str) -> None:
    model = TINY_MODELS[arch]()
    inputs = tiny_inputs(arch)
    before = logits(model, inputs)
    delta = deltatune.attach(model, small())
    assert max_diff(logits(model, inputs), before) <= 1e-6
    layers = model.config.num_hidden_layers
    assert len(mixtures(delta)) == layers
    kinds = delta.part_kinds()
    attention = {"llama": 4, "gpt2": 2, "bert": 4}[arch]
    assert kinds["lora"] == attention * layers
    assert kinds.get("mixlora_link", 0) == (layers if arch == "bert" else 0)
    part = delta.parts[FFN[arch]]
    d, f = model.config.hidden_size, model.config.intermediate_size if arch != "gpt2" else 4 * model.config.n_embd
    assert part.router.shape == (4, d) and part.router.dtype == torch.float32
    expected = {"llama": {"gate_A": (4, 2, d), "gate_B": (4, f, 2), "up_A": (4, 2, d), "up_B": (4, f, 2),
                          "down_A": (4, 2, f), "down_B": (4, d, 2)}}.get(
        arch, {"in_A": (4, 2, d), "in_B": (4, f, 2), "out_A": (4, 2, f), "out_B": (4, d, 2)})
    assert {k: tuple(v.shape) for k, v in part.state().items() if k != "router"} == expected
    lora_count = sum(p.trainable_count for p in delta.parts.values() if p.kind == "lora")
    assert delta.trainable_count == lora_count + layers * sum(
        4 * (2 * (i + o)) for i, o in part.projection_shapes().values()) + layers * 4 * d
    # the same seed draws the same delta
    again = deltatune.attach(TINY_MODELS[arch](), small())
    assert all(torch.equal(a, b) for n in delta.parts for a, b in
               zip(delta.parts[n].state().values(), again.parts[n].state().values(), strict=True))


def test_unknown_architecture_and_missing_link_are_refused() -> None:
    model = TINY_MODELS["gpt2"]()  # an ungated MLP under a model_type the table lacks
    model.config.model_type = "t5"
    with pytest.raises(TargetError, match="no FFN layout for model_type 't5'"):
        deltatune.attach(model, small())
    # Llama's children, but another computation between them (Gemma 3n sparsifies the activation)
    model = TINY_MODELS["llama"]()
    model.config.model_type = "t5"
    for layer in model.model.layers:
        layer.mlp.forward = lambda x, mlp=layer.mlp: mlp.down_proj(torch.relu(mlp.act_fn(mlp.gate_proj(x)) - 0.01)
                                                                  * mlp.up_proj(x))
    with pytest.raises(TargetError, match="compute down"):
        deltatune.attach(model, small())
    # a BERT mixture part alone (its layer's link part not attached): a clear error, not a silent base output
    bert = TINY_MODELS["bert"]()
    delta = deltatune.attach(bert, small(attention_targets=[]))
    alone = deltatune.Delta(method="mixlora", config={}, parts={FFN["bert"]: delta.parts[FFN["bert"]]},
                            fingerprint={}, heads={})
    fresh = TINY_MODELS["bert"]()
    attach_parts(fresh, alone.parts)
    with pytest.raises(TargetError, match="mixlora_link"):
        logits(fresh, tiny_inputs("bert"))
    # a part built for another width is refused at attach
    wide = MixLoRAPart("gated", 32, 128, 2, 1, 1, 1.0)
    with pytest.raises(ShapeMismatch, match="width 32→128"):
        attach_parts(TINY_MODELS["llama"](), {FFN["llama"]: wide})


# --------------------------------------------------------------------------------------------------
# the math
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_top_k_routing_matches_dense_per_expert_reference(arch: str) -> None:
    model = TINY_MODELS[arch]()
    delta = randomize_delta(model, small(num_experts=5, top_k=2, attention_targets=[]), seed=7, std=0.2)
    part = delta.parts[FFN[arch]]
    x = hidden(model)
    with torch.no_grad():
        got = block_output(arch, model, x)
        ref = dense_mixture(arch, model, part, x)
        base = block_output(arch, TINY_MODELS[arch](), x) if arch != "bert" else None
    assert max_diff(got, ref) <= 1e-5
    if base is not None:
        assert max_diff(got, base) > 1e-2, "the experts do not change the block (vacuous)"
    # top-1 as well (one slot, weight 1)
    model1 = TINY_MODELS[arch]()
    part1 = randomize_delta(model1, small(num_experts=3, top_k=1, attention_targets=[]), seed=8, std=0.2).parts[
        FFN[arch]]
    with torch.no_grad():
        assert max_diff(block_output(arch, model1, x), dense_mixture(arch, model1, part1, x)) <= 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_equal_experts_are_one_expert_and_zero_lora_is_the_base(arch: str) -> None:
    model = TINY_MODELS[arch]()
    delta = randomize_delta(model, small(num_experts=4, top_k=2, attention_targets=[]), seed=9, std=0.2)
    part = delta.parts[FFN[arch]]
    x = hidden(model)
    with torch.no_grad():
        for name, t in part.named_parameters():
            if name != "router":
                t.copy_(t[:1].expand_as(t))  # every expert = expert 0; the router stays random
        one = dense_expert(arch, model, part, x.reshape(-1, x.shape[-1]), 0).reshape(x.shape)
        if arch == "bert":
            one = get_module(model, f"{BLOCK[arch]}.output").LayerNorm(one + x)
        assert max_diff(block_output(arch, model, x), one) <= 1e-5
        for name, t in part.named_parameters():
            if name.endswith("_B"):
                t.zero_()
        bare = TINY_MODELS[arch]()
        if arch == "bert":
            layer = get_module(bare, BLOCK[arch])
            want = layer.output(layer.intermediate(x), x)
        else:
            want = get_module(bare, BLOCK[arch])(x)
        assert max_diff(block_output(arch, model, x), want) <= 1e-6


def test_load_balancing_loss_by_hand() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]])
    experts = torch.tensor([[0, 1], [0, 1], [0, 2]])
    # f = (3, 2, 1) / 6 assignments; P = column means (0.8, 1.1, 1.1) / 3
    hand = 3 * (3 / 6 * 0.8 / 3 + 2 / 6 * 1.1 / 3 + 1 / 6 * 1.1 / 3)
    assert abs(load_balancing_loss(probs, experts, 3).item() - hand) <= 1e-6
    # token 1 masked (padding): f = (2, 1, 1) / 4, P = (0.7, 0.5, 0.8) / 2
    masked = 3 * (2 / 4 * 0.7 / 2 + 1 / 4 * 0.5 / 2 + 1 / 4 * 0.8 / 2)
    got = load_balancing_loss(probs, experts, 3, torch.tensor([True, False, True]))
    assert abs(got.item() - masked) <= 1e-6
    balanced = load_balancing_loss(torch.full((4, 2), 0.5), torch.tensor([[0], [1], [0], [1]]), 2)
    assert abs(balanced.item() - 1.0) <= 1e-6


def _hand_aux(x: torch.Tensor, part: MixLoRAPart, keep: list[bool] | None = None,
              layers: list[tuple[torch.Tensor, MixLoRAPart]] | None = None) -> float:
    """``coef · N · Σ_e f_e P_e`` with python loops over the tokens — of one layer, or (``layers``: each layer's
    input and part) over every layer's tokens together, as the reference's loss on concatenated router logits."""
    n, k = part.num_experts, part.top_k
    counts, prob_sum, tokens = [0] * n, [0.0] * n, 0
    for inp, owner in layers or [(x, part)]:
        flat = inp.reshape(-1, inp.shape[-1]).double()
        for t in range(flat.shape[0]):
            if keep is not None and not keep[t]:
                continue
            p = torch.softmax(flat[t] @ owner.router.double().t(), dim=-1).tolist()
            for e in sorted(range(n), key=lambda i: -p[i])[:k]:
                counts[e] += 1
            prob_sum = [s + q for s, q in zip(prob_sum, p, strict=True)]
            tokens += 1
    return part.aux_loss_coef * n * sum(counts[e] / (tokens * k) * prob_sum[e] / tokens for e in range(n))


def test_part_aux_loss_is_the_hand_count_and_masks_padding() -> None:
    model = TINY_MODELS["llama"]()
    delta = randomize_delta(model, small(num_experts=4, top_k=2, aux_loss_coef=0.5), seed=11, std=0.3)
    part = delta.parts[FFN["llama"]]
    seen: list[torch.Tensor] = []
    wrapper = model.get_submodule(_physical(model, FFN["llama"]))
    handle = wrapper.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    inputs = tiny_inputs("llama", batch=2, seq=6)
    model.eval()
    model(**inputs)
    assert part.aux_loss() is None, "an eval forward must not record an aux loss"
    model.train()
    model(**inputs)
    assert abs(part.aux_loss().item() - _hand_aux(seen[-1], part)) <= 1e-6
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    with token_mask(mask):
        model(**{**inputs, "attention_mask": mask})
    keep = [bool(v) for v in mask.reshape(-1)]
    assert abs(part.aux_loss().item() - _hand_aux(seen[-1], part, keep)) <= 1e-6
    handle.remove()
    # a copy (deepcopy, pickle) leaves out the transient loss, whose graph cannot be copied
    model_copy, delta_copy = copy.deepcopy((model, delta))
    assert delta_copy.aux_loss() is None and delta.aux_loss() is not None
    with token_mask(mask):
        model_copy(**{**inputs, "attention_mask": mask})
    assert torch.allclose(delta_copy.aux_loss(), delta.aux_loss())
    # the delta's loss is one L_aux over both layers' tokens (the reference's concatenated logits), not a per-layer sum
    parts = mixtures(delta)
    inputs_of: dict[int, torch.Tensor] = {}
    handles = [model.get_submodule(_physical(model, n)).register_forward_pre_hook(
        lambda m, args, i=i: inputs_of.__setitem__(i, args[0].detach().clone()))
        for i, n in enumerate(n for n, p in delta.parts.items() if isinstance(p, MixLoRAPart))]
    model(**inputs)
    for h in handles:
        h.remove()
    together = _hand_aux(inputs_of[0], parts[0], layers=[(inputs_of[i], p) for i, p in enumerate(parts)])
    assert len(parts) == 2 and abs(delta.aux_loss().item() - together) <= 1e-6
    assert abs(sum(p.aux_loss().item() for p in parts) - together) > 1e-3, "vacuous: the per-layer sum agrees"


def test_training_hook_masks_padding_in_the_loss() -> None:
    model = TINY_MODELS["llama"]()
    config = small(aux_loss_coef=1.0)
    delta = randomize_delta(model, config, seed=15, std=0.3)
    part = delta.parts["model.layers.1.mlp"]
    seen: list[torch.Tensor] = []
    model.get_submodule(_physical(model, "model.layers.1.mlp")).register_forward_pre_hook(
        lambda m, args: seen.append(args[0].detach().clone()))
    hooks = get_method("mixlora").hooks(model, delta, config, None, 10, 1)
    inputs = tiny_inputs("llama", batch=2, seq=6)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])  # left padding
    model.train()
    model(**{**inputs, "attention_mask": mask})
    keep = [bool(v) for v in mask.reshape(-1)]
    assert abs(part.aux_loss().item() - _hand_aux(seen[-1], part, keep)) <= 1e-6
    assert abs(part.aux_loss().item() - _hand_aux(seen[-1], part)) > 1e-4, "the mask changes nothing (vacuous)"
    for hook in hooks:
        hook.remove()
    model(**{**inputs, "attention_mask": mask})
    assert abs(part.aux_loss().item() - _hand_aux(seen[-1], part)) <= 1e-6


# --------------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_trains_and_the_aux_loss_reaches_the_router(arch: str) -> None:
    model = TINY_MODELS[arch]()
    base = copy.deepcopy(model)
    inputs = tiny_inputs(arch)
    before = logits(model, inputs)
    delta = deltatune.attach(model, make_config("mixlora", {**SMALL, "aux_loss_coef": 0.1}))
    start = {n: {k: v.clone() for k, v in p.state().items()} for n, p in delta.parts.items()}
    model.train()
    # the aux loss alone: a gradient on every router; none on the last layer's experts (the loss depends on the
    # routing only, and no later router reads their output)
    model(**inputs)
    delta.aux_loss().backward()
    for part in mixtures(delta):
        assert part.router.grad is not None and float(part.router.grad.abs().max()) > 0
    last = mixtures(delta)[-1]
    assert all(p.grad is None for n, p in last.named_parameters() if n != "router")
    model.zero_grad(set_to_none=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        out = model(**inputs)
        aux = delta.aux_loss()
        assert aux is not None and torch.isfinite(aux) and aux.item() > 0
        (out.loss + aux).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    assert max_diff(logits(model, inputs), before) > 1e-3
    for name, part in delta.parts.items():
        changed = [k for k, v in part.state().items() if not torch.equal(v, start[name][k])]
        if isinstance(part, MixLoRAPart):
            assert "router" in changed and any(k.endswith("_B") for k in changed), f"{name}: {changed}"
        elif part.kind == "lora":
            assert "lora_B" in changed
    # the base is untouched and frozen
    ref = dict(base_parameters(base, HEADS[arch]))
    assert all(torch.equal(p, ref[n]) and not p.requires_grad for n, p in base_parameters(model, HEADS[arch]))


def test_jitter_noise_only_in_training() -> None:
    model = TINY_MODELS["llama"]()
    randomize_delta(model, small(jitter_noise=0.5), seed=12, std=0.2)
    model.eval()  # attached parts start in training mode (see the report: the layer should follow the base)
    inputs = tiny_inputs("llama")
    a, b = logits(model, inputs), logits(model, inputs)
    assert torch.equal(a, b)
    model.train()
    torch.manual_seed(0)
    c = logits(model, inputs)
    assert max_diff(c, a) > 1e-4


def test_train_loop_on_minilm_logs_aux_loss(tmp_path, data_dir) -> None:
    from deltatune.train import loop
    from deltatune.train.config import TrainConfig

    cfg = TrainConfig(out_dir=str(tmp_path / "run"), max_steps=3, train_limit=48, eval_limit=16, eval_every=0,
                      eval_before=False, max_length=32, batch_size=8, checkpoint_every=0, progress=False,
                      lr=3e-3)
    result = loop.train(cfg, make_config("mixlora", {"num_experts": 4, "r": 2}))
    assert [r["step"] for r in result.history] == [1, 2, 3]
    for record in result.history:
        assert 0 < record["aux_loss"] < 1.0, record  # coefficient 0.01 times a loss near 1 per layer, 6 layers
    assert result.delta.method == "mixlora" and len(mixtures(result.delta)) == 6
    loaded = deltatune.load_delta(result.delta_dir)
    assert loaded.part_kinds() == {"lora": 24, "mixlora": 6, "mixlora_link": 6}


# --------------------------------------------------------------------------------------------------
# save / load, refusals
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip_is_exact(arch: str, tmp_path) -> None:
    model = TINY_MODELS[arch]()
    delta = randomize_delta(model, small(), seed=13, std=0.3)
    inputs = tiny_inputs(arch)
    want = logits(model, inputs)
    loaded = deltatune.load_delta(deltatune.save_delta(delta, tmp_path / "d"))
    assert loaded.part_kinds() == delta.part_kinds()
    for name, part in delta.parts.items():
        got = loaded.parts[name]
        assert type(got) is type(part) and got.meta() == part.meta()
        state = got.state()
        assert set(state) == set(part.state()) and all(torch.equal(state[k], v) for k, v in part.state().items())
    fresh = TINY_MODELS[arch]()
    deltatune.apply_delta(fresh, loaded)
    assert torch.equal(logits(fresh, inputs), want)
    assert max_diff(want, logits(TINY_MODELS[arch](), inputs)) > 1e-3
    deltatune.detach(fresh)
    assert torch.equal(logits(fresh, inputs), logits(TINY_MODELS[arch](), inputs))


def test_merge_compose_compress_are_refused_and_nothing_is_written(tmp_path) -> None:
    from deltatune.algebra.compose import compose
    from deltatune.algebra.compress import compress_delta
    from deltatune.algebra.engine import merge

    delta = randomize_delta(TINY_MODELS["llama"](), small(), seed=14, std=0.1)
    path = deltatune.save_delta(delta, tmp_path / "d")
    model = TINY_MODELS["llama"]()
    ref = {n: p.clone() for n, p in model.state_dict().items()}

    def untouched() -> bool:
        now = model.state_dict()
        return set(now) == set(ref) and all(torch.equal(now[n], ref[n]) for n in ref)

    for run in (lambda: deltatune.merge_delta(model, delta), lambda: deltatune.apply_delta(model, delta, merge=True),
                lambda: compose(model, [delta], mode="merge")):
        with pytest.raises(NotMergeable, match="'mixlora'|'lora'") as info:
            run()
        assert info.value.kind in ("mixlora", "lora", "mixlora_link")
        assert untouched()
    with pytest.raises(NotMergeable, match="mixlora"):
        compress_delta(delta, "dare", density=0.5)
    with pytest.raises(NotMergeable):
        merge([path, path], "linear", out=str(tmp_path / "merged"))
    assert not (tmp_path / "merged").exists()
    assert get_method("mixlora").capabilities()["additive"] is False


# --------------------------------------------------------------------------------------------------
# mixed batches, nesting
# --------------------------------------------------------------------------------------------------
ROWS = ["m", "l", None, "s", "m"]


@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_batch_beside_lora_sparse_and_base_equals_each_alone(arch: str, tmp_path) -> None:
    def saved(config, seed: int, std: float, name: str) -> deltatune.Delta:
        d = randomize_delta(TINY_MODELS[arch](), config, seed, std)
        return deltatune.load_delta(deltatune.save_delta(d, tmp_path / name))

    deltas = {"m": saved(small(), 21, 0.2, "m"), "l": saved(deltatune.LoRAConfig(r=2), 22, 0.1, "l"),
              "s": saved(deltatune.SparseConfig(num_tunable=777, regrow=False, seed=1), 23, 0.5, "s")}
    model = TINY_MODELS[arch]()
    for name, d in deltas.items():
        attach_parts(model, d.parts, name)
    inputs = tiny_inputs(arch, batch=len(ROWS))
    with deltatune.mixed_batch(model, ROWS):
        mixed = logits(model, inputs)
    bare = TINY_MODELS[arch]()
    for i, name in enumerate(ROWS):
        ref_model = TINY_MODELS[arch]()
        if name is not None:
            deltatune.apply_delta(ref_model, deltas[name])
        row = {k: v[i:i + 1] for k, v in inputs.items()}
        ref = logits(ref_model, row)
        assert max_diff(mixed[i:i + 1], ref) <= 1e-6, f"row {i} ({name})"
        if name == "m":
            assert max_diff(ref, logits(bare, row)) > 1e-3, "the mixture does not change its row (vacuous)"


def test_lora_on_gate_proj_nests_under_the_mixture(tmp_path) -> None:
    gate = "model.layers.0.mlp.gate_proj"
    lora = randomize_delta(TINY_MODELS["llama"](), deltatune.LoRAConfig(r=2, targets=[gate]), 31, 0.2)
    mix = randomize_delta(TINY_MODELS["llama"](), small(attention_targets=[]), 32, 0.2)
    model = TINY_MODELS["llama"]()
    attach_parts(model, lora.parts, "g")
    attach_parts(model, mix.parts, "m")
    part, nested = mix.parts[FFN["llama"]], lora.parts[gate]
    x = hidden(model)
    with torch.no_grad():
        got = block_output("llama", model, x)
        # reference: the LoRA folded into W_gate of every expert
        dense = TINY_MODELS["llama"]()
        get_module(dense, gate).weight.add_(nested.delta_weight())
        ref = dense_mixture("llama", dense, part, x)
        only_mix = dense_mixture("llama", TINY_MODELS["llama"](), part, x)
    assert max_diff(got, ref) <= 1e-5
    assert max_diff(got, only_mix) > 1e-3, "the nested LoRA does not act"
    assert max_diff(got, get_module(dense, BLOCK["llama"])(x)) > 1e-3, "the mixture does not act"
    # the whole model, and a mixed batch where rows use the nested LoRA, the mixture, or the base
    inputs = tiny_inputs("llama")
    both = logits(model, inputs)
    ref_model = TINY_MODELS["llama"]()
    deltatune.apply_delta(ref_model, lora, name="g")
    deltatune.apply_delta(ref_model, mix, name="m")
    assert max_diff(both, logits(ref_model, inputs)) <= 1e-6
    rows = ["g", "m", None]
    with deltatune.mixed_batch(model, rows):
        mixed = logits(model, inputs)
    for i, name in enumerate(rows):
        alone = TINY_MODELS["llama"]()
        if name is not None:
            deltatune.apply_delta(alone, lora if name == "g" else mix)
        assert max_diff(mixed[i:i + 1], logits(alone, {k: v[i:i + 1] for k, v in inputs.items()})) <= 1e-6
    # detaching the mixture leaves the nested LoRA working, and detaching both restores the base
    deltatune.detach(model, "m")
    only_lora = TINY_MODELS["llama"]()
    deltatune.apply_delta(only_lora, lora)
    assert max_diff(logits(model, inputs), logits(only_lora, inputs)) <= 1e-6
    deltatune.detach(model)
    assert torch.equal(logits(model, inputs), logits(TINY_MODELS["llama"](), inputs))


def test_the_load_balance_of_a_routed_mixture_nesting_another_delta_counts_its_own_rows() -> None:
    """A mixture whose block nests another delta's wrapped projections runs on the whole batch (the nested layers
    route the batch): its load-balancing statistics still count only the rows routed to it."""
    lora = randomize_delta(TINY_MODELS["llama"](), deltatune.LoRAConfig(r=2), 41, 0.2)
    mix = randomize_delta(TINY_MODELS["llama"](), small(attention_targets=[]), 42, 0.2)
    model = TINY_MODELS["llama"]()
    attach_parts(model, mix.parts, "m")
    attach_parts(model, lora.parts, "l")
    model.train()
    inputs = {k: v for k, v in tiny_inputs("llama", batch=2, seq=6).items() if k != "labels"}
    with torch.no_grad(), deltatune.mixed_batch(model, ["m", "l"]):
        model(**inputs)
    mixed = [v for p in mix.parts.values() if p.has_aux_loss for v in (float(p._stats[2]), float(p.aux_loss()))]
    alone = TINY_MODELS["llama"]()
    attach_parts(alone, mix.parts, "m")
    alone.train()
    with torch.no_grad():
        alone(**{k: v[:1] for k, v in inputs.items()})
    assert mixed == pytest.approx([v for p in mix.parts.values() if p.has_aux_loss
                                   for v in (float(p._stats[2]), float(p.aux_loss()))], rel=1e-5)


@pytest.mark.parametrize("family", ["gemma", "qwen3"])
def test_models_with_llamas_gated_ffn_take_its_site(family: str, tmp_path) -> None:
    # no table entry: the feed-forward blocks' gate/up/down/act children say where the experts go
    import transformers

    def build():
        torch.manual_seed(0)
        common = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)
        return (transformers.GemmaForCausalLM(transformers.GemmaConfig(**common)) if family == "gemma" else
                transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common))).eval()

    inputs = tiny_inputs("llama")
    before = logits(build(), inputs)
    model = build()
    delta = deltatune.attach(model, small())
    assert len(mixtures(delta)) == 2 and max_diff(logits(model, inputs), before) <= 1e-6  # the base at init
    delta = randomize_delta(build(), small(), seed=3, std=0.3)
    loaded = deltatune.load_delta(delta.save(tmp_path / "d"))
    fresh = build()
    deltatune.apply_delta(fresh, loaded)
    out = logits(fresh, inputs)
    assert max_diff(out, before) > 1e-3
    with deltatune.mixed_batch(fresh, ["default", None, "default"]), torch.no_grad():
        mixed = fresh(**inputs).logits
    assert max_diff(mixed[0], out[0]) <= 1e-5 and max_diff(mixed[1], before[1]) <= 1e-5
