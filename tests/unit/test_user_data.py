"""A user's own files for classify/regress: formats, label map order, hold-out, bad input, metrics."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest

from deltatune.errors import DataError
from deltatune.train import metrics, user_data

ROWS = [{"text": f"sentence {i}", "other": f"pair {i}", "label": lab, "score": float(i) / 2}
        for i, lab in enumerate(["b", "a", "c", "a", "b", "c", "a", "b", "c", "a"])]


def _write(tmp_path, fmt: str):
    path = tmp_path / f"rows.{fmt}"
    if fmt in ("csv", "tsv"):
        sep = "," if fmt == "csv" else "\t"
        lines = [sep.join(ROWS[0])] + [sep.join(str(r[k]) for k in ROWS[0]) for r in ROWS]
        path.write_text("\n".join(lines) + "\n")
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif fmt == "json":
        path.write_text(json.dumps(ROWS))
    elif fmt == "parquet":
        datasets.Dataset.from_list(ROWS).to_parquet(str(path))
    elif fmt == "disk":
        datasets.Dataset.from_list(ROWS).save_to_disk(str(path))
    return str(path)


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "json", "parquet", "disk"])
def test_every_format_reads_the_same_examples(tmp_path, fmt):
    spec = _write(tmp_path, fmt)
    table = user_data.read_table(spec)
    info = user_data.task_info("classify", table, spec, "text", "other", "label")
    assert info.label_names == ["a", "b", "c"] and info.num_labels == 3
    ex = user_data.to_examples(table, info, spec)
    assert ex["text_a"][:2] == ["sentence 0", "sentence 1"] and ex["text_b"][1] == "pair 1"
    assert ex["label"] == [1, 0, 2, 0, 1, 2, 0, 1, 2, 0]
    reg = user_data.task_info("regress", table, spec, "text", None, "score")
    out = user_data.to_examples(table, reg, spec)
    assert out["text_b"] == [None] * 10 and out["label"][3] == pytest.approx(1.5)


def test_split_of_a_dataset_dict_folder_and_of_a_json_object_of_splits(tmp_path):
    folder = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:6]),
                          "test": datasets.Dataset.from_list(ROWS[6:])}).save_to_disk(str(folder))
    assert len(user_data.read_table(f"{folder}:test")) == 4
    with pytest.raises(DataError, match=r"holds splits \['test', 'train'\]"):
        user_data.read_table(str(folder))
    clinc = tmp_path / "full.json"  # CLINC150's published layout: an object of splits of [text, intent] pairs
    clinc.write_text(json.dumps({"train": [["hi", "greet"], ["bye", "leave"]], "oos_train": [["what", "oos"]]}))
    table = user_data.read_table(f"{clinc}:train+oos_train")
    assert table["text"] == ["hi", "bye", "what"] and table["label"] == ["greet", "leave", "oos"]
    named = user_data.read_table(f"{clinc}:train", ("utterance", "intent"))
    assert named.column_names == ["utterance", "intent"] and len(named) == 2
    with pytest.raises(DataError, match="no split 'val'"):
        user_data.read_table(f"{clinc}:val")
    with pytest.raises(DataError, match=r"full\.json: holds splits \['oos_train', 'train'\]; pick one"):
        user_data.read_table(str(clinc))  # without :SPLIT, not pyarrow's JSON parse error


def test_integer_labels_sort_numerically_and_map_by_spelling(tmp_path):
    train = tmp_path / "t.csv"
    train.write_text("text,label\na,10\nb,2\nc,1\nd,2\n")
    table = user_data.read_table(str(train))
    info = user_data.task_info("classify", table, str(train), "text", None, "label")
    assert info.label_names == [1, 2, 10]  # numeric order, not "1" < "10" < "2"
    ev = tmp_path / "e.jsonl"  # the same labels written as strings in another format
    ev.write_text('{"text": "x", "label": "10"}\n{"text": "y", "label": "1"}\n')
    assert user_data.to_examples(user_data.read_table(str(ev)), info, str(ev))["label"] == [2, 0]


def test_csv_cells_are_read_as_spelled_and_only_plain_integers_become_integers(tmp_path):
    """Label codes with leading zeros keep their spelling (the same codes as JSON strings map); text cells that look
    like numbers stay text; a label column of plain integers is integers (numeric label order), any other column
    stays text."""
    codes = tmp_path / "codes.csv"
    codes.write_text("text,label,n\n007,001,3\nfever,002,-12\ncough,010,0\n")
    table = user_data.read_table(str(codes))
    assert table["text"] == ["007", "fever", "cough"] and table["n"] == ["3", "-12", "0"]
    info = user_data.task_info("classify", table, str(codes), "text", None, "label")
    assert info.label_names == ["001", "002", "010"]
    ev = tmp_path / "codes.jsonl"
    ev.write_text('{"text": "x", "label": "010"}\n{"text": "y", "label": "001"}\n')
    assert user_data.to_examples(user_data.read_table(str(ev)), info, str(ev))["label"] == [2, 0]
    for spelled in ("1.5", "+1", "01"):  # not plain integers: the column keeps its text
        other = tmp_path / "other.csv"
        other.write_text(f"text,label\na,{spelled}\nb,2\n")
        assert user_data.read_table(str(other))["label"] == [spelled, "2"]


def test_integer_labels_written_with_a_zero_decimal_map_as_integers(tmp_path):
    """pandas writes integer labels as 1.0/0.0 once the column held a NaN: they are the classes 0 and 1, so an eval
    file spelling them 1/0 (or a delta trained before) maps."""
    train, dev = tmp_path / "train.csv", tmp_path / "dev.csv"
    train.write_text("text,label\na,1.0\nb,0.0\nc,1.0\n")
    dev.write_text("text,label\nx,1\ny,0\n")
    info = user_data.task_info("classify", user_data.read_table(str(train)), str(train), "text", None, "label")
    assert info.label_names == [0, 1]
    assert user_data.to_examples(user_data.read_table(str(dev)), info, str(dev))["label"] == [1, 0]


def test_a_tsv_whose_stray_quotes_swallow_rows_keeps_its_rows(tmp_path):
    """A missing cell with GLUE-style stray quotes: CSV's quoting would swallow rows (tabs and all) up to the next
    quote; quoting stays off, every row is kept and the missing label is the error."""
    path = tmp_path / "stray.tsv"
    path.write_text('sentence\tlabel\n"Spirited Away is great\t1\nbad film\t\nawful\t0\nit\'s "fine\t1\nok\t1\n')
    table = user_data.read_table(str(path))
    assert len(table) == 5 and table["sentence"][0] == '"Spirited Away is great'
    with pytest.raises(DataError, match=r"stray\.tsv: row 2, column 'label': missing label"):
        user_data.task_info("classify", table, str(path), "sentence", None, "label")


def test_a_first_row_longer_than_the_header_is_an_error_not_a_shifted_table(tmp_path):
    """pandas makes the extra leading field an index and shifts the columns: every text would lose its start."""
    shifted = tmp_path / "comma.csv"
    shifted.write_text("text,label\nGreat movie, loved it,pos\nAwful, boring,neg\n")
    with pytest.raises(DataError, match=r"comma\.csv: the first data row has more fields than the header \(2 columns"):
        user_data.read_table(str(shifted))


def test_missing_column_names_the_file_and_lists_columns(tmp_path):
    spec = _write(tmp_path, "csv")
    table = user_data.read_table(spec)
    with pytest.raises(DataError, match=r"rows\.csv: no column 'intent' \(columns: \['text', 'other', 'label', "
                                        r"'score'\]\)"):
        user_data.task_info("classify", table, spec, "text", None, "intent")


def test_unknown_eval_label_names_file_row_and_label(tmp_path):
    spec = _write(tmp_path, "csv")
    info = user_data.task_info("classify", user_data.read_table(spec), spec, "text", None, "label")
    ev = tmp_path / "ev.csv"
    ev.write_text("text,label\nfine,a\nodd,zebra\n")
    with pytest.raises(DataError, match=r"ev\.csv: row 2, column 'label': label 'zebra' is not in the training"):
        user_data.to_examples(user_data.read_table(str(ev)), info, str(ev))


def test_empty_header_only_and_unknown_format(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DataError, match="empty.csv: file is empty"):
        user_data.read_table(str(empty))
    header = tmp_path / "header.csv"
    header.write_text("text,label\n")
    with pytest.raises(DataError, match="header.csv: has no rows"):
        user_data.read_table(str(header))
    with pytest.raises(DataError, match="unknown data format '.xlsx'"):
        (tmp_path / "x.xlsx").write_text("x")
        user_data.read_table(str(tmp_path / "x.xlsx"))
    with pytest.raises(DataError, match="not found"):
        user_data.read_table(str(tmp_path / "missing.csv"))


def test_non_numeric_regression_label_names_file_row_column(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("text,y\na,1.5\nb,high\n")
    table = user_data.read_table(str(path))
    info = user_data.task_info("regress", table, str(path), "text", None, "y")
    with pytest.raises(DataError, match=r"r\.csv: row 2, column 'y': regression label 'high' is not a finite"):
        user_data.to_examples(table, info, str(path))


def test_missing_label_and_single_class_are_errors(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": null}\n')
    with pytest.raises(DataError, match="row 2, column 'label': missing label"):
        user_data.task_info("classify", user_data.read_table(str(path)), str(path), "text", None, "label")
    one = tmp_path / "one.csv"
    one.write_text("text,label\na,x\nb,x\n")
    with pytest.raises(DataError, match="1 distinct label"):
        user_data.task_info("classify", user_data.read_table(str(one)), str(one), "text", None, "label")


def test_mixed_label_types_are_an_error(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": "x"}\n')
    with pytest.raises(DataError, match=r"mixed\.jsonl: column 'label' mixes label types \['int', 'str'\]"):
        user_data.task_info("classify", user_data.read_table(str(path)), str(path), "text", None, "label")


def test_boolean_labels_are_classes_and_labels_differing_by_spaces_are_warned(tmp_path):
    flags = tmp_path / "flags.jsonl"
    flags.write_text('{"text": "a", "label": true}\n{"text": "b", "label": false}\n{"text": "c", "label": true}\n')
    table = user_data.read_table(str(flags))
    info = user_data.task_info("classify", table, str(flags), "text", None, "label")
    assert info.label_names == [False, True]
    assert user_data.to_examples(table, info, str(flags))["label"] == [1, 0, 1]
    spaced = tmp_path / "spaced.csv"
    spaced.write_text("text,label\nhello, pos\nbye,neg\nyes,pos\n")
    with pytest.warns(UserWarning, match=r"spaced\.csv: column 'label' has labels that differ only by surrounding "
                                         r"spaces \(\[\(' pos', 'pos'\)\]\)"):
        user_data.task_info("classify", user_data.read_table(str(spaced)), str(spaced), "text", None, "label")


def test_hold_out_is_seeded_and_sized():
    ds = datasets.Dataset.from_dict({"label": list(range(50))})
    train, held = user_data.hold_out(ds, seed=3, where="x")
    again = user_data.hold_out(ds, seed=3, where="x")[1]
    other = user_data.hold_out(ds, seed=4, where="x")[1]
    assert (len(train), len(held)) == (45, 5)
    assert list(held["label"]) == list(again["label"]) != list(other["label"])
    assert sorted(list(train["label"]) + list(held["label"])) == list(range(50))
    with pytest.raises(DataError, match="pass --eval-data"):
        user_data.hold_out(ds.select([0]), seed=0, where="x")


def test_macro_f1_and_per_class_report_by_hand():
    y = np.array([0, 0, 1, 1, 2])
    p = np.array([0, 1, 1, 1, 0])
    # class 0: TP1 FP1 FN1 → F1 0.5; class 1: TP2 FP1 FN0 → 0.8; class 2: TP0 FP0 FN1 → 0
    assert metrics.macro_f1(p, y) == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    report = metrics.per_class_report(p, y, ["a", "b", "c", "d"])
    assert report["b"] == {"precision": pytest.approx(2 / 3), "recall": 1.0, "f1": pytest.approx(0.8), "support": 2}
    assert report["c"]["support"] == 1 and report["c"]["recall"] == 0.0
    assert report["d"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    logits = np.eye(3)[p]
    assert metrics.user_metrics("classify", logits, y) == {"accuracy": pytest.approx(0.6),
                                                           "macro_f1": pytest.approx(1.3 / 3)}
    reg = metrics.user_metrics("regress", np.array([[1.0], [2.0], [4.0]]), np.array([1.0, 3.0, 2.0]))
    assert reg["spearman"] == pytest.approx(0.5) and reg["pearson"] == pytest.approx(metrics.pearson(
        np.array([1.0, 2.0, 4.0]), np.array([1.0, 3.0, 2.0])))


def test_tsv_quotes_are_text_na_strings_are_values_and_a_bom_is_dropped(tmp_path) -> None:
    from deltatune.train.user_data import read_table

    quoted = tmp_path / "q.tsv"
    quoted.write_text('text\tlabel\n"Hi\t1\nthere" she said\t0\nok\t1\nfine\t0\n')
    table = read_table(str(quoted))
    assert len(table) == 4 and table["text"][:2] == ['"Hi', 'there" she said']
    na = tmp_path / "na.csv"
    na.write_bytes("\ufefftext,label\nNA,null\nnull,None\nhello,NA\n".encode())
    table = read_table(str(na))
    assert table.column_names == ["text", "label"]
    assert table["text"] == ["NA", "null", "hello"] and table["label"] == ["null", "None", "NA"]
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n,pos\nhi,neg\n")
    assert read_table(str(empty))["text"][0] is None  # an empty cell is still missing


def test_a_tsv_written_with_csv_quoting_is_read_as_written_and_says_so(tmp_path) -> None:
    import warnings

    import pandas as pd

    from deltatune.train.user_data import read_table

    rows = {"text": ['He said "hi"', "plain", 'a "b" c\tand a tab', "last"], "label": ["x", "y", "x", "y"]}
    pandas_tsv = tmp_path / "pandas.tsv"
    pd.DataFrame(rows).to_csv(pandas_tsv, sep="\t", index=False)
    with pytest.warns(UserWarning, match=r"pandas\.tsv: it cannot be read with quoting off .*read with CSV's quoting"):
        table = read_table(str(pandas_tsv))
    assert table["text"] == rows["text"] and table["label"] == rows["label"]
    no_tabs = tmp_path / "no_tabs.tsv"  # every row parses with quoting off: the doubled quotes give it away
    pd.DataFrame({k: v[:2] for k, v in rows.items()}).to_csv(no_tabs, sep="\t", index=False)
    with pytest.warns(UserWarning, match=r"no_tabs\.tsv: line 2 holds a doubled quote in a quoted cell"):
        assert read_table(str(no_tabs))["text"] == rows["text"][:2]
    quote_all = tmp_path / "all.tsv"  # csv.QUOTE_ALL: even the header is quoted
    quote_all.write_text('"text"\t"label"\n"hello"\t"x"\n')
    with pytest.warns(UserWarning, match=r"all\.tsv: its header is quoted"):
        assert read_table(str(quote_all)).column_names == ["text", "label"]
    glue_style = tmp_path / "glue.tsv"  # quotes that are text, one cell as CSV would quote it: quoting stays off
    cells = ['"We will win," he said.', '"quoted whole"', '"Why is "" == 0 true?"', '"unclosed']
    glue_style.write_text("text\tlabel\n" + "".join(f"{c}\t1\n" for c in cells))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_table(str(glue_style))["text"] == cells
    broken = tmp_path / "line_break.tsv"  # with quoting off a quoted line break splits a row into two short rows
    pd.DataFrame({"text": ["first line\nsecond line", "plain"], "label": ["x", "y"]}).to_csv(broken, sep="\t",
                                                                                            index=False)
    with pytest.warns(UserWarning, match=r"line_break\.tsv: line 2 holds a cell quoted as CSV quotes one "
                                         r"\('first line\\nsecond line'\)"):
        assert read_table(str(broken))["text"] == ["first line\nsecond line", "plain"]
    ragged = tmp_path / "ragged.tsv"  # neither way: the parser's own error, from quoting off
    ragged.write_text("text\tlabel\na\t1\nb\t2\t3\n")
    with pytest.raises(DataError, match=r"ragged\.tsv: cannot be read as TSV \(ParserError: .*Expected 2 fields"):
        read_table(str(ragged))


def test_hold_out_warns_when_repeated_rows_land_on_both_sides() -> None:
    from deltatune.train.user_data import hold_out

    rows = datasets.Dataset.from_dict({"text_a": ["same"] * 50 + [f"t{i}" for i in range(50)],
                                       "text_b": [None] * 100, "label": [0] * 100})
    with pytest.warns(UserWarning, match="held-out rows also occur among the training rows"):
        hold_out(rows, 0, "f.csv")
    unique = datasets.Dataset.from_dict({"text_a": [f"t{i}" for i in range(100)], "text_b": [None] * 100,
                                         "label": [0] * 100})
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hold_out(unique, 0, "f.csv")
