"""The evaluation loss is the mean over what carries a label, whatever the batch size: rows for classification,
labelled tokens for token classification (rows of different lengths), and a batch with no labelled token weighs
nothing."""

from __future__ import annotations

import datasets
import pytest
import torch
from transformers import BertConfig, BertForTokenClassification

from deltatune.train.evaluate import eval_outputs
from deltatune.train.tasks import Task


def _token_task(rows: list[tuple[list[int], list[int]]]) -> Task:
    """Rows padded to the longest, as the tokens task pads its evaluation rows (labels -100 on the padding)."""
    width = max(len(ids) for ids, _ in rows)
    ds = datasets.Dataset.from_dict({
        "input_ids": [ids + [0] * (width - len(ids)) for ids, _ in rows],
        "labels": [lab + [-100] * (width - len(lab)) for _, lab in rows],
        "attention_mask": [[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows]})
    return Task("tokens", ds, ds, lambda: None, lambda *a: {}, "entity_f1", True, 0, False)


def test_token_classification_loss_is_the_mean_over_labelled_tokens_at_any_batch_size():
    torch.manual_seed(0)
    model = BertForTokenClassification(BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                  num_hidden_layers=1, num_attention_heads=2, num_labels=3)).eval()
    rows = [([5, 6], [1, 2]), ([7, 8, 9, 10, 11, 12, 13, 14], [0, 1, 2, 0, 1, 2, 0, 1]), ([3, 4], [-100, -100])]
    task = _token_task(rows)
    _, _, whole = eval_outputs(model, task, batch_size=3, device=torch.device("cpu"))
    _, _, one_by_one = eval_outputs(model, task, batch_size=1, device=torch.device("cpu"))
    assert one_by_one == pytest.approx(whole, rel=1e-5)  # the 2-token row does not weigh as much as the 8-token one
    assert whole == whole  # not NaN: the unlabelled row adds nothing
