"""``deltatune predict`` on a user's file with real MiniLM classify deltas: labels spelled as trained, input
order, top-k, several deltas (different label maps, different kinds) in one routed pass equal to each alone,
and typed errors for a delta without a head and a missing column."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import deltatune
from deltatune.errors import DataError
from deltatune.prediction import predict
from deltatune.train import loop
from deltatune.train.config import TrainConfig

WORDS = {"joy": "happy glad great", "anger": "angry mad furious", "fear": "scared afraid nervous"}


def _rows(n: int, labels: list[str], start: int = 0) -> list[dict[str, str]]:
    return [{"text": f"{WORDS[labels[i % len(labels)]].split()[i % 3]} day {i}", "label": labels[i % len(labels)]}
            for i in range(start, start + n)]


def _train(tmp_path, minilm_path, name: str, labels: list[str], method: str, **method_cfg):
    data = tmp_path / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows(48, labels)))
    cfg = TrainConfig(model=minilm_path, task="classify", data=str(data), out_dir=str(tmp_path / name), max_steps=6,
                      batch_size=8, max_length=16, lr=5e-3, eval_every=0, eval_before=False, checkpoint_every=0,
                      progress=False, keep_best=False)
    return loop.train(cfg, deltatune.make_config(method, method_cfg)).delta_dir


@pytest.fixture(scope="module")
def deltas(tmp_path_factory, minilm_path):
    tmp = tmp_path_factory.mktemp("predict")
    return {"three": _train(tmp, minilm_path, "three", sorted(WORDS), "lora", r=2),
            "two": _train(tmp, minilm_path, "two", ["anger", "joy"], "dora", r=2),
            "three_ia3": _train(tmp, minilm_path, "three_ia3", sorted(WORDS), "ia3")}


def test_predict_labels_scores_and_order(deltas, tmp_path):
    inputs = tmp_path / "in.csv"
    rows = _rows(10, sorted(WORDS), start=100)
    inputs.write_text("text\n" + "".join(f"{r['text']}\n" for r in rows))
    out = predict(deltas["three"], str(inputs), out=tmp_path / "p.jsonl", top_k=2)
    lines = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert lines == out and len(out) == len(rows)
    for row in out:
        assert row["label"] in WORDS and 0 < row["score"] <= 1
        assert [t["label"] for t in row["top"]][0] == row["label"] and len(row["top"]) == 2
        assert row["top"][0]["score"] >= row["top"][1]["score"]
    one_by_one = [predict(deltas["three"], _single(tmp_path, r, i)) for i, r in enumerate(rows)]
    assert [o[0]["label"] for o in one_by_one] == [r["label"] for r in out]  # input order kept, batching exact
    assert all(abs(o[0]["score"] - r["score"]) < 1e-4 for o, r in zip(one_by_one, out, strict=True))


def _single(tmp_path, row, i):
    path = tmp_path / f"one{i}.jsonl"
    path.write_text(json.dumps({"text": row["text"]}) + "\n")
    return str(path)


def test_several_deltas_in_one_routed_run_equal_each_alone(deltas, tmp_path):
    inputs = tmp_path / "in.jsonl"
    inputs.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in _rows(7, sorted(WORDS), start=200)))
    names = ["three", "two", "three_ia3"]
    together = predict([deltas[n] for n in names], str(inputs))
    for name in names:
        alone = predict(deltas[name], str(inputs))
        for row, ref in zip(together, alone, strict=True):
            assert row[name]["label"] == ref["label"]
            assert abs(row[name]["score"] - ref["score"]) < 1e-5
    assert {row["two"]["label"] for row in together} <= {"anger", "joy"}


def test_single_sentence_and_sentence_pair_deltas_in_one_run(deltas, tmp_path, minilm_path):
    """A pair delta beside single-sentence ones (SST-2 with MRPC): each kind is tokenized in batches of its own
    (one mixed tokenizer call failed), and every row equals the delta alone."""
    rows = [{**r, "second": f"and then {r['text']}"} for r in _rows(48, ["anger", "joy"])]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = TrainConfig(model=minilm_path, task="classify", data=str(data), text_pair_column="second",
                      out_dir=str(tmp_path / "pair"), max_steps=2, batch_size=8, max_length=24, eval_every=0,
                      eval_before=False, checkpoint_every=0, progress=False, keep_best=False)
    pair = loop.train(cfg, deltatune.make_config("lora", {"r": 2})).delta_dir
    inputs = tmp_path / "in.jsonl"
    inputs.write_text("".join(json.dumps({"text": r["text"], "second": r["second"]}) + "\n" for r in rows[:5]))
    together = predict([pair, deltas["two"]], str(inputs), batch_size=4)  # two labels each: one model
    assert all(list(row) == ["pair", "two"] for row in together)  # each row's keys in the order the deltas came
    for name, delta in (("two", deltas["two"]), ("pair", pair)):
        for row, ref in zip(together, predict(delta, str(inputs)), strict=True):
            assert row[name]["label"] == ref["label"] and abs(row[name]["score"] - ref["score"]) < 1e-5


def test_cli_predict_with_several_deltas(deltas, tmp_path):
    from deltatune.cli import app

    inputs = tmp_path / "in.jsonl"
    inputs.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in _rows(4, sorted(WORDS))))
    res = CliRunner().invoke(app, ["predict", str(deltas["three"]), "--delta", str(deltas["two"]), "--data",
                                   str(inputs), "--out", str(tmp_path / "o.jsonl")])
    assert res.exit_code == 0, res.output
    lines = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and all(set(x) == {"three", "two"} for x in lines)


def test_predict_bad_input(deltas, tmp_path, minilm_path):
    inputs = tmp_path / "in.jsonl"
    inputs.write_text(json.dumps({"sentence": "happy"}) + "\n")
    with pytest.raises(DataError, match="no column .text.*sentence"):
        predict(deltas["three"], str(inputs))
    blank = tmp_path / "blank.csv"  # an empty text cell: an error, as in training, not a prediction for "None"
    blank.write_text("text\nhappy\n\"\"\n")
    with pytest.raises(DataError, match=r"blank\.csv: row 2, column 'text': missing text"):
        predict(deltas["three"], str(blank))
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(minilm_path)
    headless = deltatune.attach(encoder, deltatune.LoRAConfig(r=2))
    headless.save(tmp_path / "headless")
    with pytest.raises(DataError, match="no classification head"):
        predict(tmp_path / "headless", str(inputs))
    assert torch.is_grad_enabled()
