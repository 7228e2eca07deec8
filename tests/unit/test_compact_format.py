"""Compact delta format: exact round trips, codec choices, byte accounting, corruption errors, CLI."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_bert, tiny_gpt2, tiny_llama
from safetensors.numpy import load_file, save_file
from typer.testing import CliRunner

import deltatune as dt
from deltatune.algebra.compress import compress_delta
from deltatune.delta import Delta
from deltatune.errors import ConfigError, DeltaFormatError, ShapeMismatch
from deltatune.io.compact_format import DATA_FILE, MANIFEST, compact_report, load_compact, save_compact
from deltatune.io.outputs import MARKER
from deltatune.ops.compress import dequantize_int8, quantize_int8
from deltatune.parts import SparsePart
from deltatune.parts.dense import DensePart

pytestmark = pytest.mark.usefixtures("one_thread")


def _files_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def _randomise(delta: Delta, seed: int) -> Delta:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for part in delta.parts.values():
            for t in part.parameters():
                t.copy_(torch.randn(t.shape, generator=g) * 0.02)
    return delta


def _lora(model) -> Delta:
    d = _randomise(dt.attach(model, dt.LoRAConfig(r=4, targets=["c_attn", "c_fc", "wte"])), 0)
    dt.detach(model)
    return d


def _sparse(model) -> Delta:
    d = _randomise(dt.attach(model, dt.SparseConfig(density=0.05)), 1)
    dt.detach(model)
    return d


def _full(model) -> Delta:
    d = _randomise(dt.attach(model, dt.FullConfig()), 2)
    dt.detach(model)
    return d


CASES = {
    "lora-compeft": (tiny_gpt2, _lora, dict(method="compeft", density=0.1, alpha=1.0)),
    "lora-product-dare": (tiny_gpt2, _lora, dict(method="dare", density=0.2, target="product", dtype="bf16")),
    "lora-int8-row": (tiny_gpt2, _lora, dict(method="quantize", dtype="int8", scope="row")),
    "sparse-compeft": (tiny_bert, _sparse, dict(method="compeft", density=0.3, scope="tensor", alpha=1.0)),
    "sparse-darex-q-int8": (tiny_bert, _sparse, dict(method="darex-q", density=0.5, q=0.8, dtype="int8")),
    "dense-magnitude": (tiny_llama, _full, dict(method="magnitude", density=0.05)),
    "dense-compeft": (tiny_llama, _full, dict(method="compeft", density=0.1, alpha=1.0)),
    "dense-fp16": (tiny_llama, _full, dict(method="quantize", dtype="fp16")),
    "dense-uncompressed": (tiny_llama, _full, None),
}


def _states_equal(a: Delta, b: Delta) -> None:
    assert list(a.parts) == list(b.parts)
    for name, part in a.parts.items():
        other = b.parts[name]
        assert type(other) is type(part) and other.meta() == part.meta()
        sa, sb = part.state(), other.state()
        assert set(sa) == set(sb)
        for k in sa:
            assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), (name, k)
    for head, tensors in a.heads.items():
        for k, t in tensors.items():
            assert torch.equal(t, b.heads[head][k])


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_is_exact_and_merges_identically(tmp_path, case):
    make_model, make_delta, kwargs = CASES[case]
    delta = make_delta(make_model())
    compressed = compress_delta(delta, **kwargs) if kwargs else delta
    report = save_compact(compressed, tmp_path / "c")
    loaded = dt.load_delta(tmp_path / "c")  # dispatches on the manifest's format
    _states_equal(compressed, loaded)
    assert loaded.method == compressed.method and loaded.config == json.loads(json.dumps(compressed.config))
    assert loaded.fingerprint == compressed.fingerprint
    in_memory, from_disk = make_model(), make_model()
    dt.apply_delta(in_memory, compressed, merge=True)
    dt.apply_delta(from_disk, loaded, merge=True)
    for (n, p), (_, q) in zip(in_memory.state_dict().items(), from_disk.state_dict().items(), strict=True):
        assert torch.equal(p, q), n
    assert report.total_bytes == _files_bytes(tmp_path / "c")
    assert compact_report(tmp_path / "c").to_dict()["tensors"] == report.to_dict()["tensors"]


def test_byte_accounting_equals_file_sizes_component_by_component(tmp_path):
    delta = compress_delta(_lora(tiny_gpt2()), "compeft", density=0.1, alpha=1.0)
    report = save_compact(delta, tmp_path / "c")
    files = {p.name: p.stat().st_size for p in (tmp_path / "c").iterdir()}
    assert set(files) == {MANIFEST, DATA_FILE, MARKER} and report.files == files
    assert report.total_bytes == sum(files.values())
    assert report.manifest_bytes == files[MANIFEST]
    assert report.payload_bytes + report.header_bytes == files[DATA_FILE]
    blobs = load_file(str(tmp_path / "c" / DATA_FILE))
    assert report.payload_bytes == sum(a.nbytes for a in blobs.values())
    parts = report.by_component()
    assert parts["ternary.signs"] + parts.get("ternary.scale", 0) > 0
    assert sum(parts.values()) == report.total_bytes
    for t in report.tensors:
        if t.values_codec == "ternary":
            assert t.components["values.signs"] == (t.nnz + 7) // 8 and t.components["values.scale"] == 4
    kept = sum(t.nnz for t in report.tensors)
    assert report.payload_bytes < 1.3 * kept  # ≈ 1 byte of gap + 1 sign bit per kept entry (vs 4 bytes dense)


def _hand_delta() -> Delta:
    """Known codecs: gaps uint8 with one escape, ternary signs, an indexed sparse part, int8 rows, a head."""
    gaps_tensor = torch.zeros(1000)
    gaps_tensor[[0, 10, 400, 410]] = torch.tensor([0.5, -0.5, 0.5, 0.5])  # gaps 0, 9, 389, 9
    sparse = SparsePart((4, 8), torch.tensor([3, 17, 30]))
    with torch.no_grad():
        sparse.values.copy_(torch.tensor([1.2345678, -3.0, 0.0]))  # not bf16-exact; an explicit 0 is kept
    q, s = quantize_int8(torch.tensor([[1.0, -0.5, 0.25], [2.0, 0.0, -1.0]]), per_row=True)
    dense = DensePart({"weight": (1000,), "w8": (2, 3)})
    with torch.no_grad():
        dense.deltas["weight"].copy_(gaps_tensor)
        dense.deltas["w8"].copy_(dequantize_int8(q, s))
    return Delta("hand", {"k": 1}, {"d": dense, "s": sparse}, heads={"cls": {"bias": torch.tensor([1.0, 2.0])}})


def test_hand_computed_codecs_and_bytes(tmp_path):
    report = save_compact(_hand_delta(), tmp_path / "c")
    by_name = {t.name: t for t in report.tensors}
    w = by_name["d::weight"]
    assert (w.layout, w.index_codec, w.values_codec, w.nnz) == ("sparse", "gaps", "ternary", 4)
    # uint8 gaps [0, 9, 255, 9] + escape 389 as uint16 (2 bytes) beats uint16 gaps (8 bytes) and a 125-byte bitmask
    assert w.components == {"index.gaps": 4, "index.escapes": 2, "values.signs": 1, "values.scale": 4}
    manifest = json.loads((tmp_path / "c" / MANIFEST).read_text())
    entry = manifest["parts"]["d"]["tensors"]["weight"]
    blobs = load_file(str(tmp_path / "c" / DATA_FILE))
    dtype, off, n = entry["index"]["data"]["gaps"]
    assert blobs[dtype][off:off + n].tolist() == [0, 9, 255, 9]
    dtype, off, n = entry["index"]["data"]["escapes"]
    assert (dtype, blobs[dtype][off:off + n].tolist()) == ("uint16", [389])
    w8 = by_name["d::w8"]
    assert (w8.layout, w8.values_codec, w8.components) == ("dense", "int8", {"values.q": 6, "values.scale": 8})
    assert manifest["parts"]["d"]["tensors"]["w8"]["values"]["groups"] == "row"
    sp = by_name["s::values"]
    assert (sp.layout, sp.values_codec, sp.nnz) == ("indexed", "fp32", 3)
    assert sp.components == {"index.gaps": 3, "index.escapes": 0, "values.values": 12}
    _states_equal(_hand_delta(), load_compact(tmp_path / "c"))


def test_long_gaps_pick_uint16_with_a_uint32_escape(tmp_path):
    t = torch.zeros(200_000)
    t[[0, 300, 100_000]] = torch.tensor([2.0, -2.0, 2.0])  # gaps 0, 299, 99699
    part = DensePart({"weight": (200_000,)})
    with torch.no_grad():
        part.deltas["weight"].copy_(t)
    report = save_compact(Delta("x", {}, {"m": part}), tmp_path / "c")
    assert report.tensors[0].components == {"index.gaps": 6, "index.escapes": 4, "values.signs": 1,
                                            "values.scale": 4}
    assert torch.equal(load_compact(tmp_path / "c").parts["m"].delta_for("weight"), t)


def test_bf16_values_and_bitmask_at_high_density(tmp_path):
    t = torch.randn(64, 64, generator=torch.Generator().manual_seed(0)).bfloat16().float()
    t[t.abs() < 0.3] = 0.0  # ~76 % non-zero: a bitmask (512 bytes) beats gaps
    part = DensePart({"weight": (64, 64)})
    with torch.no_grad():
        part.deltas["weight"].copy_(t)
    report = save_compact(Delta("x", {}, {"m": part}), tmp_path / "c")
    (entry,) = report.tensors
    nnz = int((t != 0).sum())
    assert (entry.layout, entry.index_codec, entry.values_codec) == ("sparse", "bitmask", "bf16")
    assert entry.components == {"index.mask": 512, "values.values": 2 * nnz}
    assert torch.equal(load_compact(tmp_path / "c").parts["m"].delta_for("weight"), t)


def test_save_refuses_duplicate_sparse_indices_and_replaces_atomically(tmp_path):
    with pytest.raises(ShapeMismatch, match="occurs more than once"):
        SparsePart((4, 4), torch.tensor([1, 1, 3]))
    part = SparsePart((4, 4), torch.tensor([1, 2, 3]))
    part.indices[1] = 1  # corrupted after construction: the writer still refuses it
    with pytest.raises(DeltaFormatError, match="unique, sorted"):
        save_compact(Delta("x", {}, {"m": part}), tmp_path / "c")
    assert not (tmp_path / "c").exists()
    save_compact(_hand_delta(), tmp_path / "c")
    save_compact(Delta("y", {}, {}), tmp_path / "c")
    assert load_compact(tmp_path / "c").method == "y" and not load_compact(tmp_path / "c").parts


# --------------------------------------------------------------------------------------------------
# corruption
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path) -> Path:
    save_compact(_hand_delta(), tmp_path / "c")
    return tmp_path / "c"


def _edit_manifest(path: Path, fn) -> None:
    manifest = json.loads((path / MANIFEST).read_text())
    fn(manifest)
    (path / MANIFEST).write_text(json.dumps(manifest))


def _edit_blob(path: Path, part: str, tensor: str, side: str, comp: str, fn) -> None:
    manifest = json.loads((path / MANIFEST).read_text())
    dtype, off, n = manifest["parts"][part]["tensors"][tensor][side]["data"][comp]
    blobs = load_file(str(path / DATA_FILE))
    view = blobs[dtype][off:off + n]
    fn(view)
    save_file(blobs, str(path / DATA_FILE))


def _set_ref(part, tensor, side, comp, index, value):
    def fn(m):
        m["parts"][part]["tensors"][tensor][side]["data"][comp][index] = value
    return fn


CORRUPTIONS = {
    "truncated data": (lambda p: (p / DATA_FILE).write_bytes((p / DATA_FILE).read_bytes()[:-20]),
                       DeltaFormatError, "data.safetensors"),
    "missing data": (lambda p: (p / DATA_FILE).unlink(), DeltaFormatError, "missing"),
    "wrong count": (lambda p: _edit_manifest(p, _set_ref("d", "weight", "values", "signs", 2, 2)),
                    DeltaFormatError, "part 'd' tensor 'weight'.*2 entries, expected 1"),
    "wrong nnz": (lambda p: _edit_manifest(p, lambda m: m["parts"]["s"]["tensors"]["values"].update(nnz=2)),
                  DeltaFormatError, "part 's' tensor 'values'"),
    "escape missing": (lambda p: _edit_blob(p, "d", "weight", "index", "gaps", lambda v: v.__setitem__(0, 255)),
                       DeltaFormatError, "'escapes' has 1 entries, expected 2"),
    "index out of range": (lambda p: _edit_blob(p, "d", "weight", "index", "escapes",
                                                lambda v: v.__setitem__(0, 999)),
                           DeltaFormatError, "part 'd' tensor 'weight'.*out of range"),
    "indexed out of range": (lambda p: _edit_blob(p, "s", "values", "index", "gaps", lambda v: v.__setitem__(2, 20)),
                             DeltaFormatError, "part 's' tensor 'values'.*out of range"),
    "escape below marker": (lambda p: _edit_blob(p, "d", "weight", "index", "escapes",
                                                 lambda v: v.__setitem__(0, 3)),
                            DeltaFormatError, "below the escape marker"),
    "unknown value codec": (lambda p: _edit_manifest(p, lambda m: m["parts"]["d"]["tensors"]["w8"]["values"].update(
        codec="zstd")), DeltaFormatError, "tensor 'w8'.*unknown value codec 'zstd'"),
    "unknown index codec": (lambda p: _edit_manifest(p, lambda m: m["parts"]["d"]["tensors"]["weight"][
        "index"].update(codec="rle")), DeltaFormatError, "unknown index codec 'rle'"),
    "unknown layout": (lambda p: _edit_manifest(p, lambda m: m["parts"]["d"]["tensors"]["weight"].update(
        layout="csr")), DeltaFormatError, "tensor 'weight'.*unknown layout 'csr'"),
    "unknown dtype": (lambda p: _edit_manifest(p, lambda m: m["heads"]["cls"]["bias"].update(dtype="float8")),
                      DeltaFormatError, "head 'cls' tensor 'bias'.*unknown dtype"),
    "blob size": (lambda p: _edit_manifest(p, lambda m: m["blobs"].update(float32=m["blobs"]["float32"] + 1)),
                  ShapeMismatch, "blob 'float32'"),
    "unreferenced bytes": (lambda p: (_edit_manifest(p, lambda m: m["blobs"].update(float32=m["blobs"]["float32"]
                                                                                      + 1)),
                                      save_file({k: np.concatenate([v, np.zeros(1, v.dtype)]) if k == "float32" else v
                                                 for k, v in load_file(str(p / DATA_FILE)).items()},
                                                str(p / DATA_FILE))),
                           DeltaFormatError, "referenced by nothing"),
    "ternary scale": (lambda p: _edit_blob(p, "d", "weight", "values", "scale", lambda v: v.__setitem__(0, -1.0)),
                      DeltaFormatError, "ternary scale must be finite and > 0"),
    "sign padding": (lambda p: _edit_blob(p, "d", "weight", "values", "signs", lambda v: v.__setitem__(0, v[0] | 128)),
                     DeltaFormatError, "sign bits set past the 4 values"),
    "int8 -128": (lambda p: _edit_blob(p, "d", "w8", "values", "q", lambda v: v.__setitem__(0, -128)),
                  DeltaFormatError, "-128"),
    "bad ref": (lambda p: _edit_manifest(p, _set_ref("d", "w8", "values", "q", 0, "int4")),
                DeltaFormatError, "must be \\[dtype, offset, count\\]"),
    "ref past blob": (lambda p: _edit_manifest(p, _set_ref("d", "w8", "values", "q", 1, 10_000)),
                      DeltaFormatError, "truncated"),
    "wrong format": (lambda p: _edit_manifest(p, lambda m: m.update(format="zip")), DeltaFormatError, "format"),
    "newer version": (lambda p: _edit_manifest(p, lambda m: m.update(format_version=9)), DeltaFormatError,
                      "format_version 9"),
    "missing field": (lambda p: _edit_manifest(p, lambda m: m.pop("blobs")), DeltaFormatError, "missing field"),
    "bad part meta": (lambda p: _edit_manifest(p, lambda m: m["parts"]["s"]["meta"].pop("weight_shape")),
                      DeltaFormatError, "part 's' metadata is invalid"),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corruption_is_reported(saved, name):
    damage, error, match = CORRUPTIONS[name]
    damage(saved)
    with pytest.raises(error, match=match):
        load_compact(saved, verify=False)


def test_report_detects_extra_files(saved):
    (saved / "stray.bin").write_bytes(b"x")
    with pytest.raises(DeltaFormatError, match="extra files"):
        compact_report(saved)


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------
def test_cli_compress_compact_and_lowrank_export(tmp_path, monkeypatch):
    from deltatune.cli import app, main

    source = _lora(tiny_gpt2())
    source.save(tmp_path / "d")
    runner = CliRunner()
    res = runner.invoke(app, ["compress", str(tmp_path / "d"), "--method", "compeft", "--density", "0.1",
                              "--alpha", "1", "--out", str(tmp_path / "c")])
    assert res.exit_code == 0, res.output
    assert "ratio" in res.output and "ternary.signs" in res.output
    expected = compress_delta(dt.load_delta(tmp_path / "d"), "compeft", density=0.1, alpha=1.0)
    _states_equal(expected, dt.load_delta(tmp_path / "c"))
    report = compact_report(tmp_path / "c")  # the folder's size as `info` counts it: the output marker aside
    assert f"compressed bytes  {report.total_bytes - report.marker_bytes:,}" in res.output

    res = runner.invoke(app, ["compress", str(tmp_path / "d"), "--method", "lowrank", "--rank", "2",
                              "--out", str(tmp_path / "low")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["export", str(tmp_path / "low"), "--out", str(tmp_path / "peft")])
    assert res.exit_code == 0, res.output
    back = dt.load_peft_adapter(tmp_path / "peft")
    low = dt.load_delta(tmp_path / "low")
    for name, part in low.parts.items():
        assert back.parts[name].rank == 2 and torch.allclose(back.parts[name].delta_weight(), part.delta_weight())

    res = runner.invoke(app, ["compress", str(tmp_path / "d"), "--density", "0"])
    assert isinstance(res.exception, ConfigError)
    monkeypatch.setattr(sys, "argv", ["deltatune", "compress", str(tmp_path / "d"), "--method", "lowrank",
                                      "--rank", "0"])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2
