"""The one-read tensor loader of the delta format (:mod:`deltatune.io.tensor_file`, issue 11: loading a delta while
serving): digests over raw bytes equal the tensor digests, finiteness in one pass per run still names the bad
tensor, every dtype round-trips bit-exactly (misaligned offsets too), a file changed between the library's header
check and the read is refused, and the store's fast wrapper lookup finds what ``physical_path`` finds."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import deltatune.io.tensor_file as tensor_file
from deltatune.delta import Delta
from deltatune.errors import DeltaFormatError, IntegrityError, NonFiniteError, ShapeMismatch
from deltatune.io.delta_format import PARTS_FILE, _read_tensors, load_delta, save_delta
from deltatune.io.digest import bytes_digest, tensor_digest
from deltatune.parts import LoRAPart

pytestmark = pytest.mark.usefixtures("one_thread")

TENSORS = {
    "f32": torch.randn(3, 5, generator=torch.Generator().manual_seed(0)),
    "f64": torch.randn(4, dtype=torch.float64, generator=torch.Generator().manual_seed(1)),
    "f16": torch.randn(2, 3, generator=torch.Generator().manual_seed(2)).half(),
    "bf16": torch.randn(7, generator=torch.Generator().manual_seed(3)).bfloat16(),
    "i64": torch.tensor([1, -2, 3]),
    "i32": torch.tensor([[4, 5]], dtype=torch.int32),
    "u8": torch.tensor([1, 2, 250], dtype=torch.uint8),
    "flag": torch.tensor([True, False]),
    "scalar": torch.tensor(2.5),
    "empty": torch.zeros(0, 4),
}


def _spec(t: torch.Tensor) -> dict:
    return {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}


def _read(file: Path, tensors: dict[str, torch.Tensor], verify: bool = True) -> dict[str, torch.Tensor]:
    expected = {k: _spec(t) for k, t in tensors.items()}
    names = {k: f"parts/{k}" for k in tensors}
    digests = {f"parts/{k}": tensor_digest(f"parts/{k}", t) for k, t in tensors.items()} if verify else None
    return _read_tensors(file, expected, names, digests)


def _raw_file(path: Path, entries: list[tuple[str, str, list[int], bytes]]) -> Path:
    """A safetensors file written byte by byte (offsets in the given order, no alignment padding)."""
    header, data = {}, b""
    for name, dtype, shape, raw in entries:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def test_every_dtype_round_trips_bit_exactly_with_matching_digests(tmp_path) -> None:
    file = tmp_path / "t.safetensors"
    save_file(TENSORS, str(file))
    got = _read(file, TENSORS)  # verifies every digest: raw-byte digests equal tensor_digest
    assert set(got) == set(TENSORS)
    for k, t in TENSORS.items():
        assert got[k].dtype == t.dtype and got[k].shape == t.shape
        assert torch.equal(got[k].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), k


def test_raw_bytes_digest_is_the_tensor_digest() -> None:
    for k, t in TENSORS.items():
        raw = t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        assert bytes_digest(k, _spec(t)["dtype"], list(t.shape), raw) == tensor_digest(k, t), k


def test_tensors_are_writable_and_independent(tmp_path) -> None:
    file = tmp_path / "t.safetensors"
    save_file({"a": torch.ones(4), "b": torch.ones(4)}, str(file))
    got = _read(file, {"a": torch.ones(4), "b": torch.ones(4)})
    got["a"].mul_(3)
    assert torch.equal(got["a"], torch.full((4,), 3.0)) and torch.equal(got["b"], torch.ones(4))


def test_misaligned_offsets_are_read_correctly(tmp_path) -> None:
    """A 3-byte tensor first puts the float32 one at an offset that is not a multiple of 4."""
    f32 = torch.tensor([1.5, -2.0, 3.25])
    u8 = torch.tensor([7, 8, 9], dtype=torch.uint8)
    file = _raw_file(tmp_path / "m.safetensors", [("u8", "U8", [3], u8.numpy().tobytes()),
                                                  ("f32", "F32", [3], f32.numpy().tobytes())])
    got = _read(file, {"u8": u8, "f32": f32})
    assert torch.equal(got["f32"], f32) and torch.equal(got["u8"], u8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_fused_finiteness_names_the_bad_tensor_among_its_neighbours(tmp_path, dtype, bad) -> None:
    """Five adjacent tensors of one dtype are checked in one pass; the error still names the third and counts its
    bad values."""
    tensors = {f"t{i}": torch.randn(4, 3).to(dtype) for i in range(5)}
    tensors["t2"][1, 2] = bad
    tensors["t2"][3, 0] = bad
    file = tmp_path / "n.safetensors"
    save_file(tensors, str(file))
    with pytest.raises(NonFiniteError, match=r"tensor 't2': 2 of 12 values are NaN or ±Inf"):
        _read(file, tensors, verify=False)
    with pytest.raises(NonFiniteError, match="'t2'"):  # the stored digests match: finiteness still refuses it
        _read(file, tensors, verify=True)


def test_one_finiteness_pass_for_a_file_of_one_dtype(tmp_path, monkeypatch) -> None:
    calls = []
    real = tensor_file._run_finite
    monkeypatch.setattr(tensor_file, "_run_finite", lambda *a: calls.append(a) or real(*a))
    tensors = {f"t{i}": torch.randn(2, 2) for i in range(6)}
    file = tmp_path / "one.safetensors"
    save_file(tensors, str(file))
    _read(file, tensors)
    assert len(calls) == 1


def _lora_delta() -> Delta:
    g = torch.Generator().manual_seed(0)
    parts = {}
    for name in ("q", "k", "v"):
        part = LoRAPart(8, 6, 2, scale=0.5)
        with torch.no_grad():
            for p in part.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        parts[name] = part
    return Delta("lora", {"r": 2}, parts, fingerprint=None)


def _flip(file: Path, value_offset: int, value: float) -> None:
    """Overwrite the float32 at ``value_offset`` (bytes into the data section) of a safetensors file."""
    raw = bytearray(file.read_bytes())
    start = 8 + struct.unpack("<Q", raw[:8])[0]
    raw[start + value_offset:start + value_offset + 4] = struct.pack("<f", value)
    file.write_bytes(bytes(raw))


def test_a_corrupted_tensor_is_still_refused_with_the_same_typed_errors(tmp_path) -> None:
    delta = _lora_delta()
    path = save_delta(delta, tmp_path / "d")
    loaded = load_delta(path)
    for name, part in delta.parts.items():
        for k, t in part.state().items():
            assert torch.equal(loaded.parts[name].state()[k], t)
    raw = (path / PARTS_FILE).read_bytes()
    begin = json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])["k::lora_B"]["data_offsets"][0]
    _flip(path / PARTS_FILE, begin + 4, 123.0)
    with pytest.raises(IntegrityError, match=r"tensor 'parts/k::lora_B' fails its SHA-256 check"):
        load_delta(path)
    assert load_delta(path, verify=False).parts["k"].lora_B.view(-1)[1].item() == 123.0  # unverified: finite loads
    _flip(path / PARTS_FILE, begin + 4, float("nan"))
    with pytest.raises(IntegrityError, match="'parts/k::lora_B'"):
        load_delta(path)
    with pytest.raises(NonFiniteError, match=r"tensor 'k::lora_B': 1 of 12 values"):
        load_delta(path, verify=False)


def test_a_file_changed_between_the_header_check_and_the_read_is_refused(tmp_path, monkeypatch) -> None:
    """The library validated one file; the bytes read are another's: refused with a typed error, never misread."""
    tensors = {"a": torch.ones(2, 3), "b": torch.zeros(4)}
    file = tmp_path / "t.safetensors"
    save_file(tensors, str(file))
    other = tmp_path / "o.safetensors"
    real = tensor_file.read_file_bytes
    cases = [({"a": torch.ones(3, 2), "b": torch.zeros(4)}, ShapeMismatch),  # another shape
             ({"a": torch.ones(2, 3, dtype=torch.float64), "b": torch.zeros(4)}, ShapeMismatch),  # another dtype
             ({"a": torch.ones(2, 3)}, DeltaFormatError)]  # a tensor gone
    for swapped, error in cases:
        save_file(swapped, str(other))
        monkeypatch.setattr(tensor_file, "read_file_bytes", lambda _f, o=other: real(o))
        with pytest.raises(error):
            _read(file, tensors, verify=False)
    truncated = file.read_bytes()[:-8]
    monkeypatch.setattr(tensor_file, "read_file_bytes", lambda _f: np.frombuffer(truncated, dtype=np.uint8).copy())
    with pytest.raises(DeltaFormatError, match="do not hold"):
        _read(file, tensors, verify=False)


def test_store_wrapper_lookup_matches_physical_path() -> None:
    """Nested wrappers (an MLP and its projection) resolve as ``physical_path`` resolves them; a missing name is
    ``None``."""
    from conftest import tiny_llama

    from deltatune.layer import DeltaLayer
    from deltatune.model import physical_path
    from deltatune.serve.store import _logical_module

    model = tiny_llama()
    names = ["model.layers.0.mlp", "model.layers.0.mlp.gate_proj", "model.layers.1.self_attn.q_proj"]
    for name in names:  # parent first, then the child inside it
        path = physical_path(model, name)
        model.set_submodule(path, DeltaLayer(model.get_submodule(path)))
    resolved = {"": model}
    for name in [*names, "model.layers.0.mlp.up_proj", "model.layers.1.self_attn.k_proj"]:
        assert _logical_module(resolved, name) is model.get_submodule(physical_path(model, name)), name
    assert _logical_module(resolved, "model.layers.0.mlp.nothing") is None
    assert _logical_module(resolved, "model.nothing.deeper") is None
    assert physical_path(model, "model.layers.0.mlp.gate_proj") == "model.layers.0.mlp.base.gate_proj"
