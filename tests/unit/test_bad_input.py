"""Bad input fails loudly with the specific typed error, and the message names the culprit.

Wrong base model, unmatched targets, shape/dtype mismatches, damaged delta files and manifests, bad
config values, a diverging loss and failures in the middle of an atomic save.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_bert, tiny_inputs
from safetensors.torch import load_file, save_file

import deltatune
import deltatune.io.delta_format as delta_format
import deltatune.io.shards as shards
from deltatune.delta import Delta
from deltatune.errors import (
    ConfigError,
    DeltaFormatError,
    FingerprintMismatch,
    ShapeMismatch,
    TargetError,
    TrainingDiverged,
)
from deltatune.fingerprint import base_parameters
from deltatune.layer import DeltaLayer
from deltatune.methods.lora import LoRA
from deltatune.methods.registry import TrainHook
from deltatune.model import attach_parts
from deltatune.parts import LoRAPart
from deltatune.train.checkpoint import load_checkpoint
from deltatune.train.config import TrainConfig
from deltatune.train.loop import train

QUERY0 = "bert.encoder.layer.0.attention.self.query"

pytestmark = pytest.mark.usefixtures("one_thread")




def lora_delta(model: torch.nn.Module, seed: int = 0) -> Delta:
    """A LoRA delta on ``query`` with non-zero tensors (so that overwriting it is observable)."""
    delta = deltatune.attach(model, deltatune.LoRAConfig(r=2, targets=["query"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for part in delta.parts.values():
            part.lora_B.copy_(torch.randn(part.lora_B.shape, generator=g))
    return delta


@pytest.fixture
def saved(minilm, tmp_path) -> Path:
    return deltatune.save_delta(lora_delta(minilm), tmp_path / "delta")


def copy_of(path: Path, name: str) -> Path:
    return Path(shutil.copytree(path, path.parent / name))


def same_delta(a: Delta, b: Delta) -> bool:
    return (set(a.parts) == set(b.parts)
            and all(torch.equal(x, y) for n in a.parts
                    for x, y in zip(a.parts[n].state().values(), b.parts[n].state().values(), strict=True))
            and all(torch.equal(a.heads[h][k], b.heads[h][k]) for h in a.heads for k in a.heads[h]))


# --------------------------------------------------------------------------------------------------
# wrong base model
# --------------------------------------------------------------------------------------------------
def test_delta_on_another_architecture_is_refused(minilm, saved) -> None:
    delta = deltatune.load_delta(saved)
    other = tiny_bert()
    with pytest.raises(FingerprintMismatch) as err:
        deltatune.apply_delta(other, delta, where=str(saved))
    msg = str(err.value)
    assert str(saved) in msg
    assert "the architecture differs" in msg
    assert "num_params" in msg and "shapes" in msg
    assert "force=True" in msg
    assert not any(isinstance(m, DeltaLayer) for m in other.modules()), "nothing may be attached on refusal"


def test_delta_on_same_architecture_other_weights(minilm) -> None:
    other = copy.deepcopy(minilm)
    delta = lora_delta(minilm)
    # perturb a single scalar of the other copy; the fingerprint samples the leading values of evenly
    # spaced tensors in name order, starting with the first one
    name, p = sorted(base_parameters(other, delta.heads), key=lambda item: item[0])[0]
    with torch.no_grad():
        p.view(-1)[0] += 0.5
    with pytest.raises(FingerprintMismatch) as err:
        deltatune.apply_delta(other, delta)
    msg = str(err.value)
    assert "the weights differ" in msg
    assert "values" in msg
    assert "architecture differs" not in msg
    assert "num_params" not in msg and "shapes:" not in msg

    deltatune.apply_delta(other, delta, force=True)
    wrapped = {n for n, m in other.named_modules() if isinstance(m, DeltaLayer)}
    assert wrapped == set(delta.parts) | set(delta.heads)  # heads attach as routable parts
    head = other.classifier.parts["default"].tensors()
    assert torch.equal(head["weight"], delta.heads["classifier"]["weight"])
    assert dict(base_parameters(other, delta.heads))[name] is p  # the base itself is not touched


# --------------------------------------------------------------------------------------------------
# targets and shapes
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [
    deltatune.LoRAConfig(targets=["q_proj"]),
    deltatune.LoRAConfig(targets=["query", "q_proj"]),
    deltatune.SparseConfig(targets=["q_proj"], regrow=False),
    deltatune.FullConfig(targets=["q_proj"]),
], ids=["lora", "lora-one-of-two", "sparse", "full"])
def test_target_matching_nothing(minilm, config) -> None:
    with pytest.raises(TargetError) as err:
        deltatune.attach(minilm, config)
    msg = str(err.value)
    assert "'q_proj'" in msg
    assert "query" in msg and "value" in msg  # lists what is available
    assert not any(isinstance(m, DeltaLayer) for m in minilm.modules())


def test_lora_part_with_wrong_in_features(minilm, tmp_path) -> None:
    part = LoRAPart(in_features=100, out_features=384, rank=2, scale=1.0)
    with pytest.raises(ShapeMismatch) as err:
        attach_parts(minilm, {QUERY0: part})
    assert QUERY0 in str(err.value)
    assert "100" in str(err.value) and "384" in str(err.value)

    # the same part through a saved delta, attached or merged
    path = deltatune.save_delta(Delta("lora", {}, {QUERY0: part}), tmp_path / "bad")
    loaded = deltatune.load_delta(path)
    with pytest.raises(ShapeMismatch, match=QUERY0.replace(".", r"\.")):
        deltatune.apply_delta(minilm, loaded)
    with pytest.raises(ShapeMismatch, match=QUERY0.replace(".", r"\.")):
        deltatune.apply_delta(minilm, loaded, merge=True)
    assert not any(isinstance(m, DeltaLayer) for m in minilm.modules())


def test_part_for_a_missing_module(minilm) -> None:
    part = LoRAPart(in_features=384, out_features=384, rank=2, scale=1.0)
    with pytest.raises(TargetError, match="no_such_module"):
        attach_parts(minilm, {"bert.no_such_module": part})


def test_head_of_another_shape(minilm, tmp_path) -> None:
    small = tiny_bert()
    delta = deltatune.attach(small, deltatune.LoRAConfig(r=2, targets=["query"]))
    with pytest.raises(ShapeMismatch) as err:
        deltatune.apply_delta(minilm, delta, force=True)
    assert "classifier.weight" in str(err.value)


def test_head_of_another_dtype(tmp_path) -> None:
    """A head tensor of another dtype class (an int16 classifier weight on an fp32 model) is refused, naming the
    head, the tensor and both dtypes, by every consumer before the model changes: attach, merge.  A float head of
    another precision (saved in fp16, applied to the fp32 base) is cast: attached it computes, alone and in a
    mixed batch, what the merged (loaded) head computes, instead of failing in the first forward."""
    delta = lora_delta(tiny_bert())
    own = {k: v.clone() for k, v in delta.heads["classifier"].items()}
    inputs = {k: v for k, v in tiny_inputs("bert").items() if k != "labels"}

    delta.heads = {"classifier": {**own, "weight": (own["weight"] * 1000).to(torch.int16)}}
    for consume in (deltatune.apply_delta, deltatune.merge_delta):
        model = tiny_bert()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(ShapeMismatch, match=r"head tensor classifier\.weight has dtype torch\.int16, model has "
                                                r"torch\.float32.*'classifier'.*floating-point"):
            consume(model, delta, where="sst2-delta")
        assert not any(isinstance(m, DeltaLayer) for m in model.modules())
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    delta.heads = {"classifier": {k: (torch.randn_like(v) if k == "weight" else v).half() for k, v in own.items()}}
    delta.save(tmp_path / "half")
    loaded = deltatune.load_delta(tmp_path / "half")
    assert loaded.heads["classifier"]["weight"].dtype == torch.float16
    attached, merged = tiny_bert(), tiny_bert()
    deltatune.apply_delta(attached, loaded, name="sst2")
    deltatune.merge_delta(merged, loaded)
    routed = attached.classifier.parts["sst2"].tensors()
    assert {t.dtype for t in routed.values()} == {torch.float32}
    with torch.no_grad():
        want = merged(**inputs).logits
        assert torch.allclose(attached(**inputs).logits, want, atol=1e-5)
        with deltatune.mixed_batch(attached, ["sst2", None, "sst2"]):
            mixed = attached(**inputs).logits
    assert torch.allclose(mixed[[0, 2]], want[[0, 2]], atol=1e-5)


# --------------------------------------------------------------------------------------------------
# damaged tensor files
# --------------------------------------------------------------------------------------------------
def test_dtype_differs_from_manifest(saved) -> None:
    tensors = load_file(saved / "parts.safetensors")
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].half()
    save_file(tensors, str(saved / "parts.safetensors"), metadata={"format": "deltatune.delta"})
    with pytest.raises(ShapeMismatch) as err:
        deltatune.load_delta(saved)
    assert isinstance(err.value, DeltaFormatError)
    msg = str(err.value)
    assert key in msg
    assert "float16" in msg and "float32" in msg
    assert str(saved / "parts.safetensors") in msg


def test_shape_differs_from_manifest(saved) -> None:
    tensors = load_file(saved / "parts.safetensors")
    key = sorted(tensors)[0]
    tensors[key] = torch.cat([tensors[key], tensors[key]])
    save_file(tensors, str(saved / "parts.safetensors"))
    with pytest.raises(ShapeMismatch, match=key.replace(".", r"\.")):
        deltatune.load_delta(saved)


def _truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _garbage(data: bytes) -> bytes:
    return bytes((i * 131 + 17) % 256 for i in range(len(data)))


@pytest.mark.parametrize("damage", [_truncate, _garbage, lambda data: b""],
                         ids=["truncated", "garbage", "empty"])
@pytest.mark.parametrize("file", ["parts.safetensors", "heads.safetensors"])
def test_damaged_safetensors(saved, file: str, damage: Callable[[bytes], bytes]) -> None:
    target = saved / file
    target.write_bytes(damage(target.read_bytes()))
    with pytest.raises(DeltaFormatError) as err:
        deltatune.load_delta(saved)
    assert str(target) in str(err.value)


def test_missing_tensor_file(saved) -> None:
    (saved / "heads.safetensors").unlink()
    with pytest.raises(DeltaFormatError, match="heads.safetensors"):
        deltatune.load_delta(saved)


# --------------------------------------------------------------------------------------------------
# damaged manifests
# --------------------------------------------------------------------------------------------------
def _first_part(m: dict[str, Any]) -> dict[str, Any]:
    return m["parts"][sorted(m["parts"])[0]]


MANIFEST_CASES: list[tuple[str, Callable[[dict[str, Any]], Any], list[str], str | None]] = [
    ("missing-field", lambda m: m.pop("method"), ["missing field", "'method'"], None),
    ("unknown-field", lambda m: m.update(colour="red"), ["unknown field", "'colour'"], None),
    ("newer-version", lambda m: m.update(format_version=2), ["format_version", "2"], None),
    ("version-not-int", lambda m: m.update(format_version="1"), ["'format_version'"], None),
    ("wrong-format", lambda m: m.update(format="peft"), ["'format'", "'peft'"], None),
    ("unknown-kind", lambda m: _first_part(m).update(kind="vera"), ["unknown kind", "'vera'", QUERY0], None),
    ("part-extra-field", lambda m: _first_part(m).update(extra=1), [QUERY0, "kind"], None),
    ("meta-incomplete", lambda m: _first_part(m)["meta"].pop("rank"), [QUERY0, "rank"], None),
    ("parts-not-object", lambda m: m.update(parts=[]), ["'parts'"], None),
    ("heads-not-object", lambda m: m.update(heads=[]), ["'heads'"], None),
    ("tensors-null", lambda m: _first_part(m).update(tensors=None), [QUERY0, "tensors"], None),
    ("bad-layer-kind", lambda m: _first_part(m)["meta"].update(layer="conv9"), [QUERY0, "conv9"], None),
]


@pytest.mark.parametrize(("mutate", "expected"), [
    pytest.param(mutate, expected, id=cid, marks=[pytest.mark.xfail(strict=True, reason=bug)] if bug else [])
    for cid, mutate, expected, bug in MANIFEST_CASES
])
def test_bad_manifest(saved, mutate, expected: list[str]) -> None:
    file = saved / "manifest.json"
    manifest = json.loads(file.read_text())
    mutate(manifest)
    file.write_text(json.dumps(manifest))
    with pytest.raises(DeltaFormatError) as err:
        deltatune.load_delta(saved)
    msg = str(err.value)
    assert str(file) in msg
    for text in expected:
        assert text in msg


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "\xff\xfe"],
                         ids=["syntax", "not-an-object", "binary"])
def test_manifest_not_json(saved, text: str) -> None:
    file = saved / "manifest.json"
    file.write_bytes(text.encode("latin-1"))
    with pytest.raises(DeltaFormatError) as err:
        deltatune.load_delta(saved)
    assert str(file) in str(err.value)


def test_not_a_delta_directory(tmp_path) -> None:
    with pytest.raises(DeltaFormatError, match="nowhere"):
        deltatune.load_delta(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DeltaFormatError, match="manifest.json"):
        deltatune.load_delta(tmp_path / "empty")


# --------------------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------------------
def test_unknown_config_field_lists_valid_ones() -> None:
    with pytest.raises(ConfigError) as err:
        deltatune.make_config("lora", {"rank": 4})
    msg = str(err.value)
    assert "'rank'" in msg
    for valid in ("'r'", "'alpha'", "'dropout'", "'targets'", "'rslora'"):
        assert valid in msg


@pytest.mark.parametrize(("method", "mapping", "field"), [
    ("sparse", {"density": 0}, "density"),
    ("sparse", {"density": 1.5}, "density"),
    ("sparse", {"density": "0"}, "density"),
    ("sparse", {"num_tunable": 0}, "num_tunable"),
    ("lora", {"r": 0}, "r"),
    ("lora", {"dropout": 1.0}, "dropout"),
    ("lora", {"alpha": -1}, "alpha"),
    ("lora", {"r": "abc"}, "r"),
    ("lora", {"r": 2.5}, "r"),
    ("lora", {"rslora": "maybe"}, "rslora"),
    ("lora", {"init": "xavier"}, "init"),
    ("sparse", {"num_tunable": "many"}, "num_tunable"),
    ("sparse", {"schedule": "exp"}, "schedule"),
], ids=lambda v: str(v) if not isinstance(v, dict) else "-".join(f"{k}={x}" for k, x in v.items()))
def test_bad_config_value(method: str, mapping: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as err:
        deltatune.make_config(method, mapping)
    assert f"config.{field}" in str(err.value)


def test_unknown_method() -> None:
    with pytest.raises(ConfigError, match="'vera'") as err:
        deltatune.make_config("vera", {})
    assert "lora" in str(err.value)


def test_string_values_are_coerced() -> None:
    cfg = deltatune.make_config("lora", {"r": "4", "rslora": "true", "targets": "query,value"})
    assert (cfg.r, cfg.rslora, cfg.targets) == (4, True, ["query", "value"])


# --------------------------------------------------------------------------------------------------
# NaN / Inf loss
# --------------------------------------------------------------------------------------------------
class _Poison(TrainHook):
    """Fill one LoRA tensor with NaN, before the micro-batches of a step or after a step."""

    def __init__(self, delta: Delta, when: str, at: int) -> None:
        self.delta, self.when, self.at = delta, when, at

    def _poison(self) -> None:
        part = self.delta.parts[sorted(self.delta.parts)[0]]
        with torch.no_grad():
            part.lora_A.fill_(float("nan"))

    def before_step(self, step: int) -> None:
        if self.when == "before" and step == self.at:
            self._poison()

    def after_step(self, step: int) -> None:
        if self.when == "after" and step == self.at:
            self._poison()


def _diverging_run(monkeypatch, out: Path, minilm_path: str, data_dir, when: str, at: int,
                   max_steps: int) -> TrainingDiverged:
    monkeypatch.setattr(LoRA, "hooks", lambda self, model, delta, *args, **kw: [_Poison(delta, when, at)])
    cfg = TrainConfig(model=minilm_path, data=str(data_dir), out_dir=str(out), max_steps=max_steps,
                      checkpoint_every=2, train_limit=64, eval_limit=16, eval_every=0, eval_before=False,
                      max_length=16, batch_size=8, progress=False)
    with pytest.raises(TrainingDiverged) as err:
        train(cfg, deltatune.LoRAConfig(r=2, targets=["query"]))
    return err.value


def _trainable_tensors(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state["trainable"].items() if v.is_floating_point()}


def test_nan_loss_raises_and_keeps_last_good_checkpoint(monkeypatch, tmp_path, minilm_path, data_dir) -> None:
    # steps 1..4 are healthy (checkpoints after 2 and 4); the loss is NaN from step 5 on
    out = tmp_path / "run"
    exc = _diverging_run(monkeypatch, out, minilm_path, data_dir, "before", 4, max_steps=6)
    assert exc.step == 5
    assert exc.loss != exc.loss  # NaN
    assert exc.checkpoint == str(out / "checkpoint")
    assert str(out / "checkpoint") in str(exc)
    assert "step 5" in str(exc)
    assert (out / "checkpoint").is_dir()
    state = load_checkpoint(out / "checkpoint")
    assert state["step"] == 4
    tensors = _trainable_tensors(state)
    assert any("lora_A" in k for k in tensors) and any("classifier" in k for k in tensors)
    assert all(bool(torch.isfinite(t).all()) for t in tensors.values())
    assert not (out / "delta").exists()
    assert not list(out.glob(".checkpoint.tmp-*"))


def test_checkpoint_named_by_divergence_is_finite(monkeypatch, tmp_path, minilm_path, data_dir) -> None:
    out = tmp_path / "run"
    exc = _diverging_run(monkeypatch, out, minilm_path, data_dir, "after", 2, max_steps=4)
    if exc.checkpoint is not None:
        state = load_checkpoint(Path(exc.checkpoint))
        assert all(bool(torch.isfinite(t).all()) for t in _trainable_tensors(state).values())


# --------------------------------------------------------------------------------------------------
# atomic writes
# --------------------------------------------------------------------------------------------------
def _fail_on_call(real: Callable[..., Any], n: int) -> Callable[..., Any]:
    calls = {"n": 0}

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == n:
            raise OSError("disk full")
        return real(*args, **kwargs)

    return wrapper


def _leftovers(parent: Path, name: str) -> list[Path]:
    return sorted(parent.glob(f".{name}.tmp-*")) + sorted(parent.glob(f".{name}.old-*"))


def test_failed_save_keeps_previous_delta(minilm, tmp_path, monkeypatch) -> None:
    base_copy = copy.deepcopy(minilm)
    target = tmp_path / "delta"
    first = lora_delta(minilm, seed=1)
    deltatune.save_delta(first, target)
    files_before = {p.name: p.read_bytes() for p in target.iterdir()}
    second = lora_delta(base_copy, seed=2)
    assert not same_delta(first, second)

    monkeypatch.setattr(delta_format, "save_file", _fail_on_call(delta_format.save_file, 2))
    with pytest.raises(OSError, match="disk full"):
        deltatune.save_delta(second, target)

    assert {p.name: p.read_bytes() for p in target.iterdir()} == files_before
    assert same_delta(deltatune.load_delta(target), first)
    assert not _leftovers(tmp_path, "delta")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["delta"]


def test_failed_first_save_leaves_nothing(minilm, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(delta_format, "save_file", _fail_on_call(delta_format.save_file, 2))
    with pytest.raises(OSError, match="disk full"):
        deltatune.save_delta(lora_delta(minilm), tmp_path / "delta")
    assert list(tmp_path.iterdir()) == []


def _tensors(seed: int) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(f"layer.{i}.weight", torch.randn(100, generator=g)) for i in range(4)]


def _failing_iter(items: list[tuple[str, torch.Tensor]], at: int):
    for i, item in enumerate(items):
        if i == at:
            raise OSError("disk full")
        yield item


@pytest.mark.parametrize("how", ["save_file", "source"])
@pytest.mark.parametrize("previous", [False, True], ids=["fresh", "over-previous"])
def test_failed_sharded_write(tmp_path, monkeypatch, how: str, previous: bool) -> None:
    out = tmp_path / "ckpt"
    limit = 500  # one 400-byte tensor per shard
    before: dict[str, bytes] | None = None
    if previous:
        names = shards.write_sharded(out, _tensors(1), limit, [("config.json", b"{}")])
        assert len(names) == 4 and (out / shards.INDEX).is_file()
        before = {p.name: p.read_bytes() for p in out.iterdir()}

    if how == "save_file":
        monkeypatch.setattr(shards, "save_file", _fail_on_call(shards.save_file, 2))
        source: Any = _tensors(2)
    else:
        source = _failing_iter(_tensors(2), 3)
    with pytest.raises(OSError, match="disk full"):
        shards.write_sharded(out, source, limit, [("config.json", b'{"new": 1}')])

    if previous:
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
        loaded = {}
        for name in sorted(set(json.loads((out / shards.INDEX).read_text())["weight_map"].values())):
            loaded.update(load_file(out / name))
        assert all(torch.equal(loaded[k], v) for k, v in _tensors(1))
    else:
        assert not out.exists()
    assert not _leftovers(tmp_path, "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == (["ckpt"] if previous else [])
