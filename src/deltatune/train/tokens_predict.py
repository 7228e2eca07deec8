"""``predict`` for token-classification deltas (``--task tokens``): one JSON object per input sentence, in input
order, with its ``words``, the predicted tag of each word (``labels``, spelled as in the training file), that
tag's softmax probability (``scores``) and the ``entities`` the tags spell (``{"type", "start", "end", "text"}``,
word indices, ``end`` exclusive; read as :mod:`deltatune.train.entities` reads them).

A word's tag is read at its first sub-token (as in training); a word without a sub-token (cut by
``max_length``, or empty after the tokenizer's normalisation) is tagged ``O`` with score ``null``.  Inputs are
a column file (tokens in the first column; tags, if any, ignored) or records with a token-list column (the one
the delta was trained with; a string is split on whitespace).  Several deltas share one model and one pass per
batch (rows routed to their own delta and head); deltas with different tag counts run in separate passes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from deltatune.delta import Delta
from deltatune.errors import DataError
from deltatune.train.collate import pad_collate
from deltatune.train.entities import entity_spans
from deltatune.train.tokens import Sentences, encode, read_sentences


@dataclass(frozen=True)
class TokenReading:
    """How a tokens delta reads a file: its token column and its tag names (index = class id)."""

    tokens_column: str
    label_names: list[str]


def token_reading(delta: Delta, head_width: int, where: str) -> TokenReading:
    """The token column and tag names a tokens delta was trained with; DataError when its head does not have one
    output per tag."""
    task = delta.provenance.task or {}
    names = [str(n) for n in task.get("label_names") or []]
    if len(names) != head_width or not task.get("text_column"):
        raise DataError(f"{where}: the delta's token head has {head_width} outputs but its task records "
                        f"{len(names)} tags ({names[:20]}); was it trained with --task tokens by deltatune?")
    return TokenReading(str(task["text_column"]), names)


def _entry(words: list[str], probs: torch.Tensor | None, positions: list[int], names: list[str]) -> dict[str, Any]:
    labels: list[str] = []
    scores: list[float | None] = []
    for p in positions:
        if p < 0 or probs is None or p >= probs.shape[0]:
            labels.append("O")
            scores.append(None)
            continue
        score, index = probs[p].max(-1)
        labels.append(names[int(index)])
        scores.append(round(float(score), 6))
    entities = [{"type": kind, "start": start, "end": end, "text": " ".join(words[start:end])}
                for kind, start, end in entity_spans(labels)]
    return {"words": words, "labels": labels, "scores": scores, "entities": entities}


def predict_tokens(loaded: list[Delta], readings: list[TokenReading], names: list[str], wheres: list[str], data: str,
                   path: str, batch_size: int, max_length: int) -> list[dict[str, dict[str, Any]]]:
    """``[{delta name: entry}]`` per input sentence (module docstring), every delta on the same base ``path``."""
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    from deltatune.model import mixed_batch
    from deltatune.provenance import recorded_stack
    from deltatune.train.stacking import attach_for_use
    from deltatune.train.tasks import _quiet_transformers, with_head

    _quiet_transformers()
    tokenizer = AutoTokenizer.from_pretrained(path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    read: dict[str, tuple[Sentences, dict[str, list]]] = {}
    for r in readings:
        if r.tokens_column not in read:
            sentences = read_sentences(data, r.tokens_column, "", need_tags=False)
            read[r.tokens_column] = (sentences, encode(sentences, tokenizer, max_length, None))
    count = {len(s) for s, _ in read.values()}.pop()
    results: list[dict[str, dict[str, Any]]] = [{} for _ in range(count)]
    groups: dict[tuple[int, int], list[int]] = {}
    for j, r in enumerate(readings):  # a stacked delta changes the base beneath it: a model of its own
        groups.setdefault((len(r.label_names), j if recorded_stack(loaded[j]) else -1), []).append(j)
    for (width, _), members in groups.items():
        torch.manual_seed(0)
        net = with_head(AutoModelForTokenClassification, path, width).eval()
        for j in members:
            attach_for_use(net, loaded[j], names[j], where=wheres[j])
        pairs = [(i, j) for i in range(count) for j in members]
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            feats = []
            for i, j in chunk:
                enc = read[readings[j].tokens_column][1]
                feats.append({k: enc[k][i] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc})
            batch = pad_collate(feats, pad_id)
            with torch.no_grad(), mixed_batch(net, [names[j] for _, j in chunk]):
                probs = net(**batch).logits.float().softmax(-1)
            for (i, j), p in zip(chunk, probs, strict=True):
                sentences, enc = read[readings[j].tokens_column]
                results[i][names[j]] = _entry(sentences.tokens[i], p, enc["positions"][i], readings[j].label_names)
    return results
