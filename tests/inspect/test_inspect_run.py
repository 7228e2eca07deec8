"""``deltatune inspect`` end to end on tiny Llama: deltas and streamed checkpoints, the report folder, the CLI,
and bad input (deltas of different bases, an unwritable report folder)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import randomize_delta, tiny_llama
from typer.testing import CliRunner

import deltatune as dt
from deltatune.errors import ConfigError, FingerprintMismatch
from deltatune.inspect import InspectOptions, OutputNotWritable, inspect_deltas
from deltatune.methods.full import FullConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama base checkpoint, LoRA / sparse / full deltas of it saved, and a full fine-tuned checkpoint."""
    root = tmp_path_factory.mktemp("inspect")
    tiny_llama(0).save_pretrained(root / "base")
    paths = {"base": root / "base"}
    for name, config, std in (("lora", dt.LoRAConfig(r=4), 0.05), ("sparse", dt.SparseConfig(density=0.05), 0.02),
                              ("full", FullConfig(), 1e-3)):
        randomize_delta(tiny_llama(0), config, 1 + len(paths), std).save(root / name)
        paths[name] = root / name
    ft = tiny_llama(0)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 1e-3)
    ft.save_pretrained(root / "ft")
    paths["ft"] = root / "ft"
    return paths


def _opts(tiny, **kw) -> InspectOptions:
    return InspectOptions(base=str(tiny["base"]), plots=False, **kw)


def test_lora_and_sparse_numbers(tiny):
    report = inspect_deltas([tiny["lora"], tiny["sparse"]], _opts(tiny, labels=["lora", "sparse"]))
    lora = [r for r in report["layers"] if r["input"] == "lora"]
    sparse = [r for r in report["layers"] if r["input"] == "sparse"]
    assert lora and sparse and all(r["matrix"] for r in lora)
    assert all(r["erank"] <= 4 + 1e-4 and r["density"] == 1.0 for r in lora)  # a rank-4 product
    assert all(r["spectrum"][4] < 1e-4 * r["spectrum"][0] for r in lora)
    assert all(r["rel_norm"] > 0 and r["intruders"] is not None and len(r["intruder_cos"]) == 10 for r in lora)
    s = next(x for x in report["summaries"] if x["input"] == "sparse")
    assert 0 < s["density"] < 0.2 and s["top10_energy"] > 0.99
    assert all("placement" in r for r in sparse)
    assert any("head_counts" in r["placement"] for r in sparse)  # q/k/v/o projections split by head (dim 8)
    (pair,) = report["pairs_summary"]
    assert pair["tensors"] == len(sparse) and -0.2 < pair["cosine"] < 0.2
    assert pair["support_jaccard"] == pytest.approx(s["density"], rel=1e-6)  # LoRA's support is everything
    assert 0 <= pair["conflict_mass"] <= 1 and 0 <= pair["subspace_overlap"] <= 1
    assert report["recommendation"]["method"] in ("task_arithmetic", "ties", "linear")
    json.dumps(report)


def test_update_rank_and_per_block_sparsity(tiny):
    """§6.2 of the methods reference: rank(ΔW)/min(m, n) per matrix (a rank-4 LoRA product: 4/min; full
    fine-tuning: full rank) and the per-block means; the summary's intruder total is the ε sweep's at its ε."""
    report = inspect_deltas([tiny["lora"], tiny["full"]], _opts(tiny, labels=["lora", "full"]))
    lora = [r for r in report["layers"] if r["input"] == "lora"]
    assert all(r["rank_fraction"] == pytest.approx(4 / min(r["shape"])) for r in lora)
    full_mats = [r for r in report["layers"] if r["input"] == "full" and r["matrix"]]
    assert full_mats and all(r["rank_fraction"] == 1.0 for r in full_mats)
    blocks = [b for b in report["per_layer"] if b["input"] == "lora"]
    assert [b["layer"] for b in blocks] == sorted({r["layer"] for r in lora if r["layer"] is not None})
    for b in blocks:
        mine = [r for r in lora if r["layer"] == b["layer"]]
        assert b["tensors"] == len(mine) and b["density"] == pytest.approx(sum(r["density"] for r in mine) / len(mine))
    summary = {s["input"]: s for s in report["summaries"]}
    assert summary["full"]["rank_fraction_mean"] == 1.0
    curve = report["intruder_curve"]
    at = curve["epsilons"].index(report["options"]["epsilon"])
    for label in ("lora", "full"):
        assert summary[label]["intruders_total"] == curve[label][at]
    approx = inspect_deltas([tiny["lora"]], _opts(tiny, svd_full_max=4, svd_rank=12))
    assert all(r["rank_fraction"] is None for r in approx["layers"] if r["matrix"])  # no whole spectrum


def test_numbers_match_a_direct_computation(tiny):
    report = inspect_deltas([tiny["lora"]], _opts(tiny))
    delta = dt.Delta.load(tiny["lora"])
    module = "model.layers.1.self_attn.v_proj"
    row = next(r for r in report["layers"] if r["key"] == f"{module}.weight")
    dw = delta.parts[module].delta_weight().detach().float()
    w = tiny_llama(0).model.layers[1].self_attn.v_proj.weight.detach()
    assert row["norm"] == pytest.approx(float(dw.norm()), rel=1e-5)
    assert row["rel_norm"] == pytest.approx(float(dw.norm() / w.norm()), rel=1e-5)
    u0 = torch.linalg.svd(w).U
    u1 = torch.linalg.svd(w + dw).U
    expected = (u1[:, :10].T @ u0).abs().amax(1)
    torch.testing.assert_close(torch.tensor(row["intruder_cos"]), expected, atol=1e-4, rtol=1e-4)
    assert report["recommendation"]["method"] is None


def test_randomised_svd_path(tiny):
    exact = inspect_deltas([tiny["lora"]], _opts(tiny))
    approx = inspect_deltas([tiny["lora"]], _opts(tiny, svd_full_max=4, svd_rank=12))
    for a, b in zip(exact["layers"], approx["layers"], strict=True):
        assert not b["svd_exact"] and a["svd_exact"]
        assert b["erank"] == pytest.approx(a["erank"], rel=1e-3)  # a rank-4 ΔW is captured exactly at q = 12


def test_checkpoint_streamed_against_base(tiny, monkeypatch):
    from deltatune.algebra.checkpoint import CheckpointReader

    reads: list[str] = []
    original = CheckpointReader.get
    monkeypatch.setattr(CheckpointReader, "get", lambda self, name, into=None: reads.append(name) or
                        original(self, name, into))
    report = inspect_deltas([tiny["ft"]], _opts(tiny))
    rows = {r["key"]: r for r in report["layers"]}
    assert "model.embed_tokens.weight" in rows and "model.norm.weight" in rows
    assert not rows["model.norm.weight"]["matrix"]
    assert all(r["density"] == pytest.approx(1.0) for r in rows.values())
    assert rows["lm_head.weight"]["intruders"] is not None
    assert len(reads) == 2 * len(rows)  # each tensor read once from the fine-tune and once from the base
    with pytest.raises(ConfigError, match="--base"):
        inspect_deltas([tiny["ft"]], InspectOptions(plots=False))
    with pytest.raises(ConfigError, match="mix"):
        inspect_deltas([tiny["ft"], tiny["lora"]], _opts(tiny))


def test_a_bf16_fine_tune_of_an_fp32_base_counts_only_real_updates(tiny, tmp_path):
    # RL update sparsity is measured "in the same dtype": against the fp32 base, every bf16 rounding would count
    ft = tiny_llama(0).to(torch.bfloat16)
    changed = {}
    with torch.no_grad():
        for name, p in ft.named_parameters():
            flat = p.view(-1)
            idx = torch.arange(0, flat.numel(), 20)  # 5 % of the entries move
            flat[idx] += 0.5
            changed[name] = idx.numel() / flat.numel()
    ft.save_pretrained(tmp_path / "ft16")
    report = inspect_deltas([tmp_path / "ft16"], _opts(tiny))
    rows = {r["key"]: r for r in report["layers"]}
    for key, share in changed.items():
        assert rows[key]["density"] == pytest.approx(share, abs=0.01), key
    assert any("rounded to torch.bfloat16" in n for n in report["notes"])


def test_deltas_of_different_bases_are_refused(tiny):
    other = randomize_delta(tiny_llama(1), dt.LoRAConfig(r=4), 9, 0.05)
    with pytest.raises(FingerprintMismatch, match="different base models"):
        inspect_deltas([dt.Delta.load(tiny["lora"]), other], _opts(tiny))
    forced = inspect_deltas([dt.Delta.load(tiny["lora"]), other], _opts(tiny, force=True))
    assert len(forced["pairs_summary"]) == 1


def test_deltas_of_one_base_with_different_task_heads_are_compared(tiny):
    """A fingerprint leaves its delta's own task heads out, so deltas of one base that carry different heads have
    fingerprints that differ in their counts: they are compared on what both share (model type, probed tensors),
    as merge and compose compare them, not refused as deltas of different bases."""
    from deltatune.fingerprint import fingerprint

    plain = dt.Delta.load(tiny["lora"])
    model = tiny_llama(0)
    headed = randomize_delta(tiny_llama(0), dt.LoRAConfig(r=4), 9, 0.05)
    headed.heads = {"lm_head": {"weight": model.lm_head.weight.detach().clone()}}
    headed.fingerprint = fingerprint(model, exclude=["lm_head"])
    assert headed.fingerprint != plain.fingerprint
    report = inspect_deltas([plain, headed], _opts(tiny))
    assert len(report["pairs_summary"]) == 1


def test_unwritable_report_folder_fails_before_any_work(tiny, tmp_path, monkeypatch):
    import deltatune.inspect.analyze as analyze

    monkeypatch.setattr(analyze, "open_sources", lambda *a, **k: pytest.fail("inputs opened before the check"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputNotWritable, match="is a file"):
        inspect_deltas([tiny["lora"]], InspectOptions(out=str(blocker / "report")))

    def read_only(*args, **kwargs):
        raise PermissionError(30, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(OutputNotWritable, match="Read-only"):
        inspect_deltas([tiny["lora"]], InspectOptions(out=str(tmp_path / "report")))


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only-mode folder")
def test_folder_without_write_permission(tiny, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(OutputNotWritable):
        inspect_deltas([tiny["lora"]], InspectOptions(out=str(locked / "report")))


PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000")


def test_cli_json_and_one_line_failure(tiny, tmp_path, monkeypatch, capsys):
    import sys

    from deltatune.cli import app, main

    result = CliRunner().invoke(app, ["inspect", str(tiny["lora"]), str(tiny["sparse"]), "--base", str(tiny["base"]),
                                      "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert [s["input"] for s in report["summaries"]] == ["lora", "sparse"]  # the folders' names
    assert report["pairs_summary"][0]["a"] == "lora" and report["recommendation"]["method"]
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setattr(sys, "argv", ["deltatune", "inspect", str(tiny["lora"]), "--out", str(blocker / "r")])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2 and "error (OutputNotWritable)" in capsys.readouterr().err


def test_html_report_is_self_contained(tiny, tmp_path):
    from deltatune.inspect.report import render_html

    report = inspect_deltas([tiny["lora"], tiny["sparse"]], _opts(tiny, labels=["lora", "sparse"]))
    images = {}
    for name in ("rel_norm", "spectra"):
        (tmp_path / f"{name}.png").write_bytes(PNG)
        images[name] = tmp_path / f"{name}.png"
    page = render_html(report, images)
    assert page.count("data:image/png;base64,") == 2 and "src='rel_norm.png'" not in page
    assert "ties" in page or "task_arithmetic" in page or "linear" in page
    assert page.count("<tr>") > len(report["layers"])  # the per-tensor table


@pytest.mark.slow
def test_report_folder_with_plots(tiny, tmp_path):
    from deltatune.cli import app

    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["inspect", str(tiny["lora"]), str(tiny["sparse"]), "--base", str(tiny["base"]),
                                      "--out", str(out), "--label", "lora", "--label", "sparse"])
    assert result.exit_code == 0, result.output
    assert "merge suggestion (heuristic)" in result.output and "lora" in result.output
    names = {p.name for p in out.iterdir()}
    assert {"report.json", "report.html", "rel_norm.png", "spectra.png", "intruders.png",
            "pairwise_cosine.png", "concentration.png"} <= names
    pngs = [n for n in names if n.endswith(".png")]
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(pngs)
    assert all((out / n).read_bytes()[:8] == PNG[:8] for n in pngs)
    assert json.loads((out / "report.json").read_text())["summaries"][0]["input"] == "lora"
    again = CliRunner().invoke(app, ["inspect", str(tiny["lora"]), "--base", str(tiny["base"]), "--out", str(out)])
    assert again.exit_code == 0, again.output  # an earlier report is replaced without --overwrite


def test_gpt2_conv1d_weights_are_read_in_out_in_layout(tmp_path):
    from conftest import tiny_gpt2

    tiny_gpt2(0).save_pretrained(tmp_path / "base")
    delta = randomize_delta(tiny_gpt2(0), dt.SparseConfig(density=0.05), 3, 0.02)
    report = inspect_deltas([delta], InspectOptions(base=str(tmp_path / "base"), plots=False))
    row = next(r for r in report["layers"] if r["key"].endswith("h.0.attn.c_attn.weight"))
    assert row["shape"] == [192, 64]  # Conv1D stores (in, out) = (64, 192): transposed to (out, in)
    assert len(row["placement"]["head_counts"]) == 12  # q, k and v rows: 3 × 4 heads of 16
    assert report["head_dim"] == 16 and row["intruders"] is not None


def test_conv1d_layout_is_decided_by_model_type_not_only_by_name(tiny, tmp_path):
    # GPTBigCode and Qwen-1 name nn.Linear layers c_attn / c_proj / c_fc: only GPT-2's Conv1D is stored (in, out)
    from conftest import tiny_gpt2

    from deltatune.inspect.metrics import canonical
    from deltatune.inspect.sources import open_sources

    w = torch.randn(96, 32)
    key = "transformer.h.0.attn.c_attn.weight"
    assert canonical(key, w, conv1d=False).shape == (96, 32)
    assert canonical(key, w, conv1d=True).shape == canonical(key, w).shape == (32, 96)
    assert open_sources([tiny["lora"]], _opts(tiny)).conv1d is False  # a Llama base
    tiny_gpt2(0).save_pretrained(tmp_path / "gpt2")
    delta = randomize_delta(tiny_gpt2(0), dt.LoRAConfig(r=2), 1, 0.05)
    assert open_sources([delta], InspectOptions(base=str(tmp_path / "gpt2"), plots=False)).conv1d is True


def test_a_tied_lm_head_is_read_from_the_input_embedding_and_its_updates_are_summed_with_it(tmp_path):
    # GPT-2 stores only transformer.wte.weight: lm_head.weight is that tensor, so a LoRA on both is one update
    from conftest import tiny_gpt2

    from deltatune.algebra.inputs import DeltaInput

    tiny_gpt2(0).save_pretrained(tmp_path / "base")
    wte = tiny_gpt2(0).transformer.wte.weight.detach()
    head_only = randomize_delta(tiny_gpt2(0), dt.LoRAConfig(r=2, targets=["lm_head"]), 1, 0.2)
    both = randomize_delta(tiny_gpt2(0), dt.LoRAConfig(r=2, targets=["transformer.wte", "lm_head"]), 2, 0.2)
    report = inspect_deltas([head_only, both], InspectOptions(base=str(tmp_path / "base"), plots=False,
                                                              labels=["head", "both"]))
    rows = {(r["input"], r["key"]): r for r in report["layers"]}
    assert set(rows) == {("head", "transformer.wte.weight"), ("both", "transformer.wte.weight")}
    two = DeltaInput(both, "both")
    expected = {"head": DeltaInput(head_only, "head").tau("lm_head.weight"),
                "both": two.tau("lm_head.weight") + two.tau("transformer.wte.weight")}
    for label, tau in expected.items():
        row = rows[(label, "transformer.wte.weight")]
        assert row["norm"] == pytest.approx(float(tau.norm()), rel=1e-5)
        assert row["rel_norm"] == pytest.approx(float(tau.norm() / wte.norm()), rel=1e-5)
    assert len(report["pairs"]) == 1  # the two inputs compared on the one shared tensor


def test_a_llama_bitfit_delta_is_inspected_against_zero_biases(tiny):
    # BitFit's default adds biases to Llama's bias-free layers: their θ₀ is zero, so relative numbers are undefined
    delta = randomize_delta(tiny_llama(0), dt.make_config("bitfit", {}), 7, 0.05)
    report = inspect_deltas([delta], _opts(tiny))
    assert len(report["layers"]) == len(delta.parts) == 14
    for row in report["layers"]:
        part = delta.parts[row["key"].removesuffix(".bias")]
        assert row["norm"] == pytest.approx(float(part.bias_delta.detach().norm()), rel=1e-5)
        assert row["rel_norm"] is None and row["rel_entry_q50"] is None
