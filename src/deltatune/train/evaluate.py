"""Evaluation pass: logits and labels over a dataset, scored by the task's metric."""

from __future__ import annotations

import datasets
import numpy as np
import torch
from torch import nn

from deltatune.train.collate import pad_collate
from deltatune.train.tasks import Task

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "labels")


def batches(ds: datasets.Dataset, order: list[int], batch_size: int, pad_id: int, device: torch.device):
    for start in range(0, len(order), batch_size):
        rows = ds.select(order[start:start + batch_size])
        feats = [{k: r[k] for k in MODEL_INPUTS if k in r} for r in rows]
        yield {k: v.to(device) for k, v in pad_collate(feats, pad_id).items()}


@torch.no_grad()
def eval_outputs(model: nn.Module, task: Task, batch_size: int, device: torch.device
                 ) -> tuple[np.ndarray, np.ndarray, float]:
    """``(logits, labels, loss)`` over ``task.eval`` in eval mode (the model's mode is restored); the loss is
    the mean over what carries a label — rows, or tokens (language modelling, whose logits and labels are left
    empty; token classification) — so it equals the loss of the whole set in one batch."""
    was_training = model.training
    model.eval()
    preds, labels, loss_sum, weight = [], [], 0.0, 0
    for batch in batches(task.eval, list(range(len(task.eval))), batch_size, task.pad_token_id, device):
        out = model(**batch)
        if task.is_lm:
            n = int((batch["labels"][:, 1:] != -100).sum())
        else:  # a label per row, or per token (tokens tasks: the loss is the mean over the labelled tokens)
            n = int((batch["labels"] != -100).sum()) if batch["labels"].dim() > 1 else batch["labels"].shape[0]
            preds.append(out.logits.float().cpu().numpy())
            labels.append(batch["labels"].cpu().numpy())
        if n:  # a batch without a labelled token has loss 0/0: it weighs nothing
            loss_sum += float(out.loss) * n
            weight += n
    model.train(was_training)
    if task.is_lm:
        return np.empty(0), np.empty(0), loss_sum / max(weight, 1)
    return np.concatenate(preds), np.concatenate(labels), loss_sum / max(weight, 1)


def evaluate(model: nn.Module, task: Task, batch_size: int, device: torch.device) -> dict[str, float]:
    """Task metrics on ``task.eval``; token-weighted mean loss for language modelling."""
    if task.eval is None or len(task.eval) == 0:
        return {}
    return task.score(*eval_outputs(model, task, batch_size, device))
