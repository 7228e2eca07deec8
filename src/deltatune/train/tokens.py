"""``--task tokens``: token classification with BIO tags on a user's own files.

**Files.**

* *Column files* (``.conll``, ``.bio``, ``.iob``, ``.iob2``, ``.txt``, ``.tsv``): one token per line, its tag in the
  last column (``token<TAB>tag`` or space-separated columns, as CoNLL-2003's ``token POS chunk tag``); every line
  of a file has the same number of columns.  A blank line — or one holding only whitespace, as WNUT-17's lines of
  a single tab — ends a sentence; ``-DOCSTART-`` lines are document breaks.
* *Records* (JSON, JSONL, Parquet, ``save_to_disk`` folders, read through ``datasets``): a column of token
  lists (``--text-column``, default ``tokens``) and a column of tag lists (``--label-column``, default ``tags``);
  a string in either column is split on whitespace (CSV cells ``"Ann Lee ran"``, ``"B-person I-person O"``); tags
  are strings, or class ids of a ``datasets.ClassLabel`` feature (read as its names).

Tags are ``O`` or ``B-``/``I-``/``E-``/``S-`` plus an entity type (:mod:`deltatune.train.entities`).  The label
map is, as for ``classify``, **the sorted unique tags of the training file** (code-point order: ``B-…``, then
``I-…``, then ``O``), saved with the delta (``provenance.task.label_names``), so eval and predict files map by
the same table.

**Alignment** (as Hugging Face's token-classification recipe): each word is split into sub-word tokens by the
model's (fast) tokenizer; the *first* sub-token of a word carries the word's tag id, every other position
(later sub-tokens, special tokens, padding) has label ``-100`` and is left out of the loss.  A word that gets no
sub-token (truncated by ``--max-length``, or empty after normalisation) is predicted ``O`` when scoring, so the
entity scores are over the words of the file, not over what survived tokenization.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from deltatune.errors import ConfigError, DataError
from deltatune.train.collate import IGNORE_INDEX
from deltatune.train.entities import entity_scores, split_tag, word_accuracy

COLUMN_SUFFIXES = (".conll", ".bio", ".iob", ".iob2", ".txt", ".tsv")
TOKENS_COLUMN = "tokens"
TAGS_COLUMN = "tags"
MODEL_COLUMNS = ("input_ids", "attention_mask", "token_type_ids")
TAG_ORDER = "sorted unique tags of the training file (code-point order: B-…, I-…, O)"


@dataclass
class Sentences:
    """Words (and tags) of a file's sentences, with where each sentence comes from (for error messages)."""

    path: str
    tokens: list[list[str]]
    tags: list[list[str]] | None
    lines: list[int] | None
    """Column files: the line of each sentence's first token (token ``k`` is on line ``lines[i] + k``)."""
    rows: list[int]
    """1-based record (row) number of each sentence; for JSONL its line."""

    def where(self, i: int, k: int | None = None) -> str:
        """``file:LINE`` of token ``k`` of sentence ``i`` (column files), else ``file: row N[, token K]``."""
        if self.lines is not None:
            return f"{self.path}:{self.lines[i] + (k or 0)}"
        token = f", token {k + 1}" if k is not None else ""
        return f"{self.path}: row {self.rows[i]}{token}"

    def subset(self, indices: list[int]) -> Sentences:
        return Sentences(self.path, [self.tokens[i] for i in indices],
                         None if self.tags is None else [self.tags[i] for i in indices],
                         None if self.lines is None else [self.lines[i] for i in indices],
                         [self.rows[i] for i in indices])

    def __len__(self) -> int:
        return len(self.tokens)


def _fields(line: str) -> list[str]:
    return [f.strip() for f in line.split("\t")] if "\t" in line else line.split()


def read_column_file(path: Path, need_tags: bool = True) -> Sentences:
    """Sentences of a CoNLL-style column file (module docstring); DataError naming the file and line of a line
    whose columns differ from the first line's, an empty token or tag, or a token without a tag."""
    tokens: list[list[str]] = []
    tags: list[list[str]] = []
    lines: list[int] = []
    words: list[str] = []
    labels: list[str] = []
    width, first = 0, 0
    try:
        handle = path.open(encoding="utf-8-sig")
        with handle:
            for no, raw in enumerate(handle, start=1):
                line = raw.rstrip("\r\n")
                if not line.strip() or line.startswith("-DOCSTART-"):
                    if words:
                        tokens.append(words)
                        tags.append(labels)
                        words, labels = [], []
                    continue
                fields = _fields(line)
                if not width:
                    width, first = len(fields), no
                if any(not f for f in fields):
                    raise DataError(f"{path}:{no}: empty token or tag in {fields!r}; a line holds a token and its tag "
                                    "(token<TAB>tag), a blank line ends a sentence")
                if need_tags and len(fields) < 2:
                    raise DataError(f"{path}:{no}: 1 token and 0 tags ({line.strip()!r}); a line holds a token and "
                                    "its tag (token<TAB>tag), a blank line ends a sentence")
                if len(fields) != width:
                    raise DataError(f"{path}:{no}: {len(fields)} columns {fields!r}, but line {first} has {width}; "
                                    "every line holds the same columns (token first, tag last)")
                if not words:
                    lines.append(no)
                words.append(fields[0])
                labels.append(fields[-1])
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror})") from None
    if words:
        tokens.append(words)
        tags.append(labels)
    if not tokens:
        raise DataError(f"{path}: has no tokens")
    has_tags = width >= 2
    return Sentences(str(path), tokens, tags if has_tags else None, lines, list(range(1, len(tokens) + 1)))


def _jsonl_lines(path: Path) -> list[int] | None:
    """Line number of each record of a JSONL file (blank lines skipped), else None."""
    if path.suffix.lower() != ".jsonl" or not path.is_file():
        return None
    with path.open(encoding="utf-8", errors="replace") as handle:
        return [no for no, line in enumerate(handle, start=1) if line.strip()]


def read_records(spec: str, tokens_column: str, tags_column: str, need_tags: bool = True) -> Sentences:
    """Sentences of a table of records (JSON, JSONL, Parquet, ``save_to_disk``); DataError for a missing column
    (listing those that exist), a row that is not a list of strings, or a row whose token and tag counts differ
    (naming the row, and for JSONL its line)."""
    from deltatune.train.user_data import class_label_names, read_table, require_columns

    table = read_table(spec, (tokens_column, tags_column))
    require_columns(table, [tokens_column, *([tags_column] if need_tags else [])], spec)
    path = Path(spec)
    lines = _jsonl_lines(path) if path.exists() else None
    rows = lines if lines is not None and len(lines) == len(table) else list(range(1, len(table) + 1))
    where = [f"{spec}: row {r}" + (f" (line {r})" if lines is not None else "") for r in rows]
    tokens = [_strings(v, tokens_column, w, split=True) for v, w in zip(table[tokens_column], where, strict=True)]
    if not need_tags or tags_column not in table.column_names:
        return Sentences(spec, tokens, None, None, rows)
    names = class_label_names(table.features.get(tags_column))
    tags = []
    for i, (value, w) in enumerate(zip(table[tags_column], where, strict=True)):
        if names is not None and isinstance(value, list):
            value = [names[v] if isinstance(v, int) and 0 <= v < len(names) else v for v in value]
        row = _strings(value, tags_column, w, split=True)
        if len(row) != len(tokens[i]):
            raise DataError(f"{w}: {len(tokens[i])} tokens but {len(row)} tags (columns {tokens_column!r}, "
                            f"{tags_column!r}); each token needs exactly one tag")
        tags.append(row)
    return Sentences(spec, tokens, tags, None, rows)


def _strings(value: Any, column: str, where: str, split: bool) -> list[str]:
    if split and isinstance(value, str):
        return value.split()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        shown = type(value).__name__ if not isinstance(value, list) else \
            sorted({type(v).__name__ for v in value if not isinstance(v, str)})
        raise DataError(f"{where}, column {column!r}: expected a list of strings, got {shown}")
    return value


def read_sentences(spec: str, tokens_column: str, tags_column: str, need_tags: bool = True) -> Sentences:
    """A column file (by its suffix) or a table of records; with ``need_tags``, every tag is checked to be a BIO
    tag (DataError naming the file and line or row)."""
    path = Path(spec)
    if path.is_file() and path.suffix.lower() in COLUMN_SUFFIXES:
        if path.stat().st_size == 0:
            raise DataError(f"{path}: file is empty")
        sentences = read_column_file(path, need_tags)
    else:
        sentences = read_records(spec, tokens_column, tags_column, need_tags)
    if need_tags:
        if sentences.tags is None:
            raise DataError(f"{spec}: has tokens but no tags (one column per line); training and evaluation need "
                            "token<TAB>tag lines")
        for i, row in enumerate(sentences.tags):
            for k, tag in enumerate(row):
                try:
                    split_tag(tag)
                except DataError as exc:
                    raise DataError(f"{sentences.where(i, k)}: {exc}") from None
    return sentences


def tag_map(sentences: Sentences) -> list[str]:
    """The label map of a training file: its sorted unique tags (module docstring)."""
    names = sorted({t for row in sentences.tags or [] for t in row})
    if len(names) < 2:
        raise DataError(f"{sentences.path}: {len(names)} distinct tag(s) {names}; token classification needs at "
                        "least 2 (e.g. O and B-TYPE)")
    return names


def encode(sentences: Sentences, tokenizer: Any, max_length: int, names: list[str] | None) -> dict[str, list]:
    """Sub-word features of the sentences: the tokenizer's ``input_ids`` / ``attention_mask`` /
    ``token_type_ids``, ``labels`` aligned as in the module docstring (all ``-100`` without ``names``) and
    ``positions`` (per word, the index of its first sub-token or -1).  DataError names a tag that is not in
    ``names`` and its line or row."""
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(f"task 'tokens' needs a fast tokenizer (word ids of sub-tokens); "
                          f"{type(tokenizer).__name__} is not one")
    lookup = {n: i for i, n in enumerate(names or [])}
    if names is not None and sentences.tags is not None:
        for i, row in enumerate(sentences.tags):
            for k, tag in enumerate(row):
                if tag not in lookup:
                    raise DataError(f"{sentences.where(i, k)}: tag {tag!r} is not in the training label map "
                                    f"({len(names)} tags: {names})")
    enc = tokenizer(sentences.tokens, is_split_into_words=True, truncation=True, max_length=max_length)
    out: dict[str, list] = {k: list(enc[k]) for k in MODEL_COLUMNS if k in enc}
    out["labels"], out["positions"] = [], []
    for i, words in enumerate(sentences.tokens):
        first = [-1] * len(words)
        labels = []
        prev = None
        for pos, word in enumerate(enc.word_ids(i)):
            if word is not None and word != prev:
                first[word] = pos
                labels.append(lookup[sentences.tags[i][word]] if names is not None and sentences.tags else IGNORE_INDEX)
            else:
                labels.append(IGNORE_INDEX)
            prev = word
        out["labels"].append(labels)
        out["positions"].append(first)
    return out


def pad_to_longest(features: dict[str, list], pad_id: int) -> dict[str, list]:
    """Every sequence column right-padded to the longest row of the set (``input_ids`` with ``pad_id``,
    ``labels`` with -100, masks with 0), so that logits of all eval batches share one width."""
    width = max(len(x) for x in features["input_ids"])
    pads = {"input_ids": pad_id, "labels": IGNORE_INDEX}
    return {k: v if k == "positions" else [row + [pads.get(k, 0)] * (width - len(row)) for row in v]
            for k, v in features.items()}


def word_tags(logits: np.ndarray, positions: list[list[int]], names: list[str]) -> list[list[str]]:
    """Predicted tag of every word: the arg-max at its first sub-token, ``O`` for a word without one."""
    ids = np.asarray(logits).argmax(-1)
    return [[names[int(ids[i, p])] if p >= 0 else "O" for p in row] for i, row in enumerate(positions)]


def scorer(gold: list[list[str]], positions: list[list[int]], names: list[str]
           ) -> Callable[[np.ndarray, np.ndarray, float], dict[str, float]]:
    """The eval metric of a tokens task: entity precision / recall / F1 and word accuracy over the eval rows (in
    order), and the loss."""

    def score(logits: np.ndarray, _labels: np.ndarray, loss: float) -> dict[str, float]:
        if np.asarray(logits).shape[0] != len(gold):
            raise DataError(f"tokens eval: {np.asarray(logits).shape[0]} rows of logits for {len(gold)} sentences")
        pred = word_tags(logits, positions, names)
        scores = entity_scores(gold, pred)
        return {"entity_f1": scores["entity_f1"], **scores, "word_accuracy": word_accuracy(gold, pred), "loss": loss}

    return score


def _dataset(features: dict[str, list]) -> datasets.Dataset:
    return datasets.Dataset.from_dict({k: v for k, v in features.items() if k != "positions"})


def build_tokens_task(cfg: Any, tokenizer: Any, pad_id: int, recorded: dict[str, Any] | None = None) -> Any:
    """The :class:`~deltatune.train.tasks.Task` of ``--task tokens``: label map from the training file (or
    ``recorded``, a delta's task info), eval rows from ``cfg.eval_data`` or a seeded hold-out of ``cfg.data``."""
    from transformers import AutoModelForTokenClassification

    from deltatune.train import user_data
    from deltatune.train.tasks import Task, _say

    if not cfg.data and not (recorded is not None and cfg.eval_data):
        raise ConfigError("task 'tokens' needs --data pointing at the training file (or, to evaluate a delta, "
                          "the file to evaluate)")
    if recorded is not None:
        info = user_data.TaskInfo.from_dict(recorded, "delta")
    else:
        columns = (cfg.text_column or TOKENS_COLUMN, cfg.label_column or TAGS_COLUMN)
        train_rows = read_sentences(cfg.data, *columns)
        tags = tag_map(train_rows)
        info = user_data.TaskInfo("tokens", columns[0], None, columns[1], tags, len(tags), TAG_ORDER)
    names = [str(n) for n in info.label_names or []]
    if cfg.eval_data:
        dev_rows = read_sentences(cfg.eval_data, info.text_column, info.label_column)
        train_rows = None if recorded is not None else train_rows
    else:
        every = train_rows if recorded is None else read_sentences(cfg.data, info.text_column, info.label_column)
        index = datasets.Dataset.from_dict({"i": list(range(len(every)))})
        kept, held = user_data.hold_out(index, cfg.seed, cfg.data)
        dev_rows = every.subset(list(held["i"]))
        train_rows = None if recorded is not None else every.subset(list(kept["i"]))
        if recorded is None:
            _say(user_data.held_out_note(len(dev_rows), len(every), "sentences", cfg))
    if train_rows is not None and cfg.train_limit:
        train_rows = train_rows.subset(list(range(min(cfg.train_limit, len(train_rows)))))
    if cfg.eval_limit:
        dev_rows = dev_rows.subset(list(range(min(cfg.eval_limit, len(dev_rows)))))
    dev_features = pad_to_longest(encode(dev_rows, tokenizer, cfg.max_length, names), pad_id)
    dev = _dataset(dev_features)
    train = dev if train_rows is None else _dataset(encode(train_rows, tokenizer, cfg.max_length, names))
    path = cfg.model_path

    def load() -> Any:
        from deltatune.train.tasks import with_head

        return with_head(AutoModelForTokenClassification, path, len(names), id2label=dict(enumerate(names)),
                         label2id={n: i for i, n in enumerate(names)})

    score = scorer(dev_rows.tags or [], dev_features["positions"], names)
    return Task("tokens", train, dev, load, score, "entity_f1", True, pad_id, False, info.to_dict())
