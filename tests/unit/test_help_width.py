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
