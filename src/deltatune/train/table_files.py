"""One data file of a user's read into a table as its bytes spell it: CSV/TSV through pandas (every cell text, only
an empty cell missing; a TSV with quoting off as GLUE's, or with CSV's quoting where the file shows it and reads one
way only: :func:`csv_quoting`), UTF-8 checked first (:func:`require_utf8`), a header that names a column twice or a
first row longer than it refused; JSON, JSONL and Parquet through ``datasets``.  Which file and split, and what the
columns mean, is :mod:`deltatune.train.user_data`'s."""

from __future__ import annotations

import csv
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from deltatune.errors import DataError


def table_read_options(path: Path, quoted: bool = False) -> dict[str, Any]:
    """``pandas.read_csv`` options for a user's CSV/TSV: every cell is read as spelled (text; only the label column
    may then become integers, :func:`canonical_ints`), only an empty cell is missing (``NA``, ``null``, ``None``,
    ``nan`` are text, labels included), a UTF-8 byte-order mark is dropped, and a TSV is read with quoting off, as
    GLUE's TSVs need (a stray ``"`` would otherwise swallow the rows up to the next one) unless ``quoted``
    (:func:`csv_quoting`); JSON and Parquet need none."""
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".tsv"):
        return {}
    options: dict[str, Any] = {"keep_default_na": False, "na_values": [""], "encoding": "utf-8-sig", "dtype": str}
    if suffix == ".tsv":
        options.update(sep="\t", quoting=csv.QUOTE_MINIMAL if quoted else csv.QUOTE_NONE)
    return options


def require_utf8(path: Path) -> None:
    """DataError naming ``path``, the byte offset and the line of its first byte sequence that is not UTF-8 (a
    Latin-1 or Windows-1252 export); nothing for UTF-8 (a byte-order mark included).  Read in 1 MiB chunks."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, line = 0, 1  # bytes fed to the decoder before ``chunk``, line of the first of them
    with path.open("rb") as handle:
        while True:
            chunk = handle.read(1 << 20)
            pending = len(decoder.getstate()[0])  # a character's first bytes held back from the chunk before
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as exc:
                before = chunk[:max(0, exc.start - pending)]
                at, line = offset - pending + exc.start, line + before.count(b"\n")
                raise DataError(f"{path}: not UTF-8 text (byte {at}, line {line}: "
                                f"{exc.object[exc.start:exc.end]!r}); save it as UTF-8 (e.g. `iconv -f latin1 -t "
                                "utf-8`)") from None
            if not chunk:
                return
            offset += len(chunk)
            line += chunk.count(b"\n")


#: one cell of a TSV as CSV's quoting writes it — quoted (group 1: its inside, inner quotes doubled), or holding no
#: quote, tab or line break — and the tab or line end after it (group 2; empty at the end of the text)
_TSV_CELL = re.compile(r'(?:"([^"]*(?:""[^"]*)*)"|[^"\t\r\n]*)(\t|\r\n|\n|\r|\Z)')


@dataclass(frozen=True)
class CsvQuoting:
    """What :func:`csv_quoting` finds in a TSV.  ``flaw``: where the file is not well-formed under CSV's quoting
    (None where it is); ``shown``: where it shows a CSV writer's quoting (None where nothing does); ``rows``: the data
    rows a read with CSV's quoting gives (blank lines skipped), counted where the file is well-formed."""

    flaw: str | None
    shown: str | None
    rows: int
    #: shown by what only a CSV writer makes (a doubled quote inside a quoted cell, or every header name quoted), not
    #: only by a quoted span holding a tab or a line break, which a GLUE-style stray quote pair can make too
    strong: bool = False
    #: every non-blank line has the header's number of tab-separated cells, as quoting off reads it (a line break
    #: inside a CSV-quoted cell leaves two short lines)
    full_width: bool = False


def csv_quoting(path: Path) -> CsvQuoting:
    """Whether a TSV was written with CSV's quoting (pandas' ``to_csv(sep="\\t")``, Python's ``csv``, spreadsheets),
    from its text.  Well-formed under CSV's quoting: every ``"`` opens a cell, is doubled inside a quoted cell, or
    closes one right before a tab or a line end, and every row has the header's number of cells.  Shown: the header's
    names are all quoted (``QUOTE_ALL``), or a quoted cell holds a doubled quote, a tab or a line break — what
    ``QUOTE_MINIMAL`` quotes a cell for, and what quoting off misreads (a tab or line break inside quotes splits the
    cell, and can leave every row as wide as the header: nothing else shows it).  A GLUE-style cell (``"We will win,"
    he said.``, ``"unclosed``) is a flaw, so one such cell keeps quoting off."""
    text = path.read_text(encoding="utf-8-sig")
    if '"' not in text:  # both readings are the same
        return CsvQuoting(None, None, 0)
    pos, start, cells, width, rows = 0, 0, [], 0, 0
    shown: str | None = None
    strong = False

    def line(at: int) -> int:
        return text.count("\n", 0, at) + 1

    while True:
        match = _TSV_CELL.match(text, pos)
        if match is None:
            if text[pos] == '"':
                what = "the quote opening a cell is not closed right before a tab or a line end"
            else:  # the unquoted cell stopped at a quote (at a tab or a line end it would have matched)
                what, pos = "a quote inside a cell that does not start with one", text.index('"', pos)
            return CsvQuoting(f"line {line(pos)}: {what} ({text[pos:pos + 40]!r})", None, 0)
        inside, end = match.group(1), match.group(2)
        cells.append(inside is not None)
        if inside is not None and '""' in inside and not strong:
            shown, strong = f"line {line(match.start())} holds a doubled quote in a quoted cell ({inside[:60]!r})", True
        if shown is None and inside is not None and any(c in inside for c in ("\t", "\n", "\r")):
            shown = f"line {line(match.start())} holds a cell quoted as CSV quotes one ({inside[:60]!r})"
        pos = match.end()
        if end == "\t":
            continue
        if len(cells) > 1 or match.group(0) != end:  # not a blank line
            if not width:
                width = len(cells)
                if all(cells):
                    shown = shown if strong else f"its header is quoted ({text[:pos].rstrip()[:40]!r})"
                    strong = True
            elif len(cells) != width:
                return CsvQuoting(f"line {line(start)} has {len(cells)} cells with CSV's quoting, the header {width}",
                                  None, 0)
            else:
                rows += 1
        if not end or pos >= len(text):
            return CsvQuoting(None, shown, rows, strong, _full_width(text))
        cells, start = [], pos


def _full_width(text: str) -> bool:
    """:attr:`CsvQuoting.full_width` of a TSV's ``text``."""
    lines = [line for line in text.splitlines() if line.strip()]
    return all(line.count("\t") == lines[0].count("\t") for line in lines[1:])


def tsv_table(path: Path, spec: str) -> datasets.Dataset:
    """A TSV read with quoting off (GLUE's), or with CSV's quoting and a warning where :func:`csv_quoting` finds the
    file well-formed under it and written with it; that read must give the rows the file's cells make.  A file that
    reads both ways with full rows, shown only by a quoted span holding a tab or a line break (a stray GLUE-style
    quote pair makes one too), is refused naming both readings.  Where quoting
    off fails and CSV's quoting is not shown, the error of quoting off (its line), never a read that swallows rows."""
    try:
        table, failure = load_file("csv", path, spec), None
    except DataError as exc:
        if "has no rows" in str(exc):
            raise
        table, failure = None, exc
    quoting = csv_quoting(path)
    if quoting.shown is None:
        if failure is None:
            return table
        if quoting.flaw is None:
            raise failure
        raise DataError(f"{failure}; nor is it written with CSV's quoting ({quoting.flaw})") from None
    quoted = load_file("csv", path, spec, quoted=True)
    if failure is None and not quoting.strong and len(quoted) != len(table) and quoting.full_width:
        raise DataError(f"{path}: reads two ways — with quoting off, as GLUE's TSVs are read, {len(table)} rows; with "
                        f"CSV's quoting {len(quoted)} ({quoting.shown}) — and nothing else in it says which: a stray "
                        "quote pair, or a cell quoted by a CSV writer?  Remove the stray quotes, or write the file "
                        "with every cell quoted (pandas: quoting=csv.QUOTE_ALL)")
    if len(quoted) != quoting.rows:
        raise DataError(f"{path}: read with CSV's quoting it gives {len(quoted)} rows where its cells make "
                        f"{quoting.rows}; check its quotes")
    why = f"it cannot be read with quoting off ({str(failure).removeprefix(str(path) + ': ')[:160]}) and " \
        if failure is not None else ""
    warnings.warn(f"{path}: {why}{quoting.shown}; the file is read with CSV's quoting (a TSV like GLUE's is read with "
                  "quoting off)", stacklevel=3)
    return quoted


#: a label as pandas writes an integer: a plain integer (no sign but ``-``, no leading zero, not ``-0``: no integer
#: is written so), int64-sized, optionally with a zero decimal part (``1.0``: pandas' ``to_csv`` writes integer
#: labels so once the column held a NaN)
_PLAIN_INT = r"^(0|-?[1-9][0-9]{0,17})(\.0+)?$"


def canonical_ints(table: datasets.Dataset, column: str) -> datasets.Dataset:
    """``table`` (a CSV/TSV read as text) with its label ``column`` as ``int64`` where every cell is an integer as
    written (:data:`_PLAIN_INT`; ``1.0`` read as ``1``, as pandas' number parsing read it before), so integer labels
    sort numerically and map to another file's ``1``; any other cell (``001``, ``1.5``, ``+1``, ``-0``, a word) keeps
    the column text, as spelled.  Every other column stays text, as spelled."""
    import pyarrow as pa
    import pyarrow.compute as pc

    data = table.data.table
    if column not in data.column_names:
        return table
    i = data.column_names.index(column)
    cells = data.column(i)
    if not (pa.types.is_string(cells.type) or pa.types.is_large_string(cells.type)) or \
            cells.null_count == len(cells) or \
            not pc.all(pc.match_substring_regex(cells, _PLAIN_INT).fill_null(True)).as_py():
        return table
    whole = pc.replace_substring_regex(cells, r"\.0+$", "")
    return datasets.Dataset(data.set_column(i, column, pc.cast(whole, pa.int64())))


def _header(path: Path, quoted: bool) -> list[str]:
    """The names of a CSV/TSV's header row, as the file spells them (pandas renames a repeated one ``label.1``)."""
    tsv = path.suffix.lower() == ".tsv"
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t" if tsv else ",",
                            quoting=csv.QUOTE_NONE if tsv and not quoted else csv.QUOTE_MINIMAL)
        return next(reader, [])


def load_file(builder: str, path: Path, spec: str, quoted: bool = False) -> datasets.Dataset:
    """``path`` read (a CSV/TSV by pandas with :func:`table_read_options`, else through ``datasets``' ``builder``);
    DataError naming the file and the innermost cause (pandas' parser error, not only ``datasets``' wrapper) where it
    cannot be read, where the first data row has more fields than the header (pandas would silently make the first
    column an index and shift the others under the wrong names), and where the header names a column twice (pandas
    would rename the second ``label.1`` and the first would be used)."""
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
            names = [n for n in _header(path, quoted) if n]  # empty names (an index column, a trailing comma) aside
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                raise DataError(f"{path}: the header names column {twice[0]!r} more than once (header: "
                                f"{_header(path, quoted)}); give each column its own name")
            if frame.empty:
                raise DataError(f"{spec}: has no rows")
            return datasets.Dataset.from_pandas(frame, preserve_index=False)
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
