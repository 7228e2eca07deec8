"""Embeddings that scale their own lookup (Gemma's and BART's ``embed_scale``): every part's lookup term carries the
scale, so the unmerged model equals the merged one, gradients are the scaled ones, and an identity part on a tied
head changes nothing (PEFT's LoRA embedding applies ``embed_scale`` the same way)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import max_diff
from transformers import GemmaConfig, GemmaForCausalLM

import deltatune
from deltatune.parts.layers import LayerKind
from deltatune.parts.lora import LoRAPart

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_gemma() -> GemmaForCausalLM:
    torch.manual_seed(0)
    cfg = GemmaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=32, pad_token_id=0)
    return GemmaForCausalLM(cfg).eval()


def test_the_model_does_scale_its_embedding_lookup() -> None:
    emb = tiny_gemma().get_input_embeddings()
    ids = torch.tensor([[3, 5]])
    assert not torch.allclose(emb(ids), emb.weight[ids])  # √64 = 8: the premise of these tests


@pytest.mark.parametrize("config", [{"method": "lora", "r": 2}, {"method": "dora", "r": 2},
                                    {"method": "sparse", "num_tunable": 300, "regrow": False},
                                    {"method": "full"}])
def test_embedding_parts_merge_exactly(config: dict) -> None:
    model = tiny_gemma()
    base = copy.deepcopy(model)
    method = config.pop("method")
    delta = deltatune.attach(model, deltatune.make_config(method, {**config, "targets": ["embed_tokens"]}))
    with torch.no_grad():
        for part in delta.parts.values():
            for p in part.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    ids = torch.randint(1, 96, (2, 6))
    live = model(input_ids=ids).logits
    deltatune.merge_delta(base, delta)
    assert max_diff(live, base(input_ids=ids).logits) <= 1e-4


def test_lora_embedding_gradient_skips_the_padding_row_and_carries_the_scale() -> None:
    emb = tiny_gemma().get_input_embeddings()
    part = LoRAPart(96, 64, 2, 1.0, layer=LayerKind.EMBEDDING)
    with torch.no_grad():
        part.lora_A.normal_()
    ids = torch.tensor([[0, 3, 0, 7]])
    out = part(ids, emb)
    assert torch.allclose(out - emb(ids), 8.0 * (part.lora_A.t()[ids] @ part.lora_B.t()), atol=1e-5)
    out.sum().backward()
    assert torch.all(part.lora_A.grad[:, 0] == 0)  # padding_idx 0, as the base's own lookup


def test_identity_lora_on_the_tied_head_changes_nothing() -> None:
    model = tiny_gemma()
    ids = torch.randint(1, 96, (2, 6))
    before = model(input_ids=ids).logits
    deltatune.attach(model, deltatune.LoRAConfig(r=2, targets=["lm_head"]))  # B = 0
    assert max_diff(model(input_ids=ids).logits, before) <= 1e-5


def test_sparse_embedding_gradient_is_the_scaled_lookups() -> None:
    from deltatune.parts.sparse import SparsePart

    emb = tiny_gemma().get_input_embeddings()
    idx = torch.randperm(96 * 64)[:200].sort().values
    part = SparsePart((96, 64), idx, LayerKind.EMBEDDING).train()
    ids = torch.tensor([[1, 4, 4, 9]])
    g = torch.randn(1, 4, 64)
    (part(ids, emb) * g).sum().backward()
    w = emb.weight.detach().clone().requires_grad_()
    (8.0 * torch.nn.functional.embedding(ids, w) * g).sum().backward()
    assert torch.allclose(part.values.grad, w.grad.reshape(-1)[idx], atol=1e-5)


def test_prompt_tuning_vocab_and_text_init_go_through_the_scaled_lookup() -> None:
    from deltatune.methods.prompt_tuning import PromptTuningConfig, initial_prompt

    model = tiny_gemma()
    got = initial_prompt(model, PromptTuningConfig(num_virtual_tokens=3, init="text", init_token_ids=[5, 6, 7]))
    assert torch.allclose(got, model.get_input_embeddings()(torch.tensor([5, 6, 7])), atol=1e-6)


@pytest.mark.parametrize("method, config", [("full", {}), ("lora", {"r": 2, "targets": ["type:Embedding"]}),
                                            ("sparse", {"num_tunable": 500, "regrow": False,
                                                        "targets": ["type:Embedding"]})])
def test_a_learned_positional_embedding_is_no_lookup_of_the_input_ids(method: str, config: dict) -> None:
    """BART's learned positional embedding subclasses nn.Embedding with a forward that computes positions from its
    input (plus an offset): parts that look ids up leave it alone (``type:Embedding`` takes the scaled word
    embeddings only), a dense part runs it through its own forward — the attached delta equals its merge."""
    from conftest import randomize_delta
    from transformers import BartConfig, BartForConditionalGeneration

    from deltatune.parts.layers import layer_kind

    def bart() -> BartForConditionalGeneration:
        torch.manual_seed(0)
        return BartForConditionalGeneration(BartConfig(
            vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32)).eval()

    model = bart()
    assert layer_kind(model.model.encoder.embed_positions) is None
    assert layer_kind(model.model.encoder.embed_tokens) is LayerKind.EMBEDDING
    delta = randomize_delta(bart(), deltatune.make_config(method, config), 1, 0.1)
    assert not any("embed_positions" in n for n in delta.parts) or method == "full"
    merged = bart()
    deltatune.apply_delta(model, delta)
    deltatune.merge_delta(merged, delta)
    g = torch.Generator().manual_seed(1)
    inputs = {"input_ids": torch.randint(3, 64, (2, 6), generator=g),
              "labels": torch.randint(3, 64, (2, 5), generator=g)}
    with torch.no_grad():
        assert max_diff(model(**inputs).logits, merged(**inputs).logits) <= 1e-5
