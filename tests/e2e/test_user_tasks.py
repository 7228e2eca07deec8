"""classify/regress on a user's own files with the real MiniLM: CLI train → eval --json needing only --data."""

from __future__ import annotations

import json

import datasets
import pytest
from typer.testing import CliRunner

from deltatune import api
from deltatune.errors import DataError
from deltatune.train import loop
from deltatune.train.config import TrainConfig

FAST = ["--set", "max_length=16", "--set", "eval_every=0", "--set", "progress=false", "--set", "checkpoint_every=0",
        "--batch-size", "8"]
WORDS = {"joy": "happy glad great", "anger": "angry mad furious", "fear": "scared afraid nervous"}


def _rows(n: int, start: int = 0) -> list[dict[str, str]]:
    names = sorted(WORDS)
    return [{"sentence": f"{WORDS[names[i % 3]].split()[i % 3]} day {i}", "second": f"note {i}",
             "emotion": names[i % 3]} for i in range(start, start + n)]


def test_cli_classify_csv_then_eval_json_with_only_data(tmp_path, minilm_path):
    from deltatune.cli import app

    train = tmp_path / "train.csv"
    rows = _rows(40)
    train.write_text("sentence,second,emotion\n" + "".join(f"{r['sentence']},{r['second']},{r['emotion']}\n"
                                                           for r in rows))
    ev = tmp_path / "eval.jsonl"
    ev.write_text("".join(json.dumps(r) + "\n" for r in _rows(12, start=40)))
    out = tmp_path / "run"
    runner = CliRunner()
    res = runner.invoke(app, ["train", "--task", "classify", "--data", str(train), "--text-column", "sentence",
                              "--text-pair-column", "second", "--label-column", "emotion", "--method", "lora",
                              "--steps", "3", "--out", str(out), "--set", "r=2", *FAST])
    assert res.exit_code == 0, res.output
    assert "held out 4 of 40 rows" in res.output
    manifest = json.loads((out / "delta" / "manifest.json").read_text())
    info = manifest["provenance"]["task"]
    assert info["name"] == "classify" and "task_info" not in manifest["metrics"]
    assert info["label_names"] == ["anger", "fear", "joy"] and info["text_pair_column"] == "second"
    assert manifest["metrics"]["final"].keys() == {"accuracy", "macro_f1", "loss"}

    shown = runner.invoke(app, ["eval", str(out / "delta"), "--data", str(ev), "--json"])
    assert shown.exit_code == 0, shown.output
    doc = json.loads(shown.stdout)
    assert doc.keys() == {"accuracy", "macro_f1", "loss"} and 0.0 <= doc["accuracy"] <= 1.0
    report = api.classification_report(out / "delta", data=str(ev))
    assert set(report) == {"anger", "fear", "joy"} and sum(r["support"] for r in report.values()) == 12
    right = sum(r["recall"] * r["support"] for r in report.values())
    assert right / 12 == pytest.approx(doc["accuracy"])

    # without --data: the recorded seeded hold-out, the same 4 rows the run scored at its end
    again = json.loads(runner.invoke(app, ["eval", str(out / "delta"), "--json"]).stdout)
    assert again["accuracy"] == pytest.approx(manifest["metrics"]["final"]["accuracy"])

    bad = tmp_path / "bad.csv"
    bad.write_text("sentence,second,emotion\nhello,there,surprise\n")
    failed = runner.invoke(app, ["eval", str(out / "delta"), "--data", str(bad), "--json"])
    assert failed.exit_code != 0 and isinstance(failed.exception, DataError)
    assert "bad.csv" in str(failed.exception) and "'surprise'" in str(failed.exception)


def test_regress_parquet_eval_file_pearson_spearman(tmp_path, minilm_path):
    rows = [{"text": f"{'very ' * (i % 4)}good", "y": float(i % 4)} for i in range(24)]
    datasets.Dataset.from_list(rows[:16]).to_parquet(str(tmp_path / "tr.parquet"))
    datasets.Dataset.from_list(rows[16:]).to_parquet(str(tmp_path / "ev.parquet"))
    cfg = TrainConfig(model=minilm_path, task="regress", data=str(tmp_path / "tr.parquet"),
                      eval_data=str(tmp_path / "ev.parquet"), label_column="y", out_dir=str(tmp_path / "run"),
                      max_steps=2, batch_size=8, max_length=16, eval_every=0, eval_before=False,
                      checkpoint_every=0, progress=False)
    import deltatune as dt

    result = loop.train(cfg, dt.LoRAConfig(r=2))
    assert result.final.keys() == {"pearson", "spearman", "loss"}
    assert result.delta.provenance.task["num_labels"] == 1
    metrics = api.evaluate_delta(result.delta_dir)["delta"]
    assert metrics["pearson"] == pytest.approx(result.final["pearson"], abs=1e-5)
    bad = tmp_path / "bad.csv"
    bad.write_text("text,y\nfine,1\nodd,lots\n")
    with pytest.raises(DataError, match=r"bad\.csv: row 2, column 'y'"):
        api.evaluate_delta(result.delta_dir, data=str(bad))
