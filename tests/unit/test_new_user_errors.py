"""Typed one-line errors where a new user used to get a raw traceback: a data folder as --model, fewer
examples than one batch, and --task text on an encoder-only model."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from deltatune.cli import app
from deltatune.errors import ConfigError, DataError
from deltatune.train import loop
from deltatune.train.config import TrainConfig
from deltatune.train.tasks import build_task


def test_a_data_folder_as_model(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\na,b\n")
    with pytest.raises(ConfigError, match="no config.json.*train.csv.*--model"):
        build_task(TrainConfig(model=str(tmp_path), task="sst2"))


def test_text_task_on_an_encoder(tmp_path, minilm_path):
    (tmp_path / "t.txt").write_text("some text " * 200)
    with pytest.raises(ConfigError, match="causal language model.*bert"):
        build_task(TrainConfig(model=minilm_path, task="text", data=str(tmp_path / "t.txt")))


def test_fewer_examples_than_one_batch(tmp_path, minilm_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"w{i}", "label": i % 2}) + "\n" for i in range(6)))
    cfg = TrainConfig(model=minilm_path, task="classify", data=str(data), batch_size=16, out_dir=str(tmp_path / "r"),
                      max_steps=1, progress=False, eval_before=False)
    with pytest.raises(DataError, match="cannot fill one batch of 16"):
        loop.train(cfg, __import__("deltatune").LoRAConfig(r=2))
    res = CliRunner().invoke(app, ["train", "--model", str(tmp_path), "--task", "sst2", "--out", str(tmp_path / "x")])
    assert res.exit_code != 0 and "no config.json" in str(res.exception or res.output)


def test_a_fine_tuned_classifier_with_another_label_count_is_a_typed_error(tmp_path, minilm_path):
    """A folder whose saved head has 2 outputs, a file with 3 classes: a ConfigError naming both sizes, not
    transformers' raw size-mismatch RuntimeError."""
    import shutil

    from transformers import AutoModelForSequenceClassification

    folder = tmp_path / "sst2_classifier"
    AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(f"{minilm_path}/{name}", folder / name)
    data = tmp_path / "three.csv"
    data.write_text("text,label\n" + "".join(f"w{i},{'abc'[i % 3]}\n" for i in range(12)))
    task = build_task(TrainConfig(model=str(folder), task="classify", data=str(data)))
    with pytest.raises(ConfigError, match=r"sst2_classifier: its saved task head has 2 outputs, this task needs 3"):
        task.load_model()
    assert build_task(TrainConfig(model=str(folder), task="sst2")).load_model().num_labels == 2  # its own size
