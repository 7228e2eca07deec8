"""Causal-LM data (text blocks, instruction pairs) and the padding collator."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from deltatune.errors import DataError
from deltatune.train.collate import pad_collate
from deltatune.train.glue import default_data_dir
from deltatune.train.text import instruction_pairs, text_blocks


@pytest.fixture(scope="module")
def shakespeare() -> Path:
    try:
        path = default_data_dir() / "tinyshakespeare" / "input.txt"
    except DataError as exc:
        pytest.skip(f"shared data folder not available: {exc}")
    if not path.is_file():
        pytest.skip(f"{path} missing")
    return path


def test_text_blocks_full_blocks(shakespeare: Path, tokenizer) -> None:
    limit = 20_000
    ds = text_blocks(shakespeare, tokenizer, block_size=64, limit_chars=limit)
    text = shakespeare.read_text(encoding="utf-8")[:limit]
    total = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert len(ds) == total // 64 > 0
    assert ds.column_names == ["input_ids", "attention_mask", "labels"]
    for row in ds:
        assert len(row["input_ids"]) == 64
        assert row["labels"] == row["input_ids"]
        assert row["attention_mask"] == [1] * 64
    special = set(tokenizer.all_special_ids)
    assert not special & {t for row in ds["input_ids"] for t in row}
    # blocks are consecutive, non-overlapping slices of the token stream
    whole = tokenizer(text, add_special_tokens=False)["input_ids"]
    flat = [t for row in ds["input_ids"] for t in row]
    assert flat == whole[: len(flat)]


def test_text_blocks_errors(tmp_path: Path, tokenizer) -> None:
    short = tmp_path / "short.txt"
    short.write_text("to be or not to be\n", encoding="utf-8")
    with pytest.raises(DataError, match="fewer than block_size"):
        text_blocks(short, tokenizer, block_size=512)
    with pytest.raises(DataError, match="not found"):
        text_blocks(tmp_path / "absent.txt", tokenizer, block_size=8)


def _write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_instruction_pairs_masks_prompt(tmp_path: Path, tokenizer) -> None:
    records = [
        {"prompt": "What is two plus two?", "response": "Four."},
        {"prompt": "Name a colour.", "response": "Blue, like the sea."},
    ]
    path = _write_jsonl(tmp_path / "pairs.jsonl", [json.dumps(records[0]), "", "   ", json.dumps(records[1])])
    ds = instruction_pairs(path, tokenizer, max_length=64)
    assert len(ds) == 2
    end = tokenizer.sep_token_id  # MiniLM (BERT) has no EOS, so SEP ends the response
    for rec, row in zip(records, ds, strict=True):
        p = tokenizer(rec["prompt"], add_special_tokens=False)["input_ids"]
        r = tokenizer(rec["response"], add_special_tokens=False)["input_ids"]
        assert row["input_ids"] == p + r + [end]
        assert row["labels"] == [-100] * len(p) + r + [end]
        assert row["attention_mask"] == [1] * len(row["input_ids"])

    short = instruction_pairs(path, tokenizer, max_length=7)
    p0 = tokenizer(records[0]["prompt"], add_special_tokens=False)["input_ids"]
    assert len(p0) == 6
    assert [len(x) for x in short["input_ids"]] == [7, 7]
    assert short[0]["labels"][:6] == [-100] * 6 and short[0]["labels"][6] != -100


def test_a_prompt_that_fills_max_length_is_skipped_not_trained_as_nan(tmp_path: Path, tokenizer, capsys) -> None:
    """Its labels would all be -100 (loss 0/0 = NaN in a batch of such rows): skipped and counted; none left is an
    error. A UTF-8 byte-order mark before the first record is not part of it."""
    long = json.dumps({"prompt": "one two three four five six seven eight", "response": "nine"})
    short = json.dumps({"prompt": "hi", "response": "there"})
    path = tmp_path / "pairs.jsonl"
    path.write_text("\ufeff" + "\n".join([long, short, long]) + "\n", encoding="utf-8")
    ds = instruction_pairs(path, tokenizer, max_length=5)
    assert len(ds) == 1 and any(t != -100 for t in ds[0]["labels"])
    assert "skipped 2 of 3 records whose prompt fills --max-length 5 tokens (first: line 1)" in capsys.readouterr().err
    first_only = _write_jsonl(tmp_path / "first.jsonl", [json.dumps({"prompt": "", "response": "x y"})])
    with pytest.raises(DataError, match="every record"):  # its one kept label is token 0, which nothing predicts
        instruction_pairs(first_only, tokenizer, max_length=1)
    only_long = _write_jsonl(tmp_path / "long.jsonl", [long])
    with pytest.raises(DataError, match="every record's prompt fills --max-length 5"):
        instruction_pairs(only_long, tokenizer, max_length=5)


def test_instruction_pairs_custom_fields(tmp_path: Path, tokenizer) -> None:
    path = _write_jsonl(tmp_path / "qa.jsonl", [json.dumps({"q": "hello", "a": "world"})])
    ds = instruction_pairs(path, tokenizer, max_length=16, prompt_field="q", response_field="a")
    assert ds[0]["labels"][0] == -100 and ds[0]["labels"][1] == ds[0]["input_ids"][1]


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"prompt": "a", "response": ', "not valid JSON"),
        ('{"prompt": "a"}', "missing field 'response'"),
        ('["prompt", "response"]', "expected a JSON object"),
        ('{"prompt": "a", "response": 3}', "field 'response' must be a string"),
    ],
)
def test_instruction_pairs_bad_line(tmp_path: Path, tokenizer, bad_line: str, message: str) -> None:
    good = json.dumps({"prompt": "a", "response": "b"})
    path = _write_jsonl(tmp_path / "bad.jsonl", [good, "", bad_line, good])
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}:3: {message}"):
        instruction_pairs(path, tokenizer, max_length=16)


def test_pad_collate_sequences() -> None:
    features = [
        {
            "input_ids": [5, 6, 7],
            "attention_mask": [1, 1, 1],
            "token_type_ids": [0, 0, 1],
            "labels": [-100, 6, 7],
        },
        {"input_ids": [8], "attention_mask": [1], "token_type_ids": [0], "labels": [8]},
    ]
    batch = pad_collate(features, pad_token_id=99)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 99, 99]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 1], [0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_pad_collate_scalar_labels() -> None:
    ints = pad_collate([{"input_ids": [1, 2], "labels": 1}, {"input_ids": [3], "labels": 0}], pad_token_id=0)
    assert ints["labels"].dtype == torch.long and ints["labels"].tolist() == [1, 0]
    assert ints["input_ids"].tolist() == [[1, 2], [3, 0]]
    floats = pad_collate(
        [{"input_ids": torch.tensor([1]), "labels": 4.5}, {"input_ids": torch.tensor([2, 3]), "labels": 0.0}],
        pad_token_id=0,
    )
    assert floats["labels"].dtype == torch.float32 and floats["labels"].tolist() == [4.5, 0.0]
    with pytest.raises(DataError, match="empty batch"):
        pad_collate([], pad_token_id=0)
