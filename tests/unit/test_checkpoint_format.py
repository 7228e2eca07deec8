"""Training checkpoints: safetensors + JSON (no pickle), digests checked on load, old pickles refused."""

from __future__ import annotations

import json
import math
import os
import pickle
import random
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import deltatune
from deltatune.errors import DeltaFormatError, IntegrityError, NonFiniteError, OutputExists
from deltatune.io.outputs import read_marker
from deltatune.methods.sparse_optim import SparseAdamW
from deltatune.train import checkpoint as ckpt
from deltatune.train.config import TrainConfig
from deltatune.train.loop import train
from deltatune.train.state_codec import decode, encode

pytestmark = pytest.mark.usefixtures("one_thread")


def same(a: Any, b: Any) -> bool:
    """Equal values of identical types, recursively (tensors: dtype, shape and bits; NaN equals NaN)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        bits = [t.reshape(-1).view(torch.uint8) for t in (a, b)]
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(*bits)
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return list(a) == list(b) and all(type(k) is type(j) for k, j in zip(a, b, strict=True)) and \
            all(same(a[k], b[k]) for k in a)
    return a == b


def roundtrip(obj: Any) -> Any:
    tree, tensors = encode(obj, where="test")
    text = json.dumps(tree, allow_nan=False)  # standard JSON: no NaN/Infinity literals
    return decode(json.loads(text), tensors, where="test")


# --------------------------------------------------------------------------------------------------
# codec
# --------------------------------------------------------------------------------------------------
def test_codec_round_trips_nested_state_with_types() -> None:
    g = torch.Generator().manual_seed(0)
    obj = {
        "ints_as_keys": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(4, 3, generator=g)}, 7: [1, 2]},
        "mixed_keys": {1.5: "f", True: None, None: 0, (1, "a"): 2, "s": 3},
        "tuples": (0.9, 0.999, (1, (2, [3, (4,)]))),
        "empty": ((), [], {}),
        "scalars": [None, True, False, 0, -(2**70), 1e-300, "päth/with.dots", math.inf, -math.inf, math.nan],
        "dtypes": {str(dt): (torch.arange(6) % 3).to(dt).reshape(2, 3)
                   for dt in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
                              torch.int32, torch.int8, torch.uint8, torch.bool)},
        "zero_dim": torch.tensor(7, dtype=torch.int64),
        "empty_tensor": torch.zeros(0, 5),
        "view": torch.arange(10.0)[2:5],  # part of a larger storage
        "shared": [torch.ones(3)] * 2,  # same tensor twice
        "numpy": np.random.RandomState(3).get_state(),
        "np_arrays": [np.arange(5, dtype=np.uint32), np.ones((2, 2), dtype=">f8"), np.array(True)],
        "python_random": random.Random(5).getstate(),
        "marker_like": {"__tuple__": [1]},  # a plain dict whose only key looks like a marker
    }
    back = roundtrip(obj)
    assert same(back, obj)
    rng = random.Random()
    rng.setstate(back["python_random"])  # needs the nested tuples back
    assert rng.random() == random.Random(5).random()
    np_rng = np.random.RandomState()
    np_rng.set_state(back["numpy"])
    assert np_rng.randint(1 << 30) == np.random.RandomState(3).randint(1 << 30)


def test_codec_numpy_scalars_become_python_numbers() -> None:
    back = roundtrip({"a": np.float64(0.25), "b": np.int32(-3), "c": np.bool_(True)})
    assert back == {"a": 0.25, "b": -3, "c": True}
    assert [type(v) for v in back.values()] == [float, int, bool]


@pytest.mark.parametrize("bad, where", [
    ({"hook": {"fn": lambda x: x}}, "hook/fn"),
    ({"s": {1, 2}}, "s"),
    ({"k": {frozenset(): 1}}, "k"),
    ([torch.zeros(2).to_sparse()], "0"),
    ({"o": np.array([object()], dtype=object)}, "o"),
    ({"path": Path("/x")}, "path"),
])
def test_codec_refuses_other_types_at_save(bad: Any, where: str) -> None:
    with pytest.raises(DeltaFormatError, match=f"out/ckpt: {where} "):
        encode(bad, where="out/ckpt")


_T = {"t": torch.zeros(2)}


@pytest.mark.parametrize("tree, tensors, what", [
    ({"x": {"__tensor__": "nope"}}, _T, "x refers to tensor 'nope'"),
    ({"x": {"__float__": "1e999"}}, {}, "x has __float__"),
    ({"x": {"__dict__": [[[1], 2]]}}, {}, "x has an unhashable dict key"),
    ({"x": {"__dict__": [1, 2]}}, {}, "x has a malformed __dict__"),
    ({"x": {"__tuple__": {"a": 1}}}, {}, "x has __tuple__ of type dict"),
    ({"x": {"__ndarray__": {"ref": "t", "dtype": "O", "shape": [2]}}}, _T, "x has numpy dtype 'O'"),
    ({"x": {"__ndarray__": {"ref": "t", "dtype": "<u4", "shape": [2]}}}, _T, "x holds 2 bytes of torch.float32"),
    ({"x": {"__tensor__": "t"}}, {**_T, "u": torch.zeros(1)}, "does not refer to: \\['u'\\]"),
])
def test_codec_refuses_malformed_trees(tree: Any, tensors: dict[str, torch.Tensor], what: str) -> None:
    with pytest.raises(DeltaFormatError, match=f"^ck: .*{what}"):
        decode(tree, tensors, where="ck")


# --------------------------------------------------------------------------------------------------
# checkpoint files
# --------------------------------------------------------------------------------------------------
def _payload(optimizer: torch.optim.Optimizer, scheduler: Any, params: list[torch.nn.Parameter]) -> dict[str, Any]:
    return {"trainable": {f"p{i}": p.detach().clone() for i, p in enumerate(params)},
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "hooks": [{"windows": None, "events": [{"step": 2, "rate": 0.5, "moved": 3}]}], "step": 3, "epoch": 1,
            "offset": 2, "before": {"accuracy": 0.5}, "best": {"loss": math.nan, "step": 2},
            "history": [{"step": 1, "loss": 0.7, "lr": 1e-3}], "rng": [ckpt.rng_state()]}


def _train_steps(optimizer: torch.optim.Optimizer, scheduler: Any, params: list[torch.nn.Parameter], n: int,
                 seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        optimizer.step()
        scheduler.step()


@pytest.mark.parametrize("opt_cls", [torch.optim.AdamW, SparseAdamW])
def test_optimizer_state_round_trips_and_resumes_exactly(tmp_path: Path, opt_cls: type) -> None:
    def fresh() -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer, Any]:
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
        opt = opt_cls([{"params": params[:1]}, {"params": params[1:], "lr": 3e-3}], lr=1e-3, weight_decay=0.01)
        return params, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + s))

    params, opt, sched = fresh()
    _train_steps(opt, sched, params, 3, seed=1)
    ckpt.save_checkpoint(tmp_path / "checkpoint", _payload(opt, sched, params))
    state = ckpt.load_checkpoint(tmp_path / "checkpoint")
    assert same(state["optimizer"], opt.state_dict())
    assert same(state["scheduler"], sched.state_dict())
    assert math.isnan(state["best"]["loss"]) and state["step"] == 3

    params2, opt2, sched2 = fresh()
    with torch.no_grad():
        for p, name in zip(params2, ("p0", "p1"), strict=True):
            p.copy_(state["trainable"][name])
    opt2.load_state_dict(state["optimizer"])
    sched2.load_state_dict(state["scheduler"])
    _train_steps(opt, sched, params, 2, seed=2)
    _train_steps(opt2, sched2, params2, 2, seed=2)
    for a, b in zip(params, params2, strict=True):
        assert torch.equal(a, b)


def test_rng_states_resume_exactly(tmp_path: Path) -> None:
    torch.manual_seed(4)
    random.seed(4)
    np.random.seed(4)
    params, opt = [torch.nn.Parameter(torch.zeros(1))], None
    opt = torch.optim.SGD(params, lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ckpt.save_checkpoint(tmp_path / "c", _payload(opt, sched, params))
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    ckpt.set_rng_state(ckpt.load_checkpoint(tmp_path / "c")["rng"][0], tmp_path / "c")
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    opt = torch.optim.AdamW(params, lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    _train_steps(opt, sched, params, 2, seed=0)
    path = tmp_path / "run" / "checkpoint"
    ckpt.save_checkpoint(path, _payload(opt, sched, params))
    return path


def test_checkpoint_holds_no_pickle(saved: Path) -> None:
    names = sorted(p.name for p in saved.iterdir())
    assert names == sorted([ckpt.STATE_FILE, ckpt.TENSOR_FILE, ".deltatune-output.json"])
    assert read_marker(saved)["kind"] == "train_checkpoint"
    doc = json.loads((saved / ckpt.STATE_FILE).read_text())
    assert doc["format"] == ckpt.FORMAT and set(doc["digests"]["tensors"]) >= {"trainable/p0", "rng/0/torch"}


def _flip_tensor_byte(file: Path, name: str) -> None:
    raw = bytearray(file.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    start, end = json.loads(raw[8:8 + n])[name]["data_offsets"]
    assert end > start
    raw[8 + n + start] ^= 0x01
    file.write_bytes(bytes(raw))


@pytest.mark.parametrize("name", ["trainable/p1", "optimizer/state/0/exp_avg_sq", "rng/0/numpy/1"])
def test_flipped_tensor_bit_is_an_integrity_error_naming_it(saved: Path, name: str) -> None:
    _flip_tensor_byte(saved / ckpt.TENSOR_FILE, name)
    with pytest.raises(IntegrityError, match=f"tensors.safetensors: tensor '{name}' fails"):
        ckpt.load_checkpoint(saved)
    assert ckpt.load_checkpoint(saved, verify=False)["step"] == 3  # only the digest catches it


def test_edited_state_json_is_an_integrity_error(saved: Path) -> None:
    file = saved / ckpt.STATE_FILE
    doc = json.loads(file.read_text())
    doc["state"]["step"] = 4
    file.write_text(json.dumps(doc))
    with pytest.raises(IntegrityError, match="state.json: the state fails its SHA-256 check"):
        ckpt.load_checkpoint(saved)


@pytest.mark.parametrize("damage", ["nan", "garbage", "no_tensors", "extra_field", "version"])
def test_damaged_checkpoint_is_a_typed_error(saved: Path, damage: str) -> None:
    file = saved / ckpt.STATE_FILE
    doc = json.loads(file.read_text())
    if damage == "nan":
        file.write_text(file.read_text().replace('"format_version": 1', '"format_version": NaN'))
    elif damage == "garbage":
        file.write_bytes(b"\xff\xfe{")
    elif damage == "no_tensors":
        (saved / ckpt.TENSOR_FILE).unlink()
    elif damage == "extra_field":
        file.write_text(json.dumps({**doc, "x": 1}))
    else:
        file.write_text(json.dumps({**doc, "format_version": 2}))
    with pytest.raises(DeltaFormatError, match=str(saved)):
        ckpt.load_checkpoint(saved)


def test_non_finite_tensors_are_refused_at_save_and_load(saved: Path, tmp_path: Path) -> None:
    params = [torch.nn.Parameter(torch.zeros(2))]
    opt = torch.optim.SGD(params, lr=0.1)
    payload = _payload(opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), params)
    payload["hooks"] = [{"windows": {"q": {"grad_sum": torch.tensor([1.0, math.inf], dtype=torch.bfloat16)}}}]
    with pytest.raises(NonFiniteError, match="'hooks/0/windows/q/grad_sum': 1 of .* NaN"):
        ckpt.save_checkpoint(tmp_path / "bad", payload)
    assert not (tmp_path / "bad").exists()

    file = saved / ckpt.TENSOR_FILE
    raw = bytearray(file.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    start, _ = json.loads(raw[8:8 + n])["trainable/p0"]["data_offsets"]
    raw[8 + n + start:8 + n + start + 4] = struct.pack("<f", math.nan)
    file.write_bytes(bytes(raw))
    with pytest.raises(NonFiniteError, match="'trainable/p0': 1 of .* NaN"):
        ckpt.load_checkpoint(saved, verify=False)


def test_out_of_range_json_number_is_refused(saved: Path) -> None:
    file = saved / ckpt.STATE_FILE
    file.write_text(file.read_text().replace('"step": 3', '"step": 1e400'))
    with pytest.raises(NonFiniteError, match="number 1e400 overflows"):
        ckpt.load_checkpoint(saved, verify=False)


class _Planted:
    """A pickle that, when unpickled, creates the file ``path`` (stands in for arbitrary code)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_old_pickle_checkpoint_is_refused_without_running_it(tmp_path: Path) -> None:
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(_Planted(proof)))
    assert proof.exists()  # the payload is real: unpickling it runs code

    pwned = tmp_path / "pwned"
    folder = tmp_path / "run" / "checkpoint"
    folder.mkdir(parents=True)
    (folder / ckpt.LEGACY_FILE).write_bytes(pickle.dumps({"state": _Planted(pwned)}))
    with pytest.raises(DeltaFormatError, match="old pickle format.*not load|no longer loads"):
        ckpt.load_checkpoint(folder)
    assert not pwned.exists()


def test_missing_checkpoint_is_a_typed_error(tmp_path: Path) -> None:
    with pytest.raises(DeltaFormatError, match="no checkpoint to resume from"):
        ckpt.load_checkpoint(tmp_path / "nothing")


def _dead_pid() -> int:
    pid = 2**22 + 12345  # above the usual pid_max
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except OSError:
            pass
        pid += 1


def test_crash_between_the_swap_renames_keeps_the_previous_checkpoint(saved: Path) -> None:
    # the writer died after "checkpoint → .checkpoint.old-PID-*" and before ".tmp → checkpoint"
    dead = _dead_pid()
    os.replace(saved, saved.parent / f".checkpoint.old-{dead}-abcd")
    (saved.parent / f".checkpoint.tmp-{dead}-ef01").mkdir()
    state = ckpt.load_checkpoint(saved)
    assert state["step"] == 3
    assert sorted(p.name for p in saved.parent.iterdir()) == ["checkpoint"]


def test_checkpoint_refuses_to_replace_a_foreign_folder(tmp_path: Path) -> None:
    target = tmp_path / "checkpoint"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    params = [torch.nn.Parameter(torch.zeros(2))]
    opt = torch.optim.SGD(params, lr=0.1)
    payload = _payload(opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), params)
    with pytest.raises(OutputExists, match="notes.txt"):
        ckpt.save_checkpoint(target, payload)
    assert (target / "notes.txt").read_text() == "mine"


# --------------------------------------------------------------------------------------------------
# the training run folder
# --------------------------------------------------------------------------------------------------
def _cfg(out: Path, minilm_path: str, data_dir: Any, **kw: Any) -> TrainConfig:
    kw = {"max_steps": 2, **kw}
    return TrainConfig(model=minilm_path, data=str(data_dir), out_dir=str(out), checkpoint_every=1,
                       train_limit=32, eval_limit=8, eval_every=0, eval_before=False, max_length=16, batch_size=8,
                       progress=False, keep_best=False, **kw)


def test_train_refuses_a_foreign_out_dir_unless_overwrite(tmp_path: Path, minilm_path: str, data_dir: Any) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "thesis.tex").write_text("keep me")
    method = deltatune.LoRAConfig(r=2, targets=["query"])
    with pytest.raises(OutputExists, match="thesis.tex"):
        train(_cfg(out, minilm_path, data_dir), method)
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]

    train(_cfg(out, minilm_path, data_dir, overwrite=True), method)
    assert (out / "thesis.tex").read_text() == "keep me"
    assert read_marker(out)["kind"] == "train_run"
    assert (out / "delta").is_dir() and (out / "checkpoint").is_dir()
    assert json.loads((out / "history.json").read_text())[-1]["step"] == 2
    with pytest.raises(OutputExists, match="thesis.tex"):  # still foreign to a later run
        train(_cfg(out, minilm_path, data_dir), method)
    (out / "thesis.tex").unlink()
    train(_cfg(out, minilm_path, data_dir), method)  # an earlier run is replaced without --overwrite


def test_resume_from_an_old_pickle_checkpoint_is_refused(tmp_path: Path, minilm_path: str, data_dir: Any) -> None:
    pwned = tmp_path / "pwned"
    folder = tmp_path / "run" / "checkpoint"
    folder.mkdir(parents=True)
    (folder / ckpt.LEGACY_FILE).write_bytes(pickle.dumps(_Planted(pwned)))
    with pytest.raises(DeltaFormatError, match="old pickle format"):
        train(_cfg(tmp_path / "run", minilm_path, data_dir, resume=True), deltatune.LoRAConfig(r=2))
    assert not pwned.exists()


def test_resume_after_a_crash_mid_swap_is_exact(tmp_path: Path, minilm_path: str, data_dir: Any) -> None:
    out = tmp_path / "run"
    method = deltatune.SparseConfig(density=0.002, reselection_steps=2, accumulation_steps=1)
    full = train(_cfg(out, minilm_path, data_dir, max_steps=3), method)  # checkpoints after steps 1 and 2
    # as if the step-2 checkpoint write died between its renames, and the run with it
    os.replace(out / "checkpoint", out / f".checkpoint.old-{_dead_pid()}-0a1b")
    resumed = train(_cfg(out, minilm_path, data_dir, max_steps=3, resume=True), method)
    assert resumed.delta.metrics["digest"] == full.delta.metrics["digest"]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".checkpoint.")]


@pytest.mark.parametrize("python_state", [(3, (-1,) * 625, None), (3, (2**64,) * 625, None), ""],
                         ids=["negative-word", "word-too-large", "empty-string"])
def test_malformed_python_rng_state_is_a_format_error(tmp_path: Path, python_state) -> None:
    state = {"torch": torch.get_rng_state(), "python": python_state, "numpy": np.random.get_state()}
    with pytest.raises(DeltaFormatError, match="RNG state is malformed"):
        ckpt.set_rng_state(state, tmp_path / "c")



def test_check_parts_names_the_part_and_what_differs(tmp_path: Path) -> None:
    from conftest import tiny_llama

    delta = deltatune.attach(tiny_llama(0), deltatune.LoRAConfig(r=2, alpha=4.0, targets=["q_proj"]))
    record = ckpt.parts_record(delta)
    ckpt.check_parts(record, delta, tmp_path)
    ckpt.check_parts(None, delta, tmp_path)  # written before parts were recorded
    name = sorted(record)[0]
    cases = {"kind": ({"kind": "dora"}, "is a dora part in the checkpoint and a lora part now"),
             "meta": ({"meta": {**record[name]["meta"], "scale": 1.0}}, "was written with scale = 1.0 and is built "
                                                                         "with 2.0 now"),
             "other": ({"added_later": 1}, "is recorded as .* and built as")}
    for change, message in cases.values():
        with pytest.raises(DeltaFormatError, match=f"part '{name}' .*{message}"):
            ckpt.check_parts({**record, name: {**record[name], **change}}, delta, tmp_path)
    ckpt.check_parts({"not.a.part.now": {"kind": "lora"}, **record}, delta, tmp_path)  # not made (yet) here


def test_tensors_written_bound_are_read_as_delta_by_a_run_that_cannot_bind(tmp_path) -> None:
    # θ trained in the base's storage (bound) then; a launch that cannot bind (FSDP, DeepSpeed) now: Δθ = θ − θ₀
    from conftest import TINY_MODELS

    from deltatune.parts.spill import TensorSpill

    def setup():
        model = TINY_MODELS["llama"]()
        return model, deltatune.attach(model, deltatune.make_config("full", {}))

    model, delta = setup()
    spill = TensorSpill()
    for name, part in delta.parts.items():
        assert part.bind(deltatune.model.get_module(model, name), spill)
    with torch.no_grad():
        for p in delta.parts.values():
            for t in p.parameters():
                t.add_(0.01)  # "trained": θ = θ₀ + 0.01
    state, record = ckpt.trainable_state(model, delta), ckpt.bound_record(delta)
    assert sorted(record["parts"]) == sorted(delta.parts)
    other, fresh = setup()  # not bound
    ckpt.restore_trainable(other, state, tmp_path, fresh, set(record["parts"]))
    for part in fresh.parts.values():
        for t in part.parameters():
            assert torch.allclose(t, torch.full_like(t, 0.01), atol=1e-6)
    for part in delta.parts.values():
        part.unbind()
    spill.close()
