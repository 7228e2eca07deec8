"""``predict``: run classification deltas on the rows of a user's file, one JSON line per input, in input order.

Token-classification deltas (``--task tokens``) give per-word tags instead: see
:mod:`deltatune.train.tokens_predict`.

What a delta needs to read a new file is in its provenance: the task (a user's ``classify`` task with its text
columns and label map, or a GLUE classification task with its columns), so ``data`` is the only input.  Each
line holds ``label`` (the predicted label, spelled as in the training file) and ``score`` (its softmax
probability), and with ``top_k > 1`` the ``top`` labels with their scores.  Inputs are truncated to the
``max_length`` each delta was trained with (:func:`deltatune.api.recorded_max_length`, as ``eval`` truncates them),
unless ``max_length`` is given; deltas of different lengths run in separate passes.

Several deltas in one run share one base model and one pass per batch: the rows of a batch are
``(input, delta)`` pairs, each routed to its own delta and its own task head through the routing context
(:mod:`deltatune.routing`); deltas whose heads have different label counts run in separate passes (a batch's
logits have one width).  A line then holds one such object per delta, under the delta's name.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deltatune.api import as_delta, base_model_path, load_base_for, recorded_max_length
from deltatune.delta import Delta
from deltatune.errors import ConfigError, DataError
from deltatune.io.atomic import atomic_file
from deltatune.model import mixed_batch
from deltatune.provenance import recorded_stack
from deltatune.train.stacking import attach_for_use


@dataclass(frozen=True)
class Reading:
    """How one delta reads a row: its text columns and its label names (index = class id)."""

    text_column: str
    text_pair_column: str | None
    label_names: list[str]
    num_labels: int


def reading_of(delta: Delta, where: str) -> Reading:
    """The columns and label names a classification delta was trained with (typed error when it has none)."""
    from deltatune.train.glue import GLUE_TASKS

    task = delta.provenance.task or {}
    width = head_width(delta, where)
    if task.get("task") == "classify" and task.get("label_names"):
        names = [str(n) for n in task["label_names"]]
        return Reading(task["text_column"], task.get("text_pair_column"), names, len(names))
    glue = GLUE_TASKS.get(str(task.get("name")))
    if glue is not None and not glue.is_regression and isinstance(glue.text_a, str):
        names = list(glue.label_names) or [str(i) for i in range(glue.num_labels)]
        text_b = glue.text_b if isinstance(glue.text_b, str) else None
        return Reading(glue.text_a, text_b, names, glue.num_labels)
    raise DataError(f"{where}: the delta records no classification task with a label map (task: "
                    f"{task.get('name')!r}, head of {width} outputs); predict needs a delta trained with --task "
                    "classify or on a GLUE classification task")


def head_width(delta: Delta, where: str) -> int:
    """Outputs of the delta's classification head (``classifier`` / ``score``); DataError when it has none (a
    causal-LM or chat delta, a delta saved without heads)."""
    head = next((h for h in ("classifier", "score") if h in delta.heads), None)
    if head is None or "weight" not in delta.heads[head]:
        task = (delta.provenance.task or {}).get("name") or (delta.provenance.task or {}).get("task")
        raise DataError(f"{where}: the delta has no classification head (heads: {sorted(delta.heads)}; task: "
                        f"{task!r}); predict needs a delta trained on a classification task (classify, tokens, "
                        "GLUE); for a causal-LM delta use `deltatune generate`")
    return int(delta.heads[head]["weight"].shape[0])


def _is_tokens(delta: Delta) -> bool:
    return (delta.provenance.task or {}).get("task") == "tokens"


def _name(item: Delta | str | Path, index: int) -> str:
    """A delta's name in the output: its folder's name (the run's name for a run's ``delta``/``best`` folder)."""
    if isinstance(item, Delta):
        return f"delta{index}"
    path = Path(item)
    return path.parent.name if path.name in ("delta", "best") and path.parent.name else path.name


def predict(deltas: Sequence[Delta | str | Path] | Delta | str | Path, data: str, out: str | Path | None = None,
            model: str | None = None, top_k: int = 1, batch_size: int = 32, max_length: int | None = None,
            verify: bool = True) -> list[dict[str, Any]]:
    """Predict the label of every row of ``data`` with each delta; write JSON Lines to ``out`` when given.

    Each input is truncated to ``max_length`` tokens: by default the delta's own, as trained (and as ``eval``
    reads it); a length beyond the model's positions is a :class:`ConfigError`.  Returns one dict per input row, in
    input order: ``{"label", "score"[, "top"]}`` for one delta, or ``{delta name: {...}}`` for several."""
    from transformers import AutoTokenizer

    from deltatune.train.user_data import read_table, require_columns, text_cells

    items = list(deltas) if isinstance(deltas, (list, tuple)) else [deltas]
    if not items:
        raise ConfigError("predict needs at least one delta")
    if top_k < 1:
        raise ConfigError(f"top_k must be ≥ 1, got {top_k}")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                   or max_length < 2):
        raise ConfigError(f"max_length must be an integer ≥ 2 (tokens per input), got {max_length!r}")
    names = [_name(item, i) for i, item in enumerate(items)]
    if len(set(names)) != len(names):
        names = [f"{n}#{i}" for i, n in enumerate(names)]
    names, wheres, loaded = _one_task_each(names, [str(item) for item in items],
                                           [as_delta(item, verify=verify) for item in items])
    path = base_model_path(loaded[0], model)
    lengths = _lengths(loaded, wheres, max_length, path)
    if any(_is_tokens(d) for d in loaded):
        return _predict_tokens(loaded, wheres, names, data, out, path, top_k, batch_size, lengths)
    readings = [reading_of(d, where) for d, where in zip(loaded, wheres, strict=True)]
    table = read_table(data)
    for r in readings:
        require_columns(table, [r.text_column, *([r.text_pair_column] if r.text_pair_column else [])], data)
    texts = {c: text_cells(table[c], c, data) for r in readings for c in (r.text_column, r.text_pair_column) if c}
    tokenizer = AutoTokenizer.from_pretrained(path)
    results: list[dict[str, Any]] = [{} for _ in range(len(table))]
    groups: dict[tuple[int, int, int], list[int]] = {}
    for j, r in enumerate(readings):  # a stacked delta changes the base beneath it: a model of its own
        groups.setdefault((r.num_labels, lengths[j], j if recorded_stack(loaded[j]) else -1), []).append(j)
    for (_, length, _), members in groups.items():
        net = load_base_for(loaded[members[0]], path).eval()
        for j in members:
            attach_for_use(net, loaded[j], names[j], where=wheres[j])
        for pair_rows in (False, True):  # a tokenizer call takes a second text for every row or for none
            kind = [j for j in members if bool(readings[j].text_pair_column) == pair_rows]
            pairs = [(i, j) for i in range(len(table)) for j in kind]
            for start in range(0, len(pairs), batch_size):
                chunk = pairs[start:start + batch_size]
                firsts = [texts[readings[j].text_column][i] for i, j in chunk]
                seconds = [texts[readings[j].text_pair_column][i] for i, j in chunk] if pair_rows else None
                batch = tokenizer(firsts, seconds, padding=True, truncation=True, max_length=length,
                                  return_tensors="pt")
                with torch.no_grad(), mixed_batch(net, [names[j] for _, j in chunk]):
                    probs = net(**batch).logits.float().softmax(-1)
                for (i, j), p in zip(chunk, probs, strict=True):
                    results[i][names[j]] = _entry(p, readings[j].label_names, top_k)
    return _write(results, names, out)


def _lengths(loaded: list[Delta], wheres: list[str], max_length: int | None, path: str) -> list[int]:
    """Tokens per input for each delta: ``max_length`` when given, else the delta's recorded one; each checked
    against the positions of the model at ``path`` (:func:`deltatune.train.config.check_max_length`)."""
    from deltatune.train.config import check_max_length

    if max_length is not None:
        check_max_length(max_length, path, "--max-length")
        return [max_length] * len(loaded)
    lengths = [recorded_max_length(d) for d in loaded]
    for length, where in {length: where for length, where in zip(lengths, wheres, strict=True)}.items():
        check_max_length(length, path, f"{where}: the delta's recorded max_length (pass --max-length to override)")
    return lengths


def _one_task_each(names: list[str], wheres: list[str],
                   loaded: list[Delta]) -> tuple[list[str], list[str], list[Delta]]:
    """Each delta as one task: a merge that kept several tasks' heads becomes one entry per task, named
    ``NAME/TASK`` (:func:`deltatune.algebra.task_heads.for_task`)."""
    from deltatune.algebra.task_heads import for_task, task_names

    out: list[tuple[str, str, Delta]] = []
    for name, where, d in zip(names, wheres, loaded, strict=True):
        tasks = task_names(d)
        out += [(f"{name}/{t}", f"{where} ({t})", for_task(d, t)) for t in tasks] or [(name, where, d)]
    return [n for n, _, _ in out], [w for _, w, _ in out], [d for _, _, d in out]


def _write(results: list[dict[str, Any]], names: list[str], out: str | Path | None) -> list[dict[str, Any]]:
    """Rows as returned (one delta: its entries; several: ``{name: entry}``), written as JSON Lines to ``out``."""
    rows = [r[names[0]] for r in results] if len(names) == 1 else [{n: r[n] for n in names} for r in results]
    if out is not None:
        with atomic_file(Path(out)) as tmp:
            tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return rows


def _predict_tokens(loaded: list[Delta], wheres: list[str], names: list[str], data: str, out: str | Path | None,
                    path: str, top_k: int, batch_size: int, lengths: list[int]) -> list[dict[str, Any]]:
    """Token-classification deltas: per-word tags (:mod:`deltatune.train.tokens_predict`), one run per length."""
    from deltatune.train.tokens_predict import predict_tokens, token_reading

    for d, where in zip(loaded, wheres, strict=True):
        if not _is_tokens(d):
            raise ConfigError(f"{where}: predict cannot mix token-classification deltas with deltas of task "
                              f"{(d.provenance.task or {}).get('name')!r} in one run (their models differ); run "
                              "them separately")
    if top_k != 1:
        raise ConfigError("--top-k applies to sentence classification; token deltas give each word its most "
                          "probable tag and its score")
    readings = [token_reading(d, head_width(d, w), w) for d, w in zip(loaded, wheres, strict=True)]
    results: list[dict[str, Any]] = []
    for length in dict.fromkeys(lengths):  # a sentence is encoded once per length
        js = [j for j, n in enumerate(lengths) if n == length]
        part = predict_tokens([loaded[j] for j in js], [readings[j] for j in js], [names[j] for j in js],
                              [wheres[j] for j in js], data, path, batch_size, length)
        results = part if not results else [{**a, **b} for a, b in zip(results, part, strict=True)]
    return _write(results, names, out)


def _entry(probs: torch.Tensor, label_names: list[str], top_k: int) -> dict[str, Any]:
    k = min(top_k, probs.numel())
    scores, ids = probs.topk(k)
    entry: dict[str, Any] = {"label": label_names[int(ids[0])], "score": round(float(scores[0]), 6)}
    if top_k > 1:
        entry["top"] = [{"label": label_names[int(i)], "score": round(float(s), 6)} for s, i in zip(scores, ids,
                                                                                                    strict=True)]
    return entry
