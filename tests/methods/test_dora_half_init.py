"""DoRA over a bf16 base is the identity at attach: its magnitude ``m = ‖W‖_c`` is computed in the precision the
part trains in (fp32 by default), not rounded to bf16 first (which scales every output channel by up to
``1 ± 2⁻⁸``: 0.004 logits off at init on this model)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import deltatune
from deltatune.parts.dora import dora_norm


@pytest.mark.parametrize("autocast", [True, False])
def test_dora_on_a_bf16_base_starts_as_the_base(autocast):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2)).to(torch.bfloat16).eval()
    delta = deltatune.attach(model, deltatune.make_config("dora", {"r": 4, "alpha": 8.0}), autocast_dtype=autocast)
    for name, part in delta.parts.items():
        assert part.magnitude.dtype == (torch.float32 if autocast else torch.bfloat16)
        norm = dora_norm(part._weight(deltatune.model.get_module(model, name)), part.lora_A, part.lora_B, part.scale)
        assert torch.equal(part.magnitude, norm.to(part.magnitude.dtype)), name  # m / n = 1 exactly
