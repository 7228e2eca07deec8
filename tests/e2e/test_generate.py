"""``deltatune generate`` with causal-LM deltas on a small random Llama (MiniLM's tokenizer): greedy equals a
hand-written greedy loop, several deltas in one routed batch equal each alone, sampling is seeded, stop strings
cut the text, one row streams, and typed errors for a classifier delta and bad options."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_delta
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

import deltatune
from deltatune.errors import ConfigError
from deltatune.generation import cut_at_stop, generate


def _base() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, minilm_path):
    root = tmp_path_factory.mktemp("gen")
    _base().save_pretrained(root / "base")
    AutoTokenizer.from_pretrained(minilm_path).save_pretrained(root / "base")
    deltas = {}
    for i, name in enumerate(["a", "b"]):
        delta = randomize_delta(_base(), deltatune.LoRAConfig(r=4), seed=i, std=0.6)
        delta.provenance.base = str(root / "base")
        deltas[name] = delta.save(root / name)
    return root, deltas


def _greedy_by_hand(root, delta_path, prompt: str, steps: int) -> str:
    tok = AutoTokenizer.from_pretrained(root / "base")
    model = LlamaForCausalLM.from_pretrained(root / "base").eval()
    deltatune.apply_delta(model, deltatune.load_delta(delta_path))
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    start = ids.shape[1]
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
    return tok.decode(ids[0, start:], skip_special_tokens=True)


def test_greedy_equals_a_hand_written_loop(setup):
    root, deltas = setup
    out = generate(deltas["a"], "the cat sat on", max_new_tokens=6)
    assert out == [{"prompt": "the cat sat on", "text": _greedy_by_hand(root, deltas["a"], "the cat sat on", 6)}]
    base_only = LlamaForCausalLM.from_pretrained(root / "base")  # the delta matters: another text without it
    assert out[0]["text"] != _greedy_by_base(root, base_only, "the cat sat on", 6)


def _greedy_by_base(root, model, prompt, steps):
    tok = AutoTokenizer.from_pretrained(root / "base")
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=steps, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_several_deltas_and_prompts_in_one_batch_equal_each_alone(setup):
    _, deltas = setup
    prompts = ["hello", "a much longer prompt about the weather today"]
    together = generate([deltas["a"], deltas["b"]], prompts, max_new_tokens=5)
    for name in ("a", "b"):
        alone = [generate(deltas[name], p, max_new_tokens=5)[0]["text"] for p in prompts]
        assert [row[name] for row in together] == alone


def test_sampling_is_seeded_and_stop_strings_cut(setup):
    _, deltas = setup
    one = generate(deltas["a"], "hello", max_new_tokens=8, temperature=1.5, top_p=0.9, seed=3)
    two = generate(deltas["a"], "hello", max_new_tokens=8, temperature=1.5, top_p=0.9, seed=3)
    assert one == two
    full = generate(deltas["a"], "hello", max_new_tokens=8)[0]["text"]
    words = full.split()
    if len(words) > 2:
        cut = generate(deltas["a"], "hello", max_new_tokens=8, stop=[words[2]])[0]["text"]
        assert cut == cut_at_stop(full, [words[2]]) and words[2] not in cut
    assert cut_at_stop("abc STOP def", ["STOP", "d"]) == "abc "


def test_one_row_streams(setup):
    _, deltas = setup
    pieces: list[str] = []
    out = generate(deltas["b"], "hello there", max_new_tokens=6, stream=pieces.append)
    assert "".join(pieces) == out[0]["text"] and len(pieces) >= 2


def test_cli_generate(setup, tmp_path):
    from deltatune.cli import app

    _, deltas = setup
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello\nthe weather\n")
    res = CliRunner().invoke(app, ["generate", str(deltas["a"]), "--delta", str(deltas["b"]), "--prompts",
                                   str(prompts), "--max-new-tokens", "4"])
    assert res.exit_code == 0, res.output
    assert res.output.count('"prompt"') == 2


def test_bad_input(setup, tmp_path):
    _, deltas = setup
    with pytest.raises(ConfigError, match="max_new_tokens"):
        generate(deltas["a"], "x", max_new_tokens=0)
    clf = randomize_delta(__import__("conftest").tiny_bert(), deltatune.LoRAConfig(r=2), 0, 0.1)
    clf.save(tmp_path / "clf")
    with pytest.raises(ConfigError, match="task head"):
        generate(tmp_path / "clf", "x")
