"""Parts that update one tied weight (GPT-2's ``wte`` and ``lm_head``) and read it (DoRA) merge into the model the
unmerged delta computes: every update from the base weight, summed (merged one after another, the second part read
the weight the first had rewritten: 2 logits off).  Such a merge cannot be undone from the merged weight: refused."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_delta, tiny_gpt2, tiny_inputs

import deltatune
from deltatune.errors import NotMergeable


@pytest.mark.parametrize("method", ["dora", "lora"])
def test_parts_on_one_tied_weight_merge_into_the_unmerged_model(method):
    config = deltatune.make_config(method, {"r": 2, "alpha": 4.0, "targets": ["wte", "lm_head"]})
    delta = randomize_delta(tiny_gpt2(), config, seed=1, std=0.5)
    assert len(delta.parts) == 2
    inputs = tiny_inputs("gpt2")
    unmerged = tiny_gpt2()
    deltatune.apply_delta(unmerged, delta)
    merged = tiny_gpt2()
    deltatune.merge_delta(merged, delta)
    with torch.no_grad():
        want, got = unmerged(**inputs).logits, merged(**inputs).logits
        bare = tiny_gpt2()(**inputs).logits
    assert (want - bare).abs().max() > 0.1
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    if method == "dora":
        with pytest.raises(NotMergeable, match="cannot be undone"):
            deltatune.revert_delta(merged, delta)
    else:  # updates that do not read the weight are undone part by part, as before
        deltatune.revert_delta(merged, delta)
        with torch.no_grad():
            torch.testing.assert_close(merged(**inputs).logits, bare, rtol=0, atol=1e-5)


@pytest.mark.parametrize("beneath", [False, True])
@pytest.mark.parametrize("on_top", [False, True])
def test_composing_them_merged_gives_the_unmerged_model_and_reverts_bit_for_bit(on_top, beneath):
    # beneath: a LoRA delta on the same tied weight first, so on_top (read the weights as the stack made them) and
    # not (read the base's) give different models; neither may read what the DoRA delta's own first part wrote
    from deltatune.algebra.compose import DeltaStack

    under = randomize_delta(tiny_gpt2(), deltatune.make_config("lora", {"r": 2, "targets": ["wte"]}), seed=2, std=0.5)
    config = deltatune.make_config("dora", {"r": 2, "alpha": 4.0, "targets": ["wte", "lm_head"]})
    delta = randomize_delta(tiny_gpt2(), config, seed=1, std=0.5)
    inputs = tiny_inputs("gpt2")
    want = tiny_gpt2()
    if beneath and on_top:  # the DoRA delta over the merged LoRA delta
        deltatune.merge_delta(want, under)
    elif beneath:  # both computed from the base
        deltatune.apply_delta(want, under, name="under")
    deltatune.apply_delta(want, delta)
    model, base = tiny_gpt2(), tiny_gpt2().state_dict()
    stack = DeltaStack(model, mode="merge")
    if beneath:
        stack.push(under)
    stack.push(delta, on_top=on_top)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, want(**inputs).logits, rtol=0, atol=1e-4)
    stack.revert()
    assert all(torch.equal(t, base[k]) for k, t in model.state_dict().items())
