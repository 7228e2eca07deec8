"""Parity with PEFT 0.21.2 prompt tuning: PEFT adapters load into deltatune, deltatune prompt deltas load into
PEFT, with equal fp32 logits (≤ 1e-5; PEFT's per-token logits include the virtual positions, which are
stripped for the comparison).  Models: tiny random Llama and GPT-2 (CAUSAL_LM), tiny BERT and the real
MiniLM (SEQ_CLS, whose classifier PEFT saves through ``modules_to_save``).
"""

from __future__ import annotations

import copy
import json
import os
import warnings

import pytest
import torch
from conftest import TINY_MODELS, tiny_inputs
from safetensors.torch import load_file, save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

peft = pytest.importorskip("peft")
from peft import (  # noqa: E402
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForSequenceClassification,
    PromptTuningConfig,
    TaskType,
    get_peft_model,
)

import deltatune  # noqa: E402
from deltatune.errors import (  # noqa: E402
    DeltaFormatError,
    IntegrityError,
    NonFiniteError,
    OutputExists,
    ShapeMismatch,
)
from deltatune.io.peft_prompt import export_prompt, load_prompt_adapter  # noqa: E402
from deltatune.methods.prompt_tuning import PromptTuningConfig as DtPromptConfig  # noqa: E402
from deltatune.model import apply_delta  # noqa: E402
from deltatune.parts.base import MODEL_LEVEL  # noqa: E402

TOL = 1e-5
N = 4
TASKS = {"llama": TaskType.CAUSAL_LM, "gpt2": TaskType.CAUSAL_LM, "bert": TaskType.SEQ_CLS}
pytestmark = pytest.mark.usefixtures("one_thread")


def _peft(base: torch.nn.Module, task: TaskType, n: int = N, seed: int = 0, **kw) -> PeftModel:
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(copy.deepcopy(base), PromptTuningConfig(task_type=task, num_virtual_tokens=n, **kw))
    if task == TaskType.SEQ_CLS:  # a trained-looking head, so that loading it matters
        with torch.no_grad():
            for p in model.base_model.classifier.modules_to_save["default"].parameters():
                p.normal_(0, 0.2)
    return model.eval()


def _peft_logits(model: PeftModel, inputs: dict[str, torch.Tensor], n: int = N) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        out = model(**inputs)
    logits = out.logits[:, n:] if out.logits.dim() == 3 else out.logits
    return logits, out.loss


def _ours(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        out = model(**inputs)
    return out.logits, out.loss


def _save(model: PeftModel, path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(str(path))


# --------------------------------------------------------------------------------------------------
# PEFT → deltatune
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_peft_adapter_loads_with_equal_logits(tmp_path, arch: str) -> None:
    base = TINY_MODELS[arch]()
    inputs = tiny_inputs(arch)
    inputs["attention_mask"][0, :2] = 0
    pm = _peft(base, TASKS[arch])
    want_logits, want_loss = _peft_logits(pm, inputs)
    _save(pm, tmp_path / "a")
    model = copy.deepcopy(base)
    delta = load_prompt_adapter(tmp_path / "a", model=model)
    assert delta.method == "prompt_tuning" and list(delta.parts) == [MODEL_LEVEL]
    assert list(delta.heads) == (["classifier"] if arch == "bert" else [])
    assert delta.fingerprint is not None
    apply_delta(model, delta)
    logits, loss = _ours(model, inputs)
    assert (logits - want_logits).abs().max().item() <= TOL
    assert abs(loss.item() - want_loss.item()) <= TOL  # PEFT also puts −100 on the virtual positions


def test_peft_minilm_classifier_loads_with_equal_logits(tmp_path, minilm, tokenizer) -> None:
    pm = _peft(minilm, TaskType.SEQ_CLS, n=8)
    inputs = dict(tokenizer(["a moving, funny film", "flat and far too long"], padding=True, return_tensors="pt"))
    want, _ = _peft_logits(pm, inputs, n=8)
    _save(pm, tmp_path / "a")
    model = copy.deepcopy(minilm)
    apply_delta(model, load_prompt_adapter(tmp_path / "a", model=model))
    got, _ = _ours(model, inputs)
    assert (got - want).abs().max().item() <= TOL


def test_peft_text_initialised_adapter_records_its_init(tmp_path, minilm, minilm_path) -> None:
    pm = _peft(minilm, TaskType.SEQ_CLS, n=6, prompt_tuning_init="TEXT", prompt_tuning_init_text="good or bad",
               tokenizer_name_or_path=minilm_path)
    _save(pm, tmp_path / "a")
    delta = load_prompt_adapter(tmp_path / "a")
    assert delta.config["init"] == "text" and delta.config["init_text"] == "good or bad"
    assert delta.config["tokenizer"] == minilm_path and delta.fingerprint is None
    # deltatune's own TEXT init gives PEFT's initial prompt
    ours = deltatune.get_method("prompt_tuning").create_parts(
        minilm, DtPromptConfig(num_virtual_tokens=6, init="text", init_text="good or bad", tokenizer=minilm_path), [])
    assert torch.equal(ours[MODEL_LEVEL].prompt_embeddings, delta.parts[MODEL_LEVEL].prompt_embeddings)


# --------------------------------------------------------------------------------------------------
# deltatune → PEFT
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_exported_prompt_loads_in_peft_with_equal_logits(tmp_path, arch: str) -> None:
    base = TINY_MODELS[arch]()
    model = copy.deepcopy(base)
    delta = deltatune.attach(model, DtPromptConfig(num_virtual_tokens=5, seed=3))
    inputs = tiny_inputs(arch)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(**inputs).loss.backward()
        opt.step()
        opt.zero_grad()
    delta.snapshot_heads(model)
    ours, _ = _ours(model, inputs)
    deltatune.export_peft(delta, tmp_path / "x", base_model_name_or_path="tiny")  # dispatched by part kind
    config = json.loads((tmp_path / "x" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PROMPT_TUNING" and config["num_virtual_tokens"] == 5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "x")).eval()
    assert isinstance(pm, PeftModelForSequenceClassification if arch == "bert" else PeftModelForCausalLM)
    theirs, _ = _peft_logits(pm, inputs, n=5)
    assert (ours - theirs).abs().max().item() <= TOL
    back = deltatune.load_peft_adapter(tmp_path / "x", model=base)  # dispatched by peft_type; digests verified
    assert torch.equal(back.parts[MODEL_LEVEL].prompt_embeddings, delta.parts[MODEL_LEVEL].prompt_embeddings)
    assert all(torch.equal(back.heads[h][k], v) for h, t in delta.heads.items() for k, v in t.items())


def test_export_verification_catches_edits(tmp_path) -> None:
    base = TINY_MODELS["llama"]()
    delta = deltatune.attach(copy.deepcopy(base), DtPromptConfig(num_virtual_tokens=3))
    export_prompt(delta, tmp_path / "x")
    cfg_file, st_file = tmp_path / "x" / "adapter_config.json", tmp_path / "x" / "adapter_model.safetensors"
    config = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**config, "prompt_tuning_init": "SAMPLE_VOCAB"}))
    with pytest.raises(IntegrityError, match="adapter_config.json"):
        load_prompt_adapter(tmp_path / "x")
    assert load_prompt_adapter(tmp_path / "x", verify=False).config["init"] == "vocab"
    cfg_file.write_text(json.dumps(config))
    from safetensors import safe_open

    with safe_open(str(st_file), "pt") as fh:
        metadata = fh.metadata()
    tensors = load_file(str(st_file))
    tensors["prompt_embeddings"][0, 0] += 1.0
    save_file(tensors, str(st_file), metadata=metadata)
    with pytest.raises(IntegrityError, match="prompt_embeddings"):
        load_prompt_adapter(tmp_path / "x")


# --------------------------------------------------------------------------------------------------
# bad input: typed errors naming what and why
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def adapter(tmp_path):
    """A PEFT prompt adapter of the tiny Llama (4 × 64) that the tests then damage."""
    _save(_peft(TINY_MODELS["llama"](), TaskType.CAUSAL_LM), tmp_path / "a")
    return tmp_path / "a"


def _edit_config(path, **changes) -> None:
    file = path / "adapter_config.json"
    config = json.loads(file.read_text())
    config.update(changes)
    file.write_text(json.dumps(config))


@pytest.mark.parametrize(("changes", "match"), [
    ({"peft_type": "LORA"}, "PROMPT_TUNING adapters"),
    ({"peft_type": "PREFIX_TUNING"}, "PROMPT_TUNING adapters"),
    ({"task_type": "SEQ_2_SEQ_LM"}, "encoder-decoder"),
    ({"task_type": "QUESTION_ANS"}, "span heads"),
    ({"num_transformer_submodules": 2}, "encoder-decoder"),
    ({"num_virtual_tokens": 0}, "positive integer"),
    ({"num_virtual_tokens": True}, "positive integer"),
    ({"num_virtual_tokens": "4"}, "positive integer"),
    ({"prompt_tuning_init": "ZEROS"}, "prompt_tuning_init"),
    ({"modules_to_save": "classifier"}, "modules_to_save"),
])
def test_bad_configs_are_refused(adapter, changes, match) -> None:
    _edit_config(adapter, **changes)
    with pytest.raises(DeltaFormatError, match=match):
        load_prompt_adapter(adapter)


def test_bad_tensors_are_refused(adapter) -> None:
    file = adapter / "adapter_model.safetensors"
    good = load_file(str(file))
    model = TINY_MODELS["llama"]()
    cases = [
        ({"prompt_embeddings": good["prompt_embeddings"][:3]}, ShapeMismatch, "num_virtual_tokens=4"),
        ({"prompt_embeddings": good["prompt_embeddings"].long()}, DeltaFormatError, "floating point"),
        ({"prompt_embeddings": torch.full((4, 64), float("nan"))}, NonFiniteError, "NaN"),
        ({**good, "base_model.model.layers.0.x": torch.zeros(2)}, DeltaFormatError, "unknown tensor key"),
        ({"embeddings": good["prompt_embeddings"]}, DeltaFormatError, "no 'prompt_embeddings'"),
    ]
    for tensors, error, match in cases:
        save_file(tensors, str(file))
        with pytest.raises(error, match=match):
            load_prompt_adapter(adapter, model=model)
    _edit_config(adapter, token_dim=None, num_virtual_tokens=64)  # the model's context is 64
    save_file({"prompt_embeddings": torch.zeros(64, 64)}, str(file))
    with pytest.raises(ShapeMismatch, match="context of 64"):
        load_prompt_adapter(adapter, model=model)
    save_file({"prompt_embeddings": torch.zeros(64, 32)}, str(file))
    with pytest.raises(ShapeMismatch, match="token dimension 32"):
        load_prompt_adapter(adapter, model=model)
    file.unlink()
    (adapter / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(DeltaFormatError, match="pickle"):
        load_prompt_adapter(adapter)


def test_export_refuses_what_peft_cannot_hold(tmp_path) -> None:
    model = TINY_MODELS["llama"]()
    lora = deltatune.attach(copy.deepcopy(model), deltatune.LoRAConfig(r=2))
    with pytest.raises(DeltaFormatError, match="exactly one prompt part"):
        export_prompt(lora, tmp_path / "x")
    delta = deltatune.attach(model, DtPromptConfig(num_virtual_tokens=3))
    with torch.no_grad():
        delta.parts[MODEL_LEVEL].prompt_embeddings[0, 0] = float("inf")
    with pytest.raises(NonFiniteError):
        export_prompt(delta, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    with torch.no_grad():
        delta.parts[MODEL_LEVEL].prompt_embeddings[0, 0] = 0.0
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "notes.txt").write_text("mine")
    with pytest.raises(OutputExists):
        export_prompt(delta, tmp_path / "y")
    assert (tmp_path / "y" / "notes.txt").read_text() == "mine"
    with pytest.raises(DeltaFormatError, match="task_type"):
        export_prompt(delta, tmp_path / "z", task_type="SEQ_2_SEQ_LM")
