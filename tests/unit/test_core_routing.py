"""The core's attachment and routing, independent of any one method: modules called with keyword arguments
and returning tuples, nested part paths, additive parts summed and non-additive parts chained, per-token
routing, routable task heads, targets by type/role/predicate, auxiliary losses."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from conftest import randomize_delta, tiny_bert, tiny_gpt2, tiny_inputs, tiny_llama
from torch import Tensor, nn

import deltatune
from deltatune.delta import Delta
from deltatune.errors import TargetError
from deltatune.layer import DeltaLayer, first, replace_first
from deltatune.methods.targets import select_modules
from deltatune.model import attach_parts, detach, get_module, physical_path, routed_batch
from deltatune.parts import LoRAPart, SparsePart
from deltatune.parts.base import Part
from deltatune.routing import Routing, current_routing
from deltatune.train.integration import param_groups

pytestmark = pytest.mark.usefixtures("one_thread")


class Scale(Part):
    """A test-only chained part (unregistered kind): multiplies the module's main output by ``factor``."""

    additive, mixed_rows, has_aux_loss = False, True, True

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = nn.Parameter(torch.tensor(float(factor)))
        self._aux: Tensor | None = None

    def forward(self, x: Tensor, base: Any) -> Any:
        out = base(x)
        self._aux = (self.factor - 1.0) ** 2
        return replace_first(out, first(out) * self.factor)

    def aux_loss(self) -> Tensor | None:
        return self._aux


def logits(model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
    with torch.no_grad():
        return model(**{k: v for k, v in inputs.items() if k != "labels"}).logits


def test_a_part_on_a_module_called_with_keywords_and_returning_a_tuple() -> None:
    """Llama attention is called as ``self_attn(hidden_states=…, position_embeddings=…, attention_mask=…)`` and
    returns ``(output, weights)``: a chained part sees ``hidden_states`` and its output replaces the first item."""
    model, ref = tiny_llama(), tiny_llama()
    inputs = tiny_inputs("llama")
    name = "model.layers.0.self_attn"
    attach_parts(model, {name: Scale(1.5)}, "s")
    handle = ref.get_submodule(name).register_forward_hook(lambda m, a, out: (out[0] * 1.5, *out[1:]))
    assert torch.allclose(logits(model, inputs), logits(ref, inputs), atol=1e-6)
    handle.remove()
    detach(model)
    assert torch.equal(logits(model, inputs), logits(ref, inputs))


def test_mixed_batch_through_a_keyword_module_matches_rows_alone() -> None:
    model = tiny_llama()
    name = "model.layers.1.self_attn"
    attach_parts(model, {name: Scale(0.5)}, "s")
    inputs = tiny_inputs("llama", batch=3)
    with deltatune.mixed_batch(model, ["s", None, "s"]):
        mixed = logits(model, inputs)
    for i, routed in enumerate(["s", None, "s"]):
        alone = tiny_llama()
        if routed:
            attach_parts(alone, {name: Scale(0.5)}, "s")
        assert torch.allclose(mixed[i:i + 1], logits(alone, {k: v[i:i + 1] for k, v in inputs.items()}), atol=1e-6)


def test_parts_nest_and_chain_in_attach_order() -> None:
    """A chained part on ``mlp`` and a LoRA on ``mlp.down_proj`` coexist, both act, in either attach order."""
    inputs = tiny_inputs("llama")
    lora = randomize_delta(tiny_llama(), deltatune.LoRAConfig(r=2, targets=["layers.0.mlp.down_proj"]), 3, 0.2)
    for order in ("outer-first", "inner-first"):
        model = tiny_llama()
        outer = {"model.layers.0.mlp": Scale(2.0)}
        if order == "outer-first":
            attach_parts(model, outer, "s")
        attach_parts(model, lora.parts, "l")
        if order == "inner-first":
            attach_parts(model, outer, "s")
        assert physical_path(model, "model.layers.0.mlp.down_proj") == "model.layers.0.mlp.base.down_proj"
        assert isinstance(get_module(model, "model.layers.0.mlp.down_proj"), nn.Linear)
        ref = tiny_llama()
        attach_parts(ref, lora.parts, "l")
        hook = ref.model.layers[0].mlp.register_forward_hook(lambda m, a, out: out * 2.0)
        assert torch.allclose(logits(model, inputs), logits(ref, inputs), atol=1e-6), order
        hook.remove()
        removed = detach(model)
        assert set(removed) == {"model.layers.0.mlp", "model.layers.0.mlp.down_proj"}
        assert not any(isinstance(m, DeltaLayer) for m in model.modules())
        assert torch.equal(logits(model, inputs), logits(tiny_llama(), inputs))


def test_several_active_additive_parts_are_summed_with_bias_and_norm_deltas() -> None:
    """θ + Σ Δθ through the module's own forward: a dense delta of a LayerNorm and of a bias sums with LoRA."""
    model, ref = tiny_bert(), tiny_bert()
    full = randomize_delta(tiny_bert(), deltatune.FullConfig(), 1, 0.01)
    lora = randomize_delta(tiny_bert(), deltatune.LoRAConfig(r=2), 2, 0.1)
    attach_parts(model, full.parts, "full")
    attach_parts(model, lora.parts, "lora")
    deltatune.merge_delta(ref, full)
    deltatune.merge_delta(ref, lora, force=True)  # ref holds a merged delta: no longer the base
    inputs = tiny_inputs("bert")
    assert torch.allclose(logits(model, inputs), logits(ref, inputs), atol=1e-5)


@pytest.mark.parametrize("kind", ["lora", "sparse"])
def test_per_token_routing_in_one_layer(kind: str) -> None:
    """Token (i, t) uses ``names[ids[i, t]]``: equal to each part's output on that token."""
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    if kind == "lora":
        a, b = LoRAPart(16, 8, 2, 1.0), LoRAPart(16, 8, 3, 0.5)
    else:
        a = SparsePart((8, 16), torch.tensor([1, 5, 40, 99]))
        b = SparsePart((8, 16), torch.tensor([0, 7, 64]))
    with torch.no_grad():
        for p in [*a.parameters(), *b.parameters()]:
            p.normal_()
    layer = DeltaLayer(base)
    layer.add("a", a)
    layer.add("b", b)
    x = torch.randn(2, 5, 16)
    names = [["a", None, "b", "a", "b"], [None, "b", "b", "a", None]]
    routing = Routing.per_token(names)
    model = nn.Sequential(layer)
    with torch.no_grad(), routed_batch(model, routing):
        got = model(x)
        with torch.no_grad():
            expect = torch.stack([torch.stack([
                (base(x[i, t]) if n is None else {"a": a, "b": b}[n](x[i, t:t + 1], base)[0])
                for t, n in enumerate(row)]) for i, row in enumerate(names)])
    assert current_routing() is None
    assert torch.allclose(got, expect, atol=1e-6)


def test_lora_stacks_its_weights_once_per_routing_context() -> None:
    model = tiny_llama()
    for i, name in enumerate(["a", "b"]):
        attach_parts(model, randomize_delta(tiny_llama(), deltatune.LoRAConfig(r=2 + i), i, 0.1).parts, name)
    inputs = tiny_inputs("llama")
    with torch.no_grad(), deltatune.mixed_batch(model, ["a", "b", None]) as routing:
        first_out = logits(model, inputs)
        cached = dict(routing.cache)
        second = logits(model, inputs)
    # two small ranks: the concatenated-rank product, prepared once (many distinct LoRAs would stack per row)
    assert cached and all(("concat", torch.float32) in v for v in cached.values())
    assert torch.equal(first_out, second)


def test_two_classifier_heads_share_a_batch() -> None:
    """Task heads are routable: rows of one batch use different classifier heads (and the base's own)."""
    deltas = {}
    for i, name in enumerate(["a", "b"]):
        d = randomize_delta(tiny_bert(), deltatune.LoRAConfig(r=2), 10 + i, 0.1)
        d.heads["classifier"] = {k: torch.randn_like(v) for k, v in d.heads["classifier"].items()}
        deltas[name] = d
    model = tiny_bert()
    own_head = copy.deepcopy(model.classifier.state_dict())
    for name, d in deltas.items():
        deltatune.apply_delta(model, d, name=name)
    assert all(torch.equal(model.classifier.base.state_dict()[k], v) for k, v in own_head.items())
    inputs = tiny_inputs("bert", batch=3)
    rows = ["a", "b", None]
    with deltatune.mixed_batch(model, rows):
        mixed = logits(model, inputs)
    for i, name in enumerate(rows):
        alone = tiny_bert()
        if name:
            deltatune.apply_delta(alone, deltas[name])
        assert torch.allclose(mixed[i:i + 1], logits(alone, {k: v[i:i + 1] for k, v in inputs.items()}), atol=1e-6)
    deltatune.detach(model, "a")
    deltatune.detach(model, "b")
    assert torch.equal(logits(model, inputs), logits(tiny_bert(), inputs))


def test_targets_by_type_role_and_predicate() -> None:
    llama, bert = tiny_llama(), tiny_bert()
    assert select_modules(llama, ["type:RMSNorm"], kinds=None) == [
        n for n, m in llama.named_modules() if type(m).__name__ == "LlamaRMSNorm"]
    assert select_modules(bert, ["type:LayerNorm"], kinds=None) == [
        n for n, m in bert.named_modules() if isinstance(m, nn.LayerNorm)]
    assert select_modules(llama, ["role:mlp"], kinds=None) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert select_modules(bert, ["role:attention"], kinds=None) == [
        f"bert.encoder.layer.{i}.attention" for i in range(2)]
    wide = select_modules(llama, [lambda n, m: isinstance(m, nn.Linear) and m.out_features == 128])
    assert wide and all(llama.get_submodule(n).out_features == 128 for n in wide)
    # targets resolve on a model that already carries parts (logical names, through the wrappers)
    deltatune.attach(llama, deltatune.LoRAConfig(r=2))
    assert select_modules(llama, ["role:mlp"], kinds=None) == ["model.layers.0.mlp", "model.layers.1.mlp"]


@pytest.mark.parametrize(("target", "listed"), [
    ("type:Conv2d", "LlamaRMSNorm"),
    ("role:mlp", "roles present"),
    ("type:RMSNorm", "Linear"),  # an RMSNorm is no Linear/Conv1D/Embedding: LoRA cannot take it
])
def test_a_target_matching_nothing_lists_what_exists(target: str, listed: str) -> None:
    model = tiny_bert() if target == "role:mlp" else tiny_llama()
    kinds = None if target != "type:RMSNorm" else select_modules.__defaults__[1]
    with pytest.raises(TargetError, match="matched no") as err:
        select_modules(model, [target], kinds=kinds)
    assert listed in str(err.value)
    with pytest.raises(TargetError, match="matched no"):
        deltatune.attach(tiny_llama(), deltatune.LoRAConfig(targets=["type:Conv2d"]))


def test_predicate_matching_nothing_is_named() -> None:
    def nothing(name: str, module: nn.Module) -> bool:
        return False

    with pytest.raises(TargetError, match="'nothing'"):
        select_modules(tiny_llama(), [nothing])


def test_aux_losses_are_summed_from_the_parts() -> None:
    model = tiny_llama()
    parts = {"model.layers.0.mlp": Scale(1.5), "model.layers.1.mlp": Scale(0.5)}
    attach_parts(model, parts, "s")
    delta = Delta("test", {}, parts)
    assert delta.has_aux_loss and delta.aux_loss() is None  # no forward yet
    logits(model, tiny_inputs("llama"))
    assert torch.allclose(delta.aux_loss(), torch.tensor(0.25 + 0.25))


def _randomized(model: nn.Module, method: str, options: dict[str, Any], name: str, seed: int) -> Delta:
    """``method`` attached to ``model`` under ``name`` with every part tensor drawn from N(0, 0.2²) (seeded)."""
    delta = deltatune.attach(model, deltatune.make_config(method, options), name=name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for part in delta.parts.values():
            for p in part.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return delta


@pytest.mark.parametrize(("method", "names"), [("dora", ["a", None]), ("ssf", ["a", "l"])])
def test_a_merge_renews_the_batched_forms_kept_from_the_old_base(method: str, names: list[str | None]) -> None:
    """A base-dependent part keeps its batched form (DoRA's scales, SSF's dense update) keyed on the base tensors'
    version counters: a merge into that base must bump them, or routed rows use the form of the old base."""
    model = tiny_llama()
    _randomized(model, method, {"r": 2} if method == "dora" else {}, "a", 1)
    _randomized(model, "lora", {"r": 2}, "l", 3)
    merged = _randomized(tiny_llama(), "lora", {"r": 2}, "m", 2)
    model.eval()
    inputs = tiny_inputs("llama", batch=2, seq=5)
    with deltatune.mixed_batch(model, names):
        logits(model, inputs)  # keeps the batched forms
    deltatune.model.merge_delta(model, merged, force=True)
    with deltatune.mixed_batch(model, names):
        routed = logits(model, inputs)
    detach(model, "l")
    plain = logits(model, {k: v[:1] for k, v in inputs.items()})  # delta a alone, read from the merged base
    assert torch.allclose(routed[:1], plain, atol=1e-5)


def test_a_routed_row_runs_the_tied_aliases_of_its_delta() -> None:
    """A delta with parts on both of GPT-2's tied modules (wte and lm_head) sees on each the other's update too,
    under ``<name>@tied:…``: a routed row runs those aliases as a plain forward of the delta does."""
    model = tiny_gpt2()
    _randomized(model, "lora", {"r": 2, "targets": ["transformer.wte", "lm_head"]}, "a", 2)
    assert any("@tied:" in n for m in ("lm_head", "transformer.wte") for n in model.get_submodule(m).parts)
    model.eval()
    inputs = tiny_inputs("gpt2", batch=2, seq=5)
    plain = logits(model, inputs)
    with deltatune.mixed_batch(model, ["a", None]):
        routed = logits(model, inputs)
    bare = logits(tiny_gpt2(), inputs)
    assert torch.allclose(routed[:1], plain[:1], atol=1e-5)
    assert torch.allclose(routed[1:], bare[1:], atol=1e-5)


def test_all_linear_leaves_out_the_lm_head_once_another_delta_wrapped_it() -> None:
    """``get_output_embeddings`` returns the wrapper of a wrapped LM head: ``all-linear`` still leaves it out."""
    model = tiny_llama()
    fresh = select_modules(model, ["all-linear"])
    deltatune.attach(model, deltatune.make_config("lora", {"r": 2, "targets": ["lm_head"]}), name="head")
    assert "lm_head" not in fresh
    assert select_modules(model, ["all-linear"]) == fresh
    assert "lm_head" not in deltatune.attach(model, deltatune.make_config("lora", {"r": 2}), name="second").parts


def test_a_routed_training_row_drops_out_the_lora_input_as_a_plain_forward_does() -> None:
    model = tiny_llama()
    _randomized(model, "lora", {"r": 4, "alpha": 8.0, "dropout": 0.5}, "a", 1)
    inputs = tiny_inputs("llama", batch=2, seq=5)
    model.eval()
    with deltatune.mixed_batch(model, ["a", None]):
        evaluated = logits(model, inputs)
    model.train()
    torch.manual_seed(0)
    with deltatune.mixed_batch(model, ["a", None]):
        trained = logits(model, inputs)
    assert not torch.allclose(trained[0], evaluated[0], atol=1e-3)  # the LoRA branch saw a dropped-out input
    assert torch.allclose(trained[1], evaluated[1], atol=1e-6)  # a base row has no dropout


def test_attaching_a_second_delta_leaves_the_first_alone() -> None:
    """Attaching B keeps A's parts as they were (frozen here), and B's optimiser takes B's parts only — also while A
    is trainable — so training B never changes A."""
    model = tiny_llama()
    first = deltatune.attach(model, deltatune.LoRAConfig(r=2), name="A")
    first_params = [p for part in first.parts.values() for p in part.parameters()]
    for p in first_params:
        p.requires_grad_(False)
    second = deltatune.attach(model, deltatune.LoRAConfig(r=2), name="B")
    assert not any(p.requires_grad for p in first_params)
    for p in first_params:
        p.requires_grad_(True)
    listed = {id(p) for group in param_groups(model, second, 1e-3) for p in group["params"]}
    assert listed == {id(p) for part in second.parts.values() for p in part.parameters()}


def test_model_code_that_reads_a_wrapped_modules_weight_still_runs() -> None:
    """T5's feed-forward casts to ``self.wo.weight.dtype`` inside its forward: with a part on ``wo`` that attribute is
    the wrapper's, which gives the wrapped module's weight (and bias), so the model runs and equals the merge."""
    from transformers import T5Config, T5ForConditionalGeneration

    from deltatune.layer import DeltaLayer

    def t5():
        torch.manual_seed(0)
        return T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                                   num_decoder_layers=1, num_heads=4, decoder_start_token_id=0)).eval()

    delta = randomize_delta(t5(), deltatune.make_config("lora", {"r": 2, "targets": ["wo", "wi"]}), 1, 0.3)
    model, merged = t5(), t5()
    deltatune.apply_delta(model, delta)
    deltatune.merge_delta(merged, delta)
    wo = model.encoder.block[0].layer[1].DenseReluDense.wo
    assert isinstance(wo, DeltaLayer) and wo.weight is wo.base.weight and wo.bias is None
    g = torch.Generator().manual_seed(1)
    inputs = {"input_ids": torch.randint(1, 64, (2, 6), generator=g),
              "labels": torch.randint(1, 64, (2, 5), generator=g)}
    with torch.no_grad():
        assert (model(**inputs).logits - merged(**inputs).logits).abs().max().item() <= 1e-5


def _tiny_mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                            num_local_experts=4, num_experts_per_tok=2)).eval()


def test_a_mixture_of_experts_block_routes_its_flattened_tokens_and_its_routers_choices() -> None:
    """Mixtral's sparse block flattens ``(batch, T, d)`` to ``(batch·T, d)`` before its router and experts: per-row
    routing refused every row of a full fine-tune there (even served alone); and the router's tuple (logits,
    weights, chosen experts) must come from each row's own delta. Every row of a mixed batch equals it alone."""
    full = randomize_delta(_tiny_mixtral(), deltatune.make_config("full", {}), seed=1, std=0.05)
    lora = randomize_delta(_tiny_mixtral(), deltatune.make_config("lora", {}), seed=2, std=0.05)
    model = _tiny_mixtral()
    attach_parts(model, copy.deepcopy(full.parts), "full", activate=False)
    attach_parts(model, copy.deepcopy(lora.parts), "lora", activate=False)
    ids = torch.randint(0, 128, (4, 5), generator=torch.Generator().manual_seed(3))
    names = ["full", "lora", None, "full"]
    with torch.no_grad(), deltatune.mixed_batch(model, names):
        mixed = model(input_ids=ids).logits
    for i, (name, delta) in enumerate(zip(names, [full, lora, None, full], strict=True)):
        alone = _tiny_mixtral()
        if delta is not None:
            deltatune.apply_delta(alone, delta)
        with torch.no_grad():
            want = alone(input_ids=ids[i:i + 1]).logits
        assert torch.allclose(mixed[i:i + 1], want, atol=1e-5), (i, name)
