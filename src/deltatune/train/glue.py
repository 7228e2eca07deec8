"""GLUE tasks read from the official TSV files with the ``csv`` module.

Every file is opened with ``encoding="utf-8-sig"`` (strips MRPC's byte-order mark, harmless elsewhere) and
``quoting=csv.QUOTE_NONE`` (quotes are literal text in GLUE; default quoting merges rows). Rows are
returned as a :class:`datasets.Dataset` with columns

* ``text_a`` (str): the first (or only) sentence,
* ``text_b`` (str or None): the second sentence; **None** for single-sentence tasks (SST-2, CoLA),
* ``label``: int64 class id in ``[0, num_labels)``, or float32 similarity score for STS-B.

RTE and QNLI string labels follow the GLUE convention ``entailment -> 0``, ``not_entailment -> 1``; integer
labels written as digits are accepted for every classification task.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from deltatune.errors import ConfigError, DataError

ColumnRef = str | int
"""A column located by header name (files with a header) or by 0-based index (CoLA, no header)."""

_SPLIT_ALIASES: dict[str, str] = {"train": "train", "dev": "dev", "validation": "dev", "valid": "dev"}


@dataclass(frozen=True)
class GlueTask:
    """How to read one GLUE task.

    ``text_a``/``text_b``/``label`` are header names when ``has_header`` is true, else 0-based column
    indices and ``num_fields`` gives the exact field count of every row. ``label_names[i]`` is the string
    label mapped to class ``i``. ``num_labels`` is 1 for the STS-B regression task.
    """

    name: str
    dir_name: str
    num_labels: int
    is_regression: bool
    has_header: bool
    text_a: ColumnRef
    text_b: ColumnRef | None
    label: ColumnRef
    num_fields: int | None = None
    label_names: tuple[str, ...] = ()
    splits: tuple[str, ...] = ("train", "dev")

    @property
    def is_pair(self) -> bool:
        """True when the task has two sentences per example."""
        return self.text_b is not None


_ENTAILMENT = ("entailment", "not_entailment")

GLUE_TASKS: dict[str, GlueTask] = {
    t.name: t
    for t in (
        GlueTask("sst2", "SST-2", 2, False, True, text_a="sentence", text_b=None, label="label"),
        GlueTask("mrpc", "MRPC", 2, False, True, text_a="#1 String", text_b="#2 String", label="Quality"),
        GlueTask("rte", "RTE", 2, False, True, "sentence1", "sentence2", "label", label_names=_ENTAILMENT),
        GlueTask("cola", "CoLA", 2, False, False, text_a=3, text_b=None, label=1, num_fields=4),
        GlueTask("stsb", "STS-B", 1, True, True, text_a="sentence1", text_b="sentence2", label="score"),
        GlueTask("wnli", "WNLI", 2, False, True, text_a="sentence1", text_b="sentence2", label="label"),
        GlueTask(
            "qnli",
            "QNLI",
            2,
            False,
            True,
            "question",
            "sentence",
            "label",
            label_names=_ENTAILMENT,
            splits=("dev",),
        ),
    )
}


def get_task(name: str) -> GlueTask:
    """Look a task up by any spelling: ``"SST-2"``, ``"sst2"``, ``"sst-2"``, ``"STS_B"``."""
    key = name.strip().lower().replace("-", "").replace("_", "")
    try:
        return GLUE_TASKS[key]
    except KeyError:
        raise DataError(f"unknown GLUE task {name!r}; known tasks: {', '.join(sorted(GLUE_TASKS))}") from None


def default_data_dir() -> Path:
    """The shared data folder.

    ``$DELTATUNE_DATA`` if set; else the first ``<ancestor>/shared/data`` folder found walking up from the
    current working directory, then from this file (layout ``<root>/main/`` beside ``<root>/shared/data``).
    """
    env = os.environ.get("DELTATUNE_DATA")
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise DataError(f"DELTATUNE_DATA={env!r} is not a directory")
        return path
    for start in (Path.cwd(), Path(__file__).resolve().parent):
        for folder in (start, *start.parents):
            candidate = folder / "shared" / "data"
            if candidate.is_dir():
                return candidate
    raise DataError(
        "no shared/data folder found above the working directory or the deltatune package; "
        "set DELTATUNE_DATA to the data folder (the one holding glue/, tinyshakespeare/, wikitext-2/)"
    )


def _column_index(ref: ColumnRef, header: list[str] | None, path: Path) -> int:
    """Resolve a column reference to an index, raising DataError when a header lacks the name."""
    if isinstance(ref, int):
        return ref
    assert header is not None
    try:
        return header.index(ref)
    except ValueError:
        raise DataError(f"{path}: header has no column {ref!r} (columns: {header})") from None


def _parse_label(task: GlueTask, raw: str, path: Path, line: int) -> int | float:
    """A float score (regression) or a class id from a label name or digits, range-checked."""
    text = raw.strip()
    if task.is_regression:
        try:
            value = float(text)
        except ValueError:
            raise DataError(f"{path}:{line}: label {raw!r} is not a number") from None
        if not math.isfinite(value):
            raise DataError(f"{path}:{line}: label {raw!r} is not finite")
        return value
    if text in task.label_names:
        return task.label_names.index(text)
    try:
        value_int = int(text)
    except ValueError:
        expected = f"one of {list(task.label_names)} or " if task.label_names else ""
        raise DataError(
            f"{path}:{line}: label {raw!r} is not {expected}an integer in [0, {task.num_labels})"
        ) from None
    if not 0 <= value_int < task.num_labels:
        raise DataError(f"{path}:{line}: label {value_int} is outside [0, {task.num_labels})")
    return value_int


def read_glue_split(data_dir: Path, task: str, split: str, limit: int | None = None) -> datasets.Dataset:
    """Read ``<data_dir>/glue/<DIR>/<split>.tsv`` (split ``train`` or ``dev``; ``validation`` means dev).

    ``data_dir`` is the shared data folder (holding ``glue/``); a folder that is itself ``glue/`` also
    works. ``limit`` keeps the first N data rows. Blank lines are skipped. Raises DataError for a missing
    file, a row whose field count differs from the header's (or CoLA's 4), or an unparsable label, naming
    the file and 1-based line number.
    """
    spec = get_task(task)
    split_key = _SPLIT_ALIASES.get(split.strip().lower())
    if split_key is None:
        raise DataError(f"unknown split {split!r} for {spec.dir_name}; use 'train' or 'dev'")
    if limit is not None and limit < 0:
        raise ConfigError(f"limit must be >= 0 or None, got {limit}")
    root = Path(data_dir)
    glue_root = root if not (root / "glue").is_dir() and (root / spec.dir_name).is_dir() else root / "glue"
    path = glue_root / spec.dir_name / f"{split_key}.tsv"
    if not path.is_file():
        note = "" if split_key in spec.splits else f" ({spec.dir_name} provides only {list(spec.splits)})"
        raise DataError(f"{spec.dir_name} {split_key} split not found: {path}{note}")

    text_a: list[str] = []
    text_b: list[str | None] = []
    labels: list[Any] = []
    with path.open("r", encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        header: list[str] | None = None
        if spec.has_header:
            header = next(reader, None)
            if header is None:
                raise DataError(f"{path}: file is empty (expected a header line)")
            header = [h.strip() for h in header]
            num_fields = len(header)
        else:
            assert spec.num_fields is not None
            num_fields = spec.num_fields
        ia = _column_index(spec.text_a, header, path)
        ib = None if spec.text_b is None else _column_index(spec.text_b, header, path)
        il = _column_index(spec.label, header, path)
        for row in reader:
            if limit is not None and len(labels) >= limit:
                break
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            line = reader.line_num
            if len(row) != num_fields:
                raise DataError(f"{path}:{line}: expected {num_fields} tab-separated fields, got {len(row)}")
            text_a.append(row[ia])
            text_b.append(None if ib is None else row[ib])
            labels.append(_parse_label(spec, row[il], path, line))

    features = datasets.Features(
        {
            "text_a": datasets.Value("string"),
            "text_b": datasets.Value("string"),
            "label": datasets.Value("float32" if spec.is_regression else "int64"),
        }
    )
    columns = {"text_a": text_a, "text_b": text_b, "label": labels}
    return datasets.Dataset.from_dict(columns, features=features)


def tokenize_pairs(ds: datasets.Dataset, tokenizer: Any, max_length: int) -> datasets.Dataset:
    """Tokenize ``text_a`` (with ``text_b`` as the second segment when it is not None), truncating to
    ``max_length`` tokens (longest segment first) without padding.

    Returns columns ``input_ids``, ``attention_mask``, ``token_type_ids`` (when the tokenizer yields them)
    and ``labels`` (same dtype as ``label``); the text columns are removed.
    """
    missing = [c for c in ("text_a", "text_b", "label") if c not in ds.column_names]
    if missing:
        raise DataError(f"dataset lacks column(s) {missing}; has {ds.column_names}")
    if max_length < 1:
        raise ConfigError(f"max_length must be >= 1, got {max_length}")

    def _encode(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        first = batch["text_a"]
        second = batch["text_b"]
        n_none = sum(1 for s in second if s is None)
        if n_none == len(second):
            enc = tokenizer(first, truncation=True, max_length=max_length)
        elif n_none == 0:
            enc = tokenizer(first, second, truncation=True, max_length=max_length)
        else:
            raise DataError("text_b mixes None and strings within one dataset")
        out: dict[str, list[Any]] = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if "token_type_ids" in enc:
            out["token_type_ids"] = enc["token_type_ids"]
        out["labels"] = batch["label"]
        return out

    label_feature = ds.features["label"]
    mapped = ds.map(_encode, batched=True, remove_columns=ds.column_names)
    if mapped.features["labels"] != label_feature:
        mapped = mapped.cast_column("labels", label_feature)
    return mapped
