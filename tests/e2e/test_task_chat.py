"""``--task chat`` on a tiny random Llama whose tokenizer (MiniLM's, with four added turn tokens) has a chat
template: the loss covers exactly the assistant turns (token positions checked against an oracle read off the
ids), truncation, CLI train → eval --json, and typed errors for bad input and unusable templates."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from deltatune.errors import ConfigError, DataError
from deltatune.train import chat
from deltatune.train.collate import IGNORE_INDEX
from deltatune.train.config import TrainConfig
from deltatune.train.tasks import build_task

TURNS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
PLAIN = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
LINES = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
         "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
COUNTING = "{{ messages | length }}" + PLAIN  # earlier turns render differently in longer conversations

CONVERSATION = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"},
                {"role": "assistant", "content": "hello friend"}, {"role": "user", "content": "what is two and two"},
                {"role": "assistant", "content": "four , i think"}]


def _tokenizer(minilm_path, template: str | None = PLAIN):
    tok = AutoTokenizer.from_pretrained(minilm_path)
    tok.add_special_tokens({"additional_special_tokens": TURNS})
    tok.chat_template = template
    return tok


def _oracle(ids: list[int], tok) -> list[int]:
    """Labels read off the ids alone: supervised from after each <|assistant|> through its <|end|>."""
    start, end = tok.convert_tokens_to_ids(["<|assistant|>", "<|end|>"])
    labels, inside = [], False
    for t in ids:
        labels.append(t if inside else IGNORE_INDEX)
        if t == start:
            inside = True
        elif t == end:
            inside = False
    return labels


@pytest.mark.parametrize("template", [PLAIN, LINES], ids=["plain", "newlines"])
def test_loss_covers_exactly_the_assistant_turns(minilm_path, template):
    tok = _tokenizer(minilm_path, template)
    second = [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two three"}]
    features, skipped = chat.encode_conversations([CONVERSATION, second], ["a", "b"], tok, 128)
    assert skipped == []
    for conv, ids, labels in zip([CONVERSATION, second], features["input_ids"], features["labels"], strict=True):
        assert ids == tok(tok.apply_chat_template(conv, tokenize=False), add_special_tokens=False)["input_ids"]
        assert labels == _oracle(ids, tok)
    ids, labels = features["input_ids"][0], features["labels"][0]
    spans = [tok.decode([t for t, y in zip(ids, labels, strict=True) if y != IGNORE_INDEX])]
    assert spans == ["hello friend <|end|> four, i think <|end|>"]
    positions = [i for i, y in enumerate(labels) if y != IGNORE_INDEX]
    assert positions == [9, 10, 11, 20, 21, 22, 23, 24]  # counted by hand: 9 tokens, then 'hello friend <|end|>' …

    # truncation keeps the first tokens; a record whose assistant turn starts after the cut is skipped
    cut, skipped = chat.encode_conversations([CONVERSATION, CONVERSATION], ["x", "y"], tok, 10)
    assert cut["labels"][0] == labels[:10] and skipped == []
    none, skipped = chat.encode_conversations([CONVERSATION], ["rec 1"], tok, 9)
    assert skipped == ["rec 1"] and none["input_ids"] == []


def test_templates_that_cannot_be_used(minilm_path):
    with pytest.raises(ConfigError, match="has no chat template"):
        chat.check_template(_tokenizer(minilm_path, None), "tiny")
    with pytest.raises(ConfigError, match="message 3: the chat template does not render"):
        chat.encode_conversations([CONVERSATION], ["rec"], _tokenizer(minilm_path, COUNTING), 64)


@pytest.fixture(scope="module")
def base(tmp_path_factory, minilm_path):
    root = tmp_path_factory.mktemp("chat")
    tok = _tokenizer(minilm_path)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    LlamaForCausalLM(cfg).save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    return root


def _write(path, conversations) -> None:
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))


def test_cli_train_and_eval_json(base, tmp_path):
    from deltatune.cli import app

    convs = [[{"role": "user", "content": f"count {i}"}, {"role": "assistant", "content": f"{i} {i + 1} {i + 2}"}]
             for i in range(20)]
    _write(tmp_path / "train.jsonl", convs)
    _write(tmp_path / "other.jsonl", convs[:4])
    runner = CliRunner()
    res = runner.invoke(app, ["train", "--task", "chat", "--model", str(base / "base"), "--data",
                              str(tmp_path / "train.jsonl"), "--method", "lora", "--steps", "3", "--out",
                              str(tmp_path / "run"), "--batch-size", "4", "--set", "r=2", "--set", "max_length=32",
                              "--set", "eval_every=0", "--set", "progress=false", "--set", "checkpoint_every=0"])
    assert res.exit_code == 0, res.output
    assert "held out 2 of 20 conversations" in res.output
    manifest = json.loads((tmp_path / "run" / "delta" / "manifest.json").read_text())
    assert manifest["provenance"]["task"]["messages_column"] == "messages"
    final = manifest["metrics"]["final"]
    assert final.keys() == {"loss", "perplexity"}
    again = json.loads(runner.invoke(app, ["eval", str(tmp_path / "run" / "delta"), "--json"]).stdout)
    assert again["loss"] == pytest.approx(final["loss"], rel=1e-5)
    other = runner.invoke(app, ["eval", str(tmp_path / "run" / "delta"), "--data", str(tmp_path / "other.jsonl"),
                                "--json"])
    assert other.exit_code == 0, other.output
    assert json.loads(other.stdout).keys() == {"loss", "perplexity"}


def test_bad_input(base, tmp_path, minilm_path):
    def cfg(data, **kw):
        return TrainConfig(model=str(base / "base"), task="chat", data=str(data), max_length=32, **kw)

    data = tmp_path / "c.jsonl"
    _write(data, [CONVERSATION, [{"role": "system", "content": "x"}, {"role": "user", "content": "hello?"}]])
    with pytest.raises(DataError, match=r"c\.jsonl: record 2 \(line 2\): no assistant turn \(roles: \['system', "
                                        r"'user'\]\)"):
        build_task(cfg(data))
    with pytest.raises(DataError, match=r"no column 'turns' \(columns: \['messages'\]\)"):
        build_task(cfg(data, text_column="turns"))
    _write(data, [[{"role": "user", "content": "a"}, {"role": "assistant", "content": 3}]])
    with pytest.raises(DataError, match=r"record 1 \(line 1\), message 2: 'content' must be a string"):
        build_task(cfg(data))
    with pytest.raises(ConfigError, match="cannot generate"):
        build_task(TrainConfig(model=minilm_path, task="chat", data=str(data)))
