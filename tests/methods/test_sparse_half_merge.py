"""A sparse part on a bf16 or fp16 base: the merged model is the model that was trained and evaluated.

The forward (a fresh ``W + scatter(values)`` without gradients, the patched weight with them) and the merge round
``W₀ + values`` the same one way (:func:`deltatune.parts.sparse_binding.added`: summed in fp32, rounded once); with
the values first rounded to the base's dtype and then added (two roundings), as the forward once did, a few entries
of every matrix differ from the merged weight and so do the logits.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import logits, tiny_inputs, tiny_llama

import deltatune

METHODS = {"random-sparse": {"num_tunable": 4000}, "sparse": {"num_tunable": 4000},
           "sara": {"fraction": 0.05, "nuclear_weight": 0.0}, "lift": {"lora_rank": 2, "filter_rank": 2}}
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_the_merged_half_precision_model_is_the_attached_one(method: str, dtype: torch.dtype) -> None:
    base = tiny_llama().to(dtype)
    model = copy.deepcopy(base)
    delta = deltatune.attach(model, deltatune.make_config(method, dict(METHODS[method])))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for part in delta.parts.values():
            part.values.copy_(torch.randn(part.values.shape, generator=gen) * 3e-3)  # below bf16's step near 1
    inputs = tiny_inputs("llama")
    evaluated = logits(model, inputs)  # no gradients: a fresh W + scatter(values)
    model.train()
    trained = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits.detach()  # the patched weight
    merged = copy.deepcopy(base)
    deltatune.merge_delta(merged, delta)
    assert torch.equal(logits(merged, inputs), evaluated)
    assert torch.equal(trained, evaluated)
