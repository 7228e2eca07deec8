"""A user's own labelled files for ``--task classify`` and ``--task regress``, read through ``datasets``.

Formats, chosen by the path: ``.csv``; ``.tsv`` (tab-separated; quoting off as in GLUE, unless cells quoted as CSV
quotes them show); ``.json`` / ``.jsonl`` (JSON Lines or a JSON list of records); ``.parquet``; a folder written by
``datasets.save_to_disk``. ``PATH:SPLIT`` picks a split of a saved ``DatasetDict`` folder, or of a JSON file holding
an object of splits (``SPLIT`` may join several with ``+``, e.g. CLINC150's ``data_full.json:train+oos_train``); rows
of such a split may be ``[text, label]`` pairs, read as the columns the task uses (``--text-column``,
``--label-column``: ``text`` and ``label`` by default).  ``:SPLIT`` on a file or folder that holds one table is an
error, never ignored.  Text files are UTF-8 (a byte-order mark is dropped); other bytes are an error naming the file.

Every file is turned into the columns ``text_a``, ``text_b`` (None without a pair column) and ``label``:

* **classify**: ``label`` is the class id, an index into ``label_names``.  The label order is stable and
  documented: **the sorted unique labels of the training file** (all rows, before any hold-out or limit) —
  numbers in numeric order, strings in code-point order (``sorted`` on ``str``).  The names are kept as
  spelled in the file (int or str: a CSV/TSV label column is integers only when every cell is a plain integer,
  ``1`` or pandas' ``1.0``, so ``001`` and ``-0`` stay ``"001"`` and ``"-0"``; every other column stays text; a
  ``ClassLabel`` column is read as its names) and saved with the delta, so eval files map by the same table.
* **regress**: ``label`` is the float32 value of the label column.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import datasets

from deltatune.errors import DataError
from deltatune.provenance import split_spec
from deltatune.train.table_files import canonical_ints, load_file, require_utf8, tsv_table

USER_TASKS = ("classify", "regress", "tokens", "chat")
"""Tasks on a user's own files whose columns (and label map) are saved in the delta's provenance: ``tokens`` is
read by :mod:`deltatune.train.tokens`, ``chat`` by :mod:`deltatune.train.chat`."""
LABEL_ORDER = "sorted unique labels of the training file (numbers numerically, strings by code point)"
HOLDOUT_FRACTION = 0.1
_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


@dataclass(frozen=True)
class TaskInfo:
    """What ``eval`` (and later ``predict``) needs to read new files as the delta was trained: saved in the
    delta's ``metrics["task_info"]``."""

    task: str
    text_column: str
    text_pair_column: str | None
    label_column: str
    label_names: list[Any] | None
    num_labels: int
    label_order: str = LABEL_ORDER

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> TaskInfo:
        try:
            return cls(**{k: data[k] for k in ("task", "text_column", "text_pair_column", "label_column",
                                                 "label_names", "num_labels")})
        except (KeyError, TypeError) as exc:
            raise DataError(f"{where}: task_info is incomplete ({exc}); was the delta trained by deltatune?") from None


def _split_spec(spec: str) -> tuple[Path, str | None]:
    """``PATH`` or ``PATH:SPLIT`` (:func:`~deltatune.provenance.split_spec`); :class:`DataError` when neither
    exists."""
    parts = split_spec(spec)
    if parts is None:
        raise DataError(f"data file {spec!r} not found")
    return Path(parts[0]), parts[1]


def _json_splits(path: Path, split: str, pair_columns: tuple[str, str]) -> datasets.Dataset:
    """Rows of one or more splits (``a+b``) of a JSON object of splits; ``[text, label]`` rows become columns."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8-sig"))  # a byte-order mark dropped, as everywhere
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: {path.name}:{split} needs a JSON object of splits; the file is not one JSON "
                        f"document ({str(exc)[:80]})") from None
    if not isinstance(doc, dict):
        raise DataError(f"{path}: {path.name}:{split} needs a JSON object of splits, got a {type(doc).__name__}")
    rows: list[Any] = []
    for name in split.split("+"):
        if name not in doc or not isinstance(doc[name], list):
            raise DataError(f"{path}: no split {name!r} (splits: {sorted(k for k in doc if isinstance(doc[k], list))})")
        rows.extend(doc[name])
    if rows and all(isinstance(r, list) and len(r) == 2 for r in rows):
        text, label = pair_columns
        return datasets.Dataset.from_dict({text: [r[0] for r in rows], label: [r[1] for r in rows]})
    if all(isinstance(r, dict) for r in rows):
        return datasets.Dataset.from_list(rows)
    raise DataError(f"{path}:{split}: rows must all be [text, label] pairs or all be objects")


def _name_json_splits(path: Path) -> None:
    """A DataError listing the splits where ``path`` is a JSON object of splits (CLINC150's ``data_full.json``) read
    without ``:SPLIT``; nothing where it is not."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError):
        return
    splits = sorted(k for k, v in doc.items() if isinstance(v, list)) if isinstance(doc, dict) else []
    if splits:
        raise DataError(f"{path}: holds splits {splits}; pick one (or several joined by +) as {path}:SPLIT (rows go "
                        "in a JSON list of objects or in JSON Lines)")


def read_table(spec: str, pair_columns: tuple[str, str] = ("text", "label")) -> datasets.Dataset:
    """One table from a CSV/TSV/JSON/JSONL/Parquet file or a ``save_to_disk`` folder (``PATH[:SPLIT]``);
    ``[text, label]`` rows of a JSON split become the columns ``pair_columns``, and ``pair_columns[1]`` is the label
    column a CSV/TSV may read as integers (:func:`deltatune.train.table_files.canonical_ints`).

    Raises DataError for a missing or unreadable file, a text file that is not UTF-8, an unknown extension, a folder
    of several splits without ``:SPLIT``, a ``:SPLIT`` that names no split (on a file that holds one table: CSV, TSV,
    JSONL, Parquet, a JSON list; on a ``save_to_disk`` folder of one dataset, unless it is that dataset's split), or a
    table with no rows."""
    path, split = _split_spec(spec)
    if path.is_dir():
        try:
            loaded = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError, OSError) as exc:
            raise DataError(f"{path}: not a folder written by datasets.save_to_disk ({str(exc)[:80]})") from None
        if isinstance(loaded, datasets.DatasetDict):
            if split is None or split not in loaded:
                raise DataError(f"{path}: holds splits {sorted(loaded)}; pick one as {path}:SPLIT")
            loaded = loaded[split]
        elif split is not None and split != str(loaded.split):
            own = f"its split is {str(loaded.split)!r}" if loaded.split is not None else "it records no split"
            raise DataError(f"{path}: holds one dataset, not splits ({own}), so {path}:{split} picks nothing; pass "
                            f"{path} itself")
        table = loaded
    else:
        suffix = path.suffix.lower()
        builder = _BUILDERS.get(suffix)
        if builder is None:
            raise DataError(f"{path}: unknown data format {path.suffix!r}; use one of {sorted(_BUILDERS)} "
                            "or a folder written by datasets.save_to_disk")
        if split is not None and suffix != ".json":
            raise DataError(f"{path}: a {suffix[1:].upper()} file holds one table, not splits, so {path}:{split} "
                            f"picks nothing; pass {path} itself (splits are read from a folder written by "
                            "DatasetDict.save_to_disk or from a JSON object of splits)")
        if path.stat().st_size == 0:
            raise DataError(f"{path}: file is empty")
        if builder != "parquet":
            require_utf8(path)
        if split is not None:
            table = _json_splits(path, split, pair_columns)
        else:
            try:
                table = tsv_table(path, spec) if suffix == ".tsv" else load_file(builder, path, spec)
            except DataError:
                if suffix == ".json":
                    _name_json_splits(path)
                raise
            if suffix == ".json" and len(table) == 1 and all(
                    isinstance(f, (datasets.Sequence, datasets.List)) for f in table.features.values()):
                _name_json_splits(path)  # one object of lists (datasets reads it as one row): splits, not records
            if builder == "csv":
                table = canonical_ints(table, pair_columns[1])
    if len(table) == 0:
        raise DataError(f"{spec}: has no rows")
    return table


def require_columns(table: datasets.Dataset, columns: list[str], where: str) -> None:
    """DataError naming the file and listing its columns when one of ``columns`` is missing."""
    for column in columns:
        if column not in table.column_names:
            raise DataError(f"{where}: no column {column!r} (columns: {table.column_names}); "
                            "choose one with --text-column / --text-pair-column / --label-column")


def class_label_names(feature: Any) -> list[str] | None:
    """The names of a ``datasets.ClassLabel`` feature (cells stored as class ids) — the feature itself, or the items
    of a list feature (``--task tokens``' tag sequences) — else None."""
    inner = getattr(feature, "feature", feature)
    return list(inner.names) if isinstance(inner, datasets.ClassLabel) else None


def label_values(table: datasets.Dataset, column: str, where: str) -> list[Any]:
    """The cells of a classify label ``column``; the class ids of a ``ClassLabel`` column read as its names (a
    missing cell stays None; an id that names no class, as ``-1`` marks an unlabelled row in a hub test split, is a
    DataError naming the file, the row and the column)."""
    values = list(table[column])
    feature = table.features.get(column)
    if not isinstance(feature, datasets.ClassLabel):
        return values
    names = list(feature.names)
    for row, value in enumerate(values):
        if value is not None and not 0 <= value < len(names):
            raise DataError(f"{where}: row {row + 1}, column {column!r}: class id {value} is not one of the "
                            f"{len(names)} of its ClassLabel (-1 marks an unlabelled row)")
    return [None if v is None else names[v] for v in values]


def label_names(table: datasets.Dataset, column: str, where: str) -> list[Any]:
    """The sorted unique labels of a training table (see the module docstring for the order); a ``ClassLabel``
    column's labels are its names (:func:`label_values`)."""
    values = label_values(table, column, where)
    for row, value in enumerate(values):
        if value is None or (isinstance(value, str) and not value.strip()):
            raise DataError(f"{where}: row {row + 1}, column {column!r}: missing label")
        if isinstance(value, float) and value.is_integer():
            continue
        if not isinstance(value, (str, int)):  # bool is an int: JSON's true/false are labels too
            raise DataError(f"{where}: row {row + 1}, column {column!r}: label {value!r} is not a string, integer or "
                            "boolean")
    unique = {int(v) if isinstance(v, float) else v for v in values}
    kinds = {type(v) for v in unique}
    if len(kinds) > 1:
        raise DataError(f"{where}: column {column!r} mixes label types {sorted(k.__name__ for k in kinds)}")
    names = sorted(unique)
    spaced = [n for n in names if isinstance(n, str) and n != n.strip() and n.strip() in unique]
    if spaced:  # "pos" and " pos" (a space after a CSV comma) are two classes
        warnings.warn(f"{where}: column {column!r} has labels that differ only by surrounding spaces "
                      f"({[(n, n.strip()) for n in spaced[:3]]}): they are separate classes", stacklevel=2)
    return names


def _class_ids(values: list[Any], names: list[Any], column: str, where: str) -> list[int]:
    lookup = {str(n): i for i, n in enumerate(names)}
    ids = []
    for row, value in enumerate(values):
        key = str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)
        if key not in lookup:
            shown = names if len(names) <= 20 else [*names[:20], "…"]
            raise DataError(f"{where}: row {row + 1}, column {column!r}: label {value!r} is not in the training "
                            f"label map ({len(names)} labels: {shown})")
        ids.append(lookup[key])
    return ids


def _floats(values: list[Any], column: str, where: str) -> list[float]:
    out = []
    for row, value in enumerate(values):
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = float("nan")
        if isinstance(value, bool) or number != number or number in (float("inf"), float("-inf")):
            raise DataError(f"{where}: row {row + 1}, column {column!r}: regression label {value!r} is not a "
                            "finite number")
        out.append(number)
    return out


def text_cells(values: list[Any], column: str, where: str) -> list[str]:
    """The cells of a text column as strings; a missing cell is a DataError naming the file, row and column."""
    for row, value in enumerate(values):
        if value is None:
            raise DataError(f"{where}: row {row + 1}, column {column!r}: missing text")
    return [str(v) for v in values]


def to_examples(table: datasets.Dataset, info: TaskInfo, where: str) -> datasets.Dataset:
    """Columns ``text_a``, ``text_b``, ``label`` (class id or float) ready for ``glue.tokenize_pairs``."""
    pair = info.text_pair_column
    require_columns(table, [info.text_column, *([pair] if pair else []), info.label_column], where)
    if info.task == "classify":
        raw = label_values(table, info.label_column, where)
        labels: list[Any] = _class_ids(raw, info.label_names or [], info.label_column, where)
    else:
        labels = _floats(list(table[info.label_column]), info.label_column, where)
    text_a = text_cells(table[info.text_column], info.text_column, where)
    text_b = text_cells(table[pair], pair, where) if pair else [None] * len(text_a)
    features = datasets.Features({"text_a": datasets.Value("string"), "text_b": datasets.Value("string"),
                                  "label": datasets.Value("int64" if info.task == "classify" else "float32")})
    return datasets.Dataset.from_dict({"text_a": text_a, "text_b": text_b, "label": labels}, features=features)


def task_info(task: str, table: datasets.Dataset, where: str, text_column: str, text_pair_column: str | None,
              label_column: str) -> TaskInfo:
    """The :class:`TaskInfo` of a training table: its columns and (classify) label map."""
    require_columns(table, [text_column, *([text_pair_column] if text_pair_column else []), label_column], where)
    if task == "classify":
        names = label_names(table, label_column, where)
        if len(names) < 2:
            raise DataError(f"{where}: column {label_column!r} has {len(names)} distinct label(s); "
                            "classification needs at least 2")
        return TaskInfo(task, text_column, text_pair_column, label_column, names, len(names))
    return TaskInfo(task, text_column, text_pair_column, label_column, None, 1)


def hold_out(examples: datasets.Dataset, seed: int, where: str) -> tuple[datasets.Dataset, datasets.Dataset]:
    """A seeded ``HOLDOUT_FRACTION`` split ``(train, held_out)``; at least one row each side.  Text rows repeated on
    both sides (the same ``text_a``, ``text_b``) are counted in a warning."""
    n = len(examples)
    if n < 2:
        raise DataError(f"{where}: {n} row(s) cannot be split into training and held-out evaluation rows; "
                        "pass --eval-data")
    n_eval = min(n - 1, max(1, round(HOLDOUT_FRACTION * n)))
    parts = examples.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
    if "text_a" not in examples.column_names:  # token or chat rows: no text pair to compare
        return parts["train"], parts["test"]
    seen = set(zip(parts["train"]["text_a"], parts["train"]["text_b"], strict=True))
    both = sum(pair in seen for pair in zip(parts["test"]["text_a"], parts["test"]["text_b"], strict=True))
    if both:  # repeated rows (GLUE's SST-2 has hundreds) land on both sides and flatter the held-out score
        warnings.warn(f"{where}: {both} of the {n_eval} held-out rows also occur among the training rows (repeated "
                      "texts in the file); pass --eval-data for a clean evaluation", stacklevel=2)
    return parts["train"], parts["test"]


def limited(rows: datasets.Dataset | None, limit: int | None) -> datasets.Dataset | None:
    """The first ``limit`` rows of ``rows`` (``train_limit``/``eval_limit``); all of them without a limit."""
    if rows is None or not limit:
        return rows
    return rows.select(range(min(limit, len(rows))))


def held_out_note(held: int, total: int, unit: str, cfg: Any) -> str:
    """The line a run prints when it evaluates on a seeded hold-out of ``cfg.data`` rather than ``--eval-data``."""
    return (f"held out {held} of {total} {unit} of {cfg.data} for evaluation ({HOLDOUT_FRACTION:.0%}, seed "
            f"{cfg.seed}); pass --eval-data to use a file instead")
