"""Rebase across tied/untied bases and with task heads: ``θ_v2 + (θ_ft − θ_v1)`` must hold for what the fine-tune
changed on the old base (a tied ``lm_head`` changed with ``wte``), and a fine-tune's classifier is kept."""

from __future__ import annotations

import copy
import json
import re
import warnings

import pytest
import torch
from conftest import tiny_bert, tiny_inputs
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, GPT2Config, GPT2LMHeadModel

from deltatune.algebra import merge
from deltatune.algebra.checkpoint import CheckpointReader
from deltatune.algebra.rebase import rebase_checkpoint, rebase_delta
from deltatune.delta import Delta
from deltatune.errors import NotMergeable
from deltatune.fingerprint import fingerprint
from deltatune.model import apply_delta, get_module
from deltatune.parts.layers import in_out_features, layer_kind
from deltatune.parts.lora import LoRAPart

pytestmark = pytest.mark.usefixtures("one_thread")


def gpt2(tie: bool, shift: float = 0.0) -> GPT2LMHeadModel:
    """A tiny GPT-2 (seed 0), its weights shifted by ``shift``; an untied one starts with ``lm_head = wte``."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64,
                                       tie_word_embeddings=tie)).eval()
    with torch.no_grad():
        if not tie:
            model.lm_head.weight.copy_(model.transformer.wte.weight)
        g = torch.Generator().manual_seed(7)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * shift)
    return model


def lora_on(model: torch.nn.Module, module: str) -> Delta:
    g = torch.Generator().manual_seed(1)
    base = get_module(model, module)
    fin, fout = in_out_features(base)
    part = LoRAPart(fin, fout, 2, 0.5, layer=layer_kind(base))
    with torch.no_grad():
        part.lora_A.copy_(torch.randn(2, fin, generator=g) * 0.2)
        part.lora_B.copy_(torch.randn(fout, 2, generator=g) * 0.2)
    return Delta("lora", {}, {module: part}, fingerprint=fingerprint(model))


def logits(model: torch.nn.Module) -> torch.Tensor:
    inputs = {k: v for k, v in tiny_inputs("gpt2").items() if k != "labels"}
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize(("old_tied", "new_tied", "module", "old_ties", "new_ties"), [
    (True, False, "transformer.wte", "['lm_head']", "no other module"),
    (False, True, "lm_head", "no other module", "['transformer.wte']"),
])
def test_rebase_delta_refuses_bases_that_tie_the_part_s_module_otherwise(old_tied, new_tied, module, old_ties,
                                                                         new_ties):
    old, new = gpt2(old_tied), gpt2(new_tied, shift=0.01)
    with pytest.raises(NotMergeable, match=rf"module '{module}' shares its weight with {re.escape(old_ties)} in the "
                                           rf"old base and with {re.escape(new_ties)} in the new base") as info:
        rebase_delta(lora_on(old, module), new, old_base=old)
    assert info.value.module == module and info.value.kind == "lora"


def test_rebase_delta_between_bases_tied_alike_is_new_base_plus_the_update():
    old, new = gpt2(True), gpt2(True, shift=0.01)
    delta = lora_on(old, "transformer.wte")
    tuned = copy.deepcopy(old)
    apply_delta(tuned, delta, merge=True)
    hand = copy.deepcopy(new)
    with torch.no_grad():  # θ_v2 + (θ_ft − θ_v1), per stored tensor
        for p, q, r in zip(hand.parameters(), tuned.parameters(), old.parameters(), strict=True):
            p.add_(q - r)
    got = copy.deepcopy(new)
    apply_delta(got, rebase_delta(delta, new, old_base=old))
    assert torch.allclose(logits(got), logits(hand), atol=1e-5)


def test_refusing_a_base_dependent_part_names_what_transfers():
    import deltatune

    v1 = tiny_bert(0)
    delta = deltatune.attach(copy.deepcopy(v1), deltatune.make_config("dora", {"r": 2}))
    with pytest.raises(NotMergeable, match="depends on the base weights") as info:
        rebase_delta(delta, copy.deepcopy(v1), old_base=v1)
    assert "adapter" not in str(info.value)  # adapters are not additive: refused before, never transferred


def save(models: dict[str, torch.nn.Module], root) -> None:
    for name, model in models.items():
        model.save_pretrained(root / name)


def test_rebase_checkpoint_gives_the_untied_twin_of_a_tied_weight_its_update(tmp_path):
    v1, v2 = gpt2(True), gpt2(False, shift=0.001)
    ft = copy.deepcopy(v1)
    with torch.no_grad():
        ft.transformer.wte.weight.add_(torch.randn(ft.transformer.wte.weight.shape) * 0.05)
    save({"v1": v1, "ft": ft, "v2": v2}, tmp_path)
    assert "lm_head.weight" not in load_file(tmp_path / "v1" / "model.safetensors")  # the premise: stored once
    out = rebase_checkpoint(tmp_path / "ft", tmp_path / "v2", tmp_path / "v1", tmp_path / "out")
    tau = ft.transformer.wte.weight - v1.transformer.wte.weight
    got = load_file(out / "model.safetensors")
    assert torch.allclose(got["transformer.wte.weight"], v2.transformer.wte.weight + tau, atol=1e-6)
    assert torch.allclose(got["lm_head.weight"], v2.lm_head.weight + tau, atol=1e-6)  # it changed with wte on v1
    expected = copy.deepcopy(v2)
    with torch.no_grad():
        expected.transformer.wte.weight.add_(tau)
        expected.lm_head.weight.add_(tau)
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.allclose(logits(loaded), logits(expected), atol=1e-5)
    record = json.loads((out / "deltatune_merge.json").read_text())
    assert record["carried_ties"] == {"lm_head.weight": "transformer.wte.weight"}


def test_rebase_checkpoint_refuses_a_new_base_that_ties_what_the_old_one_stores_apart(tmp_path):
    v1, v2 = gpt2(False), gpt2(True, shift=0.001)
    ft = copy.deepcopy(v1)
    with torch.no_grad():
        ft.lm_head.weight.add_(0.05)
    save({"v1": v1, "ft": ft, "v2": v2}, tmp_path)
    with pytest.raises(NotMergeable, match=r"stores 'lm_head.weight' apart and the new base .* ties 'lm_head.weight' "
                                           r"to 'transformer.wte.weight'"):
        rebase_checkpoint(tmp_path / "ft", tmp_path / "v2", tmp_path / "v1", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def body_only(model: torch.nn.Module, folder) -> None:
    """``model`` saved without its classifier (a base checkpoint of a classification architecture)."""
    model.save_pretrained(folder)
    state = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in state.items() if not k.startswith("classifier.")}, folder / "model.safetensors",
              metadata={"format": "pt"})


QUERY = "encoder.layer.0.attention.self.query.weight"


def test_rebase_checkpoint_copies_the_fine_tune_s_task_head(tmp_path):
    v1 = tiny_bert(0)
    v2 = copy.deepcopy(v1)
    ft = copy.deepcopy(v1)
    with torch.no_grad():
        for p in v2.parameters():
            p.add_(0.01)
        ft.bert.encoder.layer[0].attention.self.query.weight.add_(0.05)
        ft.classifier.weight.normal_()
    body_only(v1, tmp_path / "v1")
    body_only(v2, tmp_path / "v2")
    ft.save_pretrained(tmp_path / "ft")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is left out, so nothing to warn about
        out = rebase_checkpoint(tmp_path / "ft", tmp_path / "v2", tmp_path / "v1", tmp_path / "out")
    got = load_file(out / "model.safetensors")
    assert torch.equal(got["classifier.weight"], ft.classifier.weight)
    assert torch.equal(got["classifier.bias"], ft.classifier.bias)
    q = f"bert.{QUERY}"
    assert torch.allclose(got[q], v2.state_dict()[q] + 0.05, atol=1e-6)
    assert json.loads((out / "deltatune_merge.json").read_text())["copied_heads"] == ["classifier.bias",
                                                                                      "classifier.weight"]
    from typer.testing import CliRunner

    from deltatune.cli import app

    res = CliRunner().invoke(app, ["rebase", str(tmp_path / "ft"), "--to", str(tmp_path / "v2"), "--from",
                                   str(tmp_path / "v1"), "--out", str(tmp_path / "cli")])
    assert res.exit_code == 0, res.output
    assert "copied 2 task-head tensor(s) of the fine-tune unchanged: classifier.bias, classifier.weight" in res.output


def test_a_prefixed_classifier_rebases_against_its_bare_base(tmp_path):
    """A classifier saved by transformers names its body ``bert.…``; its bare base ``…``."""
    ft = tiny_bert(0)
    v1 = copy.deepcopy(ft.bert)
    v2 = copy.deepcopy(v1)
    with torch.no_grad():
        for p in v2.parameters():
            p.add_(0.01)
        ft.bert.encoder.layer[0].attention.self.query.weight.add_(0.05)
        ft.classifier.weight.normal_()
    save({"v1": v1, "ft": ft, "v2": v2}, tmp_path)
    out = rebase_checkpoint(tmp_path / "ft", tmp_path / "v2", tmp_path / "v1", tmp_path / "out")
    got = load_file(out / "model.safetensors")
    s1, sf, s2 = v1.state_dict(), ft.bert.state_dict(), v2.state_dict()
    for k, v in s2.items():  # every body tensor under the new base's (bare) name: θ_v2 + (θ_ft − θ_v1)
        if v.is_floating_point():
            assert torch.allclose(got[k], v + (sf[k] - s1[k]), atol=1e-6), k
    assert torch.equal(got["classifier.weight"], ft.classifier.weight)
    loaded = AutoModelForSequenceClassification.from_pretrained(out, num_labels=3)
    assert torch.equal(loaded.classifier.weight, ft.classifier.weight)
    assert torch.allclose(loaded.bert.encoder.layer[0].attention.self.query.weight, got[QUERY])

    # a merge of such fine-tunes reads them the same way (and leaves the heads out, with a warning)
    with pytest.warns(UserWarning, match=r"2 tensor\(s\) the base lacks .*classifier"):
        merged = merge([tmp_path / "ft"], "task_arithmetic", base=tmp_path / "v1", output="checkpoint",
                       out=tmp_path / "merged")
    assert torch.allclose(CheckpointReader(merged).get(QUERY), s1[QUERY] + 0.05, atol=1e-6)
