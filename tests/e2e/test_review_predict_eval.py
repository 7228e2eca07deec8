"""The review's predict/eval/apply findings on real MiniLM deltas trained a step or two: ``predict`` truncates as
the delta was trained (as ``eval`` does) unless ``--max-length`` says otherwise, ``apply`` names a tokens delta's
tags, ``eval`` reports an undefined correlation as undefined, a changed training file is refused by ``--resume``
and by ``eval``'s rebuilt hold-out, and a max_length beyond MiniLM's 512 positions is a ConfigError up front."""

from __future__ import annotations

import csv
import json
import math

import pytest
from typer.testing import CliRunner

import deltatune
from deltatune.api import apply_to_checkpoint, evaluate_delta
from deltatune.errors import ConfigError, DataError
from deltatune.prediction import predict
from deltatune.train import loop
from deltatune.train.config import TrainConfig
from deltatune.train.run_record import data_fingerprint

LABELS = ["anger", "fear", "joy"]
WORDS = {"joy": "happy glad great", "anger": "angry mad furious", "fear": "scared afraid nervous"}
FAST = dict(eval_every=0, eval_before=False, checkpoint_every=0, progress=False, keep_best=False)


def _rows(n: int, start: int = 0) -> list[list[str]]:
    """Rows much longer than six tokens, whose label word comes last: truncation changes what the model sees."""
    return [[f"on day {i} of the long week the weather was mild and then {WORDS[LABELS[i % 3]].split()[i % 3]}",
             LABELS[i % 3]] for i in range(start, start + n)]


def _csv(path, rows, header=("text", "label")):
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([list(header), *rows])
    return str(path)


def _train(minilm_path, out, **kw):
    cfg = TrainConfig(model=minilm_path, out_dir=str(out), batch_size=8, lr=5e-3, **{**FAST, **kw})
    return loop.train(cfg, deltatune.make_config("lora", {"r": 2})).delta_dir


@pytest.fixture(scope="module")
def classify(tmp_path_factory, minilm_path):
    root = tmp_path_factory.mktemp("classify6")
    data = _csv(root / "train.csv", _rows(40))
    return root, _train(minilm_path, root / "run", task="classify", data=data, max_length=6, max_steps=2)


def _conll(path, n: int) -> str:
    words = ["John", "Smith", "visited", "New", "York", "and", "then", "Paris", "with", "Mary", "Lee", "today"]
    tags = ["B-person", "I-person", "O", "B-location", "I-location", "O", "O", "B-location", "O", "B-person",
            "I-person", "O"]
    path.write_text("\n".join("".join(f"{w}\t{t}\n" for w, t in zip(words, tags, strict=True)) for _ in range(n)))
    return str(path)


@pytest.fixture(scope="module")
def tokens(tmp_path_factory, minilm_path):
    root = tmp_path_factory.mktemp("tokens6")
    data = _conll(root / "train.conll", 12)
    return root, _train(minilm_path, root / "run", task="tokens", data=data, max_length=6, max_steps=1)


# --------------------------------------------------------------------------------------------------
# finding 3: predict reads inputs as the delta was trained (its recorded max_length), as eval does
# --------------------------------------------------------------------------------------------------
def test_predict_truncates_to_the_recorded_max_length_as_eval_does(classify, tmp_path):
    from deltatune.cli import app

    root, delta = classify
    rows = _rows(12, start=100)
    inputs = _csv(tmp_path / "in.csv", rows)
    default = predict(delta, inputs)
    assert default == predict(delta, inputs, max_length=6)
    assert [r["score"] for r in default] != [r["score"] for r in predict(delta, inputs, max_length=64)]
    accuracy = sum(p["label"] == r[1] for p, r in zip(default, rows, strict=True)) / len(rows)
    assert math.isclose(evaluate_delta(delta, data=inputs)["delta"]["accuracy"], accuracy)  # the same rows read
    res = CliRunner().invoke(app, ["predict", str(delta), "--data", inputs, "--max-length", "64"])
    assert res.exit_code == 0, res.output
    assert [json.loads(line) for line in res.stdout.splitlines()] == predict(delta, inputs, max_length=64)


def test_token_predict_truncates_to_the_recorded_max_length(tokens, tmp_path):
    root, delta = tokens
    inputs = _conll(tmp_path / "in.conll", 2)
    default = predict(delta, inputs)
    assert default == predict(delta, inputs, max_length=6)
    assert None in default[0]["scores"]  # words past the six tokens trained on: no sub-token, no score
    assert None not in predict(delta, inputs, max_length=64)[0]["scores"]


# --------------------------------------------------------------------------------------------------
# finding 6: apply writes a tokens delta's BIO tags as the checkpoint's id2label
# --------------------------------------------------------------------------------------------------
def test_apply_names_a_tokens_delta_tags(tokens, tmp_path):
    from transformers import AutoModelForTokenClassification

    root, delta = tokens
    apply_to_checkpoint(delta, tmp_path / "ckpt")
    tags = json.loads((delta / "manifest.json").read_text())["provenance"]["task"]["label_names"]
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["architectures"] == ["BertForTokenClassification"]
    assert [config["id2label"][str(i)] for i in range(len(tags))] == tags
    assert AutoModelForTokenClassification.from_pretrained(tmp_path / "ckpt").config.label2id["B-person"] == \
        tags.index("B-person")


# --------------------------------------------------------------------------------------------------
# finding 9: a regress delta on constant targets: Pearson/Spearman undefined, the loss shown
# --------------------------------------------------------------------------------------------------
def test_eval_of_constant_targets_reports_the_correlations_undefined(tmp_path, minilm_path):
    from deltatune.cli import app

    data = _csv(tmp_path / "reg.csv", [[f"item {i} " + "good " * (i % 5), str(i % 5 + 0.5)] for i in range(24)],
                ("text", "score"))
    delta = _train(minilm_path, tmp_path / "reg", task="regress", data=data, label_column="score", max_length=16,
                   max_steps=1)
    const = _csv(tmp_path / "const.csv", [[f"thing {i}", "3.0"] for i in range(5)], ("text", "score"))
    metrics = evaluate_delta(delta, data=const)["delta"]
    assert metrics["pearson"] is None and metrics["spearman"] is None and math.isfinite(metrics["loss"])
    res = CliRunner().invoke(app, ["eval", str(delta), "--data", const, "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.splitlines()[-1])["pearson"] is None
    res = CliRunner().invoke(app, ["eval", str(delta), "--limit", "1"])
    assert res.exit_code == 0 and "undefined" in res.stdout, res.output


# --------------------------------------------------------------------------------------------------
# finding 4: a changed training file: eval does not rebuild a hold-out from it; --resume is refused
# --------------------------------------------------------------------------------------------------
def test_eval_refuses_to_rebuild_the_hold_out_from_a_changed_training_file(classify, tmp_path):
    root, delta_dir = classify
    data = tmp_path / "train.csv"
    data.write_bytes((root / "train.csv").read_bytes())
    d = deltatune.load_delta(delta_dir)
    assert d.provenance.train["data_fingerprint"] == data_fingerprint(str(root / "train.csv"))  # training records it
    d.provenance.train["data"] = str(data)  # a copy of the training file, to change here
    assert evaluate_delta(d)["delta"]["accuracy"] is not None  # unchanged: the recorded hold-out
    body = data.read_text().splitlines()
    data.write_text("\n".join([body[0], *reversed(body[1:])]) + "\n")  # re-sorted: the same rows, in another order
    with pytest.raises(DataError, match=rf"{data}: the data changed since the delta was trained .*--data FILE"):
        evaluate_delta(d)
    assert evaluate_delta(d, data=str(data))["delta"]["accuracy"] is not None  # a file to evaluate, given
    del d.provenance.train["data_fingerprint"]  # a delta trained before data was fingerprinted: as before
    assert evaluate_delta(d)["delta"]["accuracy"] is not None


def test_resume_after_the_label_set_changed_names_the_data(tmp_path, minilm_path):
    data = tmp_path / "train.csv"
    _csv(data, _rows(24))
    kw = dict(task="classify", data=str(data), max_length=8, max_steps=2)
    _train(minilm_path, tmp_path / "run", **{**kw, "checkpoint_every": 1})
    _csv(data, [*_rows(24), ["a new kind of row", "surprise"]])  # a fourth label: another classifier
    with pytest.raises(DataError, match=rf"{data}: the data changed since the checkpoint .*relabelled"):
        _train(minilm_path, tmp_path / "run", **{**kw, "checkpoint_every": 1}, resume=True)


# --------------------------------------------------------------------------------------------------
# finding 10: a max_length beyond MiniLM's 512 positions: ConfigError before any data is read
# --------------------------------------------------------------------------------------------------
def test_max_length_beyond_the_positions_is_refused_by_eval_and_predict(classify, tmp_path, minilm_path):
    root, delta_dir = classify
    inputs = _csv(tmp_path / "in.csv", _rows(3, start=200))
    with pytest.raises(ConfigError, match=r"--max-length is 1024, .* 512 positions"):
        predict(delta_dir, inputs, max_length=1024)
    d = deltatune.load_delta(delta_dir)
    d.provenance.train["max_length"] = 1024
    with pytest.raises(ConfigError, match="recorded max_length"):
        predict(d, inputs)
    with pytest.raises(ConfigError, match=r"max_length is 1024, .* 512 positions"):
        evaluate_delta(d, data=inputs)
