"""Rebase: fingerprint checks (old base, force), fit on the new base, metrics, CLI, checkpoint transfer."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_bert, tiny_inputs, tiny_llama
from safetensors.torch import load_file
from torch import nn
from transformers import BertConfig, BertForSequenceClassification
from typer.testing import CliRunner

from deltatune.algebra.rebase import rebase_checkpoint, rebase_delta
from deltatune.delta import Delta
from deltatune.errors import ConfigError, FingerprintMismatch, ShapeMismatch, TargetError
from deltatune.fingerprint import fingerprint
from deltatune.io.delta_format import load_delta
from deltatune.io.peft_format import export_peft
from deltatune.model import apply_delta, get_module
from deltatune.parts.lora import LoRAPart
from deltatune.provenance import Provenance

TARGETS = ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.attention.self.value"]


def perturbed(model: nn.Module, seed: int = 7, rel: float = 0.1) -> nn.Module:
    """``v2 = v1 + N(0, (rel·std)²)`` per floating tensor: an "updated" base of the same architecture."""
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * rel * p.std().nan_to_num(0.0))
    return out


def lora_delta(model: nn.Module) -> Delta:
    gen = torch.Generator().manual_seed(3)
    parts = {}
    for name in TARGETS:
        part = LoRAPart(64, 64, 2, 0.5)
        with torch.no_grad():
            part.lora_A.copy_(torch.randn(2, 64, generator=gen) * 0.3)
            part.lora_B.copy_(torch.randn(64, 2, generator=gen) * 0.3)
        parts[name] = part
    heads = {"classifier": {k: torch.randn(v.shape, generator=gen) for k, v in model.classifier.state_dict().items()}}
    return Delta("lora", {"r": 2}, parts, heads=heads, fingerprint=fingerprint(model, exclude=["classifier"]),
                 metrics={"final": {"accuracy": 0.5}},
                 provenance=Provenance("train", "/old/base", {"name": "mnli"}, {"model": "/old/base", "task": "mnli"}))


@pytest.fixture
def bases():
    v1 = tiny_bert(0)
    return v1, perturbed(v1), tiny_bert(1)


def test_rebase_relabels_the_delta_and_it_applies_on_the_new_base(bases):
    v1, v2, _ = bases
    delta = lora_delta(v1)
    with pytest.raises(FingerprintMismatch):
        apply_delta(copy.deepcopy(v2), delta)  # the premise: v2 is another base
    moved = rebase_delta(delta, v2, old_base=v1)
    assert moved.fingerprint == fingerprint(v2, exclude=["classifier"]) != delta.fingerprint
    assert moved.metrics["rebased_from"] == delta.fingerprint
    assert moved.metrics["final"] == {"accuracy": 0.5} and moved.provenance.task_name == "mnli"
    assert moved.provenance.operation == "rebase" and moved.provenance.parents[0]["fingerprint"] == delta.fingerprint
    assert moved.heads.keys() == {"classifier"}
    assert torch.equal(moved.heads["classifier"]["weight"], delta.heads["classifier"]["weight"])
    for name in TARGETS:  # Δ itself is unchanged, and an independent copy
        assert torch.equal(moved.parts[name].delta_weight(), delta.parts[name].delta_weight())
        assert moved.parts[name] is not delta.parts[name]
    assert delta.fingerprint == fingerprint(v1, exclude=["classifier"])  # the input is untouched

    net = copy.deepcopy(v2)
    apply_delta(net, moved)  # no FingerprintMismatch now
    inputs = {k: v for k, v in tiny_inputs("bert").items() if k != "labels"}
    hand = copy.deepcopy(v2)
    with torch.no_grad():  # θ_v2 + (θ_ft,v1 − θ_v1), written by hand
        for name in TARGETS:
            p = delta.parts[name]
            get_module(hand, name).weight.add_(p.scale * p.lora_B @ p.lora_A)
        hand.classifier.load_state_dict(delta.heads["classifier"])
        assert torch.allclose(net(**inputs).logits, hand(**inputs).logits, atol=1e-5)


def test_wrong_old_base_is_a_fingerprint_mismatch_unless_forced(bases):
    v1, v2, other = bases
    delta = lora_delta(v1)
    with pytest.raises(FingerprintMismatch, match="the delta was not trained on the old base: same architecture, "
                                                  "different weights.*values"):
        rebase_delta(delta, v2, old_base=other)
    forced = rebase_delta(delta, v2, old_base=other, force=True)
    assert forced.metrics["rebased_from"] == delta.fingerprint
    assert forced.fingerprint == fingerprint(v2, exclude=["classifier"])


def test_without_old_base_force_is_required(bases):
    v1, v2, _ = bases
    delta = lora_delta(v1)
    with pytest.raises(ConfigError, match="--from OLD_BASE.*--force"):
        rebase_delta(delta, v2)
    moved = rebase_delta(delta, v2, force=True)
    assert moved.metrics["rebased_from"] == delta.fingerprint


def test_new_base_must_fit_every_part_and_head(bases):
    v1, _, _ = bases
    delta = lora_delta(v1)
    torch.manual_seed(0)
    wide = BertForSequenceClassification(BertConfig(vocab_size=128, hidden_size=96, intermediate_size=128,
                                                    num_hidden_layers=2, num_attention_heads=4,
                                                    max_position_embeddings=64, num_labels=3))
    with pytest.raises(ShapeMismatch, match=f"module '{TARGETS[0]}': LoRA part for a linear 64→64 .* 96→96"):
        rebase_delta(delta, wide, old_base=v1)
    with pytest.raises(TargetError, match="no module 'bert.encoder.layer.0.attention.self.query'"):
        rebase_delta(delta, tiny_llama(), force=True)
    two_labels = tiny_bert(0)
    two_labels.classifier = nn.Linear(64, 2)
    with pytest.raises(ShapeMismatch, match=r"head tensor classifier.weight has shape \(3, 64\).*\(2, 64\)"):
        rebase_delta(delta, two_labels, old_base=v1)


def test_peft_adapter_without_fingerprint_takes_the_named_old_base(bases, tmp_path):
    v1, v2, _ = bases
    delta = lora_delta(v1)
    delta.heads = {}
    export_peft(delta, tmp_path / "peft")
    moved = rebase_delta(tmp_path / "peft", v2, old_base=v1)
    assert moved.metrics["rebased_from"] == fingerprint(v1)
    assert moved.fingerprint == fingerprint(v2)


@pytest.fixture
def saved(bases, tmp_path):
    v1, v2, other = bases
    for name, model in (("v1", v1), ("v2", v2), ("other", other)):
        model.save_pretrained(tmp_path / name)
    lora_delta(v1).save(tmp_path / "delta")
    return tmp_path


def test_cli_rebase_checks_and_writes_a_delta_for_the_new_base(saved):
    from deltatune.cli import app

    runner = CliRunner()
    out = saved / "moved"
    res = runner.invoke(app, ["rebase", str(saved / "delta"), "--to", str(saved / "v2"), "--from", str(saved / "v1"),
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert str(out) in res.output
    moved = load_delta(out)
    v2 = BertForSequenceClassification.from_pretrained(saved / "v2")
    assert moved.fingerprint == fingerprint(v2, exclude=["classifier"])
    assert moved.provenance.base == moved.provenance.train["model"] == str(saved / "v2")  # eval/apply find it
    apply_delta(v2, moved)

    wrong = runner.invoke(app, ["rebase", str(saved / "delta"), "--to", str(saved / "v2"), "--from",
                                str(saved / "other"), "--out", str(saved / "x")])
    assert isinstance(wrong.exception, FingerprintMismatch)
    assert f"old base '{saved / 'other'}'" in str(wrong.exception) and str(saved / "delta") in str(wrong.exception)
    assert not (saved / "x").exists()
    unchecked = runner.invoke(app, ["rebase", str(saved / "delta"), "--to", str(saved / "v2"), "--out",
                                    str(saved / "y")])
    assert isinstance(unchecked.exception, ConfigError)
    forced = runner.invoke(app, ["rebase", str(saved / "delta"), "--to", str(saved / "v2"), "--from",
                                 str(saved / "other"), "--force", "--out", str(saved / "z")])
    assert forced.exit_code == 0, forced.output
    assert load_delta(saved / "z").fingerprint == moved.fingerprint


def test_cli_rebase_keeps_a_compressed_delta_compressed(saved):
    from deltatune.algebra.compress import compress_delta
    from deltatune.cli import app
    from deltatune.io.compact_format import compact_report, save_compact
    from deltatune.io.delta_format import is_compact

    small = compress_delta(load_delta(saved / "delta"), "quantize", dtype="int8")
    save_compact(small, saved / "small")
    res = CliRunner().invoke(app, ["rebase", str(saved / "small"), "--to", str(saved / "v2"), "--from",
                                   str(saved / "v1"), "--out", str(saved / "moved")])
    assert res.exit_code == 0, res.output
    assert is_compact(saved / "moved")  # the same encodings: the tensors take the same bytes (the manifest grows)
    assert compact_report(saved / "moved").payload_bytes == compact_report(saved / "small").payload_bytes
    moved, before = load_delta(saved / "moved"), load_delta(saved / "small")
    assert all(torch.equal(t, before.parts[n].state()[k]) for n, p in moved.parts.items()
               for k, t in p.state().items())  # Δ unchanged


def test_checkpoint_rebase_is_new_base_plus_the_fine_tuning_diff(tmp_path):
    """θ'_v2 = θ_v2 + (θ_ft − θ_v1) for every tensor of a full fine-tuned checkpoint (Lin et al. 2025)."""
    from deltatune.cli import app

    v1 = tiny_llama(0)
    ft, v2 = perturbed(v1, seed=1, rel=0.05), perturbed(v1, seed=2)
    for name, model in (("v1", v1), ("ft", ft), ("v2", v2)):
        model.save_pretrained(tmp_path / name)
    res = CliRunner().invoke(app, ["rebase", str(tmp_path / "ft"), "--to", str(tmp_path / "v2"), "--out",
                                   str(tmp_path / "out")])
    assert isinstance(res.exception, ConfigError) and "--from OLD_BASE" in str(res.exception)
    out = rebase_checkpoint(tmp_path / "ft", tmp_path / "v2", tmp_path / "v1", tmp_path / "out")
    got = load_file(out / "model.safetensors") if (out / "model.safetensors").is_file() else None
    if got is None:
        got = {}
        for f in sorted(out.glob("*.safetensors")):
            got.update(load_file(f))
    s1, sf, s2 = v1.state_dict(), ft.state_dict(), v2.state_dict()
    assert set(got) == set(s2)
    for k in s2:
        assert torch.allclose(got[k], s2[k] + (sf[k] - s1[k]), atol=1e-6), k
    res = CliRunner().invoke(app, ["rebase", str(tmp_path / "ft"), "--to", str(tmp_path / "v2"), "--from",
                                   str(tmp_path / "v1"), "--out", str(tmp_path / "out2")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "out2" / "config.json").is_file()


@pytest.mark.parametrize("method", ["ia3", "dora"])
def test_base_dependent_parts_are_refused(bases, method):
    # their parameters give another Δθ on another base: copying them would not carry θ_ft − θ_v1 over
    import deltatune
    from deltatune.errors import NotMergeable

    v1, v2, _ = bases
    config = deltatune.make_config(method, {} if method == "ia3" else {"r": 2})
    delta = deltatune.attach(copy.deepcopy(v1), config)
    with pytest.raises(NotMergeable, match="depends on the base weights"):
        rebase_delta(delta, v2, old_base=v1)
