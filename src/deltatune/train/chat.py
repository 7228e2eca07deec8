"""``--task chat``: conversations formatted with the tokenizer's chat template; the loss covers only the assistant
turns.

**Records** (JSON, JSONL, Parquet, ``save_to_disk`` folders, through ``datasets``): a column (``--text-column``,
default ``messages``) holding a list of ``{"role": str, "content": str}`` messages.  Every record needs at least
one ``assistant`` message.

**Template.** A conversation is rendered by ``tokenizer.apply_chat_template`` (the model's own template, from its
``tokenizer_config.json``) and tokenized *as one string* without added special tokens (the template writes BOS
and its turn markers itself).  A tokenizer without a chat template is refused with a :class:`ConfigError` rather
than given a made-up default: the delta would learn turn markers that nothing else uses for this model (HF
pipelines, TRL, serving stacks all render with the tokenizer's template), and a wrong format is silent at
training time.  Set ``tokenizer.chat_template`` and save the tokenizer, or use ``--task jsonl``.

**Masking.** With ``R(m, g)`` the rendering of messages ``m`` (``g``: with the generation prompt), the text of
assistant turn ``k`` is the character span ``[|R(m[:k], g=True)|, |R(m[:k+1])|)`` of ``R(m)``: the turn's content
and the template's end-of-turn marker, without the generation prompt.  A token is supervised (label = its id)
iff its first character lies in such a span; every other token has label ``-100``.  The template must render
each prefix of a conversation as a prefix of the whole (true of ChatML, Llama, Zephyr, Mistral …); one that
does not is refused with a :class:`ConfigError`.  ``--max-length`` truncates the tokens; a record left with no
supervised token is skipped, and the number skipped is reported.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import datasets

from deltatune.errors import ConfigError, DataError
from deltatune.train.collate import IGNORE_INDEX

MESSAGES_COLUMN = "messages"
ASSISTANT = "assistant"


def check_template(tokenizer: Any, model: str) -> str:
    """The tokenizer's chat template (ConfigError when it has none or cannot give character offsets)."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise ConfigError(f"{model}: the tokenizer has no chat template ('chat_template' in tokenizer_config.json); "
                          "--task chat formats conversations with the model's own template. Set "
                          "tokenizer.chat_template and save the tokenizer, or use --task jsonl (prompt/response)")
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(f"{model}: task 'chat' needs a fast tokenizer (character offsets of tokens); "
                          f"{type(tokenizer).__name__} is not one")
    return template if isinstance(template, str) else str(template)


def _record_where(spec: str, rows: list[int], jsonl: bool) -> list[str]:
    return [f"{spec}: record {r}" + (f" (line {r})" if jsonl else "") for r in rows]


def read_conversations(spec: str, column: str) -> tuple[list[list[dict[str, str]]], list[str]]:
    """Conversations of a table of records and where each one is (``file: record N``, with its line for JSONL).

    DataError for a missing column (listing those that exist), a record that is not a list of ``{role,
    content}`` strings, or one without an assistant turn (naming the record)."""
    from deltatune.train.tokens import _jsonl_lines
    from deltatune.train.user_data import read_table, require_columns

    table = read_table(spec)
    require_columns(table, [column], spec)
    path = Path(spec)
    lines = _jsonl_lines(path) if path.exists() else None
    jsonl = lines is not None and len(lines) == len(table)
    where = _record_where(spec, lines if jsonl else list(range(1, len(table) + 1)), jsonl)
    conversations = [_messages(value, column, w) for value, w in zip(table[column], where, strict=True)]
    return conversations, where


def _messages(value: Any, column: str, where: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}, column {column!r}: expected a non-empty list of messages "
                        f"{{'role': …, 'content': …}}, got {type(value).__name__ if value else value!r}")
    out = []
    for k, message in enumerate(value):
        if not isinstance(message, dict):
            raise DataError(f"{where}, message {k + 1}: expected an object with 'role' and 'content', "
                            f"got {type(message).__name__}")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise DataError(f"{where}, message {k + 1}: {key!r} must be a string, got "
                                f"{type(message.get(key)).__name__} (message keys: {sorted(message)})")
        out.append({k2: v for k2, v in message.items() if v is not None})
    roles = [m["role"] for m in out]
    if ASSISTANT not in roles:
        raise DataError(f"{where}: no assistant turn (roles: {roles}); the loss covers only assistant turns, so "
                        "this record would teach nothing — add the assistant's reply or drop the record")
    return out


def render_chat(tokenizer: Any, messages: list[dict[str, str]], prompt: bool, where: str) -> str:
    """``messages`` rendered by the tokenizer's chat template (with the generation prompt when ``prompt``);
    DataError naming ``where`` when the template fails."""
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
    except Exception as exc:  # noqa: BLE001  (jinja2 raises TemplateError and whatever the template raises)
        raise DataError(f"{where}: the chat template cannot render this conversation "
                        f"({type(exc).__name__}: {str(exc)[:120]})") from None
    if not isinstance(text, str):
        raise ConfigError(f"{where}: the chat template returned {type(text).__name__}, not text")
    return text


def assistant_spans(tokenizer: Any, messages: list[dict[str, str]], where: str) -> tuple[str, list[tuple[int, int]]]:
    """``(R(m), spans)``: the rendered conversation and the character span of each assistant turn (module
    docstring); ConfigError when the template does not render prefixes as prefixes."""
    full = render_chat(tokenizer, messages, False, where)
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != ASSISTANT:
            continue
        before = render_chat(tokenizer, messages[:k], True, where)
        through = render_chat(tokenizer, messages[:k + 1], False, where)
        if not through.startswith(before) or not full.startswith(through):
            raise ConfigError(f"{where}, message {k + 1}: the chat template does not render the conversation up to "
                              "this assistant turn as a prefix of the whole, so its tokens cannot be told apart; "
                              "use a template whose earlier turns render the same in longer conversations")
        spans.append((len(before), len(through)))
    return full, spans


def encode_conversations(conversations: list[list[dict[str, str]]], where: list[str], tokenizer: Any,
                         max_length: int) -> tuple[dict[str, list[list[int]]], list[str]]:
    """``(features, skipped)``: ``input_ids``, ``attention_mask`` and ``labels`` (ids inside assistant spans,
    -100 elsewhere) of each conversation, truncated to ``max_length``; ``skipped`` names the records left with no
    supervised token (dropped from ``features``)."""
    texts, spans = [], []
    for messages, w in zip(conversations, where, strict=True):
        text, s = assistant_spans(tokenizer, messages, w)
        texts.append(text)
        spans.append(s)
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, truncation=True,
                    max_length=max_length)
    features: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
    skipped = []
    for i, (ids, offsets) in enumerate(zip(enc["input_ids"], enc["offset_mapping"], strict=True)):
        labels = [t if any(a <= start < b for a, b in spans[i]) else IGNORE_INDEX
                  for t, (start, _end) in zip(ids, offsets, strict=True)]
        if all(x == IGNORE_INDEX for x in labels):
            skipped.append(where[i])
            continue
        features["input_ids"].append(list(ids))
        features["attention_mask"].append([1] * len(ids))
        features["labels"].append(labels)
    return features, skipped


def chat_examples(spec: str, column: str, tokenizer: Any, max_length: int) -> datasets.Dataset:
    """The training examples of a chat file (see :func:`encode_conversations`); records whose assistant tokens
    are all cut by ``max_length`` are skipped and counted on stderr; DataError when none is left."""
    from deltatune.train.tasks import _say

    conversations, where = read_conversations(spec, column)
    features, skipped = encode_conversations(conversations, where, tokenizer, max_length)
    if skipped:
        if not features["input_ids"]:
            raise DataError(f"{spec}: every record's assistant turns start after --max-length {max_length} tokens; "
                            "raise --max-length")
        _say(f"{spec}: skipped {len(skipped)} of {len(where)} records whose assistant turns start after "
             f"--max-length {max_length} tokens (first: {skipped[0]})")
    return datasets.Dataset.from_dict(features)


def build_chat_task(cfg: Any, tokenizer: Any, pad_id: int, recorded: dict[str, Any] | None = None) -> Any:
    """The :class:`~deltatune.train.tasks.Task` of ``--task chat`` (a causal LM; eval loss and perplexity over
    the assistant tokens), eval rows from ``cfg.eval_data`` or a seeded hold-out of ``cfg.data``."""
    import math

    from transformers import AutoModelForCausalLM

    from deltatune.train import user_data
    from deltatune.train.tasks import Task, _say

    template = check_template(tokenizer, cfg.model_path)
    column = (recorded or {}).get("messages_column") or cfg.text_column or MESSAGES_COLUMN
    if not cfg.data and not (recorded is not None and cfg.eval_data):
        raise ConfigError("task 'chat' needs --data pointing at the training file")
    if cfg.eval_data:
        dev = chat_examples(cfg.eval_data, column, tokenizer, cfg.max_length)
        train = None if recorded is not None else chat_examples(cfg.data, column, tokenizer, cfg.max_length)
    else:
        every = chat_examples(cfg.data, column, tokenizer, cfg.max_length)
        train, dev = user_data.hold_out(every, cfg.seed, cfg.data)
        if recorded is not None:
            train = None
        else:
            _say(user_data.held_out_note(len(dev), len(every), "conversations", cfg))
    train, dev = user_data.limited(train, cfg.train_limit), user_data.limited(dev, cfg.eval_limit)
    path = cfg.model_path

    def load() -> Any:
        return AutoModelForCausalLM.from_pretrained(path)

    def score(_preds: Any, _labels: Any, loss: float) -> dict[str, float]:
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}

    info = {"task": "chat", "messages_column": column,
            "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest()}
    return Task("chat", dev if train is None else train, dev, load, score, "loss", False, pad_id, True, info)
