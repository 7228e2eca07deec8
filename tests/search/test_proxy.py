"""Proxy tuning / EFT at decode time: the combination rule exactly, the KV-cached processor equal to full
forwards, generate with a proxy equal to a hand-written greedy loop, and a typed error for mismatched vocabularies."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_delta
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

import deltatune
from deltatune.errors import ConfigError
from deltatune.generation import generate
from deltatune.proxy import ProxyConfig, ProxyLogitsProcessor, VocabularyMismatch, load_proxy, proxy_logits

VOCAB = 30522  # MiniLM's tokenizer


def _llama(hidden: int, layers: int, seed: int, vocab: int = VOCAB) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, minilm_path):
    root = tmp_path_factory.mktemp("proxy")
    tok = AutoTokenizer.from_pretrained(minilm_path)
    for name, model in (("large", _llama(48, 3, 1)), ("small", _llama(32, 2, 2))):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    delta = randomize_delta(_llama(32, 2, 2), deltatune.LoRAConfig(r=4), seed=3, std=0.6)
    delta.provenance.base = str(root / "small")
    delta.save(root / "tuned")
    other = AutoTokenizer.from_pretrained(minilm_path)
    other.add_tokens(["<zz-proxy>"])
    _llama(32, 2, 2, vocab=VOCAB + 1).save_pretrained(root / "small-other")
    other.save_pretrained(root / "small-other")
    return root


def test_proxy_logits_is_the_formula():
    g = torch.Generator().manual_seed(0)
    large, e1, e2, anti = (torch.randn(3, 50, generator=g) for _ in range(4))
    assert torch.equal(proxy_logits(large, [e1], anti, [0.7]), large + 0.7 * (e1 - anti))
    assert torch.equal(proxy_logits(large, [e1, e2], anti, [0.5, 0.25]),
                       large + 0.5 * (e1 - anti) + 0.25 * (e2 - anti))
    ls = torch.log_softmax
    eft = proxy_logits(large, [e1], anti, [1.0], mode="logprobs")
    assert torch.allclose(eft, ls(large, -1) + ls(e1, -1) - ls(anti, -1), atol=1e-6)
    # α = 1: proxy tuning and EFT give the same next-token distribution (the log Z terms cancel in softmax)
    assert torch.allclose(torch.softmax(eft, -1), torch.softmax(proxy_logits(large, [e1], anti, [1.0]), -1),
                          atol=1e-6)
    wide = torch.randn(3, 53, generator=g)  # a large model with padded logit rows: delta zero beyond the small width
    out = proxy_logits(wide, [e1], anti, [2.0])
    assert torch.equal(out[:, :50], wide[:, :50] + 2.0 * (e1 - anti)) and torch.equal(out[:, 50:], wide[:, 50:])


def test_cached_processor_equals_full_forwards(setup):
    root = setup
    cfg = ProxyConfig(tuned=[str(root / "tuned")], scale=[1.5])
    models = load_proxy(cfg)
    large = LlamaForCausalLM.from_pretrained(root / "large").eval()
    tok = AutoTokenizer.from_pretrained(root / "large")
    tok.padding_side = "left"
    batch = tok(["the cat sat on the", "a dog"], return_tensors="pt", padding=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    proc = ProxyLogitsProcessor(models.experts, models.anti, [1.5], "logits", mask)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        full_mask = torch.cat([mask, mask.new_ones(ids.shape[0], ids.shape[1] - mask.shape[1])], 1)
        pos = (full_mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            s = [m(input_ids=ids, attention_mask=full_mask, position_ids=pos).logits[:, -1]
                 for m in (large, models.experts[0], models.anti)]
        got = proc(ids, s[0])
        assert (got - (s[0] + 1.5 * (s[1] - s[2]))).abs().max() < 1e-5
        ids = torch.cat([ids, torch.randint(1000, 2000, (ids.shape[0], 1), generator=g)], 1)


def _greedy_proxy_by_hand(root, prompt: str, steps: int, scale: float) -> str:
    tok = AutoTokenizer.from_pretrained(root / "large")
    large = LlamaForCausalLM.from_pretrained(root / "large").eval()
    anti = LlamaForCausalLM.from_pretrained(root / "small").eval()
    expert = LlamaForCausalLM.from_pretrained(root / "small").eval()
    deltatune.apply_delta(expert, deltatune.load_delta(root / "tuned"))
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    start = ids.shape[1]
    with torch.no_grad():
        for _ in range(steps):
            s = [m(input_ids=ids).logits[:, -1] for m in (large, expert, anti)]
            nxt = (s[0] + scale * (s[1] - s[2])).argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
    return tok.decode(ids[0, start:], skip_special_tokens=True)


def test_generate_with_proxy_equals_hand_loop(setup):
    root = setup
    cfg = ProxyConfig(tuned=[str(root / "tuned")], scale=[2.0])
    out = generate([], "the cat sat on", model=str(root / "large"), max_new_tokens=6, proxy=cfg)
    assert out == [{"prompt": "the cat sat on", "text": _greedy_proxy_by_hand(root, "the cat sat on", 6, 2.0)}]
    plain = _greedy_proxy_by_hand(root, "the cat sat on", 6, 0.0)
    assert out[0]["text"] != plain  # the proxy steers the large model


def test_a_stacked_tuned_delta_steers_with_the_deltas_beneath_it(setup, tmp_path):
    """The expert is a delta trained on top of ``tuned``: the small tuned model is θ₀ + Δ_tuned + Δ_top."""
    from conftest import stacked_ia3_delta

    root = setup
    top = stacked_ia3_delta(_llama(32, 2, 2), [root / "tuned"], str(root / "small"), 6).save(tmp_path / "top")
    tok = AutoTokenizer.from_pretrained(root / "large")
    large, anti = (LlamaForCausalLM.from_pretrained(root / n).eval() for n in ("large", "small"))
    expert = LlamaForCausalLM.from_pretrained(root / "small").eval()
    deltatune.merge_delta(expert, deltatune.load_delta(root / "tuned"))
    deltatune.apply_delta(expert, deltatune.load_delta(top), force=True)
    ids = tok("the cat sat on", return_tensors="pt")["input_ids"]
    start = ids.shape[1]
    with torch.no_grad():
        for _ in range(6):
            s = [m(input_ids=ids).logits[:, -1] for m in (large, expert, anti)]
            ids = torch.cat([ids, (s[0] + 2.0 * (s[1] - s[2])).argmax(-1, keepdim=True)], 1)
    want = tok.decode(ids[0, start:], skip_special_tokens=True)
    cfg = ProxyConfig(tuned=[str(top)], scale=[2.0])
    out = generate([], "the cat sat on", model=str(root / "large"), max_new_tokens=6, proxy=cfg)
    assert out == [{"prompt": "the cat sat on", "text": want}]


def test_a_full_fine_tune_as_the_tuned_small_model(setup, tmp_path):
    """A full delta wraps the small model's LM head in a DeltaLayer: the width check reads the head it wraps."""
    from deltatune.methods.full import FullConfig

    root = setup
    full = randomize_delta(_llama(32, 2, 2), FullConfig(), seed=4, std=0.02)
    assert "lm_head" in full.parts
    full.provenance.base = str(root / "small")
    full.save(tmp_path / "full")
    cfg = ProxyConfig(tuned=[str(tmp_path / "full")], scale=[1.0])
    (out,) = generate([], "the cat", model=str(root / "large"), max_new_tokens=3, proxy=cfg)
    assert out["prompt"] == "the cat" and out["text"]


def test_mismatched_vocabulary_is_a_typed_error(setup):
    root = setup
    cfg = ProxyConfig(tuned=[str(root / "tuned")], base=str(root / "small-other"))
    with pytest.raises(VocabularyMismatch, match="zz-proxy"):
        generate([], "the cat", model=str(root / "large"), max_new_tokens=2, proxy=cfg)


def test_cli_generate_with_proxy_and_bad_input(setup):
    from deltatune.cli import app

    root = setup
    runner = CliRunner()
    res = runner.invoke(app, ["generate", "--model", str(root / "large"), "--proxy-tuned", str(root / "tuned"),
                              "--proxy-scale", "2.0", "--prompt", "the cat sat on", "--max-new-tokens", "6"])
    assert res.exit_code == 0, res.output
    assert res.output.strip() == _greedy_proxy_by_hand(root, "the cat sat on", 6, 2.0).strip()
    res = runner.invoke(app, ["generate", "--model", str(root / "large"), "--proxy-tuned", str(root / "tuned"),
                              "--proxy-base", str(root / "small-other"), "--prompt", "x"])
    assert isinstance(res.exception, VocabularyMismatch)
    res = runner.invoke(app, ["generate", "--proxy-tuned", str(root / "tuned"), "--prompt", "x"])
    assert isinstance(res.exception, ConfigError)
    with pytest.raises(ConfigError):
        ProxyConfig(tuned=["a", "b", "c"], scale=[1.0, 2.0])
