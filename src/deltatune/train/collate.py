"""Batch collation with right padding (pure torch, no tokenizer needed).

For a batch of ``n`` features whose longest sequence has ``L`` tokens, every sequence field becomes an
``(n, L)`` tensor (int64, or float32 if any value is a float), row ``i`` holding the ``l_i`` original
values followed by ``L - l_i`` pad values:
``input_ids`` -> ``pad_token_id``, ``attention_mask`` -> 0, ``token_type_ids`` -> 0, ``labels`` -> -100,
any other sequence field -> 0. Scalar fields (e.g. classification or regression labels) are stacked into
an ``(n,)`` tensor: int64 for integers and bools, float32 for floats.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from deltatune.errors import DataError

IGNORE_INDEX = -100
"""Pad value of sequence labels, ignored by ``torch.nn.CrossEntropyLoss``."""

_PAD_VALUES: dict[str, int] = {"attention_mask": 0, "token_type_ids": 0, "labels": IGNORE_INDEX}


def _as_tensor(value: Any) -> torch.Tensor:
    """A feature value (list, numpy array, tensor or Python scalar) as a tensor."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    return torch.as_tensor(value)


def pad_collate(features: Sequence[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad sequence fields to the longest sequence of the batch and stack scalar fields.

    All sequence fields share one length ``L`` (the longest over every sequence field), so ``labels`` stays
    aligned with ``input_ids``. Raises DataError for an empty batch, features with different keys, or a field
    that is a sequence in one feature and a scalar in another.
    """
    if len(features) == 0:
        raise DataError("pad_collate got an empty batch")
    keys = list(features[0].keys())
    for i, feat in enumerate(features):
        if set(feat.keys()) != set(keys):
            raise DataError(f"feature {i} has keys {sorted(feat)}, feature 0 has {sorted(keys)}")
    columns = {k: [_as_tensor(f[k]) for f in features] for k in keys}
    seq_keys = []
    for k, tensors in columns.items():
        dims = {t.dim() for t in tensors}
        if dims == {1}:
            seq_keys.append(k)
        elif dims != {0}:
            raise DataError(f"field {k!r} must be a 1-D sequence or a scalar in every feature, got {dims}")
    max_len = max((t.shape[0] for k in seq_keys for t in columns[k]), default=0)

    batch: dict[str, torch.Tensor] = {}
    for k, tensors in columns.items():
        if k in seq_keys:
            pad = pad_token_id if k == "input_ids" else _PAD_VALUES.get(k, 0)
            dtype = torch.float32 if any(t.is_floating_point() for t in tensors) else torch.long
            out = torch.full((len(tensors), max_len), pad, dtype=dtype)
            for i, t in enumerate(tensors):
                out[i, : t.shape[0]] = t.to(dtype)
            batch[k] = out
        else:
            stacked = torch.stack(tensors)
            batch[k] = stacked.to(torch.float32) if stacked.is_floating_point() else stacked.to(torch.long)
    return batch
