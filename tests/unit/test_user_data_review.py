"""A user's own files, read as written: TSV quoting, ``:SPLIT`` on one table, ClassLabel names, encodings, cells kept
as spelled, repeated header names."""

from __future__ import annotations

import json
import warnings

import datasets
import pandas as pd
import pytest

from deltatune.errors import DataError
from deltatune.train import user_data


def test_a_tsv_that_reads_two_ways_is_refused_unless_its_quoting_shows(tmp_path):
    """A pandas cell holding a tab and a line break leaves every row as wide as the header with quoting off (4 rows
    read as 5, inventing a class), and so does a GLUE-style stray quote pair (CSV's quoting would merge three rows
    into one): nothing in either file says which reading is meant, so both are refused, naming the two readings.
    Written with every cell quoted (or holding a doubled quote), the file shows CSV's quoting and reads as written."""
    import csv

    rows = {"text": ["good film", "col1\tcol2\nsecond line", "bad film", "fine"], "label": [1, 0, 0, 1]}
    path = tmp_path / "tabnl.tsv"
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False)
    with pytest.raises(DataError, match=r"tabnl\.tsv: reads two ways .* 5 rows; with CSV's quoting 4 .*QUOTE_ALL"):
        user_data.read_table(str(path))
    glue = tmp_path / "glue.tsv"
    glue.write_text('sentence\tlabel\n" it \'s a charming journey\t1\na solid movie\t1\nthe ending feels forced "\t0\n'
                    "fine\t1\n")
    with pytest.raises(DataError, match=r"glue\.tsv: reads two ways .* 4 rows; with CSV's quoting 2"):
        user_data.read_table(str(glue))
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False, quoting=csv.QUOTE_ALL)
    with pytest.warns(UserWarning, match=r"tabnl\.tsv: its header is quoted .*read with CSV's quoting"):
        table = user_data.read_table(str(path))
    assert table["text"] == rows["text"] and table["label"] == rows["label"]
    info = user_data.task_info("classify", table, str(path), "text", None, "label")
    assert info.label_names == [0, 1]


def test_a_tsv_that_fails_with_quoting_off_and_is_not_csv_quoted_is_the_error_of_its_line(tmp_path):
    """CSV's quoting would swallow six rows into one cell (a GLUE-style stray quote); the file's own error is kept."""
    path = tmp_path / "swallow.tsv"
    path.write_text('text\tlabel\n"Hi there, she said\t1\nsecond row\t0\nbad\trow\t0\nthird row\t1\nfourth\t0\n'
                    'fifth "quoted" word\t1\nsixth\t0\n')
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(DataError, match=r"swallow\.tsv: cannot be read as TSV \(.*Expected 2 fields in line 4, "
                                            r"saw 3\); nor is it written with CSV's quoting \(line 2: the quote "
                                            r"opening a cell is not closed"):
            user_data.read_table(str(path))
    ragged = tmp_path / "ragged.tsv"  # quotes only inside cells: the first is named
    ragged.write_text('text\tlabel\nsaid "hi\t1\nb\t2\t3\n')
    with pytest.raises(DataError, match=r"line 3, saw 3\); nor is it written with CSV's quoting \(line 2: a quote "
                                        r"inside a cell that does not start with one \('\"hi"):
        user_data.read_table(str(ragged))


def test_a_split_of_a_file_or_folder_holding_one_table_is_an_error(tmp_path):
    rows = [{"text": f"t{i}", "label": i % 2} for i in range(4)]
    csv_file, jsonl, parquet = tmp_path / "train.csv", tmp_path / "r.jsonl", tmp_path / "p.parquet"
    pd.DataFrame(rows).to_csv(csv_file, index=False)
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    datasets.Dataset.from_list(rows).to_parquet(str(parquet))
    for path, kind in ((csv_file, "CSV"), (jsonl, "JSONL"), (parquet, "PARQUET")):
        with pytest.raises(DataError, match=rf"{path.name}: a {kind} file holds one table, not splits, so "
                                            rf".*{path.name}:validation picks nothing"):
            user_data.read_table(f"{path}:validation")
    records = tmp_path / "records.json"  # a JSON list of records: no splits either
    records.write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"records\.json:test needs a JSON object of splits, got a list"):
        user_data.read_table(f"{records}:test")
    folder = tmp_path / "one"  # a single dataset saved to disk: only its own recorded split names it
    datasets.Dataset.from_list(rows, split="train").save_to_disk(str(folder))
    assert len(user_data.read_table(f"{folder}:train")) == 4
    with pytest.raises(DataError, match=r"one: holds one dataset, not splits \(its split is 'train'\), so "
                                        r".*one:validation picks nothing"):
        user_data.read_table(f"{folder}:validation")


def test_classlabel_ids_are_read_as_their_names(tmp_path):
    feats = datasets.Features({"text": datasets.Value("string"),
                               "label": datasets.ClassLabel(names=["sad", "happy", "angry"])})
    folder = tmp_path / "cl"
    datasets.Dataset.from_dict({"text": ["a", "b", "c", "d"], "label": [0, 1, 2, 1]},
                               features=feats).save_to_disk(str(folder))
    table = user_data.read_table(str(folder))
    info = user_data.task_info("classify", table, str(folder), "text", None, "label")
    assert info.label_names == ["angry", "happy", "sad"]  # the names, in the documented (sorted) order
    assert user_data.to_examples(table, info, str(folder))["label"] == [2, 1, 0, 1]
    ev = tmp_path / "eval.csv"  # an eval file spelling the names maps
    ev.write_text("text,label\nx,happy\ny,sad\n")
    assert user_data.to_examples(user_data.read_table(str(ev)), info, str(ev))["label"] == [1, 2]
    unlabelled = datasets.Dataset.from_dict({"text": ["a", "b"], "label": [1, -1]}, features=feats)
    with pytest.raises(DataError, match=r"test: row 2, column 'label': class id -1 is not one of the 3 of its "
                                        r"ClassLabel"):
        user_data.to_examples(unlabelled, info, "test")
    tags = datasets.Sequence(datasets.ClassLabel(names=["O", "B-x"]))  # the tokens task's tag lists: the same names
    assert user_data.class_label_names(tags) == ["O", "B-x"] == user_data.class_label_names(tags.feature)
    assert user_data.class_label_names(datasets.Value("string")) is None


def test_json_splits_with_a_byte_order_mark_read_as_without(tmp_path):
    path = tmp_path / "bomsplits.json"
    path.write_text('\ufeff{"train": [["a", "x"], ["b", "y"]], "test": [["c", "x"]]}', encoding="utf-8")
    assert user_data.read_table(f"{path}:train")["text"] == ["a", "b"]
    with pytest.raises(DataError, match=r"bomsplits\.json: holds splits \['test', 'train'\]"):
        user_data.read_table(str(path))


def test_a_file_that_is_not_utf8_is_an_error_naming_it_its_byte_and_line(tmp_path):
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"text":"b","label":"y"}\n{"text":"caf\xe9","label":"x"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin\.jsonl: not UTF-8 text \(byte 37, line 2: b'\\xe9'\)"):
        user_data.read_table(str(latin))
    csv_file = tmp_path / "latin.csv"
    csv_file.write_bytes("text,label\ncaf\xe9,x\n".encode("cp1252"))
    with pytest.raises(DataError, match=r"latin\.csv: not UTF-8 text \(byte 14, line 2"):
        user_data.read_table(str(csv_file))
    big = tmp_path / "big.csv"  # past the first 1 MiB chunk, a two-byte character split across the chunk boundary
    head = "text,label\n" + "a,x\n" * ((1 << 20) // 4 - 3)
    head += "b" * ((1 << 20) - len(head) - 1)
    tail = "é,x\nok,y\nbad".encode()
    big.write_bytes(head.encode() + tail + b"\xff,x\n")
    at = len(head) + len(tail)
    lines = head.count("\n") + 3
    with pytest.raises(DataError, match=rf"big\.csv: not UTF-8 text \(byte {at}, line {lines}: b'\\xff'\)"):
        user_data.read_table(str(big))


def test_text_columns_keep_their_spelling_and_minus_zero_is_not_zero(tmp_path):
    """Only the label column's integers as pandas writes them (``1``, ``1.0``) are read as integers; a text column of
    numbers stays as spelled, and ``-0`` (no integer is written so) keeps its label column text."""
    path = tmp_path / "vers.csv"
    path.write_text("text,label\n1.0,a\n2.00,b\n-0,a\n")
    table = user_data.read_table(str(path))
    info = user_data.task_info("classify", table, str(path), "text", None, "label")
    assert user_data.to_examples(table, info, str(path))["text_a"] == ["1.0", "2.00", "-0"]
    neg = tmp_path / "neg0.csv"
    neg.write_text("text,label\na,-0\nb,0\nc,1\n")
    table = user_data.read_table(str(neg))
    assert user_data.task_info("classify", table, str(neg), "text", None, "label").label_names == ["-0", "0", "1"]
    ints = tmp_path / "ints.csv"  # the label column named by the caller is the one read as integers
    ints.write_text("text,intent,n\n3,1.0,-12\n007,0.0,0\n")
    table = user_data.read_table(str(ints), ("text", "intent"))
    assert table["intent"] == [1, 0] and table["text"] == ["3", "007"] and table["n"] == ["-12", "0"]


def test_a_header_naming_a_column_twice_is_an_error(tmp_path):
    for name, header in (("dup.csv", "text,label,label"), ("dup.tsv", "text\ttext\tlabel")):
        path = tmp_path / name
        sep = "\t" if name.endswith(".tsv") else ","
        path.write_text(header + "\n" + sep.join(["a", "x", "1"]) + "\n")
        twice = "label" if name.endswith(".csv") else "text"
        with pytest.raises(DataError, match=rf"{name.replace('.', '[.]')}: the header names column '{twice}' more "
                                            r"than once"):
            user_data.read_table(str(path))
    trailing = tmp_path / "trailing.csv"  # empty names (a spreadsheet's trailing commas) are not names
    trailing.write_text("text,label,,\na,x,,\nb,y,,\n")
    assert user_data.read_table(str(trailing))["label"] == ["x", "y"]
