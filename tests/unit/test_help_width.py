"""Help and tables read at 80 columns: no help text swallowed as markup, module names never cut."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_delta, tiny_bert
from rich.console import Console
from typer.testing import CliRunner

import deltatune
from deltatune.cli import app


def test_compress_help_keeps_bracketed_text():
    res = CliRunner().invoke(app, ["compress", "--help"], env={"COLUMNS": "80"}, terminal_width=80)
    assert res.exit_code == 0
    assert "[density, 1]" in res.output
    assert max(len(line) for line in res.output.splitlines()) <= 80


def test_info_at_80_columns_keeps_module_names_whole(tmp_path, monkeypatch):
    import deltatune.cli as cli

    delta = randomize_delta(tiny_bert(), deltatune.LoRAConfig(r=2), 0, 0.1)
    delta.save(tmp_path / "d")
    monkeypatch.setattr(cli, "out", Console(width=80, highlight=False))
    res = CliRunner().invoke(app, ["info", str(tmp_path / "d")])
    assert res.exit_code == 0, res.output
    column = "".join(line.split("│")[1].strip() for line in res.output.splitlines() if line.startswith("│"))
    for name in delta.parts:  # folded over lines, never cut
        assert name in column, name
    assert "…" not in res.output
    assert torch.is_grad_enabled()


@pytest.mark.parametrize("verb", ["train", "predict", "generate", "merge", "methods"])
def test_every_help_fits_80_columns(verb):
    res = CliRunner().invoke(app, [verb, "--help"], env={"COLUMNS": "80"}, terminal_width=80)
    assert res.exit_code == 0
    assert max(len(line) for line in res.output.splitlines()) <= 80


def test_info_norm_is_the_update_norm_or_a_dash_where_the_base_is_needed(tmp_path, monkeypatch):
    """‖Δ‖ of an additive part is ‖Δθ‖ over its updates (bias parts too); base-dependent kinds print "–" (JSON
    null) with a note, never NaN."""
    import json

    import deltatune.cli as cli

    model = tiny_bert()
    lora = randomize_delta(model, deltatune.LoRAConfig(r=2), 0, 0.1)
    lora.save(tmp_path / "lora")
    monkeypatch.setattr(cli, "out", Console(width=200, highlight=False))
    res = CliRunner().invoke(app, ["info", str(tmp_path / "lora"), "--json"])
    rows = {r["module"]: r["delta_norm"] for r in json.loads(res.output)["layers"]}
    for name, part in lora.parts.items():
        (update,) = part.updates().values()
        assert rows[name] == pytest.approx(float(update.norm()), rel=1e-5) and rows[name] > 0
    dora = randomize_delta(tiny_bert(), deltatune.get_method("dora").parse({"r": 2}), 0, 0.1)
    dora.save(tmp_path / "dora")
    res = CliRunner().invoke(app, ["info", str(tmp_path / "dora")])
    assert res.exit_code == 0 and "nan" not in res.output.lower() and "depends on the base weights" in res.output
    res = CliRunner().invoke(app, ["info", str(tmp_path / "dora"), "--json"])
    assert all(r["delta_norm"] is None for r in json.loads(res.output)["layers"])
