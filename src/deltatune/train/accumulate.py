"""Gradient accumulation weighted by labelled items: a window of micro-batches trains as one batch of its rows.

A model's loss is the mean over the items its micro-batch labels (a causal LM's tokens, a classifier's rows).  A
window of ``k`` micro-batches with ``n_1 … n_k`` labelled items (``N = Σ n_i``) backpropagates

    L = Σ_i (n_i / N) · mean_i  =  Σ_i sum_i / N,

the mean over every labelled item of the window, as one batch of all its rows would, and as HF ``Trainer`` does
with ``num_items_in_batch``.  Weighing each micro-batch ``1/k`` instead gives a micro-batch of short answers
as much say as one of long answers.  A micro-batch without a labelled item (its mean is 0/0) weighs nothing.

The parts' auxiliary losses (MixLoRA's load balancing) are not means over items: a window adds their mean over its
micro-batches, ``Σ_i aux_i / k``.  Under DDP each process weighs its own window so (``N`` counts this process's
items) and DDP then averages the processes' gradients, so each process weighs the same whatever its item count;
the Trainer, averaging tokens across devices (``average_tokens_across_devices``), weighs each process by its items.
The loop (:func:`deltatune.train.loop.train`) fetches a window's ``k`` micro-batches before its first backward.
"""

from __future__ import annotations

import torch

from deltatune.train.collate import IGNORE_INDEX


def labelled_items(labels: torch.Tensor, is_lm: bool) -> int:
    """The items a model's loss averages over in one micro-batch, counted as that loss counts them:

    * causal LM (``is_lm``): the labels shifted by one, ``labels[:, 1:] != -100`` (position 0 predicts nothing);
    * token classification (``labels`` of shape ``(rows, tokens)``): ``labels != -100``;
    * sequence classification / regression (``labels`` of shape ``(rows,)``): the rows.
    """
    if is_lm:
        return int((labels[:, 1:] != IGNORE_INDEX).sum())
    if labels.dim() > 1:
        return int((labels != IGNORE_INDEX).sum())
    return int(labels.shape[0])


def window_share(loss: torch.Tensor, items: int, total: int) -> torch.Tensor:
    """A micro-batch's part of its window's loss: ``loss · items / total`` (``loss`` its mean over its ``items``,
    ``total`` the window's labelled items).  Computed as ``loss / (total / items)``: the usual division by ``k``
    where every micro-batch holds the same number of items, and ``loss`` itself where it is the whole window.  A
    micro-batch with no labelled item gives 0 with a zero gradient; it stays in the graph, so its backward still
    runs (and synchronises the processes' gradients where it is the window's last)."""
    if items == 0:
        return loss.nan_to_num(0.0) * 0.0
    if items == total:
        return loss
    return loss / (total / items)
