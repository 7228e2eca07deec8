"""The PEFT adapter loader trusts nothing: config types, dtypes, shapes, finiteness, digests, no pickle.

Each bad input ends in a typed error (a :class:`DeltaTuneError`) that names the file and the field or
tensor; adapters written by PEFT itself (no digests) still load, and :func:`export_peft` output is
verified on load.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import deltatune.io.peft_format as peft_format
from deltatune.delta import Delta
from deltatune.errors import (
    DeltaFormatError,
    DeltaTuneError,
    IntegrityError,
    NonFiniteError,
    OutputExists,
    ShapeMismatch,
)
from deltatune.io.peft_format import DIGEST_METADATA_KEY, export_peft, load_peft_adapter
from deltatune.parts import LoRAPart
from deltatune.parts.layers import LayerKind

D_IN, D_OUT, RANK = 16, 8, 4
A_KEY = "base_model.model.lin.lora_A.weight"
B_KEY = "base_model.model.lin.lora_B.weight"


class Tiny(nn.Module):
    """The smallest base a PEFT LoRA adapter can target."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(D_IN, D_OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def _delta(seed: int = 0) -> Delta:
    g = torch.Generator().manual_seed(seed)
    part = LoRAPart(D_IN, D_OUT, RANK, 0.5)
    with torch.no_grad():
        part.lora_A.copy_(torch.randn(RANK, D_IN, generator=g))
        part.lora_B.copy_(torch.randn(D_OUT, RANK, generator=g))
    return Delta(method="lora", config={"rslora": False}, parts={"lin": part})


@pytest.fixture()
def adapter(tmp_path: Path) -> Path:
    """An adapter exported by deltatune (with digests)."""
    return export_peft(_delta(), tmp_path / "adapter")


@pytest.fixture()
def peft_adapter(tmp_path: Path) -> Path:
    """An adapter written by PEFT itself (no digests)."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(1)
    cfg = peft.LoraConfig(r=RANK, lora_alpha=2, target_modules=["lin"], init_lora_weights=False)
    out = tmp_path / "peft"
    peft.get_peft_model(Tiny(), cfg).save_pretrained(str(out))
    return out


def _edit_config(path: Path, **changes: Any) -> None:
    file = path / "adapter_config.json"
    cfg = json.loads(file.read_text())
    cfg.update(changes)
    file.write_text(json.dumps(cfg))


def _rewrite_tensors(path: Path, keep_digests: bool = False, **changes: torch.Tensor) -> None:
    """Replace tensors (keys given with ``/`` for ``.``); the digest metadata is dropped unless kept."""
    file = path / "adapter_model.safetensors"
    with safe_open(str(file), framework="pt") as fh:
        metadata = dict(fh.metadata() or {})
    tensors = load_file(str(file))
    tensors.update({k.replace("/", "."): v for k, v in changes.items()})
    if not keep_digests:
        metadata.pop(DIGEST_METADATA_KEY, None)
    save_file(tensors, str(file), metadata=metadata)


def _load(path: Path, **kw: Any) -> Delta:
    return load_peft_adapter(path, **kw)


# --------------------------------------------------------------------------------------------------
# tensor dtypes, values and shapes
# --------------------------------------------------------------------------------------------------
def test_integer_lora_b_is_refused_naming_file_tensor_and_dtype(adapter):
    _rewrite_tensors(adapter, **{B_KEY.replace(".", "/"): torch.full((D_OUT, RANK), 7, dtype=torch.int32)})
    with pytest.raises(DeltaFormatError, match=r"lora_B\.weight' has dtype 'I32'.*floating point") as err:
        _load(adapter)
    assert "adapter_model.safetensors" in str(err.value)


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool, torch.float8_e4m3fn])
def test_other_non_float16_32_64_factors_are_refused(adapter, dtype):
    _rewrite_tensors(adapter, **{A_KEY.replace(".", "/"): torch.zeros(RANK, D_IN).to(dtype)})
    with pytest.raises(DeltaFormatError, match="lora_A.weight' has dtype"):
        _load(adapter)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_tensor_values_are_refused_naming_the_tensor(adapter, bad):
    a = load_file(str(adapter / "adapter_model.safetensors"))[A_KEY].clone()
    a[1, 3] = bad
    _rewrite_tensors(adapter, **{A_KEY.replace(".", "/"): a})  # no digests: the finiteness check must catch it
    with pytest.raises(NonFiniteError, match=r"lora_A\.weight'.*1 of 64 values are NaN or ±Inf"):
        _load(adapter)


def test_shapes_are_checked_from_the_header_before_any_data_is_read(adapter, monkeypatch):
    def no_reading(*args: Any, **kw: Any) -> None:
        raise AssertionError("tensor data was read before the shapes were validated")

    monkeypatch.setattr(peft_format, "_read_values", no_reading)
    # against the base model: a 2^20-wide A for a 16-wide Linear
    _rewrite_tensors(adapter, **{A_KEY.replace(".", "/"): torch.zeros(RANK, 2**20, dtype=torch.float16)})
    with pytest.raises(ShapeMismatch, match=r"'lin'.*maps 16→8.*\[4, 1048576\]"):
        _load(adapter, model=Tiny())
    # against each other: rank 4 in A, rank 3 in B
    _rewrite_tensors(adapter, **{A_KEY.replace(".", "/"): torch.zeros(RANK, D_IN),
                                 B_KEY.replace(".", "/"): torch.zeros(D_OUT, 3)})
    with pytest.raises(ShapeMismatch, match="rank mismatch"):
        _load(adapter)
    # against the config: both rank 5, config r = 4
    _rewrite_tensors(adapter, **{A_KEY.replace(".", "/"): torch.zeros(5, D_IN),
                                 B_KEY.replace(".", "/"): torch.zeros(D_OUT, 5)})
    with pytest.raises(DeltaFormatError, match="rank 4 by field 'r'/'rank_pattern'.*have rank 5"):
        _load(adapter)
    # not 2-D, and empty
    _rewrite_tensors(adapter, **{A_KEY.replace(".", "/"): torch.zeros(RANK, D_IN, 1)})
    with pytest.raises(ShapeMismatch, match="non-empty 2-D"):
        _load(adapter)
    _rewrite_tensors(adapter, **{A_KEY.replace(".", "/"): torch.zeros(RANK, 0)})
    with pytest.raises(ShapeMismatch, match="non-empty 2-D"):
        _load(adapter)


def test_a_module_the_model_lacks_and_a_key_without_module(adapter):
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    renamed = {k.replace(".lin.", ".nope."): v for k, v in tensors.items()}
    save_file(renamed, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(DeltaTuneError, match="'nope', which is not a module of this model"):
        _load(adapter, model=Tiny())
    renamed = {k.replace(".lin.", ".."): v for k, v in tensors.items()}
    save_file(renamed, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(DeltaFormatError, match="names no module"):
        _load(adapter)
    renamed = {k.replace(".lin.", "."): v for k, v in tensors.items()}
    save_file(renamed, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(DeltaFormatError, match=r"unknown tensor key 'base_model\.model\.lora_A\.weight'"):
        _load(adapter)


def test_truncated_safetensors_is_a_typed_error(adapter):
    file = adapter / "adapter_model.safetensors"
    file.write_bytes(file.read_bytes()[:-40])
    with pytest.raises(DeltaFormatError, match="truncated or corrupt"):
        _load(adapter)


# --------------------------------------------------------------------------------------------------
# adapter_config.json against PEFT's LoraConfig schema
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("changes", "error", "match"), [
    ({"fan_in_fan_out": "true"}, DeltaFormatError, "'fan_in_fan_out' must be true or false, got 'true'"),
    ({"fan_in_fan_out": 1}, DeltaFormatError, "'fan_in_fan_out' must be true or false"),
    ({"use_rslora": None}, DeltaFormatError, "'use_rslora' must be true or false"),
    ({"r": "4"}, DeltaFormatError, "field 'r' must be a positive integer, got '4'"),
    ({"r": True}, DeltaFormatError, "field 'r' must be a positive integer, got True"),
    ({"r": 4.0}, DeltaFormatError, "field 'r' must be a positive integer"),
    ({"r": 0}, DeltaFormatError, "field 'r' must be a positive integer"),
    ({"lora_alpha": math.nan}, NonFiniteError, "literal NaN"),  # refused by the JSON reader
    ({"lora_alpha": math.inf}, NonFiniteError, "literal Infinity"),
    ({"lora_alpha": 10**400}, NonFiniteError, "field 'lora_alpha' must be a finite number, got 1000"),
    ({"lora_alpha": "2"}, DeltaFormatError, "field 'lora_alpha' must be a number"),
    ({"lora_alpha": False}, DeltaFormatError, "field 'lora_alpha' must be a number"),
    ({"lora_dropout": "0.1"}, DeltaFormatError, "field 'lora_dropout' must be a number"),
    ({"lora_dropout": math.nan}, NonFiniteError, "literal NaN"),
    ({"lora_dropout": -(10**400)}, NonFiniteError, "field 'lora_dropout' must be a finite number"),
    ({"lora_dropout": 1.0}, DeltaFormatError, r"'lora_dropout' must be in \[0, 1\)"),
    ({"rank_pattern": {"lin": "2"}}, DeltaFormatError, "'rank_pattern' entry 'lin' must be a positive integer"),
    ({"rank_pattern": ["lin", 2]}, DeltaFormatError, "'rank_pattern' must be an object"),
    ({"rank_pattern": {"(": 2}}, DeltaFormatError, "not a valid regular expression"),
    ({"alpha_pattern": {"lin": math.nan}}, NonFiniteError, "literal NaN"),
    ({"alpha_pattern": {"lin": -(10**400)}}, NonFiniteError, "'alpha_pattern' entry 'lin' must be a finite number"),
    ({"alpha_pattern": {"lin": None}}, DeltaFormatError, "'alpha_pattern' entry 'lin' must be a number"),
    ({"target_modules": 3}, DeltaFormatError, "'target_modules' must be a string, a list of strings or null"),
    ({"target_modules": ["lin", 3]}, DeltaFormatError, "'target_modules' must be"),
    ({"modules_to_save": "classifier"}, DeltaFormatError, "'modules_to_save' must be a list of module names"),
    ({"modules_to_save": [""]}, DeltaFormatError, "'modules_to_save' holds an empty module name"),
    ({"peft_type": 7}, DeltaFormatError, "'peft_type' must be a string, got 7"),
    ({"peft_type": "LOHA"}, DeltaFormatError, "peft_type is 'LOHA'; deltatune reads only LORA.*Hadamard product"),
    ({"peft_type": "VERA"}, DeltaFormatError, "peft_type is 'VERA'; deltatune reads only LORA"),
    ({"bias": "all"}, DeltaFormatError, "'bias' is 'all'; only 'none'"),
    ({"bias": None}, DeltaFormatError, "'bias' must be"),
    ({"use_dora": True}, DeltaFormatError, r"'use_dora' is True: DoRA .* is not supported"),
    ({"use_dora": "yes"}, DeltaFormatError, "'use_dora' must be true or false"),
    ({"layer_replication": [[0, 1], [0, 1]]}, DeltaFormatError, "'layer_replication'.*changes the model's structure"),
    ({"megatron_config": {"tensor_model_parallel_size": 2}}, DeltaFormatError, "'megatron_config'.*Megatron"),
    ({"init_lora_weights": "pissa_niter_4"}, DeltaFormatError, "rewrites the base weights"),
    ({"init_lora_weights": "fancy"}, DeltaFormatError, "init_lora_weights is 'fancy', not one PEFT 0.21 knows"),
    ({"init_lora_weights": 3}, DeltaFormatError, "'init_lora_weights' must be true, false or"),
    ({"layers_to_transform": "0"}, DeltaFormatError, "'layers_to_transform' must be an integer"),
    ({"r": "x" * 500}, DeltaFormatError, r"got 'xxxx.{60,80}…$"),
])
def test_config_fields_are_checked_against_peft_schema(peft_adapter, changes, error, match):
    _edit_config(peft_adapter, **changes)
    with pytest.raises(error, match=match) as err:
        _load(peft_adapter)
    assert "adapter_config.json" in str(err.value)
    assert len(str(err.value)) < 400


def test_plain_inits_and_unknown_falsy_fields_load(peft_adapter):
    for init in ("gaussian", "eva", "orthogonal", "mica", False):
        _edit_config(peft_adapter, init_lora_weights=init, some_future_field=None)
        assert sorted(_load(peft_adapter).parts) == ["lin"]


def test_unknown_truthy_field_warns(peft_adapter):
    _edit_config(peft_adapter, use_something_new=True)
    with pytest.warns(UserWarning, match="use_something_new.*not in PEFT 0.21's LoraConfig"):
        _load(peft_adapter)


def test_rslora_scale_is_alpha_over_sqrt_r(peft_adapter):
    _edit_config(peft_adapter, use_rslora=True, lora_alpha=6)
    assert _load(peft_adapter).parts["lin"].scale == pytest.approx(6 / math.sqrt(RANK))
    _edit_config(peft_adapter, use_rslora=False)
    assert _load(peft_adapter).parts["lin"].scale == pytest.approx(6 / RANK)


def test_fan_in_fan_out_true_gives_conv1d_without_a_model(peft_adapter):
    _edit_config(peft_adapter, fan_in_fan_out=True)
    assert _load(peft_adapter).parts["lin"].layer is LayerKind.CONV1D
    # with the model, the module's own kind wins (as in PEFT, which corrects the flag per layer)
    assert _load(peft_adapter, model=Tiny()).parts["lin"].layer is LayerKind.LINEAR


# --------------------------------------------------------------------------------------------------
# no pickle
# --------------------------------------------------------------------------------------------------
class _Planted:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(_Planted.marker),))


def test_bin_only_adapter_is_refused_without_unpickling(adapter, tmp_path, monkeypatch):
    def forbidden(*args: Any, **kw: Any) -> None:
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", forbidden)
    _Planted.marker = tmp_path / "code-ran"
    (adapter / "adapter_model.bin").write_bytes(pickle.dumps({"x": _Planted()}))
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(DeltaFormatError, match=r"adapter_model\.bin: deltatune does not load pickle files.*"
                                               r"safe_serialization=True"):
        _load(adapter)
    assert not _Planted.marker.exists()


def test_empty_adapter_folder(adapter):
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(DeltaFormatError, match="holds no adapter_model.safetensors"):
        _load(adapter)


# --------------------------------------------------------------------------------------------------
# digests
# --------------------------------------------------------------------------------------------------
def _data_start(file: Path) -> int:
    (n,) = struct.unpack("<Q", file.read_bytes()[:8])
    return 8 + n


def test_bit_flip_in_an_exported_tensor_fails_the_digest(adapter):
    file = adapter / "adapter_model.safetensors"
    data = bytearray(file.read_bytes())
    data[_data_start(file)] ^= 0x01  # lowest mantissa bit of the first value of the first tensor
    file.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"tensor 'base_model\.model\.lin\.lora_[AB]\.weight' fails its SHA-256"):
        _load(adapter)
    loose = _load(adapter, verify=False)  # a finite flip loads when asked to skip the check
    assert not torch.equal(loose.parts["lin"].lora_A, _delta().parts["lin"].lora_A) or not torch.equal(
        loose.parts["lin"].lora_B, _delta().parts["lin"].lora_B)


def test_exported_adapter_round_trips_verified(adapter):
    back = _load(adapter, model=Tiny())
    want = _delta().parts["lin"]
    assert torch.equal(back.parts["lin"].lora_A, want.lora_A) and back.parts["lin"].scale == 0.5


def test_edited_config_of_an_export_fails_the_digest(adapter):
    _edit_config(adapter, lora_alpha=3)  # valid, but not what was exported
    with pytest.raises(IntegrityError, match=r"adapter_config\.json: differs from the digest"):
        _load(adapter)
    assert _load(adapter, verify=False).parts["lin"].scale == pytest.approx(3 / RANK)


def test_reordered_patterns_fail_the_digest(tmp_path):
    """PEFT's first-match rule depends on the pattern order, so the digest does too."""
    parts = {name: LoRAPart(D_IN, D_OUT, r, 1.0) for name, r in (("x.lin", 2), ("y.lin", 3), ("z.fc", 4))}
    path = export_peft(Delta(method="lora", config={"rslora": False}, parts=parts), tmp_path / "adapter")
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert len(cfg["rank_pattern"]) >= 2
    _edit_config(path, rank_pattern=dict(reversed(list(cfg["rank_pattern"].items()))))
    with pytest.raises(IntegrityError, match="adapter_config.json"):
        _load(path)


def test_renamed_or_added_tensor_with_digests_kept_fails(adapter):
    _rewrite_tensors(adapter, keep_digests=True, **{"base_model/model/lin2/lora_A/weight": torch.zeros(RANK, D_IN),
                                                    "base_model/model/lin2/lora_B/weight": torch.zeros(D_OUT, RANK)})
    with pytest.raises(IntegrityError, match="tensors differ from the recorded digests.*lin2"):
        _load(adapter)


@pytest.mark.parametrize("record", ["{not json", "[]", json.dumps({"tensors": {"x": 1}, "config": "0"}), "1" * 10])
def test_malformed_digest_record_is_an_integrity_error(adapter, record):
    file = adapter / "adapter_model.safetensors"
    save_file(load_file(str(file)), str(file), metadata={"format": "pt", DIGEST_METADATA_KEY: record})
    with pytest.raises(IntegrityError, match="is not a digest record"):
        _load(adapter)
    assert sorted(_load(adapter, verify=False).parts) == ["lin"]


def test_digest_record_under_a_damaged_key_is_not_skipped(adapter):
    file = adapter / "adapter_model.safetensors"
    with safe_open(str(file), framework="pt") as fh:
        record = fh.metadata()[DIGEST_METADATA_KEY]
    save_file(load_file(str(file)), str(file), metadata={"format": "pt", "deltat[ne.digests": record})
    with pytest.raises(IntegrityError, match=r"'deltat\[ne\.digests' looks like a damaged"):
        _load(adapter)


def test_peft_written_adapter_without_digest_loads(peft_adapter):
    with safe_open(str(peft_adapter / "adapter_model.safetensors"), framework="pt") as fh:
        assert DIGEST_METADATA_KEY not in (fh.metadata() or {})
    delta = _load(peft_adapter, model=Tiny())
    assert delta.parts["lin"].rank == RANK and delta.parts["lin"].scale == pytest.approx(2 / RANK)


# --------------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------------
def test_export_refuses_non_finite_values_and_scales(tmp_path):
    delta = _delta()
    with torch.no_grad():
        delta.parts["lin"].lora_B[0, 0] = math.nan
    with pytest.raises(NonFiniteError, match=r"lora_B\.weight'"):
        export_peft(delta, tmp_path / "nan")
    assert not (tmp_path / "nan").exists()
    delta = _delta()
    delta.parts["lin"].scale = math.inf
    with pytest.raises(NonFiniteError, match="part 'lin' has scale inf"):
        export_peft(delta, tmp_path / "inf")
    delta = _delta()
    delta.parts["lin"].scale = 1e308  # finite, but α = s·r overflows
    with pytest.raises(NonFiniteError, match="part 'lin' has scale 1e.308 .lora_alpha inf"):
        export_peft(delta, tmp_path / "big")
    delta = Delta(method="lora", config={"dropout": "high"}, parts=_delta().parts)
    with pytest.raises(DeltaFormatError, match="delta config field 'dropout' must be a number"):
        export_peft(delta, tmp_path / "drop")
    assert not any((tmp_path / n).exists() for n in ("inf", "big", "drop"))


def test_export_refuses_a_foreign_directory_unless_overwrite(tmp_path):
    out = tmp_path / "v"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputExists, match="notes.txt"):
        export_peft(_delta(), out)
    assert (out / "notes.txt").read_text() == "mine"
    export_peft(_delta(), out, overwrite=True)
    assert not (out / "notes.txt").exists()
    export_peft(_delta(seed=3), out)  # an earlier PEFT export is replaced without overwrite
    assert torch.equal(_load(out).parts["lin"].lora_A, _delta(seed=3).parts["lin"].lora_A)


def _task_delta(seed: int) -> Delta:
    """A LoRA delta on the tiny BERT with a trained classifier head, for task ``task{seed}``."""
    from conftest import tiny_bert

    from deltatune import LoRAConfig, attach, detach
    from deltatune.provenance import Provenance

    model = tiny_bert()
    delta = attach(model, LoRAConfig(r=2, alpha=4, targets=["query", "value"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for part in delta.parts.values():
            part.lora_B.copy_(torch.randn(part.lora_B.shape, generator=g) * 0.1)
        model.classifier.weight.copy_(torch.randn(model.classifier.weight.shape, generator=g))
    delta.snapshot_heads(model)
    delta.provenance = Provenance(operation="train", task={"name": f"task{seed}", "num_labels": 3})
    detach(model)
    return delta


def test_export_of_a_merge_keeping_several_tasks_heads_is_refused(tmp_path):
    """PEFT's ``modules_to_save`` holds one head per module: the ``classifier@task`` heads were silently dropped
    (PEFT loaded the base classifier).  Refused like every single-task path; one task's view exports its head."""
    from conftest import tiny_bert

    from deltatune.algebra.engine import merge
    from deltatune.algebra.task_heads import for_task
    from deltatune.errors import ConfigError

    merged = merge([_task_delta(0), _task_delta(1)], "task_arithmetic", output="lowrank", rank=4)
    assert sorted(merged.heads) == ["classifier@input0", "classifier@input1"]
    with pytest.raises(ConfigError, match=r"export to PEFT .*\(input0, input1\).*for_task"):
        export_peft(merged, tmp_path / "both")
    assert not (tmp_path / "both").exists()
    peft = pytest.importorskip("peft")
    view = for_task(merged, "input1")
    loaded = peft.PeftModel.from_pretrained(tiny_bert(), str(export_peft(view, tmp_path / "one")))
    head = loaded.base_model.model.classifier.modules_to_save["default"].weight
    assert torch.equal(head, view.heads["classifier"]["weight"])
