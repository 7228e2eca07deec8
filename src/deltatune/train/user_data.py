"""A user's own labelled files for ``--task classify`` and ``--task regress``, read through ``datasets``.

Formats, chosen by the path: ``.csv``; ``.tsv`` (tab-separated; quoting off as in GLUE, unless cells quoted as CSV
quotes them show); ``.json`` / ``.jsonl`` (JSON Lines or a JSON list of records); ``.parquet``; a folder written by
``datasets.save_to_disk``. ``PATH:SPLIT`` picks a split of a saved ``DatasetDict`` folder, or of a JSON file holding
an object of splits (``SPLIT`` may join several with ``+``, e.g. CLINC150's ``data_full.json:train+oos_train``); rows
of such a split may be ``[text, label]`` pairs, read as the columns the task uses (``--text-column``,
``--label-column``: ``text`` and ``label`` by default).

Every file is turned into the columns ``text_a``, ``text_b`` (None without a pair column) and ``label``:

* **classify**: ``label`` is the class id, an index into ``label_names``.  The label order is stable and
  documented: **the sorted unique labels of the training file** (all rows, before any hold-out or limit) —
  numbers in numeric order, strings in code-point order (``sorted`` on ``str``).  The names are kept as
  spelled in the file (int or str: a CSV/TSV column is integers only when every cell is a plain integer, so
  ``001`` stays ``"001"``) and saved with the delta, so eval files map by the same table.
* **regress**: ``label`` is the float32 value of the label column.
"""

from __future__ import annotations

import csv
import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import datasets

from deltatune.errors import DataError
from deltatune.provenance import split_spec

USER_TASKS = ("classify", "regress", "tokens", "chat")
"""Tasks on a user's own files whose columns (and label map) are saved in the delta's provenance: ``tokens`` is
read by :mod:`deltatune.train.tokens`, ``chat`` by :mod:`deltatune.train.chat`."""
LABEL_ORDER = "sorted unique labels of the training file (numbers numerically, strings by code point)"
HOLDOUT_FRACTION = 0.1
_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def table_read_options(path: Path, quoted: bool = False) -> dict[str, Any]:
    """``pandas.read_csv`` options for a user's CSV/TSV: every cell is read as spelled (text; :func:`_canonical_ints`
    then makes whole columns of plain integers integers, so ``001`` stays ``001``), only an empty cell is missing
    (``NA``, ``null``, ``None``, ``nan`` are text, labels included), a UTF-8 byte-order mark is dropped, and a TSV is
    read with quoting off, as GLUE's TSVs need (a stray ``"`` would otherwise swallow the rows up to the next one)
    unless ``quoted`` (:func:`csv_quoting_shown`); JSON and Parquet need none."""
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".tsv"):
        return {}
    options: dict[str, Any] = {"keep_default_na": False, "na_values": [""], "encoding": "utf-8-sig", "dtype": str}
    if suffix == ".tsv":
        options.update(sep="\t", quoting=csv.QUOTE_MINIMAL if quoted else csv.QUOTE_NONE)
    return options


#: a cell as CSV's quoting writes it (pandas' ``to_csv(sep="\t")``, Python's ``csv``, spreadsheets): wrapped in
#: quotes, every inner quote doubled
CSV_QUOTED_CELL = r'^"(?:[^"]|"")*"$'


def csv_quoting_shown(table: datasets.Dataset) -> str | None:
    """Where ``table``, read with quoting off, shows that its file was written with CSV's quoting, or ``None``: a
    header whose names are all wrapped in quotes (``QUOTE_ALL``), or cells of which every one that holds a ``"`` is
    quoted as :data:`CSV_QUOTED_CELL` and one at least doubles an inner quote (``QUOTE_MINIMAL`` quotes a cell only
    for a quote, a tab or a line break).  A GLUE-style cell (``"We will win," he said.``) is not so quoted, and one
    such cell keeps quoting off.  Vectorised over the Arrow columns."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    names = table.column_names
    if names and all(len(n) >= 2 and n[0] == n[-1] == '"' for n in names):
        return f"its header is quoted ({names[0][:40]!r})"
    first = None
    for name in names:
        column = table.data.column(name)
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            continue
        quoted = pc.match_substring_regex(column, CSV_QUOTED_CELL).fill_null(False)
        if pc.any(pc.and_(pc.match_substring(column, '"').fill_null(False), pc.invert(quoted))).as_py():
            return None
        doubled = np.flatnonzero(pc.and_(quoted, pc.match_substring(column, '""').fill_null(False))
                                 .to_numpy(zero_copy_only=False))
        if first is None and doubled.size:
            row = int(doubled[0])
            first = f"row {row + 1}, column {name!r} is quoted as CSV quotes a cell ({table[row][name][:60]!r})"
    return first


def _tsv_table(path: Path, spec: str) -> datasets.Dataset:
    """A TSV read with quoting off (GLUE's); read again with CSV's quoting, with a warning, where that finds cells
    quoted as CSV quotes them (:func:`csv_quoting_shown`) or where quoting off fails and CSV's quoting reads it (a
    quoted cell holding a tab or a line break).  Where both fail, the error of quoting off."""
    try:
        table = _load_file("csv", path, spec)
    except DataError as exc:
        if "has no rows" in str(exc):
            raise
        try:
            table = _load_file("csv", path, spec, quoted=True)
        except DataError:
            raise exc from None
        why = f"it cannot be read with quoting off ({str(exc).removeprefix(str(path) + ': ')[:160]})"
    else:
        why = csv_quoting_shown(table)
        if why is None:
            short = _first_missing_cell(table)
            if short is None:
                return table
            try:  # a quoted cell holding a line break splits its row in two short rows when quoting is off
                quoted = _load_file("csv", path, spec, quoted=True)
            except DataError:
                return table
            if _first_missing_cell(quoted) is not None or not _only_line_breaks_joined(table, quoted):
                return table  # the missing cell is the file's own (its error comes later), not a split row
            why = f"with quoting off {short} is missing, with CSV's quoting no cell is (a quoted line break?)"
            table = quoted
        else:
            table = _load_file("csv", path, spec, quoted=True)
    warnings.warn(f"{path}: {why}; the file is read with CSV's quoting (a TSV like GLUE's is read with quoting off)",
                  stacklevel=3)
    return table


def _only_line_breaks_joined(plain: datasets.Dataset, quoted: datasets.Dataset) -> bool:
    """Whether CSV's quoting read ``quoted`` differs from the quoting-off read ``plain`` only by joining rows a
    quoted line break split: no quoted cell holds the separator (a GLUE-style stray ``"`` swallows whole rows, tabs
    and all, up to the next one) and the rows it has fewer are its cells' line breaks."""
    import pyarrow as pa
    import pyarrow.compute as pc

    breaks = 0
    for name in quoted.column_names:
        column = quoted.data.column(name)
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            continue
        if pc.any(pc.match_substring(column, "\t")).as_py():
            return False
        breaks += sum(pc.count_substring(column, "\n").fill_null(0).to_pylist())
    return len(plain) - len(quoted) == breaks


def _first_missing_cell(table: datasets.Dataset) -> str | None:
    """Where ``table`` first has an empty (missing) cell, as ``row N, column 'c'``, or ``None``."""
    for name in table.column_names:
        column = table.data.column(name)
        if column.null_count:
            row = next(i for i, v in enumerate(column.is_null().to_pylist()) if v)
            return f"row {row + 1}, column {name!r}"
    return None


#: a cell that is a plain integer as written (no sign but ``-``, no leading zero), int64-sized, optionally with a
#: zero decimal part (``1.0``: pandas' ``to_csv`` writes integer labels so once the column held a NaN)
_PLAIN_INT = r"^-?(0|[1-9][0-9]{0,17})(\.0+)?$"


def _canonical_ints(table: datasets.Dataset) -> datasets.Dataset:
    """Columns of a CSV/TSV read as text whose every cell is a plain integer (:data:`_PLAIN_INT`) as ``int64``, the
    label ids and numeric columns users mean (``1.0`` read as ``1``, as pandas' number parsing read it before); any
    other cell (``001``, ``1.5``, ``+1``, a word) keeps its column text, as spelled."""
    import pyarrow as pa
    import pyarrow.compute as pc

    data = table.data.table
    for i, name in enumerate(data.column_names):
        column = data.column(i)
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)) or \
                column.null_count == len(column):
            continue
        if pc.all(pc.match_substring_regex(column, _PLAIN_INT).fill_null(True)).as_py():
            whole = pc.replace_substring_regex(column, r"\.0+$", "")
            data = data.set_column(i, name, pc.cast(whole, pa.int64()))
    return datasets.Dataset(data)


def _load_file(builder: str, path: Path, spec: str, quoted: bool = False) -> datasets.Dataset:
    """``path`` read (a CSV/TSV by pandas with :func:`table_read_options`, else through ``datasets``' ``builder``);
    DataError naming the file and the innermost cause (pandas' parser error, not only ``datasets``' wrapper) where it
    cannot be read, and where the first data row has more fields than the header (pandas would silently make the first
    column an index and shift the others under the wrong names)."""
    datasets.disable_progress_bars()
    try:
        if builder == "csv":  # pandas itself: datasets' CSV builder cannot keep cells as spelled (no dtype)
            import pandas as pd

            frame = pd.read_csv(path, **table_read_options(path, quoted))
            if not isinstance(frame.index, pd.RangeIndex):  # a first row longer than the header became an index
                header = [str(c) for c in frame.columns]
                raise DataError(f"{path}: the first data row has more fields than the header ({len(header)} "
                                f"columns: {header}); quote cells that hold the separator, or name every column in "
                                "the header")
            if frame.empty:
                raise DataError(f"{spec}: has no rows")
            return _canonical_ints(datasets.Dataset.from_pandas(frame, preserve_index=False))
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001  (pandas/pyarrow raise many kinds; all mean "cannot read")
        if "corresponds to no data" in str(exc):  # a header without rows
            raise DataError(f"{spec}: has no rows") from None
        cause: BaseException = exc
        while cause.__cause__ is not None:
            cause = cause.__cause__
        raise DataError(f"{path}: cannot be read as {path.suffix[1:].upper()} "
                        f"({type(cause).__name__}: {str(cause).strip()[:160]})") from None


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
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a JSON file ({str(exc)[:80]})") from None
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
    ``[text, label]`` rows of a JSON split become the columns ``pair_columns``.

    Raises DataError for a missing or unreadable file, an unknown extension, a folder of several splits
    without ``:SPLIT``, or a table with no rows."""
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
        table = loaded
    elif split is not None and path.suffix.lower() == ".json":
        table = _json_splits(path, split, pair_columns)
    else:
        builder = _BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise DataError(f"{path}: unknown data format {path.suffix!r}; use one of {sorted(_BUILDERS)} "
                            "or a folder written by datasets.save_to_disk")
        if path.stat().st_size == 0:
            raise DataError(f"{path}: file is empty")
        try:
            table = _tsv_table(path, spec) if builder == "csv" and path.suffix.lower() == ".tsv" else \
                _load_file(builder, path, spec)
        except DataError:
            if path.suffix.lower() == ".json":
                _name_json_splits(path)
            raise
        if path.suffix.lower() == ".json" and len(table) == 1 and all(
                isinstance(f, (datasets.Sequence, datasets.List)) for f in table.features.values()):
            _name_json_splits(path)  # one object of lists (datasets reads it as one row): splits, not records
    if len(table) == 0:
        raise DataError(f"{spec}: has no rows")
    return table


def require_columns(table: datasets.Dataset, columns: list[str], where: str) -> None:
    """DataError naming the file and listing its columns when one of ``columns`` is missing."""
    for column in columns:
        if column not in table.column_names:
            raise DataError(f"{where}: no column {column!r} (columns: {table.column_names}); "
                            "choose one with --text-column / --text-pair-column / --label-column")


def label_names(table: datasets.Dataset, column: str, where: str) -> list[Any]:
    """The sorted unique labels of a training table (see the module docstring for the order)."""
    values = list(table[column])
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
    raw = list(table[info.label_column])
    if info.task == "classify":
        labels: list[Any] = _class_ids(raw, info.label_names or [], info.label_column, where)
    else:
        labels = _floats(raw, info.label_column, where)
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
