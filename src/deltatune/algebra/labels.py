"""The ``config.json`` of a written classifier: its own architecture and its label names.

A checkpoint written from base + delta (``deltatune apply``, a merge with ``output="checkpoint"``) is loaded
by users with ``AutoModelForSequenceClassification.from_pretrained(out)`` and read by pipelines through
``config.id2label``.  The base's config says ``architectures: ["BertModel"]`` and transformers fills in
``LABEL_0 … LABEL_{n-1}``; :func:`describe_classifier` records the class actually written
(``BertForSequenceClassification``, ``BertForTokenClassification``) and the label names the delta was trained
with: a ``classify`` task's label map or a ``tokens`` task's tags (saved in its provenance, in the training file's
spelling), or a GLUE task's label names.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def label_names(task: dict[str, Any] | None) -> list[str] | None:
    """The label names (index = class id) of the task record ``task`` (a delta's ``provenance.task``), or
    ``None`` when it records none (regression, plain text, an unknown task)."""
    from deltatune.train.glue import GLUE_TASKS

    if not isinstance(task, dict):
        return None
    if task.get("task") in ("classify", "tokens") and isinstance(task.get("label_names"), list):
        return [str(n) for n in task["label_names"]]  # a user's classes, or BIO tags (class id = index)
    glue = GLUE_TASKS.get(str(task.get("name")))
    if glue is not None and not glue.is_regression and glue.label_names:
        return [str(n) for n in glue.label_names]
    return None


def describe_classifier(model: nn.Module, task: dict[str, Any] | None) -> None:
    """Set ``model.config.architectures`` to the model's class and, for a classifier whose ``num_labels`` matches
    the task's label names, ``id2label``/``label2id`` to those names (in place; other configs keep theirs)."""
    config = getattr(model, "config", None)
    if config is None:
        return
    config.architectures = [type(model).__name__]
    names = label_names(task)
    classifier = type(model).__name__.endswith(("ForSequenceClassification", "ForTokenClassification"))
    if names and classifier and len(names) == config.num_labels:
        config.id2label = dict(enumerate(names))
        config.label2id = {n: i for i, n in enumerate(names)}
