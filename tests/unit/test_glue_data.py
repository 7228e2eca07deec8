"""GLUE TSV parsing against the real files in the shared data folder."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest

from deltatune.errors import DataError
from deltatune.train.glue import GLUE_TASKS, default_data_dir, get_task, read_glue_split, tokenize_pairs

OFFICIAL_ROWS: dict[tuple[str, str], int] = {
    ("sst2", "train"): 67_349,
    ("sst2", "dev"): 872,
    ("mrpc", "train"): 3_668,
    ("mrpc", "dev"): 408,
    ("rte", "train"): 2_490,
    ("rte", "dev"): 277,
    ("cola", "train"): 8_551,
    ("cola", "dev"): 1_043,
    ("stsb", "train"): 5_749,
    ("stsb", "dev"): 1_500,
    ("wnli", "train"): 635,
    ("wnli", "dev"): 71,
    ("qnli", "dev"): 5_463,
}


@pytest.fixture(scope="module")
def data_dir() -> Path:
    try:
        path = default_data_dir()
    except DataError as exc:
        pytest.skip(f"shared data folder not available: {exc}")
    if not (path / "glue").is_dir():
        pytest.skip(f"no glue/ folder under {path}")
    return path




def test_task_table_covers_official_rows() -> None:
    assert {name for name, _ in OFFICIAL_ROWS} == set(GLUE_TASKS)
    for name, task in GLUE_TASKS.items():
        assert {s for n, s in OFFICIAL_ROWS if n == name} == set(task.splits)


@pytest.mark.parametrize(("task", "split"), sorted(OFFICIAL_ROWS))
def test_official_row_counts_and_labels(data_dir: Path, task: str, split: str) -> None:
    ds = read_glue_split(data_dir, task, split)
    spec = get_task(task)
    assert len(ds) == OFFICIAL_ROWS[(task, split)]
    assert ds.column_names == ["text_a", "text_b", "label"]
    labels = np.asarray(ds["label"])
    if spec.is_regression:
        assert ds.features["label"].dtype == "float32"
        assert labels.min() >= 0.0 and labels.max() <= 5.0
    else:
        assert ds.features["label"].dtype == "int64"
        assert set(np.unique(labels).tolist()) == {0, 1}
    text_a = list(ds["text_a"])
    text_b = list(ds["text_b"])
    assert all(isinstance(t, str) and t.strip() for t in text_a)
    if spec.is_pair:
        assert all(isinstance(t, str) for t in text_b)
    else:
        assert all(t is None for t in text_b)


def test_task_name_spellings_and_unknown() -> None:
    for spelling in ("SST-2", "sst2", "sst-2", "Sst_2"):
        assert get_task(spelling).name == "sst2"
    assert get_task("STS-B").is_regression and get_task("stsb").num_labels == 1
    with pytest.raises(DataError, match="known tasks.*sst2"):
        get_task("mnli")
    with pytest.raises(DataError, match="known tasks"):
        read_glue_split(Path("."), "squad", "train")


def test_specific_rows(data_dir: Path) -> None:
    mrpc = read_glue_split(data_dir, "MRPC", "train", limit=3)
    assert len(mrpc) == 3
    assert mrpc[0]["label"] == 1
    assert mrpc[0]["text_a"].startswith("Amrozi accused his brother")
    assert "\ufeff" not in "".join(list(mrpc["text_a"]) + list(mrpc["text_b"]))
    assert "\ufeff" not in "".join(mrpc.column_names)

    cola_dev = read_glue_split(data_dir, "cola", "dev")
    last = (data_dir / "glue" / "CoLA" / "dev.tsv").read_text(encoding="utf-8").split("\n")[-1].split("\t")
    assert cola_dev[-1]["text_a"] == last[3] and cola_dev[-1]["label"] == int(last[1])

    rte = read_glue_split(data_dir, "rte", "dev", limit=1)
    assert rte[0]["label"] == 1  # not_entailment

    qnli = read_glue_split(data_dir, "qnli", "validation", limit=1)
    assert qnli[0]["label"] == 0  # entailment

    sts = read_glue_split(data_dir, "sts-b", "train", limit=1)
    assert sts[0] == {
        "text_a": "A plane is taking off.",
        "text_b": "An air plane is taking off.",
        "label": 5.0,
    }

    assert len(read_glue_split(data_dir, "sst2", "train", limit=0)) == 0


def test_missing_split_names_path(data_dir: Path) -> None:
    with pytest.raises(DataError, match=r"QNLI.*train\.tsv"):
        read_glue_split(data_dir, "qnli", "train")
    with pytest.raises(DataError, match="split"):
        read_glue_split(data_dir, "sst2", "test")


def _write_task(tmp_path: Path, dir_name: str, text: str) -> Path:
    folder = tmp_path / "glue" / dir_name
    folder.mkdir(parents=True)
    (folder / "train.tsv").write_text(text, encoding="utf-8")
    return folder / "train.tsv"


def test_malformed_rows_name_file_and_line(tmp_path: Path) -> None:
    path = _write_task(tmp_path, "RTE", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tb\n")
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}:3: expected 4 tab-separated fields, got 3"):
        read_glue_split(tmp_path, "rte", "train")

    bad = tmp_path / "bad"
    path = _write_task(bad, "WNLI", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\t1\n1\ta\tb\tmaybe\n")
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}:3: label 'maybe'"):
        read_glue_split(bad, "wnli", "train")

    out_of_range = tmp_path / "range"
    path = _write_task(out_of_range, "SST-2", "sentence\tlabel\ngood\t1\nbad\t7\n")
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}:3: label 7 is outside"):
        read_glue_split(out_of_range, "sst2", "train")

    sts = tmp_path / "sts"
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    path = _write_task(sts, "STS-B", header + "0\tg\tf\ty\t0\ts\ts\ta\tb\tfive\n")
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}:2: label 'five' is not a number"):
        read_glue_split(sts, "stsb", "train")

    cola = tmp_path / "cola"
    path = _write_task(cola, "CoLA", 'src\t1\t\tFine.\nsrc\t0\tA sentence with a quote " inside.\n')
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}:2: expected 4"):
        read_glue_split(cola, "cola", "train")


def test_quotes_are_literal(tmp_path: Path) -> None:
    _write_task(tmp_path, "SST-2", 'sentence\tlabel\n"a quote\t1\nstill "quoted\t0\n')
    ds = read_glue_split(tmp_path, "sst2", "train")
    assert list(ds["text_a"]) == ['"a quote', 'still "quoted'] and list(ds["label"]) == [1, 0]


def test_missing_file_names_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "glue" / "WNLI" / "dev.tsv"))):
        read_glue_split(tmp_path, "wnli", "dev")


def test_default_data_dir_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DELTATUNE_DATA", str(tmp_path))
    assert default_data_dir() == tmp_path
    monkeypatch.setenv("DELTATUNE_DATA", str(tmp_path / "nope"))
    with pytest.raises(DataError, match="DELTATUNE_DATA"):
        default_data_dir()


@pytest.mark.skipif(os.environ.get("DELTATUNE_DATA") is not None, reason="layout walk only without env var")
def test_default_data_dir_walks_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "main" / "sub").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "main" / "sub")
    assert default_data_dir() == tmp_path / "shared" / "data"


def test_tokenize_pairs(data_dir: Path, tokenizer) -> None:
    pairs = tokenize_pairs(read_glue_split(data_dir, "mrpc", "dev", limit=8), tokenizer, max_length=24)
    assert set(pairs.column_names) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    for row in pairs:
        assert len(row["input_ids"]) <= 24 == len(pairs[0]["input_ids"])
        assert row["input_ids"].count(tokenizer.sep_token_id) == 2
        assert set(row["token_type_ids"]) == {0, 1}
        assert len(row["attention_mask"]) == len(row["input_ids"])
    raw = read_glue_split(data_dir, "mrpc", "dev", limit=8)
    assert list(pairs["labels"]) == list(raw["label"])

    single = tokenize_pairs(read_glue_split(data_dir, "sst2", "dev", limit=4), tokenizer, max_length=512)
    expected = tokenizer(list(read_glue_split(data_dir, "sst2", "dev", limit=4)["text_a"]))["input_ids"]
    assert [list(x) for x in single["input_ids"]] == expected
    assert all(set(r) == {0} for r in single["token_type_ids"])

    sts = tokenize_pairs(read_glue_split(data_dir, "stsb", "dev", limit=4), tokenizer, max_length=64)
    assert sts.features["labels"].dtype == "float32"
