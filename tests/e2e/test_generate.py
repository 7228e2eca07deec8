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


def _prompted(root, name: str, n: int, seed: int) -> str:
    delta = randomize_delta(_base(), deltatune.make_config("prompt_tuning", {"num_virtual_tokens": n}), seed=seed,
                            std=0.8)
    delta.provenance.base = str(root / "base")
    return delta.save(root / name)


def test_a_prompt_tuning_delta_decodes_from_the_kv_cache_as_a_hand_loop_of_full_forwards(setup, monkeypatch):
    """A prompt-tuning delta's virtual tokens go into the KV cache with the first forward; ``generate`` continues
    with a mask and positions of the caller's tokens only, which are translated into the cache's layout: every
    later step forwards one token, and the text equals a hand loop of full forwards; beside a LoRA delta and a
    prompt of another length in one batch (trailing pads inside the cache), prompts of two lengths (left pads),
    each row equals itself alone."""
    from deltatune import generation

    root, deltas = setup
    prompted, longer = _prompted(root, "prompted", 3, 4), _prompted(root, "longer", 5, 6)
    lengths: list[int] = []
    load = generation.load_base_for

    def counting(*args, **kwargs):
        net = load(*args, **kwargs)
        net.model.register_forward_pre_hook(lambda _, a, kw: lengths.append(kw["inputs_embeds"].shape[1]
                                                                            if kw.get("inputs_embeds") is not None
                                                                            else kw["input_ids"].shape[1]),
                                            with_kwargs=True)
        return net

    monkeypatch.setattr(generation, "load_base_for", counting)
    out = generate(prompted, "the cat sat on", max_new_tokens=4)
    assert out == [{"prompt": "the cat sat on", "text": _greedy_by_hand(root, prompted, "the cat sat on", 4)}]
    assert lengths[1:] == [1, 1, 1] and lengths[0] > 3  # one token a step after the prompted first forward
    prompts = ["hello", "a much longer prompt about the weather"]
    together = generate([prompted, deltas["a"], longer], prompts, max_new_tokens=3)
    for name, path in (("prompted", prompted), ("a", deltas["a"]), ("longer", longer)):
        assert [row[name] for row in together] == [generate(path, p, max_new_tokens=3)[0]["text"] for p in prompts]
        assert [row[name] for row in together] == [_greedy_by_hand(root, path, p, 3) for p in prompts]


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


def test_a_stacked_delta_generates_over_the_deltas_beneath_it(setup):
    """A delta trained on top of ``a`` (``train --on``) generates from θ₀ + Δ_a + Δ_top, the weights it was trained
    on: its recorded underlying delta merged beneath it, which changes the text."""
    from conftest import stacked_ia3_delta

    root, deltas = setup
    top = stacked_ia3_delta(_base(), [deltas["a"]], str(root / "base"), 5).save(root / "top")
    by_hand = LlamaForCausalLM.from_pretrained(root / "base").eval()
    deltatune.merge_delta(by_hand, deltatune.load_delta(deltas["a"]))
    deltatune.apply_delta(by_hand, deltatune.load_delta(top), force=True)
    out = generate(top, "the cat sat on", max_new_tokens=6)
    assert out == [{"prompt": "the cat sat on", "text": _greedy_by_base(root, by_hand, "the cat sat on", 6)}]
    alone = LlamaForCausalLM.from_pretrained(root / "base").eval()
    deltatune.apply_delta(alone, deltatune.load_delta(top))
    assert out[0]["text"] != _greedy_by_base(root, alone, "the cat sat on", 6)  # without a beneath: another text


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


# --- chat deltas: the prompt goes in as one user turn of the tokenizer's chat template ------------------------------
TURNS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def chat_setup(tmp_path_factory, minilm_path):
    """A tiny Llama whose tokenizer (MiniLM's + turn tokens) has a chat template, a LoRA delta trained on it with
    ``task chat`` by deltatune's loop (2 steps, then its tensors randomized so that it visibly matters) and a plain
    delta of the same base."""
    from deltatune.train import loop
    from deltatune.train.config import TrainConfig

    root = tmp_path_factory.mktemp("genchat")
    tok = AutoTokenizer.from_pretrained(minilm_path)
    tok.add_special_tokens({"additional_special_tokens": TURNS})
    tok.chat_template = TEMPLATE
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    LlamaForCausalLM(cfg).save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    data = root / "chats.jsonl"
    data.write_text("".join(__import__("json").dumps({"messages": [
        {"role": "user", "content": f"count {i}"}, {"role": "assistant", "content": f"{i} {i + 1}"}]}) + "\n"
        for i in range(12)))
    trained = loop.train(TrainConfig(model=str(root / "base"), task="chat", data=str(data), out_dir=str(root / "run"),
                                     max_steps=2, batch_size=4, max_length=32, eval_every=0, eval_before=False,
                                     checkpoint_every=0, keep_best=False, progress=False),
                         deltatune.LoRAConfig(r=2)).delta
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for part in trained.parts.values():
            for p in part.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.6)
    chat_delta = trained.save(root / "chat")
    plain = randomize_delta(LlamaForCausalLM.from_pretrained(root / "base"), deltatune.LoRAConfig(r=2), seed=7, std=0.6)
    plain.provenance.base = str(root / "base")
    return root, tok, chat_delta, plain.save(root / "plain")


def _greedy_on_ids(root, delta_path, ids: list[int], steps: int) -> str:
    tok = AutoTokenizer.from_pretrained(root / "base")
    model = LlamaForCausalLM.from_pretrained(root / "base").eval()
    deltatune.apply_delta(model, deltatune.load_delta(delta_path))
    x = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(steps):
            x = torch.cat([x, model(input_ids=x).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return tok.decode(x[0, len(ids):], skip_special_tokens=True)


def test_a_chat_delta_sees_the_prompt_in_its_chat_template(chat_setup):
    root, tok, chat_delta, _ = chat_setup
    assert deltatune.load_delta(chat_delta).provenance.task["task"] == "chat"  # what training records
    prompt = "what is two and two"
    templated = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                        add_generation_prompt=True)
    assert templated == f"<|user|>{prompt}<|end|><|assistant|>"
    by_hand_chat = _greedy_on_ids(root, chat_delta, tok(templated, add_special_tokens=False)["input_ids"], 6)
    by_hand_raw = _greedy_on_ids(root, chat_delta, tok(prompt)["input_ids"], 6)
    assert by_hand_chat != by_hand_raw  # the two inputs lead somewhere else: the comparison below can fail
    assert generate(chat_delta, prompt, max_new_tokens=6) == [{"prompt": prompt, "text": by_hand_chat}]
    assert generate(chat_delta, prompt, max_new_tokens=6, raw=True) == [{"prompt": prompt, "text": by_hand_raw}]


def test_cli_generate_templates_a_chat_delta_and_raw_turns_it_off(chat_setup):
    from deltatune.cli import app

    _, _, chat_delta, _ = chat_setup
    runner = CliRunner()
    chat = runner.invoke(app, ["generate", str(chat_delta), "--prompt", "hi there", "--max-new-tokens", "5"])
    raw = runner.invoke(app, ["generate", str(chat_delta), "--prompt", "hi there", "--max-new-tokens", "5", "--raw"])
    assert chat.exit_code == 0 and raw.exit_code == 0, chat.output + raw.output
    assert chat.stdout == generate(chat_delta, "hi there", max_new_tokens=5)[0]["text"] + "\n"
    assert raw.stdout == generate(chat_delta, "hi there", max_new_tokens=5, raw=True)[0]["text"] + "\n"
    assert chat.stdout != raw.stdout


def test_a_chat_and_a_plain_delta_in_one_batch_each_get_their_own_format(chat_setup):
    _, _, chat_delta, plain = chat_setup
    prompts = ["hello", "a longer prompt about the weather"]
    together = generate([chat_delta, plain], prompts, max_new_tokens=5)
    for name, path in (("chat", chat_delta), ("plain", plain)):
        assert [row[name] for row in together] == [generate(path, p, max_new_tokens=5)[0]["text"] for p in prompts]
    raw = generate([chat_delta, plain], prompts, max_new_tokens=5, raw=True)
    assert [row["chat"] for row in raw] == [generate(chat_delta, p, max_new_tokens=5, raw=True)[0]["text"]
                                            for p in prompts]
    assert [row["plain"] for row in raw] == [row["plain"] for row in together]  # nothing changes for a plain delta


def test_a_chat_delta_without_a_template_or_with_another_one(chat_setup, tmp_path):
    root, tok, chat_delta, _ = chat_setup
    bare = AutoTokenizer.from_pretrained(root / "base")
    bare.chat_template = None
    LlamaForCausalLM.from_pretrained(root / "base").save_pretrained(tmp_path / "no-template")
    bare.save_pretrained(tmp_path / "no-template")
    with pytest.raises(ConfigError, match="trained with --task chat.*no chat template.*--raw"):
        generate(chat_delta, "hi", model=str(tmp_path / "no-template"), max_new_tokens=2)
    assert generate(chat_delta, "hi", model=str(tmp_path / "no-template"), max_new_tokens=2, raw=True)
    other = AutoTokenizer.from_pretrained(root / "base")
    other.chat_template = TEMPLATE.replace("<|end|>", "\n<|end|>")
    LlamaForCausalLM.from_pretrained(root / "base").save_pretrained(tmp_path / "other")
    other.save_pretrained(tmp_path / "other")
    with pytest.warns(UserWarning, match="another chat template than the delta was trained with"):
        generate(chat_delta, "hi", model=str(tmp_path / "other"), max_new_tokens=2)
