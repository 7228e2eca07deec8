"""Prompt tuning: a model-level part (virtual tokens) on tiny Llama, GPT-2 (Conv1D), BERT (sequence
classifier) and the real MiniLM.

The reference for one prompt is PEFT's definition, written out by hand on an untouched copy of the base:
``model(inputs_embeds=[prompt; embed(ids)], attention_mask=[1…1; mask], labels=[−100…; labels])`` with the
virtual positions stripped from per-token logits.  Mixed batches (prompts of different lengths, rows on the
bare base, LoRA rows) must give every row what it gets alone, exactly in fp32.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import TINY_MODELS, max_diff, tiny_inputs
from torch import nn

import deltatune
from deltatune.algebra.compose import compose
from deltatune.algebra.compress import compress_delta
from deltatune.algebra.engine import merge
from deltatune.errors import ConfigError, DeltaFormatError, InputTooLarge, NotMergeable, ShapeMismatch
from deltatune.fingerprint import base_parameters
from deltatune.io.delta_format import load_delta, save_delta
from deltatune.methods import get_method, make_config
from deltatune.methods.prompt_tuning import PromptTuning, PromptTuningConfig
from deltatune.model import apply_delta, attach_parts, detach, merge_delta, model_parts
from deltatune.parts.base import MODEL_LEVEL, PART_KINDS
from deltatune.parts.prompt import (
    PromptPart,
    leading_pads,
    original_positions,
    place,
    take_original,
    virtual_layout,
)
from deltatune.routing import Routing, routed

ARCHS = ("llama", "gpt2", "bert")
EXACT = 1e-6
pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def without_labels(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in inputs.items() if k != "labels"}


def prompt_parts(model: nn.Module, n: int, seed: int, init: str = "random") -> dict[str, PromptPart]:
    return get_method("prompt_tuning").create_parts(model, PromptTuningConfig(num_virtual_tokens=n, seed=seed,
                                                                              init=init), [])


def reference(base: nn.Module, prompt: torch.Tensor, inputs: dict[str, torch.Tensor]):
    """PEFT's single-prompt forward on the untouched ``base``, per-token logits stripped of the prompt."""
    ids, mask = inputs["input_ids"], inputs.get("attention_mask")
    b, n = ids.shape[0], prompt.shape[0]
    kw = {"inputs_embeds": torch.cat([prompt.expand(b, -1, -1), base.get_input_embeddings()(ids)], 1)}
    if mask is not None:
        kw["attention_mask"] = torch.cat([torch.ones(b, n, dtype=mask.dtype), mask], 1)
    labels = inputs.get("labels")
    if labels is not None:
        token_level = labels.shape == ids.shape
        kw["labels"] = torch.cat([torch.full((b, n), -100), labels], 1) if token_level else labels
    out = base(**kw)
    logits = out.logits[:, n:] if out.logits.dim() == 3 else out.logits
    return logits, out.loss


def attached(arch: str, n: int = 4, seed: int = 0) -> tuple[nn.Module, nn.Module, deltatune.Delta]:
    base = TINY_MODELS[arch]()
    model = copy.deepcopy(base)
    delta = deltatune.attach(model, PromptTuningConfig(num_virtual_tokens=n, seed=seed))
    return base, model, delta


# --------------------------------------------------------------------------------------------------
# the layout (pure functions)
# --------------------------------------------------------------------------------------------------
def test_layout_places_each_row_after_its_own_prompt() -> None:
    lengths = torch.tensor([2, 0, 1])
    region, source = virtual_layout(lengths, 3)
    assert region.tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 2, 2], [0, 1, 1, 1, 2]]
    values = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    assert place(values, region, source, -1, -2).tolist() == [[-1, -1, 1, 2, 3], [4, 5, 6, -2, -2],
                                                              [-1, 7, 8, 9, -2]]
    assert place(values, region, source, -1, None).tolist() == [[-1, -1, 1, 2, 3], [4, 5, 6, 6, 6],
                                                                [-1, 7, 8, 9, 9]]
    positions = lengths[:, None] + torch.arange(3)
    feats = torch.randn(3, 3, 4)
    assert torch.equal(take_original(place(feats, region, source, 0.0, 0.0), positions), feats)
    lead = leading_pads(lengths, True)  # pads first: every row ends at the last slot
    region, source = virtual_layout(lengths, 3, lead)
    assert region.tolist() == [[0, 0, 1, 1, 1], [2, 2, 1, 1, 1], [2, 0, 1, 1, 1]]
    assert place(values, region, source, -1, -2).tolist() == [[-1, -1, 1, 2, 3], [-2, -2, 4, 5, 6],
                                                              [-2, -1, 7, 8, 9]]
    moved = place(feats, region, source, 0.0, 0.0)
    assert torch.equal(take_original(moved, original_positions(lengths, 3, lead)), feats)
    assert leading_pads(lengths, False) is None


# --------------------------------------------------------------------------------------------------
# forward = PEFT's definition; labels, masks, positions
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_single_prompt_matches_peft_definition(arch: str) -> None:
    base, model, delta = attached(arch)
    inputs = tiny_inputs(arch)
    inputs["attention_mask"][0, :2] = 0  # left padding in one row
    prompt = delta.parts[MODEL_LEVEL].prompt_embeddings.detach()
    with torch.no_grad():
        out = model(**inputs)
        ref_logits, ref_loss = reference(base, prompt, inputs)
        plain = base(**without_labels(inputs)).logits
    assert out.logits.shape == plain.shape  # aligned with the caller's input_ids
    assert max_diff(out.logits, ref_logits) <= EXACT
    assert abs(out.loss.item() - ref_loss.item()) <= EXACT  # token labels −100 on the prompt; class labels as given
    assert max_diff(out.logits, plain) > 1e-3  # the prompt acts


def test_inputs_embeds_positional_ids_and_hidden_states_are_aligned() -> None:
    base, model, delta = attached("llama")
    ids = tiny_inputs("llama")["input_ids"]
    with torch.no_grad():
        by_ids = model(input_ids=ids, output_hidden_states=True)
        positional = model(ids)
        by_embeds = model(inputs_embeds=base.get_input_embeddings()(ids))
        last_two = model(input_ids=ids, logits_to_keep=2).logits
    assert torch.equal(by_ids.logits, positional.logits) and torch.equal(by_ids.logits, by_embeds.logits)
    assert all(h.shape[:2] == ids.shape for h in by_ids.hidden_states)
    assert torch.equal(last_two, by_ids.logits[:, -2:])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_caller_position_ids_are_shifted_past_the_prompt(arch: str) -> None:
    base, model, delta = attached(arch, n=3)
    ids = tiny_inputs(arch)["input_ids"]
    b, t = ids.shape
    prompt = delta.parts[MODEL_LEVEL].prompt_embeddings.detach()
    with torch.no_grad():
        default = model(input_ids=ids).logits
        explicit = model(input_ids=ids, position_ids=torch.arange(t)[None]).logits
        offset = model(input_ids=ids, position_ids=torch.arange(t).expand(b, t) + 5).logits
        embeds = torch.cat([prompt.expand(b, -1, -1), base.get_input_embeddings()(ids)], 1)
        pos = torch.cat([torch.arange(3), torch.arange(t) + 5 + 3])[None].expand(b, -1)
        want = base(inputs_embeds=embeds, position_ids=pos, attention_mask=torch.ones(b, 3 + t)).logits[:, 3:]
    assert max_diff(default, explicit) <= EXACT
    assert max_diff(offset, want) <= EXACT
    assert max_diff(offset, default) > 1e-4  # the offset is not ignored (PEFT drops caller position ids)


def test_bert_token_type_ids_and_sequence_labels() -> None:
    base, model, delta = attached("bert")
    inputs = tiny_inputs("bert")
    with torch.no_grad():
        plain = model(**inputs)
        typed = model(**inputs, token_type_ids=torch.zeros_like(inputs["input_ids"]))
    assert max_diff(plain.logits, typed.logits) <= EXACT
    assert abs(nn.functional.cross_entropy(plain.logits, inputs["labels"]).item() - plain.loss.item()) <= EXACT


def test_token_classification_labels_are_padded() -> None:
    from transformers import BertConfig, BertForTokenClassification

    torch.manual_seed(0)
    base = BertForTokenClassification(BertConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                                 num_hidden_layers=2, num_attention_heads=4,
                                                 max_position_embeddings=64, num_labels=5)).eval()
    model = copy.deepcopy(base)
    delta = deltatune.attach(model, PromptTuningConfig(num_virtual_tokens=3))
    ids = tiny_inputs("llama")["input_ids"]
    labels = torch.randint(0, 5, ids.shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
        ref_logits, _ = reference(base, delta.parts[MODEL_LEVEL].prompt_embeddings, {"input_ids": ids})
    assert out.logits.shape == (*ids.shape, 5)
    assert max_diff(out.logits, ref_logits) <= EXACT
    want = nn.functional.cross_entropy(ref_logits.reshape(-1, 5), labels.reshape(-1))
    assert abs(out.loss.item() - want.item()) <= EXACT


def test_generation_without_cache_and_refused_cache_continuation() -> None:
    _, model, _ = attached("llama")
    inputs = without_labels(tiny_inputs("llama"))
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=3, do_sample=False, use_cache=False)
        ids = inputs["input_ids"]
        for _ in range(3):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
        assert torch.equal(generated, ids)
        with pytest.raises(ConfigError, match="use_cache=False"):
            model.generate(**inputs, max_new_tokens=2, do_sample=False)
        with pytest.raises(ConfigError, match="return_dict"):
            model(**inputs, return_dict=False)


# --------------------------------------------------------------------------------------------------
# bad input: typed errors, nothing attached
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [0, -3])
def test_prompt_length_not_positive_is_refused(n: int) -> None:
    with pytest.raises(ConfigError, match="num_virtual_tokens"):
        PromptTuningConfig(num_virtual_tokens=n)
    with pytest.raises(ConfigError, match="num_virtual_tokens"):
        make_config("prompt_tuning", {"num_virtual_tokens": str(n)})
    with pytest.raises(DeltaFormatError, match="num_virtual_tokens"):
        PromptPart.expected_state({"num_virtual_tokens": n, "dim": 64})


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_prompt_longer_than_context_is_refused(arch: str) -> None:
    model = TINY_MODELS[arch]()  # context 64
    with pytest.raises(ConfigError, match="context of 64"):
        deltatune.attach(model, PromptTuningConfig(num_virtual_tokens=64))
    loaded = PromptPart(70, 64)
    with pytest.raises(ShapeMismatch, match="context of 64"):
        attach_parts(model, {MODEL_LEVEL: loaded}, "long")
    assert model_parts(model) is None and not model._forward_pre_hooks  # nothing attached
    deltatune.attach(model, PromptTuningConfig(num_virtual_tokens=60))
    with pytest.raises(InputTooLarge, match="60 virtual \\+ 7 input tokens"):
        model(**without_labels(tiny_inputs(arch)))
    with pytest.raises(InputTooLarge, match="exceed the model's context"):  # shifted positions past the context
        model(input_ids=torch.ones(1, 2, dtype=torch.long), position_ids=torch.tensor([[10, 11]]))


def test_bad_configs_and_parts() -> None:
    with pytest.raises(ConfigError, match="init"):
        make_config("prompt_tuning", {"init": "zeros"})
    with pytest.raises(ConfigError, match="exactly one of init_text or init_token_ids"):
        PromptTuningConfig(init="text")
    with pytest.raises(ConfigError, match="apply only to init=text"):
        PromptTuningConfig(init="random", init_text="hello")
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        deltatune.attach(TINY_MODELS["llama"](), PromptTuningConfig(init="text", init_token_ids=[5, 500]))
    with pytest.raises(ShapeMismatch, match="dimension 32"):
        attach_parts(TINY_MODELS["llama"](), {MODEL_LEVEL: PromptPart(4, 32)}, "narrow")
    for meta in ({"num_virtual_tokens": 4}, {"num_virtual_tokens": 4, "dim": 8, "x": 1}, [4, 8],
                 {"num_virtual_tokens": 4, "dim": True}):
        with pytest.raises(DeltaFormatError):
            PromptPart.expected_state(meta)


def test_per_token_routing_is_refused() -> None:
    _, model, _ = attached("llama")
    ids = tiny_inputs("llama")["input_ids"]
    with routed(Routing.per_token([["default"] * ids.shape[1]] * ids.shape[0])), pytest.raises(ConfigError):
        model(input_ids=ids)


# --------------------------------------------------------------------------------------------------
# initialisations
# --------------------------------------------------------------------------------------------------
def test_initialisations() -> None:
    model = TINY_MODELS["llama"]()
    table = model.get_input_embeddings().weight.detach()
    random_a = prompt_parts(model, 6, seed=3)[MODEL_LEVEL].prompt_embeddings
    random_b = prompt_parts(model, 6, seed=3)[MODEL_LEVEL].prompt_embeddings
    assert torch.equal(random_a, random_b) and random_a.dtype == torch.float32
    vocab = prompt_parts(model, 6, seed=1, init="vocab")[MODEL_LEVEL].prompt_embeddings
    assert all(any(torch.equal(row, t) for t in table) for row in vocab)
    text = PromptTuning().create_parts(model, PromptTuningConfig(num_virtual_tokens=5, init="text",
                                                                 init_token_ids=[9, 4]), [])[MODEL_LEVEL]
    assert torch.equal(text.prompt_embeddings, table[[9, 4, 9, 4, 9]])  # PEFT's TEXT rule: repeat, cut to n


def test_text_initialisation_with_a_real_tokenizer(minilm, minilm_path, tokenizer) -> None:
    config = PromptTuningConfig(num_virtual_tokens=8, init="text", init_text="positive or negative",
                                tokenizer=minilm_path)
    part = PromptTuning().create_parts(minilm, config, [])[MODEL_LEVEL]
    ids = tokenizer("positive or negative")["input_ids"]  # with [CLS] … [SEP], as PEFT
    ids = (ids * 8)[:8]
    assert torch.equal(part.prompt_embeddings, minilm.get_input_embeddings().weight.detach()[ids])


# --------------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------------
def _train(model: nn.Module, inputs: dict[str, torch.Tensor], steps: int, lr: float) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        loss = model(**inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("arch", ARCHS)
def test_trains_only_the_prompt_and_head(arch: str) -> None:
    base, model, delta = attached(arch)
    heads = list(delta.heads)
    before = {n: p.detach().clone() for n, p in base_parameters(model, heads)}
    prompt0 = delta.parts[MODEL_LEVEL].prompt_embeddings.detach().clone()
    inputs = tiny_inputs(arch)
    losses = _train(model, inputs, steps=6, lr=1e-2)  # the loop's call: model(**batch).loss with labels
    assert losses[-1] < losses[0]
    assert not torch.equal(delta.parts[MODEL_LEVEL].prompt_embeddings.detach(), prompt0)
    assert all(torch.equal(p, before[n]) for n, p in base_parameters(model, heads))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"deltatune_model_parts.parts.default.prompt_embeddings"} | {
        f"{h}.{k}" for h in heads for k in ("weight", "bias")}


def test_trains_on_minilm(minilm, tokenizer) -> None:
    delta = deltatune.attach(minilm, PromptTuningConfig(num_virtual_tokens=10, seed=0))
    batch = tokenizer(["a great and moving film", "dull, tedious and far too long", "i loved every minute",
                       "the worst acting of the year"], padding=True, return_tensors="pt")
    batch["labels"] = torch.tensor([1, 0, 1, 0])
    losses = _train(minilm, dict(batch), steps=8, lr=3e-2)
    assert losses[-1] < losses[0]
    assert delta.parts[MODEL_LEVEL].prompt_embeddings.grad is None  # zeroed after the last step, trained before


def test_training_loop_on_minilm_resumes_exactly(tmp_path, monkeypatch, data_dir) -> None:
    """The real loop (labels in the batch) on MiniLM; a run killed after a checkpoint resumes bit-exactly."""
    from deltatune.methods import prompt_tuning
    from deltatune.methods.registry import TrainHook
    from deltatune.train import loop
    from deltatune.train.config import TrainConfig

    kw = dict(train_limit=64, eval_limit=16, eval_every=0, eval_before=False, max_length=24, batch_size=8,
              max_steps=6, checkpoint_every=3, progress=False)
    config = PromptTuningConfig(num_virtual_tokens=6)
    full = loop.train(TrainConfig(out_dir=str(tmp_path / "a"), **kw), config)
    saved = load_delta(tmp_path / "a" / "delta")
    assert list(saved.parts) == [MODEL_LEVEL] and saved.method == "prompt_tuning"
    assert torch.equal(saved.parts[MODEL_LEVEL].prompt_embeddings, full.delta.parts[MODEL_LEVEL].prompt_embeddings)

    armed = [True]

    class Crash(TrainHook):  # stays in the hook list on resume (the checkpoint counts the hooks), disarmed
        def after_step(self, step: int) -> None:
            if armed[0] and step == 4:  # after the checkpoint at step 3
                raise KeyboardInterrupt

    original = prompt_tuning.PromptTuning.hooks
    monkeypatch.setattr(prompt_tuning.PromptTuning, "hooks", lambda self, *a, **k: [*original(self, *a, **k), Crash()])
    with pytest.raises(KeyboardInterrupt):
        loop.train(TrainConfig(out_dir=str(tmp_path / "b"), **kw), config)
    armed[0] = False
    loop.train(TrainConfig(out_dir=str(tmp_path / "b"), resume=True, **kw), config)
    resumed = load_delta(tmp_path / "b" / "delta")
    assert torch.equal(resumed.parts[MODEL_LEVEL].prompt_embeddings, saved.parts[MODEL_LEVEL].prompt_embeddings)
    assert all(torch.equal(resumed.heads[h][k], v) for h, t in saved.heads.items() for k, v in t.items())


# --------------------------------------------------------------------------------------------------
# save / load, merge / compress refused, detach
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip(tmp_path, arch: str) -> None:
    base, model, delta = attached(arch, n=5, seed=2)
    inputs = without_labels(tiny_inputs(arch))
    _train(model, tiny_inputs(arch), steps=2, lr=1e-2)
    delta.snapshot_heads(model)
    with torch.no_grad():
        want = model(**inputs).logits
    save_delta(delta, tmp_path / "d")
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert manifest["parts"][MODEL_LEVEL]["kind"] == "prompt"
    assert manifest["parts"][MODEL_LEVEL]["meta"] == {"num_virtual_tokens": 5, "dim": 64}
    loaded = load_delta(tmp_path / "d")
    assert torch.equal(loaded.parts[MODEL_LEVEL].prompt_embeddings, delta.parts[MODEL_LEVEL].prompt_embeddings)
    fresh = copy.deepcopy(base)
    apply_delta(fresh, loaded)
    with torch.no_grad():
        assert torch.equal(fresh(**inputs).logits, want)


def test_merge_compose_compress_are_refused_and_write_nothing(tmp_path) -> None:
    base, model, delta = attached("llama")
    save_delta(delta, tmp_path / "d")
    target = copy.deepcopy(base)
    weights = {n: p.detach().clone() for n, p in target.named_parameters()}
    for run in (lambda: merge_delta(target, delta), lambda: apply_delta(target, delta, merge=True),
                lambda: compose(target, [delta], mode="merge"), lambda: compose(target, [delta])):
        with pytest.raises(NotMergeable, match="'prompt' part") as err:
            run()
        assert err.value.module == MODEL_LEVEL and err.value.kind == "prompt"
    assert all(torch.equal(p, weights[n]) for n, p in target.named_parameters())
    assert model_parts(target) is None
    with pytest.raises(NotMergeable, match="compress"):
        compress_delta(delta, "magnitude", density=0.5)
    with pytest.raises(NotMergeable, match="merge"):
        merge([tmp_path / "d", tmp_path / "d"], "task_arithmetic", out=tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("arch", ARCHS)
def test_detach_restores_the_base(arch: str) -> None:
    base, model, delta = attached(arch)
    inputs = without_labels(tiny_inputs(arch))
    removed = detach(model)
    assert set(removed) == {MODEL_LEVEL} and removed[MODEL_LEVEL] is delta.parts[MODEL_LEVEL]
    assert model_parts(model) is None and not model._forward_pre_hooks and not model._forward_hooks
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, base(**inputs).logits)
    assert "prompt" in PART_KINDS and PART_KINDS["prompt"] is PromptPart


# --------------------------------------------------------------------------------------------------
# mixed batches
# --------------------------------------------------------------------------------------------------
def _mixed_setup(arch: str) -> tuple[nn.Module, nn.Module, dict[str, dict]]:
    base = TINY_MODELS[arch]()
    model = copy.deepcopy(base)
    emb = {"llama": "model.embed_tokens", "gpt2": "transformer.wte", "bert": "bert.embeddings.word_embeddings"}[arch]
    lora = get_method("lora")
    parts = {"p": prompt_parts(model, 3, seed=1), "q": prompt_parts(model, 5, seed=2, init="vocab"),
             "l": lora.create_parts(model, deltatune.LoRAConfig(r=2), []),
             "e": lora.create_parts(model, deltatune.LoRAConfig(r=2, targets=[emb]), [])}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in ("l", "e"):
            for part in parts[name].values():
                part.lora_B.copy_(torch.randn(part.lora_B.shape, generator=g) * 0.1)
                part.lora_A.copy_(torch.randn(part.lora_A.shape, generator=g) * 0.1)
    for name, ps in parts.items():
        attach_parts(model, ps, name, activate=False)
    return base, model, parts


@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_batch_rows_equal_alone(arch: str) -> None:
    base, model, parts = _mixed_setup(arch)
    names = ["p", None, "l", "q", "e", "p"]
    inputs = without_labels(tiny_inputs(arch, batch=len(names)))
    inputs["attention_mask"][1, :2] = 0  # a padded row on the bare base
    inputs["attention_mask"][5, :1] = 0
    with torch.no_grad():
        with deltatune.mixed_batch(model, names):
            mixed = model(**inputs).logits
        assert mixed.shape == base(**inputs).logits.shape
        for i, name in enumerate(names):
            row = {k: v[i:i + 1] for k, v in inputs.items()}
            with deltatune.mixed_batch(model, [name]):
                alone = model(**row).logits
            only = copy.deepcopy(base)  # a model holding nothing but this row's delta, plain forward
            if name is not None:
                attach_parts(only, copy.deepcopy(parts[name]), name)
            assert max_diff(mixed[i:i + 1], alone) <= EXACT, (arch, i, name)
            assert max_diff(alone, only(**row).logits) <= EXACT, (arch, i, name)
    detach(model)
    assert model_parts(model) is None and not model._forward_pre_hooks and not model._forward_hooks
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, base(**inputs).logits)


def _decoder_classifier(arch: str) -> nn.Module:
    """A tiny Llama / GPT-2 sequence classifier: it pools each row's last slot (given ``inputs_embeds``)."""
    from transformers import GPT2Config, GPT2ForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    if arch == "llama":
        return LlamaForSequenceClassification(LlamaConfig(
            vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, num_labels=3, pad_token_id=0)).eval()
    return GPT2ForSequenceClassification(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64,
                                                    num_labels=3, pad_token_id=0)).eval()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_decoder_classifier_mixed_prompt_lengths_equal_alone(arch: str) -> None:
    """Rows with a shorter prompt (or none) take their pads first, so the pooled last slot is their own last
    token, and their positions skip the pads: every row's class logits equal its own forward alone."""
    base = _decoder_classifier(arch)
    model = copy.deepcopy(base)
    parts = {"p": prompt_parts(model, 2, seed=1), "q": prompt_parts(model, 5, seed=2)}
    for name, ps in parts.items():
        attach_parts(model, ps, name, activate=False)
    names = ["p", "q", None, "p"]
    inputs = without_labels(tiny_inputs("llama", batch=len(names), seq=6))
    inputs["attention_mask"][3, :2] = 0  # a left-padded row
    labels = torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        with deltatune.mixed_batch(model, names):
            out = model(**inputs, labels=labels)
        losses = []
        for i, name in enumerate(names):
            row = {k: v[i:i + 1] for k, v in inputs.items()}
            only = copy.deepcopy(base)
            if name is not None:
                attach_parts(only, copy.deepcopy(parts[name]), name)
            alone = only(**row, labels=labels[i:i + 1])
            losses.append(alone.loss)
            assert max_diff(out.logits[i:i + 1], alone.logits) <= EXACT, (arch, i, name)
        assert abs(float(out.loss) - float(torch.stack(losses).mean())) <= EXACT


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_decoder_classifier_right_padded_rows_pool_their_last_token(arch: str) -> None:
    """Given ``inputs_embeds`` a decoder classifier pools each row's last slot: the caller's right padding goes
    first, so a right-padded row (prompted, of another prompt length, or bare in a mixed batch) scores as its
    unpadded tokens alone, and its per-token hidden states come back at its own positions."""
    base = _decoder_classifier(arch)
    model = copy.deepcopy(base)
    parts = {"p": prompt_parts(model, 2, seed=1), "q": prompt_parts(model, 5, seed=2)}
    for name, ps in parts.items():
        attach_parts(model, ps, name, activate=False)
    inputs = without_labels(tiny_inputs("llama", batch=4, seq=6))
    real = [6, 3, 4, 1]  # right padding: row i attends its first real[i] tokens
    for i, n in enumerate(real):
        inputs["attention_mask"][i, n:] = 0
    for names in (["p", "q", None, "p"], ["q"] * 4):
        with torch.no_grad(), deltatune.mixed_batch(model, names):
            out = model(**inputs, output_hidden_states=True)
        for i, name in enumerate(names):
            row = {k: v[i:i + 1, :real[i]] for k, v in inputs.items()}
            only = copy.deepcopy(base)
            if name is not None:
                attach_parts(only, copy.deepcopy(parts[name]), name)
            with torch.no_grad():
                alone = only(**row, output_hidden_states=True)
            assert max_diff(out.logits[i:i + 1], alone.logits) <= EXACT, (arch, names, i)
            assert max_diff(out.hidden_states[-1][i:i + 1, :real[i]], alone.hidden_states[-1]) <= EXACT


def test_mixed_batch_trains_each_prompt_on_its_rows() -> None:
    _, model, parts = _mixed_setup("llama")
    inputs = tiny_inputs("llama", batch=3)
    with deltatune.mixed_batch(model, ["p", "q", None]):
        model(**inputs).loss.backward()
    p, q = parts["p"][MODEL_LEVEL].prompt_embeddings, parts["q"][MODEL_LEVEL].prompt_embeddings
    assert p.grad is not None and q.grad is not None and p.grad.abs().sum() > 0 and q.grad.abs().sum() > 0
    assert all(part.lora_A.grad is None for part in parts["l"].values())  # no row used "l"


def test_two_active_prompts_are_refused() -> None:
    _, model, _ = _mixed_setup("llama")
    container = model_parts(model)
    container.active[:] = ["p", "q"]
    with pytest.raises(ConfigError, match="2 model-level parts are active"):
        model(input_ids=tiny_inputs("llama")["input_ids"])


def test_prompt_gradients_are_bit_identical_across_reruns() -> None:
    """Each prompt's gradient is summed over its rows in a fixed order (exact resume needs reruns to agree)."""
    _, model, parts = _mixed_setup("llama")
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 128, (32, 24), generator=g)
    prompts = [parts[n][MODEL_LEVEL].prompt_embeddings for n in ("p", "q")]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # a race between threads is what would make them differ
    try:
        for names in (["p"] * 32, ["p", "q", None, "l"] * 8):
            grads = []
            for _ in range(3):
                with deltatune.mixed_batch(model, names):
                    model(input_ids=ids, labels=ids).loss.backward()
                grads.append([p.grad.clone() if p.grad is not None else None for p in prompts])
                for p in prompts:
                    p.grad = None
            assert all(torch.equal(a, b) for run in grads[1:] for a, b in zip(grads[0], run, strict=True)
                       if a is not None)
    finally:
        torch.set_num_threads(threads)
