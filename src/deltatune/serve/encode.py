"""Encoder requests of the serving engine: one padded forward for a group of embedding or classification
requests, each row routed to its own delta (and task head)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from deltatune.parts.prompt import pools_last_token
from deltatune.positions import table_positions
from deltatune.routing import Routing, routed
from deltatune.serve.requests import EncodeRequest, EncodeResult


def row_routing(keys: Sequence[str | None]) -> Routing | None:
    """The per-row routing of a batch; ``None`` when every row is on the bare base: deltas are attached inactive,
    so an unrouted forward runs the base modules alone and a base row costs nothing extra."""
    return None if all(k is None for k in keys) else Routing.per_row(list(keys))


def encode_group(model: nn.Module, pad_id: int, device: torch.device, task: str,
                 group: Sequence[tuple[EncodeRequest, str | None]]) -> list[EncodeResult]:
    """``task`` "classify": the softmax of each row's logits; "embed": the mean of the last hidden states over the
    row's tokens, L2-normalised.  ``group`` pairs each request with its delta key (``None``: the base).  Rows run
    in padded batches; a decoder classifier, which reads its prediction at the last token
    (:func:`~deltatune.parts.prompt.pools_last_token`), in the batches :func:`padding_free` makes, so every row's
    result is the one it gets alone."""
    every = [list(range(len(group)))]
    batches = padding_free(model, group, pad_id) if task == "classify" and pools_last_token(model) else every
    results: list[EncodeResult | None] = [None] * len(group)
    for rows in batches:
        for i, result in zip(rows, _encode_batch(model, pad_id, device, task, [group[i] for i in rows]), strict=True):
            results[i] = result
    return [r for r in results if r is not None]


def padding_free(model: nn.Module, group: Sequence[tuple[EncodeRequest, str | None]], pad_id: int) -> list[list[int]]:
    """The rows of ``group`` (indices) in batches a decoder classifier reads right: all in one padded batch where the
    config's pad id is the one padding with (it then finds each row's last real token), else batches of one length
    each — no padding to misread — and one row per batch when the config has no pad id (``transformers`` refuses
    batches of more rows then)."""
    config_pad = getattr(model.config, "pad_token_id", None)
    if config_pad == pad_id:
        return [list(range(len(group)))]
    if config_pad is None:
        return [[i] for i in range(len(group))]
    by_length: dict[int, list[int]] = {}
    for i, (r, _) in enumerate(group):
        by_length.setdefault(len(r.input_ids), []).append(i)
    return list(by_length.values())


@torch.no_grad()
def _encode_batch(model: nn.Module, pad_id: int, device: torch.device, task: str,
                  group: Sequence[tuple[EncodeRequest, str | None]]) -> list[EncodeResult]:
    """One right-padded forward of ``group`` (see :func:`encode_group`)."""
    width = max(len(r.input_ids) for r, _ in group)
    ids = torch.full((len(group), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(group), width), dtype=torch.long)
    types = torch.zeros((len(group), width), dtype=torch.long)
    for i, (r, _) in enumerate(group):
        ids[i, :len(r.input_ids)] = torch.tensor(r.input_ids)
        mask[i, :len(r.input_ids)] = 1
        if r.token_type_ids:
            types[i, :len(r.token_type_ids)] = torch.tensor(r.token_type_ids)
    kwargs = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    if any(r.token_type_ids for r, _ in group):
        kwargs["token_type_ids"] = types.to(device)
    with routed(row_routing([key for _, key in group])):
        out = model(**kwargs, output_hidden_states=task == "embed")
    if task == "classify":
        probs = out.logits.float().softmax(-1).cpu()
        return [EncodeResult(r.request_id, probs=probs[i].tolist(), tokens=len(r.input_ids))
                for i, (r, _) in enumerate(group)]
    hidden = out.hidden_states[-1].float().cpu()
    weights = mask[..., None].float()
    pooled = torch.nn.functional.normalize((hidden * weights).sum(1) / weights.sum(1), dim=-1)
    return [EncodeResult(r.request_id, embedding=pooled[i].tolist(), tokens=len(r.input_ids))
            for i, (r, _) in enumerate(group)]


def encoder_positions(model: nn.Module, max_positions: int | None) -> int | None:
    """The positions an encoder input may use: its tables of absolute positions' usable rows
    (:func:`~deltatune.positions.table_positions`: RoBERTa's start at ``padding_idx + 1``, so XLM-R's 514 leave
    512), else the config's ``max_positions``."""
    found = table_positions(model)
    return found if found is not None else max_positions
