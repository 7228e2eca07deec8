"""Modules computed once for the whole batch under a routing: BART's learned positions (one ``(T, d)`` output for
every row) and T5's relative attention bias (a ``(q, k)`` grid of buckets as input).  Rows of one delta get that
delta there, as a plain forward does (its part was silently dropped on BART, and T5 refused every routed batch);
rows of deltas that change such a module differently are refused by name."""

from __future__ import annotations

import pytest
import torch
from transformers import BartConfig, BartForConditionalGeneration, T5Config, T5ForConditionalGeneration

import deltatune
from deltatune.errors import ConfigError


def _bart():
    torch.manual_seed(0)
    return BartForConditionalGeneration(BartConfig(vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1,
                                                   encoder_attention_heads=4, decoder_attention_heads=4,
                                                   encoder_ffn_dim=64, decoder_ffn_dim=64,
                                                   max_position_embeddings=32)).eval()


def _t5():
    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                               num_decoder_layers=1, num_heads=4, decoder_start_token_id=0)).eval()


def _inputs():
    g = torch.Generator().manual_seed(3)
    return {"input_ids": torch.randint(2, 64, (2, 6), generator=g),
            "decoder_input_ids": torch.randint(2, 64, (2, 5), generator=g)}


def _perturbed(model, targets):
    delta = deltatune.attach(model, deltatune.make_config("full", {"targets": targets}))
    with torch.no_grad():
        for part in delta.parts.values():
            for t in part.parameters():
                t.add_(torch.randn(t.shape) * 0.2)
    return delta


@pytest.mark.parametrize("build,target", [(_bart, "embed_positions"), (_t5, "relative_attention_bias")])
def test_rows_of_one_delta_get_it_in_a_module_computed_for_the_whole_batch(build, target):
    model = build()
    _perturbed(model, [target])
    inputs = _inputs()
    with torch.no_grad():
        plain = model(**inputs).logits
        with deltatune.mixed_batch(model, ["default", "default"]):
            routed = model(**inputs).logits
        bare = build()(**inputs).logits
    assert (plain - bare).abs().max() > 1e-2  # the part changes the output
    torch.testing.assert_close(routed, plain, rtol=0, atol=1e-5)


@pytest.mark.parametrize("build,target,module", [(_bart, "embed_positions", "BartLearnedPositionalEmbedding"),
                                                 (_t5, "relative_attention_bias", "Embedding")])
def test_rows_of_different_deltas_there_are_refused_by_name(build, target, module):
    model = build()
    _perturbed(model, [target])
    with torch.no_grad(), deltatune.mixed_batch(model, ["default", None]), \
            pytest.raises(ConfigError, match=f"{module}: .*deltas \\['default', None\\]"):
        model(**_inputs())


def test_t5_generates_under_a_routing_of_one_delta_as_without():
    # at a decode step the bias grid is (1, k): it looked like one row to broadcast and failed; rows that share
    # their parts on a layer now run the plain forward there, whatever the call's shapes
    model = _t5()
    _perturbed(model, ["relative_attention_bias", "q"])
    ids = _inputs()["input_ids"]
    with torch.no_grad():
        plain = model.generate(ids, max_new_tokens=4, do_sample=False)
        with deltatune.mixed_batch(model, ["default", "default"]):
            routed = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(routed, plain)
