"""Sparse parts keep sorted int32 indices where the weight allows; files store them so, old int64 files load."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import tiny_bert, tiny_inputs
from safetensors import safe_open
from torch import nn
from typer.testing import CliRunner

import deltatune as dt
from deltatune.parts.layers import LayerKind
from deltatune.parts.sparse import SparsePart, index_dtype, sum_sparse


def test_index_dtype_boundary():
    assert index_dtype(1) is torch.int32
    assert index_dtype(2**31 - 1) is torch.int32
    assert index_dtype(2**31) is torch.int64


def test_new_parts_hold_sorted_int32_indices():
    part = SparsePart((6, 5), torch.tensor([9, 2, 17], dtype=torch.int64), LayerKind.LINEAR)
    assert part.indices.dtype is torch.int32
    assert part.indices.tolist() == [2, 9, 17]
    assert part.state()["indices"].dtype is torch.int32
    assert part.nbytes == 3 * 4 + 3 * 4


def test_int32_part_forward_merge_and_sum_match_int64_reference():
    torch.manual_seed(0)
    base = nn.Linear(5, 6)
    idx = torch.tensor([0, 4, 11, 29])
    part = SparsePart((6, 5), idx, LayerKind.LINEAR)
    with torch.no_grad():
        part.values.copy_(torch.tensor([0.5, -1.0, 2.0, 0.25]))
    x = torch.randn(3, 5)
    dense = base.weight.detach().clone().reshape(-1)
    dense[idx] += part.values.detach()
    ref = nn.functional.linear(x, dense.view(6, 5), base.bias)
    assert torch.allclose(part(x, base), ref, atol=1e-6)
    before = base.weight.detach().clone()
    part.merge_into(base)
    assert torch.allclose(base(x), ref, atol=1e-6)
    part.unmerge_from(base)
    assert torch.allclose(base.weight, before, atol=1e-6)
    other = SparsePart((6, 5), torch.tensor([4, 5]), LayerKind.LINEAR)
    with torch.no_grad():
        other.values.fill_(1.0)
    total = sum_sparse([part, other], "test")
    assert total.indices.dtype is torch.int32 and total.indices.tolist() == [0, 4, 5, 11, 29]
    assert total.values.tolist() == [0.5, 0.0, 1.0, 2.0, 0.25]


def test_from_state_accepts_int64_and_stores_int32():
    state = {"indices": torch.tensor([1, 3, 8], dtype=torch.int64), "values": torch.tensor([1.0, 2.0, 3.0])}
    part = SparsePart.from_state(state, {"weight_shape": [3, 4], "layer": "linear", "k": 3})
    assert part.indices.dtype is torch.int32 and part.indices.tolist() == [1, 3, 8]
    assert part.values.tolist() == [1.0, 2.0, 3.0]


def _sparse_delta(model):
    delta = dt.attach(model, dt.SparseConfig(density=0.05, regrow=False))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for part in delta.parts.values():
            part.values.copy_(torch.randn(part.values.shape, generator=g) * 0.02)
    return delta


def _stored(folder: Path) -> dict[str, tuple[torch.dtype, int]]:
    out = {}
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            for key in fh.keys():  # noqa: SIM118 (safe_open is not iterable)
                t = fh.get_tensor(key)
                out[key] = (t.dtype, t.numel() * t.element_size())
    return out


def test_saved_file_stores_int32_and_info_reports_exact_bytes(tmp_path):
    model = tiny_bert()
    delta = _sparse_delta(model)
    folder = delta.save(tmp_path / "d")
    stored = _stored(folder)
    idx_keys = [k for k in stored if k.endswith("indices")]
    assert idx_keys and all(stored[k][0] is torch.int32 for k in idx_keys)
    part_bytes = sum(b for k, (_, b) in stored.items() if k.endswith(("indices", "values")))
    assert part_bytes == sum(p.indices.numel() * 4 + p.values.numel() * 4 for p in delta.parts.values())
    from deltatune.api import describe
    from deltatune.cli import app

    info = describe(folder)
    assert info["bytes"] == sum(b for _, b in stored.values())  # parts and head tensors, exactly as stored
    assert sum(row["bytes"] for row in info["layers"]) == part_bytes
    res = CliRunner().invoke(app, ["info", str(folder), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["bytes"] == info["bytes"]
    saved = ("parts.safetensors", "heads.safetensors", "manifest.json")  # the marker aside
    on_disk = sum(f.stat().st_size for f in folder.iterdir() if f.name in saved)
    assert info["disk_bytes"] == json.loads(res.output)["disk_bytes"] == on_disk > info["bytes"]  # + header, manifest
    assert describe(delta)["disk_bytes"] is None  # a delta object has no folder
    res = CliRunner().invoke(app, ["compress", str(folder), "--method", "quantize", "--dtype", "int8",
                                   "--out", str(tmp_path / "q")])
    assert res.exit_code == 0, res.output
    quantized = describe(tmp_path / "q")  # compact: int8 values on disk, decoded to fp32 when loaded
    assert quantized["disk_bytes"] < quantized["bytes"] < 4.2 * quantized["disk_bytes"]


def test_old_int64_file_loads_to_int32_with_the_same_outputs(tmp_path):
    model = tiny_bert()
    delta = _sparse_delta(model)
    for part in delta.parts.values():  # an older file: the same indices stored as int64
        part.indices = part.indices.to(torch.int64)
    folder = delta.save(tmp_path / "old")
    stored = _stored(folder)
    assert all(dt_ is torch.int64 for k, (dt_, _) in stored.items() if k.endswith("indices"))
    ref = {n: (p.indices.clone(), p.values.detach().clone()) for n, p in delta.parts.items()}
    inputs = tiny_inputs("bert")
    with torch.no_grad():
        ref_out = model(**inputs).logits
    dt.detach(model)
    with torch.no_grad():
        assert not torch.equal(model(**inputs).logits, ref_out)  # the delta does change the outputs
    loaded = dt.Delta.load(folder)
    for name, part in loaded.parts.items():
        assert part.indices.dtype is torch.int32
        assert torch.equal(part.indices.long(), ref[name][0]) and torch.equal(part.values.detach(), ref[name][1])
    dt.apply_delta(model, loaded)
    with torch.no_grad():
        out = model(**inputs).logits
    assert torch.equal(out, ref_out)
    dt.detach(model)


def test_trained_indices_stay_int32():
    model = tiny_bert()
    delta = dt.attach(model, dt.SparseConfig(density=0.05, regrow=False))
    out = model(**tiny_inputs("bert")).logits.sum()
    out.backward()
    assert all(p.indices.dtype is torch.int32 and p.values.grad is not None for p in delta.parts.values())
    dt.detach(model)
