"""The serving KV cache appends into spare room (GrowingLayer) instead of concatenating the whole history at every
decode step, with the same outputs as transformers' DynamicLayer."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from transformers import DynamicCache

from deltatune.serve.kv_buffer import GrowingLayer, growing_cache

pytestmark = pytest.mark.usefixtures("one_thread")


def _decode(model, cache, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy logits of ``steps`` decode steps after prefilling ``prompt`` into ``cache``."""
    out = []
    with torch.no_grad():
        logits = model(input_ids=prompt, cache=cache, use_cache=True).logits[:, -1]
        for _ in range(steps):
            out.append(logits)
            step = logits.argmax(-1, keepdim=True)
            logits = model(input_ids=step, cache=cache, use_cache=True).logits[:, -1]
    return torch.stack(out, 1)


def test_growing_cache_decodes_exactly_like_the_dynamic_one():
    model = tiny_llama().eval()
    prompt = torch.randint(1, 128, (3, 5), generator=torch.Generator().manual_seed(0))
    dynamic = _decode(model, DynamicCache(config=model.config), prompt, 40)
    growing = DynamicCache(config=model.config)
    growing.layers = [GrowingLayer() for _ in growing.layers]
    got = _decode(model, growing, prompt, 40)
    assert torch.equal(got, dynamic)
    assert growing.get_seq_length() == 5 + 40


def test_appending_reallocates_logarithmically_often_and_keeps_the_history():
    layer = GrowingLayer()
    g = torch.Generator().manual_seed(1)
    pieces, buffers = [], set()
    for t in range(300):
        k = torch.randn(2, 3, 1 if t else 4, 8, generator=g)
        keys, values = layer.update(k, -k)
        pieces.append(k)
        buffers.add(layer._key_buffer.data_ptr())
    history = torch.cat(pieces, dim=-2)
    assert torch.equal(keys, history) and torch.equal(values, -history)
    assert layer.get_seq_length() == 303
    assert len(buffers) <= 4  # 68 → 138 → 278 → 558 positions: a handful of copies, not one per step


def test_selecting_rows_and_cropping_keep_appending_correctly():
    k = torch.randn(4, 2, 6, 8, generator=torch.Generator().manual_seed(2))
    cache = growing_cache([(k, k + 1)], config=None, columns=6)
    layer = cache.layers[0]
    assert isinstance(layer, GrowingLayer)
    layer.batch_select_indices(torch.tensor([3, 1]))
    new = torch.ones(2, 2, 1, 8)
    keys, _ = layer.update(new, new)
    assert torch.equal(keys, torch.cat([k[[3, 1]], new], dim=-2))
    layer.crop(-2)
    keys, values = layer.update(2 * new, 2 * new)
    assert torch.equal(keys, torch.cat([k[[3, 1], :, :5], 2 * new], dim=-2))
    assert torch.equal(values, torch.cat([k[[3, 1], :, :5] + 1, 2 * new], dim=-2))
