"""Fast checks of the review's eval/predict findings: an undefined correlation is reported as undefined (only a
non-finite loss is damage), a tokens delta's tags name the written checkpoint's labels, a max_length beyond the
model's positions is refused up front, and a resume whose training file changed is refused naming the file."""

from __future__ import annotations

import json
import math

import pytest
from transformers import BertConfig, GPT2Config, LlamaConfig, RobertaConfig

from deltatune import api
from deltatune.algebra.labels import label_names
from deltatune.errors import ConfigError, DataError, NonFiniteError
from deltatune.train import run_record
from deltatune.train.config import TrainConfig, check_max_length, position_limit


# --------------------------------------------------------------------------------------------------
# finding 9: an undefined Pearson/Spearman beside a finite loss is undefined, not a damaged delta
# --------------------------------------------------------------------------------------------------
def test_an_undefined_correlation_is_none_and_only_a_non_finite_loss_is_refused() -> None:
    got = api.check_finite_metrics({"delta": {"pearson": math.nan, "spearman": math.nan, "loss": 0.5}}, "d")
    assert got == {"delta": {"pearson": None, "spearman": None, "loss": 0.5}}
    with pytest.raises(NonFiniteError, match="metric 'loss' of model 'delta' is nan"):
        api.check_finite_metrics({"delta": {"pearson": math.nan, "loss": math.nan}}, "d")
    with pytest.raises(NonFiniteError, match="metric 'pearson' of model 'base' is inf"):
        api.check_finite_metrics({"base": {"pearson": math.inf, "loss": 0.5}}, "d")
    with pytest.raises(NonFiniteError, match="metric 'accuracy'"):  # no loss to tell: a NaN is refused, as before
        api.check_finite_metrics({"delta": {"accuracy": math.nan}}, "d")


# --------------------------------------------------------------------------------------------------
# finding 6: a tokens delta's BIO tags are the written checkpoint's id2label
# --------------------------------------------------------------------------------------------------
def test_label_names_of_a_tokens_task_are_its_tags() -> None:
    tags = ["B-location", "B-person", "I-location", "I-person", "O"]
    assert label_names({"name": "tokens", "task": "tokens", "label_names": tags, "text_column": "tokens"}) == tags
    assert label_names({"name": "classify", "task": "classify", "label_names": [2, 10]}) == ["2", "10"]
    assert label_names({"name": "regress", "task": "regress", "label_names": None}) is None


# --------------------------------------------------------------------------------------------------
# finding 10: max_length beyond the model's positions is a ConfigError before any data is read
# --------------------------------------------------------------------------------------------------
def _folder(tmp_path, name, config) -> str:
    config.save_pretrained(tmp_path / name)
    return str(tmp_path / name)


def test_max_length_beyond_the_positions_is_refused_naming_both(tmp_path, minilm_path) -> None:
    with pytest.raises(ConfigError, match=r"train config.max_length is 1024, .* has 512 positions"):
        TrainConfig(model=minilm_path, max_length=1024)
    assert TrainConfig(model=minilm_path, max_length=512).max_length == 512
    with pytest.raises(ConfigError, match="--max-length is 513"):
        check_max_length(513, minilm_path, "--max-length")


def test_position_limit_counts_the_rows_a_model_can_use(tmp_path) -> None:
    bert = _folder(tmp_path, "bert", BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                                num_attention_heads=2, intermediate_size=32,
                                                max_position_embeddings=40))
    roberta = _folder(tmp_path, "roberta", RobertaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                                         num_attention_heads=2, intermediate_size=32,
                                                         max_position_embeddings=40, pad_token_id=1))
    gpt2 = _folder(tmp_path, "gpt2", GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=64, n_positions=24))
    llama = _folder(tmp_path, "llama", LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                                   num_hidden_layers=1, num_attention_heads=2,
                                                   num_key_value_heads=1, max_position_embeddings=16))
    assert position_limit(bert) == 40
    assert position_limit(roberta) == 38  # positions start after padding_idx (1): two rows are never used
    assert position_limit(gpt2) == 24
    assert position_limit(llama) is None  # rotary positions: no table to run past
    assert position_limit(str(tmp_path / "no-model")) is None
    check_max_length(38, roberta, "max_length")
    with pytest.raises(ConfigError, match="has 38 positions"):
        check_max_length(39, roberta, "max_length")
    with pytest.raises(ConfigError, match="has 24 positions"):
        TrainConfig(model=gpt2, task="text", max_length=32)
    assert TrainConfig(model=llama, task="text", max_length=64).max_length == 64


# --------------------------------------------------------------------------------------------------
# finding 4: the training file's content is part of the run; a resume on changed data is refused
# --------------------------------------------------------------------------------------------------
def _delta():
    from deltatune.delta import Delta
    from deltatune.train import checkpoint

    return Delta("lora", checkpoint.config_as_recorded({}, "lora"), {})


def _settings(tmp_path, data, **kw):
    return run_record.run_settings(TrainConfig(task="classify", data=str(data), out_dir=str(tmp_path / "o"), **kw),
                                   _delta())


def test_resume_refuses_a_training_file_changed_under_its_path(tmp_path) -> None:
    data = tmp_path / "train.csv"
    rows = [f"row {i},{'xy'[i % 2]}\n" for i in range(20)]
    data.write_text("text,label\n" + "".join(rows))
    then = _settings(tmp_path, data)
    assert then["data"]["bytes"] == data.stat().st_size and len(then["data"]["sha256"]) == 64
    run_record.check_same_run(tmp_path, then, _settings(tmp_path, data))  # unchanged: resumes
    data.write_text("text,label\n" + "".join(reversed(rows)))  # re-sorted: same size, same labels, other order
    with pytest.raises(DataError, match=rf"{data}: the data changed since the checkpoint .* \(same size"):
        run_record.check_same_run(tmp_path, then, _settings(tmp_path, data))
    data.write_text("text,label\n" + "".join(rows[:10]))  # shrunk
    with pytest.raises(DataError, match="bytes then"):
        run_record.check_same_run(tmp_path, then, _settings(tmp_path, data))
    older = json.loads(json.dumps(then))
    del older["data"]  # a checkpoint written before data was fingerprinted
    run_record.check_same_run(tmp_path, older, _settings(tmp_path, data))


def test_data_fingerprint_streams_files_and_folders(tmp_path, monkeypatch) -> None:
    import hashlib

    big = tmp_path / "rows.jsonl"
    big.write_bytes(b'{"text": "a", "label": "x"}\n' * 5000)
    monkeypatch.setattr(run_record, "HASH_CHUNK", 1000)  # read in many pieces: the same digest as whole
    assert run_record.data_fingerprint(str(big)) == {"bytes": big.stat().st_size,
                                                     "sha256": hashlib.sha256(big.read_bytes()).hexdigest()}
    assert run_record.data_fingerprint(f"{big}:train")["sha256"] == hashlib.sha256(big.read_bytes()).hexdigest()
    folder = tmp_path / "saved"
    (folder / "train").mkdir(parents=True)
    (folder / "train" / "data.arrow").write_bytes(b"abc")
    (folder / "state.json").write_text("{}")
    first = run_record.data_fingerprint(str(folder))
    assert first["bytes"] == 5
    (folder / "train" / "data.arrow").write_bytes(b"abd")
    assert run_record.data_fingerprint(str(folder))["sha256"] != first["sha256"]
    assert run_record.data_fingerprint("some/hub-dataset") is None and run_record.data_fingerprint(None) is None
    assert _settings(tmp_path, big)["data"] is not None
    assert run_record.run_settings(TrainConfig(task="sst2"), _delta())["data"] is None  # GLUE's shared folder

