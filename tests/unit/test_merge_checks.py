"""``merge_delta`` on a fresh model checks the base fingerprint and loads the task heads (the new-user trial:
merging skipped both, and accuracy fell from 0.94 to 0.43)."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_delta, tiny_bert, tiny_inputs

import deltatune
from deltatune.errors import FingerprintMismatch


def test_merge_loads_the_heads_and_equals_the_attached_delta():
    delta = randomize_delta(tiny_bert(), deltatune.LoRAConfig(r=2), 1, 0.1)
    delta.heads["classifier"] = {k: torch.randn_like(v) for k, v in delta.heads["classifier"].items()}
    attached, merged = tiny_bert(), tiny_bert()
    deltatune.apply_delta(attached, delta)
    deltatune.merge_delta(merged, delta)
    assert torch.equal(merged.classifier.weight, delta.heads["classifier"]["weight"])
    inputs = {k: v for k, v in tiny_inputs("bert").items() if k != "labels"}
    with torch.no_grad():
        assert torch.allclose(merged(**inputs).logits, attached(**inputs).logits, atol=1e-5)


def test_merge_into_another_base_is_refused_before_writing():
    delta = randomize_delta(tiny_bert(), deltatune.LoRAConfig(r=2), 1, 0.1)
    other = tiny_bert(seed=7)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(FingerprintMismatch, match="weights differ"):
        deltatune.merge_delta(other, delta)
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())
    deltatune.merge_delta(other, delta, force=True)  # on purpose
    assert not torch.equal(other.classifier.weight, before["classifier.weight"])
