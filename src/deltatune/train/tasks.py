"""Build what a training run needs from a :class:`TrainConfig`: model, datasets, metric.

GLUE tasks load ``AutoModelForSequenceClassification`` (``num_labels=1`` → regression for STS-B) and
report the official metrics; ``text`` and ``jsonl`` load ``AutoModelForCausalLM`` and report eval
loss and perplexity (prompt tokens masked from the loss for ``jsonl``); ``classify`` and ``regress`` read a
user's own files (:mod:`deltatune.train.user_data`) and record their columns and label map in ``Task.info``;
``tokens`` (:mod:`deltatune.train.tokens`, ``AutoModelForTokenClassification``, entity-level F1) and ``chat``
(:mod:`deltatune.train.chat`, a causal LM trained on the assistant turns only) do the same for their files.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from torch import nn

from deltatune.errors import ConfigError, DataError
from deltatune.train import glue, metrics, text, user_data
from deltatune.train.config import TrainConfig

LM_TASKS = ("text", "jsonl", "chat")


@dataclass
class Task:
    name: str
    train: datasets.Dataset
    eval: datasets.Dataset | None
    load_model: Callable[[], nn.Module]
    score: Callable[[np.ndarray, np.ndarray, float], dict[str, float]]
    main_metric: str
    greater_is_better: bool
    pad_token_id: int
    is_lm: bool
    info: dict[str, Any] | None = None
    """classify/regress: the :class:`~deltatune.train.user_data.TaskInfo` as a dict, saved as the delta's
    ``metrics["task_info"]`` (columns, label map) so that ``eval`` needs only ``--data``."""


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()


def with_head(auto_class: Any, path: str, num_labels: int, **kwargs: Any) -> nn.Module:
    """``auto_class.from_pretrained(path, num_labels=…)``: the base with a task head of ``num_labels`` outputs (new,
    or the folder's own where it has one of that size).  A folder whose saved head has another size (a fine-tuned
    classifier used with another label set) is a :class:`ConfigError` naming both sizes, not transformers' raw
    size-mismatch error."""
    try:
        return auto_class.from_pretrained(path, num_labels=num_labels, **kwargs)
    except RuntimeError as exc:
        if "size mismatch" not in str(exc) and "ignore_mismatched_sizes" not in str(exc):
            raise
        from transformers import AutoConfig

        saved = getattr(AutoConfig.from_pretrained(path), "num_labels", "?")
        raise ConfigError(f"{path}: its saved task head has {saved} outputs, this task needs {num_labels}; start from "
                          "the base model without that head (a delta trains its own head)") from None


def build_task(cfg: TrainConfig, tokenizer: Any | None = None, recorded: dict[str, Any] | None = None) -> Task:
    """The task of ``cfg``; ``recorded`` is a delta's ``task_info`` (classify/regress eval: reuse its label map)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    _quiet_transformers()
    path = cfg.model_path
    config = model_config(path)
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    if cfg.task in LM_TASKS:
        if not is_causal_lm(config):
            raise ConfigError(f"task {cfg.task!r} trains a causal language model, but {path} is a "
                              f"{config.model_type} model ({', '.join(config.architectures or ['no architecture'])}) "
                              "that cannot generate text; use a decoder (Llama, GPT-2 …) or a classification task")
        if cfg.task == "chat":
            from deltatune.train.chat import build_chat_task

            return build_chat_task(cfg, tokenizer, pad_id, recorded)
        return _lm_task(cfg, tokenizer, pad_id, lambda: AutoModelForCausalLM.from_pretrained(path))
    if cfg.task == "tokens":
        from deltatune.train.tokens import build_tokens_task

        return build_tokens_task(cfg, tokenizer, pad_id, recorded)
    if cfg.task in user_data.USER_TASKS:
        return _user_task(cfg, tokenizer, pad_id, recorded)
    spec = glue.get_task(cfg.task)
    data_dir = Path(cfg.data) if cfg.data else glue.default_data_dir()
    train = glue.tokenize_pairs(glue.read_glue_split(data_dir, spec.name, "train", cfg.train_limit), tokenizer,
                                cfg.max_length)
    dev = glue.tokenize_pairs(glue.read_glue_split(data_dir, spec.name, "dev", cfg.eval_limit), tokenizer,
                              cfg.max_length)

    def load() -> nn.Module:
        return with_head(AutoModelForSequenceClassification, path, spec.num_labels)

    def score(preds: np.ndarray, labels: np.ndarray, loss: float) -> dict[str, float]:
        return {**metrics.compute_metrics(spec.name, preds, labels), "loss": loss}

    return Task(spec.name, train, dev, load, score, metrics.main_metric(spec.name), True, pad_id, False)


def model_config(path: str) -> Any:
    """The ``transformers`` config of the model folder ``path`` (a :class:`ConfigError` saying what the folder is
    when it is not a model: missing, a data folder, an unreadable config)."""
    from transformers import AutoConfig

    folder = Path(path)
    if not folder.is_dir():
        raise ConfigError(f"model {path!r} is not a local folder (deltatune loads models from disk only)")
    if not (folder / "config.json").is_file():
        found = sorted(p.name for p in folder.iterdir())[:8]
        raise ConfigError(f"model folder {path} has no config.json, so it is not a transformers model (it holds "
                          f"{found}); pass the base model's folder as --model, data as --data")
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"model folder {path}: its config.json cannot be read by transformers "
                          f"({str(exc)[:120]})") from None


def is_causal_lm(config: Any) -> bool:
    """Whether a model config describes a text generator (a decoder with an LM head); a config that names no
    architecture is given the benefit of the doubt."""
    archs = config.architectures or []
    return not archs or bool(getattr(config, "is_decoder", False)) or any(
        a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)


def _lm_task(cfg: TrainConfig, tokenizer: Any, pad_id: int, load: Callable[[], nn.Module]) -> Task:
    if not cfg.data:
        raise ConfigError(f"task {cfg.task!r} needs --data pointing at the training file")
    if cfg.task == "text":
        blocks = text.text_blocks(Path(cfg.data), tokenizer, cfg.max_length)
        n_eval = max(1, len(blocks) // 10)
        if len(blocks) < 2:
            raise DataError(f"{cfg.data}: too little text for even two blocks of {cfg.max_length} tokens")
        train = blocks.select(range(len(blocks) - n_eval))
        dev = blocks.select(range(len(blocks) - n_eval, len(blocks)))
    else:
        train = text.instruction_pairs(Path(cfg.data), tokenizer, cfg.max_length)
        dev = text.instruction_pairs(Path(cfg.eval_data), tokenizer, cfg.max_length) if cfg.eval_data else None
    train, dev = user_data.limited(train, cfg.train_limit), user_data.limited(dev, cfg.eval_limit)

    def score(_preds: np.ndarray, _labels: np.ndarray, loss: float) -> dict[str, float]:
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}

    return Task(cfg.task, train, dev, load, score, "loss", False, pad_id, True)


def _say(message: str) -> None:
    """One line on stderr, from the main process only (``RANK`` 0 or unset)."""
    import os

    from rich.console import Console

    if os.environ.get("RANK", "0") != "0":
        return
    Console(stderr=True, highlight=False).print(f"[bold]deltatune[/bold] {message}")


def _user_task(cfg: TrainConfig, tokenizer: Any, pad_id: int, recorded: dict[str, Any] | None) -> Task:
    """classify/regress on the user's files: label map from the training file (or ``recorded``), eval rows
    from ``cfg.eval_data`` or a seeded hold-out of ``cfg.data`` (seed = ``cfg.seed``)."""
    from transformers import AutoModelForSequenceClassification

    if not cfg.data:
        raise ConfigError(f"task {cfg.task!r} needs --data pointing at the training file")
    train_table = None
    if recorded is not None:
        info = user_data.TaskInfo.from_dict(recorded, "delta")
    else:
        text_column, label_column = cfg.text_column or "text", cfg.label_column or "label"
        train_table = user_data.read_table(cfg.data, (text_column, label_column))
        info = user_data.task_info(cfg.task, train_table, cfg.data, text_column, cfg.text_pair_column,
                                   label_column)
    if cfg.eval_data:
        columns = (info.text_column, info.label_column)
        dev = user_data.to_examples(user_data.read_table(cfg.eval_data, columns), info, cfg.eval_data)
        train = None if recorded is not None else user_data.to_examples(train_table, info, cfg.data)
    else:
        table = train_table if train_table is not None else \
            user_data.read_table(cfg.data, (info.text_column, info.label_column))
        train, dev = user_data.hold_out(user_data.to_examples(table, info, cfg.data), cfg.seed, cfg.data)
        if recorded is not None:
            train = None  # evaluating a delta: only the held-out rows are needed
        else:
            _say(user_data.held_out_note(len(dev), len(train) + len(dev), "rows", cfg))
    train, dev = user_data.limited(train, cfg.train_limit), user_data.limited(dev, cfg.eval_limit)
    dev = glue.tokenize_pairs(dev, tokenizer, cfg.max_length)
    train = dev if train is None else glue.tokenize_pairs(train, tokenizer, cfg.max_length)
    names = [str(n) for n in info.label_names] if info.label_names is not None else None
    path = cfg.model_path

    def load() -> nn.Module:
        if names is None:
            return with_head(AutoModelForSequenceClassification, path, 1)
        return with_head(AutoModelForSequenceClassification, path, info.num_labels, id2label=dict(enumerate(names)),
                         label2id={n: i for i, n in enumerate(names)})

    def score(preds: np.ndarray, labels: np.ndarray, loss: float) -> dict[str, float]:
        return {**metrics.user_metrics(cfg.task, preds, labels), "loss": loss}

    main = "accuracy" if cfg.task == "classify" else "pearson"
    return Task(cfg.task, train, dev, load, score, main, True, pad_id, False, info.to_dict())
