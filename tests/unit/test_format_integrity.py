"""Integrity of the delta and compact formats (issue 8, findings 3, 4, 5 and 7).

Digests cover tensor bytes *and* names/metadata; NaN/±Inf is refused in tensors and manifests; sparse
indices must be unique, sorted and in range everywhere; and a manifest that claims huge shapes fails
with a typed error before anything is allocated.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from deltatune.delta import Delta
from deltatune.errors import (
    DeltaFormatError,
    DeltaTuneError,
    InputTooLarge,
    IntegrityError,
    NonFiniteError,
    OutputExists,
    ShapeMismatch,
)
from deltatune.io.compact_format import load_compact, save_compact
from deltatune.io.delta_format import load_delta, save_delta
from deltatune.parts import DensePart, LoRAPart, SparsePart

pytestmark = pytest.mark.usefixtures("one_thread")

LORA, DENSE, SPARSE = "enc.layer.0.query", "enc.layer.0.norm", "enc.layer.1.value"
FORMATS = {"delta": (save_delta, load_delta), "compact": (save_compact, load_compact)}


def _delta(seed: int = 0) -> Delta:
    """One part of each kind plus a head, with non-zero values."""
    g = torch.Generator().manual_seed(seed)
    lora = LoRAPart(8, 6, 2, scale=0.5)
    dense = DensePart({"weight": (6,), "bias": (6,)})
    sparse = SparsePart((6, 8), torch.tensor([1, 7, 20, 47]))
    with torch.no_grad():
        for part in (lora, dense, sparse):
            for p in part.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
    head = {"weight": torch.randn(2, 6, generator=g), "bias": torch.randn(2, generator=g)}
    return Delta("mixed", {"lr": 1e-3, "targets": ["query"]}, {LORA: lora, DENSE: dense, SPARSE: sparse},
                 heads={"classifier": head}, fingerprint={"sha": "abc"}, metrics={"loss": 0.25})


def _states(d: Delta) -> dict[str, torch.Tensor]:
    out = {f"{n}/{k}": v for n, p in d.parts.items() for k, v in p.state().items()}
    out.update({f"head {h}/{k}": v for h, t in d.heads.items() for k, v in t.items()})
    return out


def _same(a: Delta, b: Delta) -> bool:
    sa, sb = _states(a), _states(b)
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _save(fmt: str, delta: Delta, path: Path) -> Path:
    FORMATS[fmt][0](delta, path)
    return path


def _load(fmt: str, path: Path, verify: bool = True) -> Delta:
    return FORMATS[fmt][1](path, verify=verify)


def _edit_manifest(path: Path, fn: Callable[[dict[str, Any]], Any]) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    fn(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


def _tensor_range(file: Path, key: str) -> tuple[int, int]:
    """Absolute byte range of tensor ``key``'s data in a safetensors file."""
    raw = file.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    start, end = json.loads(raw[8:8 + n])[key]["data_offsets"]
    return 8 + n + start, 8 + n + end


def _flip_bit(file: Path, offset: int, bit: int = 0) -> None:
    raw = bytearray(file.read_bytes())
    raw[offset] ^= 1 << bit
    file.write_bytes(bytes(raw))


def _part_meta(m: dict[str, Any], name: str) -> dict[str, Any]:
    return m["parts"][name]["meta"]


# --------------------------------------------------------------------------------------------------
# finding 4: digests
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_round_trip_stores_and_verifies_digests(tmp_path, fmt) -> None:
    delta = _delta()
    path = _save(fmt, delta, tmp_path / "d")
    manifest = json.loads((path / "manifest.json").read_text())
    digests = manifest["digests"]
    assert set(digests) == {"tensors", "manifest"} and len(digests["manifest"]) == 64
    assert f"parts/{SPARSE}::indices" in digests["tensors"] and "heads/classifier::bias" in digests["tensors"]
    assert _same(_load(fmt, path), delta) and _same(_load(fmt, path, verify=False), delta)


def test_bit_flip_in_tensor_data_fails_the_digest(tmp_path) -> None:
    path = _save("delta", _delta(), tmp_path / "d")
    key = f"{LORA}::lora_B"
    start, _ = _tensor_range(path / "parts.safetensors", key)
    _flip_bit(path / "parts.safetensors", start + 1, bit=3)
    with pytest.raises(IntegrityError) as err:
        load_delta(path)
    assert str(path / "parts.safetensors") in str(err.value) and f"parts/{key}" in str(err.value)
    assert not _same(load_delta(path, verify=False), _delta())  # the flip is real; verify=False skips the check


def test_bit_flip_in_a_head_fails_the_digest(tmp_path) -> None:
    path = _save("delta", _delta(), tmp_path / "d")
    start, _ = _tensor_range(path / "heads.safetensors", "classifier::weight")
    _flip_bit(path / "heads.safetensors", start, bit=0)
    with pytest.raises(IntegrityError, match="heads/classifier::weight"):
        load_delta(path)


def test_bit_flip_in_compact_data_fails_the_digest(tmp_path) -> None:
    path = _save("compact", _delta(), tmp_path / "c")
    start, end = _tensor_range(path / "data.safetensors", "float32")
    _flip_bit(path / "data.safetensors", end - 2, bit=4)
    with pytest.raises(IntegrityError, match="fails its SHA-256 check"):
        load_compact(path)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_bit_flip_in_a_part_name_fails_the_digest(tmp_path, fmt) -> None:
    """One flipped bit moves an update from layer 0 to layer 1 ('0' ^ 1 == '1'): the digest catches it."""
    path = _save(fmt, _delta(), tmp_path / "d")
    text = (path / "manifest.json").read_text()
    assert text.count(f'"{LORA}"') == 1
    moved = LORA.replace("layer.0", "layer.1")
    (path / "manifest.json").write_text(text.replace(f'"{LORA}"', f'"{moved}"'))
    with pytest.raises(IntegrityError, match="manifest fails its SHA-256 check"):
        _load(fmt, path)
    if fmt == "compact":
        assert moved in _load(fmt, path, verify=False).parts  # what verify prevents: a silently moved update
    else:  # the standard format also names parts in the tensor file's keys
        with pytest.raises(DeltaFormatError, match="do not match the manifest"):
            _load(fmt, path, verify=False)


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("mutate", [
    lambda m: m["config"].update(lr=2e-3),
    lambda m: _part_meta(m, LORA).update(scale=0.25),
    lambda m: m["fingerprint"].update(sha="abd"),
    lambda m: m.update(method="other"),
    lambda m: m["digests"]["tensors"].update({f"parts/{LORA}::lora_A": "0" * 64}),
], ids=["config", "scale", "fingerprint", "method", "tensor-digest"])
def test_edited_manifest_fails_the_digest(tmp_path, fmt, mutate) -> None:
    path = _save(fmt, _delta(), tmp_path / "d")
    _edit_manifest(path, mutate)
    with pytest.raises(IntegrityError, match=str(path / "manifest.json")):
        _load(fmt, path)
    _load(fmt, path, verify=False)


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("digests", [5, {"tensors": {}}, {"tensors": [], "manifest": "0" * 64},
                                     {"tensors": {}, "manifest": "xyz"}],
                         ids=["int", "no-manifest", "list", "not-hex"])
def test_malformed_digests_field(tmp_path, fmt, digests) -> None:
    path = _save(fmt, _delta(), tmp_path / "d")
    _edit_manifest(path, lambda m: m.update(digests=digests))
    for verify in (True, False):
        with pytest.raises(IntegrityError, match="'digests'"):
            _load(fmt, path, verify=verify)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_digest_for_a_missing_or_unknown_tensor(tmp_path, fmt) -> None:
    path = _save(fmt, _delta(), tmp_path / "d")

    def drop_and_rehash(m: dict[str, Any]) -> None:
        from deltatune.io.digest import manifest_digest

        m["digests"]["tensors"].pop(f"parts/{LORA}::lora_A")
        m["digests"]["manifest"] = manifest_digest(m)  # a consistent manifest that lacks one tensor digest

    _edit_manifest(path, drop_and_rehash)
    with pytest.raises(IntegrityError, match="no digest for"):
        _load(fmt, path)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_manifest_without_digests_loads_unverified(tmp_path, fmt) -> None:
    """Format-version-1 files written before digests existed have none: they load, unverified."""
    delta = _delta()
    path = _save(fmt, delta, tmp_path / "d")
    _edit_manifest(path, lambda m: m.pop("digests"))
    assert _same(_load(fmt, path), delta)


def test_delta_save_and_load_forward_overwrite_and_verify(tmp_path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(OutputExists, match="notes.txt"):
        _delta().save(target)
    assert (target / "notes.txt").read_text() == "keep me"
    _delta().save(target, overwrite=True)
    start, _ = _tensor_range(target / "parts.safetensors", f"{DENSE}::bias")
    _flip_bit(target / "parts.safetensors", start)
    with pytest.raises(IntegrityError):
        Delta.load(target)
    assert set(Delta.load(target, verify=False).parts) == {LORA, DENSE, SPARSE}
    _delta(seed=1).save(target)  # an earlier delta is replaceable without overwrite
    assert _same(Delta.load(target), _delta(seed=1))


# --------------------------------------------------------------------------------------------------
# finding 3: non-finite values
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("where", ["part", "head"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_tensor_is_refused_at_save_and_load(tmp_path, fmt, where, value) -> None:
    good = _save(fmt, _delta(), tmp_path / "good")
    bad = _delta()
    with torch.no_grad():
        if where == "part":
            bad.parts[LORA].lora_A[0, 1] = value
        else:
            bad.heads["classifier"]["bias"][1] = value
    with pytest.raises(NonFiniteError, match="lora_A" if where == "part" else "bias"):
        _save(fmt, bad, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    if fmt == "delta":  # a file written by something else: NaN where the digest matches
        file, key = ((good / "parts.safetensors", f"{LORA}::lora_A") if where == "part"
                     else (good / "heads.safetensors", "classifier::bias"))
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(file))
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[1] = value
        save_file(tensors, str(file))
        _edit_manifest(good, lambda m: m.pop("digests"))
        with pytest.raises(NonFiniteError, match=key):
            load_delta(good)


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize(("field", "literal"), [
    ("scale", "NaN"), ("scale", "Infinity"), ("scale", "-Infinity"), ("dropout", "NaN"),
    ("config", "NaN"), ("metrics", "Infinity"),
])
def test_non_finite_number_in_manifest(tmp_path, fmt, field, literal) -> None:
    path = _save(fmt, _delta(), tmp_path / "d")
    manifest = json.loads((path / "manifest.json").read_text())
    if field in ("scale", "dropout"):
        _part_meta(manifest, LORA)[field] = "@@"
    elif field == "config":
        manifest["config"]["lr"] = "@@"
    else:
        manifest["metrics"]["loss"] = "@@"
    (path / "manifest.json").write_text(json.dumps(manifest).replace('"@@"', literal))
    for verify in (True, False):
        with pytest.raises(NonFiniteError) as err:
            _load(fmt, path, verify=verify)
        msg = str(err.value)
        assert str(path / "manifest.json") in msg
        # the JSON reader refuses the literal while parsing; a parsed non-finite value is named by its field
        named = {"scale": "scale", "dropout": "dropout", "config": "lr", "metrics": "loss"}[field]
        assert literal in msg or named in msg


def test_non_finite_config_is_refused_at_save(tmp_path) -> None:
    delta = _delta()
    delta.config["lambda"] = math.nan
    for fmt in FORMATS:
        with pytest.raises(NonFiniteError, match="lambda"):
            _save(fmt, delta, tmp_path / fmt)
        assert not (tmp_path / fmt).exists()


def test_huge_integer_scale_is_a_typed_error(tmp_path) -> None:
    path = _save("delta", _delta(), tmp_path / "d")
    _edit_manifest(path, lambda m: _part_meta(m, LORA).update(scale=10**400))
    with pytest.raises(NonFiniteError, match="scale"):
        load_delta(path, verify=False)


# --------------------------------------------------------------------------------------------------
# finding 5: sparse indices
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("indices", "match"), [
    ([3, 3, 5], "occurs more than once"), ([5, 3, 5], "occurs more than once"),
    ([0, 48], "out of range"), ([-1, 2], "out of range"),
])
def test_construction_refuses_duplicate_and_out_of_range_indices(indices, match) -> None:
    with pytest.raises(ShapeMismatch, match=match):
        SparsePart((6, 8), torch.tensor(indices))


def test_construction_takes_an_index_set_in_any_order() -> None:
    """Values start at zero, so ordering the given set is the one canonical rule, not a silent re-sort."""
    assert SparsePart((6, 8), torch.tensor([9, 2, 14])).indices.tolist() == [2, 9, 14]


@pytest.mark.parametrize(("indices", "match"), [
    ([14, 2, 9], "not sorted"), ([2, 2, 9], "occurs more than once"), ([2, 9, 48], "out of range"),
    ([-3, 2, 9], "out of range"),
])
def test_from_state_refuses_unsorted_duplicate_and_out_of_range(indices, match) -> None:
    meta = {"weight_shape": [6, 8], "layer": "linear", "k": 3}
    state = {"indices": torch.tensor(indices), "values": torch.tensor([1.0, 2.0, 3.0])}
    with pytest.raises(ShapeMismatch, match=match):
        SparsePart.from_state(state, meta)


@pytest.mark.parametrize("indices", [[1, 1, 20, 47], [1, 20, 7, 47], [1, 7, 20, 48]],
                         ids=["duplicate", "unsorted", "out-of-range"])
def test_delta_file_with_bad_sparse_indices(tmp_path, indices) -> None:
    from safetensors.torch import load_file, save_file

    path = _save("delta", _delta(), tmp_path / "d")
    tensors = load_file(str(path / "parts.safetensors"))
    tensors[f"{SPARSE}::indices"] = torch.tensor(indices, dtype=tensors[f"{SPARSE}::indices"].dtype)
    save_file(tensors, str(path / "parts.safetensors"))
    with pytest.raises(IntegrityError):
        load_delta(path)
    with pytest.raises(ShapeMismatch) as err:
        load_delta(path, verify=False)
    assert SPARSE in str(err.value) and str(path / "parts.safetensors") in str(err.value)


def test_compact_gap_codec_cannot_decode_out_of_range(tmp_path) -> None:
    import numpy as np
    from safetensors.numpy import load_file, save_file

    path = _save("compact", _delta(), tmp_path / "c")
    entry = json.loads((path / "manifest.json").read_text())["parts"][SPARSE]["tensors"]["values"]
    dtype, offset, count = entry["index"]["data"]["gaps"]
    blobs = load_file(str(path / "data.safetensors"))
    blobs[dtype] = blobs[dtype].copy()
    blobs[dtype][offset + count - 1] = np.iinfo(dtype).max - 1 if dtype != "uint8" else 200  # past the weight
    save_file(blobs, str(path / "data.safetensors"))
    with pytest.raises(DeltaFormatError, match="out of range"):
        load_compact(path, verify=False)


def test_loaded_sparse_part_forward_equals_merge(tmp_path) -> None:
    delta = _delta()
    for fmt in FORMATS:
        loaded = _load(fmt, _save(fmt, delta, tmp_path / fmt))
        part = loaded.parts[SPARSE]
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 6))
        x = torch.randn(3, 8)
        with torch.no_grad():
            forward = part(x, model[0])
            part.merge_into(model[0])
            assert torch.allclose(model[0](x), forward, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# finding 7 and typed errors: metadata is checked against the file before anything is allocated
# --------------------------------------------------------------------------------------------------
HUGE_CASES: dict[str, tuple[str, Callable[[dict[str, Any]], Any], type[DeltaTuneError]]] = {
    "in_features 2^26": ("delta", lambda m: _part_meta(m, LORA).update(in_features=2**26), ShapeMismatch),
    "rank 5e5": ("delta", lambda m: _part_meta(m, LORA).update(rank=500_000), ShapeMismatch),
    "rank 5e5 and spec": ("delta", lambda m: (_part_meta(m, LORA).update(rank=500_000),
                                              m["parts"][LORA]["tensors"]["lora_A"].update(shape=[500_000, 8]),
                                              m["parts"][LORA]["tensors"]["lora_B"].update(shape=[6, 500_000])),
                          ShapeMismatch),
    "dense 20000^2": ("delta", lambda m: (_part_meta(m, DENSE)["shapes"].update(weight=[20000, 20000]),
                                          m["parts"][DENSE]["tensors"]["weight"].update(shape=[20000, 20000])),
                      ShapeMismatch),
    "head 20000^2": ("delta", lambda m: m["heads"]["classifier"]["weight"].update(shape=[20000, 20000]),
                     ShapeMismatch),
    "in_features 2^40": ("delta", lambda m: _part_meta(m, LORA).update(in_features=2**40), InputTooLarge),
    "weight_shape 2^40": ("delta", lambda m: _part_meta(m, SPARSE).update(weight_shape=[2**40, 2**40]),
                          InputTooLarge),
    "shape 1e308": ("delta", lambda m: m["parts"][LORA]["tensors"]["lora_A"].update(shape=[1e308, 8]),
                    DeltaFormatError),
    "compact in_features 2^26": ("compact", lambda m: _part_meta(m, LORA).update(in_features=2**26),
                                 ShapeMismatch),
    "compact dense 20000^2": ("compact", lambda m: (_part_meta(m, DENSE)["shapes"].update(weight=[20000, 20000]),
                                                    m["parts"][DENSE]["tensors"]["weight"].update(
                                                        shape=[20000, 20000])), DeltaFormatError),
    "compact head 20000^2": ("compact", lambda m: m["heads"]["classifier"]["weight"].update(shape=[20000, 20000]),
                             DeltaFormatError),
    "compact domain 2^40": ("compact", lambda m: m["parts"][SPARSE]["tensors"]["values"].update(domain=[2**40, 8]),
                            InputTooLarge),
    "compact nnz 2^40": ("compact", lambda m: m["parts"][SPARSE]["tensors"]["values"].update(nnz=2**40),
                         DeltaFormatError),
}

_PROBE = textwrap.dedent("""
    import json, resource, sys, time
    import deltatune.io.compact_format  # imported before timing (load_delta imports it on first use)
    from deltatune.io.delta_format import load_delta
    with open("/proc/self/status") as fh:
        vm = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize"))
    limit = vm + 400 * 2**20  # 400 MB more address space than the interpreter holds after imports
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))
    out = {}
    for name, path, verify in json.loads(sys.argv[1]):
        t0 = time.perf_counter()
        try:
            load_delta(path, verify=verify)
            out[name] = ["loaded", 0.0]
        except BaseException as exc:
            out[name] = [type(exc).__name__, time.perf_counter() - t0]
    print(json.dumps(out))
""")


def test_huge_metadata_fails_fast_without_allocating(tmp_path) -> None:
    """Each load runs in a child process whose address space is capped at +400 MB: a loader that
    allocated the claimed tensors (0.3–1.8 GB, or 2^40 entries) would die with MemoryError/RuntimeError."""
    jobs = []
    for i, (name, (fmt, mutate, _)) in enumerate(HUGE_CASES.items()):
        path = _save(fmt, _delta(), tmp_path / f"case{i}")
        _edit_manifest(path, mutate)
        jobs += [(name, str(path), False), (f"{name} (verified)", str(path), True)]
    proc = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(jobs)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    import deltatune.errors as errors

    for name, (_, _, expected) in HUGE_CASES.items():
        for label, want in ((name, expected), (f"{name} (verified)", DeltaFormatError | InputTooLarge)):
            kind, seconds = results[label]
            assert kind != "loaded", label
            assert issubclass(getattr(errors, kind), want), (label, kind)
            assert seconds < 1.0, (label, seconds)


WRONG_TYPES: dict[str, Callable[[dict[str, Any]], Any]] = {
    "rank str": lambda m: _part_meta(m, LORA).update(rank="2"),
    "rank bool": lambda m: _part_meta(m, LORA).update(rank=True),
    "rank 0": lambda m: _part_meta(m, LORA).update(rank=0),
    "scale list": lambda m: _part_meta(m, LORA).update(scale=[1]),
    "scale null": lambda m: _part_meta(m, LORA).update(scale=None),
    "dropout 2": lambda m: _part_meta(m, LORA).update(dropout=2.0),
    "layer int": lambda m: _part_meta(m, LORA).update(layer=5),
    "layer dict": lambda m: _part_meta(m, LORA).update(layer={}),
    "meta list": lambda m: m["parts"][LORA].update(meta=[1, 2]),
    "meta extra": lambda m: _part_meta(m, LORA).update(colour="red"),
    "kind list": lambda m: m["parts"][LORA].update(kind=["lora"]),
    "shapes str": lambda m: _part_meta(m, DENSE).update(shapes="weight"),
    "shapes empty": lambda m: _part_meta(m, DENSE).update(shapes={}),
    "shape entry str": lambda m: _part_meta(m, DENSE)["shapes"].update(weight="6"),
    "shape entry float": lambda m: _part_meta(m, DENSE)["shapes"].update(weight=[6.0]),
    "shape name bad": lambda m: _part_meta(m, DENSE)["shapes"].update({"a.b": [6]}),
    "weight_shape str": lambda m: _part_meta(m, SPARSE).update(weight_shape="6x8"),
    "weight_shape zero": lambda m: _part_meta(m, SPARSE).update(weight_shape=[0, 8]),
    "k negative": lambda m: _part_meta(m, SPARSE).update(k=-1),
    "k too big": lambda m: _part_meta(m, SPARSE).update(k=49),
    "k float": lambda m: _part_meta(m, SPARSE).update(k=4.0),
    "method int": lambda m: m.update(method=3),
    "created_by list": lambda m: m.update(created_by=["x"]),
    "config list": lambda m: m.update(config=[1]),
    "metrics str": lambda m: m.update(metrics="x"),
    "fingerprint list": lambda m: m.update(fingerprint=[]),
    "deep config": lambda m: m["config"].update(deep=json.loads("[" * 60 + "]" * 60)),
    "head str": lambda m: m["heads"].update(classifier="x"),
}


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("name", list(WRONG_TYPES))
def test_wrong_typed_manifest_field_is_a_typed_error(tmp_path, fmt, name) -> None:
    path = _save(fmt, _delta(), tmp_path / "d")
    _edit_manifest(path, WRONG_TYPES[name])
    for verify in (True, False):
        with pytest.raises((DeltaFormatError, InputTooLarge)) as err:
            _load(fmt, path, verify=verify)
        assert str(path / "manifest.json") in str(err.value)
        assert len(str(err.value)) < 400


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_negative_zeros_left_by_a_mask_verify_after_the_round_trip(tmp_path, fmt: str) -> None:
    """A DARE mask multiplies negative values by 0 and leaves −0.0; the compact format's sparse layouts store
    only non-zeros and decode +0.0 (the same update), so its digests are of the sign-less form."""
    delta = _delta()
    with torch.no_grad():
        a = delta.parts[LORA].lora_A
        a.copy_(torch.where(torch.rand(a.shape, generator=torch.Generator().manual_seed(1)) < 0.8,
                            a * 0.0, a))  # mostly zeros, half of them −0.0: the sparse layout is chosen
    assert bool((torch.signbit(a) & (a == 0)).any())
    loaded = _load(fmt, _save(fmt, delta, tmp_path / fmt))  # verify=True
    assert torch.equal(loaded.parts[LORA].lora_A, delta.parts[LORA].lora_A)


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("record", [{"role": "on"}, {"role": "on", "path": 5, "digest": "x"},
                                    {"role": "on", "path": "/d", "digest": ""}], ids=["missing", "int", "empty"])
def test_an_underlying_delta_record_without_a_path_or_digest_is_a_format_error(tmp_path, fmt, record) -> None:
    """A stacked delta finds each underlying delta by its recorded path and checks it by its digest: a record
    without them (a hand-edited or foreign manifest) is refused at load naming the entry, not a raw KeyError or
    TypeError when the delta is used."""
    delta = _delta()
    delta.provenance.parents = [{"method": "lora"}, record]
    path = _save(fmt, delta, tmp_path / "d")
    with pytest.raises(DeltaFormatError, match=r"provenance.parents\[1\] records an underlying delta"):
        _load(fmt, path)
    delta.provenance.parents = [{"method": "lora"}, {"role": "on", "path": "/d", "digest": "ab" * 32}]
    assert _load(fmt, _save(fmt, delta, tmp_path / "ok")).provenance.parents[1]["path"] == "/d"
