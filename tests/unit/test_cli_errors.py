"""The command line never deletes what it did not write, and every failure is one line with exit status 2
(issue 8, findings 1, 9 and 11): ``--overwrite`` on every writer, ``--no-verify`` on every reader,
``--debug`` for the traceback, and a NaN metric from ``eval`` is an error."""

from __future__ import annotations

import errno
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import typer
from conftest import tiny_bert
from typer.testing import CliRunner

import deltatune
import deltatune.api as api
from deltatune.cli import _train_configs, app, main
from deltatune.errors import ConfigError, NonFiniteError, OutputExists
from deltatune.io.outputs import MARKER, folder_bytes

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()

WRITERS = {"train", "apply", "export", "merge", "compress", "rebase"}
READERS = {"info", "eval", "apply", "export", "compress", "rebase", "merge"}


def _lora(model: torch.nn.Module, scale: float = 1.0, target: str = "query") -> deltatune.Delta:
    delta = deltatune.attach(model, deltatune.LoRAConfig(r=2, targets=[target]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for part in delta.parts.values():
            part.lora_B.copy_(torch.randn(part.lora_B.shape, generator=g) * scale)
    return delta


@pytest.fixture
def tiny(tmp_path) -> dict[str, Path]:
    """A tiny BERT base folder and a LoRA delta trained on it."""
    model = tiny_bert()
    model.save_pretrained(tmp_path / "base")
    delta = _lora(model)
    return {"base": tmp_path / "base", "delta": deltatune.save_delta(delta, tmp_path / "delta")}


def _foreign(path: Path) -> Path:
    path.mkdir()
    (path / "notes.txt").write_text("not yours")
    return path


# --------------------------------------------------------------------------------------------------
# finding 1: existing output folders
# --------------------------------------------------------------------------------------------------
def test_export_refuses_an_unrelated_folder_overwrites_on_request_and_replaces_its_own(tiny, tmp_path) -> None:
    v = _foreign(tmp_path / "v")
    res = runner.invoke(app, ["export", str(tiny["delta"]), "--out", str(v)])
    assert isinstance(res.exception, OutputExists), res.output
    assert str(v) in str(res.exception) and "notes.txt" in str(res.exception)
    assert (v / "notes.txt").read_text() == "not yours"

    res = runner.invoke(app, ["export", str(tiny["delta"]), "--out", str(v), "--overwrite"])
    assert res.exit_code == 0, res.output
    assert not (v / "notes.txt").exists() and (v / "adapter_config.json").is_file()

    res = runner.invoke(app, ["export", str(tiny["delta"]), "--out", str(v)])  # its own earlier output
    assert res.exit_code == 0, res.output
    assert deltatune.load_peft_adapter(v).parts.keys() == deltatune.load_delta(tiny["delta"]).parts.keys()


def _merge_recipe(tiny, tmp_path, out: Path) -> Path:
    recipe = tmp_path / "merge.yml"
    recipe.write_text(f"method: linear\ninputs:\n  - {tiny['delta']}\n  - {tiny['delta']}\noutput: dense\n"
                      f"out: {out}\n")
    return recipe


@pytest.mark.parametrize("command", ["apply", "compress", "rebase", "merge"])
def test_writers_refuse_an_unrelated_folder_before_working(tiny, tmp_path, command: str) -> None:
    v = _foreign(tmp_path / "v")
    args = {
        "apply": ["apply", str(tiny["delta"]), "--out", str(v), "--model", str(tiny["base"])],
        "compress": ["compress", str(tiny["delta"]), "--method", "magnitude", "--density", "0.5", "--out", str(v)],
        "rebase": ["rebase", str(tiny["delta"]), "--to", str(tiny["base"]), "--force", "--out", str(v)],
        "merge": ["merge", str(_merge_recipe(tiny, tmp_path, v)), "--no-progress"],  # the recipe's out: key
    }[command]
    res = runner.invoke(app, args)
    assert isinstance(res.exception, OutputExists), res.output
    assert str(v) in str(res.exception) and "notes.txt" in str(res.exception)
    assert sorted(p.name for p in v.iterdir()) == ["notes.txt"]


def test_apply_and_compress_replace_their_own_output_and_overwrite_on_request(tiny, tmp_path) -> None:
    ckpt = _foreign(tmp_path / "ckpt")
    apply = ["apply", str(tiny["delta"]), "--out", str(ckpt), "--model", str(tiny["base"])]
    res = runner.invoke(app, [*apply, "--overwrite"])
    assert res.exit_code == 0, res.output
    assert not (ckpt / "notes.txt").exists() and (ckpt / "model.safetensors").is_file()
    assert runner.invoke(app, apply).exit_code == 0  # its own earlier output

    small = tmp_path / "small"
    compress = ["compress", str(tiny["delta"]), "--method", "magnitude", "--density", "0.5", "--out", str(small)]
    assert runner.invoke(app, compress).exit_code == 0
    res = runner.invoke(app, compress)
    assert res.exit_code == 0
    shown = res.output.split("compressed bytes")[1].split()[0]  # the size `deltatune info` reports, marker aside
    assert int(shown.replace(",", "")) == folder_bytes(small)
    res = runner.invoke(app, ["compress", str(tiny["delta"]), "--method", "lowrank", "--rank", "1", "--out",
                              str(small)])
    assert isinstance(res.exception, OutputExists) and "compact output, not a delta one" in str(res.exception)
    res = runner.invoke(app, ["compress", str(tiny["delta"]), "--method", "lowrank", "--rank", "1", "--out",
                              str(small), "--overwrite"])
    assert res.exit_code == 0, res.output


def test_merge_overwrites_on_request_and_replaces_its_own_output(tiny, tmp_path) -> None:
    v = _foreign(tmp_path / "v")
    recipe = str(_merge_recipe(tiny, tmp_path, v))
    res = runner.invoke(app, ["merge", recipe, "--no-progress", "--overwrite"])
    assert res.exit_code == 0, res.output
    assert (v / "manifest.json").is_file() and not (v / "notes.txt").exists()
    res = runner.invoke(app, ["merge", recipe, "--no-progress"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["merge", recipe, "--no-progress", "--output", "sparse"])  # a compact output now
    assert isinstance(res.exception, OutputExists) and "delta output, not a compact one" in str(res.exception)


def test_rebase_overwrites_on_request(tiny, tmp_path) -> None:
    w = _foreign(tmp_path / "w")
    res = runner.invoke(app, ["rebase", str(tiny["delta"]), "--to", str(tiny["base"]), "--force", "--out", str(w),
                              "--overwrite"])
    assert res.exit_code == 0, res.output
    assert (w / "manifest.json").is_file() and not (w / "notes.txt").exists()


def test_every_writer_has_overwrite_and_every_reader_has_no_verify() -> None:
    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    flags = {name: {opt for p in cmd.params for opt in (*p.opts, *p.secondary_opts)} for name, cmd in commands.items()}
    assert set(flags) >= WRITERS | READERS
    assert [c for c in WRITERS if "--overwrite" not in flags[c]] == []
    assert [c for c in READERS if "--no-verify" not in flags[c]] == []


def test_train_overwrite_reaches_the_train_config() -> None:
    cfg, _ = _train_configs("sparse", None, {"overwrite": True}, [])
    assert cfg.overwrite is True
    cfg, _ = _train_configs("sparse", None, {"overwrite": None}, [])
    assert cfg.overwrite is False


def test_no_verify_reaches_the_loader(tiny, monkeypatch) -> None:
    seen = []
    real = api.load_delta

    def spy(path, verify=True):
        seen.append(verify)
        return real(path, verify=verify)

    monkeypatch.setattr(api, "load_delta", spy)
    assert runner.invoke(app, ["info", str(tiny["delta"]), "--no-verify"]).exit_code == 0
    assert runner.invoke(app, ["info", str(tiny["delta"])]).exit_code == 0
    assert seen == [False, True]


# --------------------------------------------------------------------------------------------------
# finding 11: a non-finite metric is an error
# --------------------------------------------------------------------------------------------------
def test_check_finite_metrics_names_metric_and_row() -> None:
    api.check_finite_metrics({"base": {"accuracy": 0.5}, "delta": {"accuracy": 1.0, "loss": 0.1}}, "d")
    with pytest.raises(NonFiniteError, match="metric 'loss' of model 'delta' is nan"):
        api.check_finite_metrics({"base": {"loss": 0.3}, "delta": {"accuracy": 0.5, "loss": math.nan}}, "d")
    with pytest.raises(NonFiniteError, match="metric 'loss' of model 'base' is inf"):
        api.check_finite_metrics({"base": {"loss": math.inf}}, "d")


def test_eval_of_an_overflowing_delta_exits_2(minilm, tmp_path, data_dir, monkeypatch, capsys) -> None:
    """Finite but huge LoRA values make MiniLM's outputs NaN: `eval` must fail instead of printing `loss nan`."""
    delta_dir = deltatune.save_delta(_lora(minilm, scale=1e30, target="value"), tmp_path / "huge")
    monkeypatch.setattr(sys, "argv", ["deltatune", "eval", str(delta_dir), "--limit", "8"])
    with pytest.raises(SystemExit) as done:
        main()
    assert done.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "records no task; evaluating on sst2" in " ".join(err.split())  # made in Python: the default task, said
    line = err.splitlines()[-1]
    assert line.startswith("error (NonFiniteError):") and "of model 'delta' is nan" in line, line


# --------------------------------------------------------------------------------------------------
# finding 9: one line, exit status 2, --debug for the traceback
# --------------------------------------------------------------------------------------------------
def _run_main(monkeypatch, capsys, argv: list[str], exc: BaseException) -> tuple[int, str]:
    def boom(*args, **kwargs):
        raise exc

    monkeypatch.setattr(api, "describe", boom)
    monkeypatch.setattr(sys, "argv", ["deltatune", *argv])
    with pytest.raises(SystemExit) as done:
        main()
    return done.value.code, capsys.readouterr().err


@pytest.mark.parametrize("exc", [
    RecursionError("maximum recursion depth exceeded"),
    TypeError("expected str, got dict"),
    OverflowError("cannot convert float infinity to integer"),
    UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),
    OSError(errno.EACCES, "Permission denied"),
    RuntimeError("something\nspread over\n\nlines " + "x" * 2000),
], ids=lambda e: type(e).__name__)
def test_any_exception_is_one_line_with_status_2(monkeypatch, capsys, tmp_path, exc: Exception) -> None:
    code, err = _run_main(monkeypatch, capsys, ["info", str(tmp_path)], exc)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and len(lines[0]) < 400, err
    assert lines[0].startswith(f"internal error ({type(exc).__name__}): ") and "--debug" in lines[0]


def test_deltatune_error_and_disk_full_lines(monkeypatch, capsys, tmp_path) -> None:
    long = ConfigError("field 'x' must be > 0\n" + "y" * 900)
    code, err = _run_main(monkeypatch, capsys, ["info", str(tmp_path)], long)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error (ConfigError): field 'x' must be > 0 yyy")
    assert len(err) < 400
    full = OSError(errno.ENOSPC, "No space left on device", "/data/out/model.safetensors")
    code, err = _run_main(monkeypatch, capsys, ["info", str(tmp_path)], full)
    assert code == 2 and err.startswith("error (DiskFull): disk full") and "/data/out/model.safetensors" in err


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_prints_the_traceback(monkeypatch, capsys, tmp_path, how: str) -> None:
    argv = ["info", str(tmp_path)]
    if how == "flag":
        argv = ["--debug", *argv]
    else:
        monkeypatch.setenv("DELTATUNE_DEBUG", "1")
    code, err = _run_main(monkeypatch, capsys, argv, TypeError("expected str, got dict"))
    assert code == 2 and "Traceback (most recent call last)" in err and "TypeError: expected str, got dict" in err


def test_console_script_reports_a_missing_delta_in_one_line(tmp_path) -> None:
    cmd = [sys.executable, "-m", "deltatune.cli", "info", str(tmp_path / "missing")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith("error (") and str(tmp_path / "missing") in done.stderr
    debug = subprocess.run([*cmd[:3], "--debug", *cmd[3:]], capture_output=True, text=True, timeout=300)
    assert debug.returncode == 2 and "Traceback (most recent call last)" in debug.stderr


def test_marker_does_not_disturb_loading(tiny) -> None:
    assert (tiny["delta"] / MARKER).is_file()
    assert deltatune.load_delta(tiny["delta"]).parts
