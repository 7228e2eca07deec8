"""Causal-LM data: fixed-length blocks of plain text, and prompt/response pairs with masked prompts.

Blocks: the text is tokenized without special tokens, the ids are concatenated ``t_0 .. t_{T-1}`` and cut
into ``n = floor(T / block_size)`` non-overlapping blocks ``t_{k*B} .. t_{(k+1)*B - 1}``; the last
``T - n*B`` ids are dropped. ``labels == input_ids`` (the model shifts them for next-token prediction).

Instruction pairs: ``input_ids = tok(prompt) + tok(response) + [end]`` with ``end`` the tokenizer's EOS id,
else its SEP id, else nothing; ``labels`` is ``-100`` at every prompt position and equals ``input_ids``
elsewhere, so the loss covers only the response and the end token. Both are truncated to ``max_length``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from deltatune.errors import ConfigError, DataError

IGNORE_INDEX = -100
"""Label value ignored by ``torch.nn.CrossEntropyLoss`` (its default ``ignore_index``)."""

_CHUNK_CHARS = 1000
"""Lines are grouped into chunks of about this many characters before tokenizing (keeps memory flat)."""

_CHUNKS_PER_CALL = 256
"""Chunks tokenized per batched tokenizer call."""


def _read_text(path: Path) -> str:
    """Read a utf-8 text file, raising DataError when it is missing or not utf-8."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"text file not found: {path}")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid utf-8 ({exc})") from None


def _line_chunks(text: str) -> Iterator[str]:
    """Consecutive groups of whole lines (line ends kept), each about ``_CHUNK_CHARS`` long."""
    buf: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        buf.append(line)
        size += len(line)
        if size >= _CHUNK_CHARS:
            yield "".join(buf)
            buf, size = [], 0
    if buf:
        yield "".join(buf)


def text_blocks(
    path: Path, tokenizer: Any, block_size: int, limit_chars: int | None = None
) -> datasets.Dataset:
    """Cut a plain-text file into ``floor(T / block_size)`` blocks of ``block_size`` token ids.

    ``limit_chars`` keeps only the first N characters of the file. The text is tokenized in chunks of
    whole lines with ``add_special_tokens=False`` (for byte-level BPE a merge across a chunk boundary may
    differ from tokenizing the whole text at once). Columns: ``input_ids``, ``attention_mask`` (all ones),
    ``labels`` (a copy of ``input_ids``). Raises DataError when the text yields fewer than ``block_size``
    tokens.
    """
    if block_size < 1:
        raise ConfigError(f"block_size must be >= 1, got {block_size}")
    if limit_chars is not None and limit_chars < 0:
        raise ConfigError(f"limit_chars must be >= 0 or None, got {limit_chars}")
    text = _read_text(path)
    if limit_chars is not None:
        text = text[:limit_chars]

    pieces: list[np.ndarray] = []
    batch: list[str] = []

    def _flush() -> None:
        if batch:
            ids = tokenizer(batch, add_special_tokens=False)["input_ids"]
            pieces.extend(np.asarray(x, dtype=np.int64) for x in ids)
            batch.clear()

    for chunk in _line_chunks(text):
        batch.append(chunk)
        if len(batch) >= _CHUNKS_PER_CALL:
            _flush()
    _flush()

    all_ids = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    n_blocks = all_ids.size // block_size
    if n_blocks == 0:
        raise DataError(f"{path}: text yields {all_ids.size} tokens, fewer than block_size={block_size}")
    blocks = all_ids[: n_blocks * block_size].reshape(n_blocks, block_size).tolist()
    ones = [[1] * block_size for _ in range(n_blocks)]
    return datasets.Dataset.from_dict(
        {"input_ids": blocks, "attention_mask": ones, "labels": [list(b) for b in blocks]}
    )


def _end_token_id(tokenizer: Any) -> int | None:
    """The id appended after the response: EOS if the tokenizer has one, else SEP, else None."""
    for attr in ("eos_token_id", "sep_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return None


def instruction_pairs(
    path: Path,
    tokenizer: Any,
    max_length: int,
    prompt_field: str = "prompt",
    response_field: str = "response",
) -> datasets.Dataset:
    """Read a JSONL file of ``{prompt_field: str, response_field: str}`` objects into causal-LM examples.

    ``input_ids = tok(prompt) + tok(response) + [eos or sep]`` (no other special tokens), ``labels = -100``
    on the prompt tokens and the ids elsewhere, ``attention_mask`` all ones; all three are truncated to the
    first ``max_length`` tokens. A record whose prompt fills ``max_length`` (no supervised token left: its loss would
    be 0/0) is skipped and counted on stderr, as ``--task chat`` does; DataError when none is left. Empty lines are
    skipped. A line that is not a JSON object or lacks a string field raises DataError naming file and line.
    """
    if max_length < 1:
        raise ConfigError(f"max_length must be >= 1, got {max_length}")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"JSONL file not found: {path}")
    prompts: list[str] = []
    responses: list[str] = []
    lines: list[int] = []
    with path.open("r", encoding="utf-8-sig") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
            for field in (prompt_field, response_field):
                if field not in record:
                    raise DataError(f"{path}:{line_no}: missing field {field!r} (has {sorted(record)})")
                if not isinstance(record[field], str):
                    kind = type(record[field]).__name__
                    raise DataError(f"{path}:{line_no}: field {field!r} must be a string, got {kind}")
            prompts.append(record[prompt_field])
            responses.append(record[response_field])
            lines.append(line_no)
    if not prompts:
        raise DataError(f"{path}: no records")

    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(responses, add_special_tokens=False)["input_ids"]
    end = _end_token_id(tokenizer)
    tail = [] if end is None else [end]
    input_ids: list[list[int]] = []
    labels: list[list[int]] = []
    skipped: list[int] = []
    for p, r, line_no in zip(prompt_ids, response_ids, lines, strict=True):
        lab = ([IGNORE_INDEX] * len(p) + list(r) + tail)[:max_length]
        if all(t == IGNORE_INDEX for t in lab[1:]):  # the model predicts token i from those before it: none for 0
            skipped.append(line_no)
            continue
        input_ids.append((list(p) + list(r) + tail)[:max_length])
        labels.append(lab)
    if skipped:
        from deltatune.train.tasks import _say

        if not input_ids:
            raise DataError(f"{path}: every record's prompt fills --max-length {max_length} tokens (no response "
                            "token left to learn); raise --max-length")
        _say(f"{path}: skipped {len(skipped)} of {len(lines)} records whose prompt fills --max-length {max_length} "
             f"tokens (first: line {skipped[0]})")
    return datasets.Dataset.from_dict(
        {"input_ids": input_ids, "attention_mask": [[1] * len(x) for x in input_ids], "labels": labels}
    )
