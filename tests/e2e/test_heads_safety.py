"""Task heads are never silently lost between training and use (issue 13 §7), on real MiniLM classify deltas:

* a merge of two classifier deltas of different tasks keeps each input's head under its own name; each task's
  view routes its rows to its own head in one mixed batch (equal to that view alone) and ``predict`` spells each
  task's labels; a checkpoint output, which can hold one head, is refused before anything is written;
* ``apply`` and checkpoint merges write a classifier config (``BertForSequenceClassification``, the label
  names), so ``AutoModelForSequenceClassification.from_pretrained`` gives back the classifier and its labels;
* fresh task heads train in their own optimizer group at ``head_lr`` (deltatune's loop and ``prepare``).
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import deltatune
from deltatune.algebra import merge
from deltatune.algebra.task_heads import for_task, task_names
from deltatune.api import apply_to_checkpoint, load_base_for
from deltatune.errors import ConfigError
from deltatune.model import apply_delta, mixed_batch
from deltatune.prediction import predict
from deltatune.train import loop
from deltatune.train.config import TrainConfig
from deltatune.train.integration import default_head_lr, make_optimizer, prepare

WORDS = [["happy", "glad", "great"], ["angry", "mad", "furious"], ["scared", "afraid", "nervous"]]
FEELINGS = ["joy", "anger", "fear"]  # task "feel": sorted label ids anger 0, fear 1, joy 2
MOODS = ["calm", "hot", "tense"]     # task "mood": the same texts, other label names


def _rows(names: list[str], n: int, start: int = 0) -> list[dict[str, str]]:
    return [{"text": f"{WORDS[i % 3][(i // 3) % 3]} day {i}", "label": names[i % 3]} for i in range(start, start + n)]


def _train(tmp, minilm_path, name: str, labels: list[str], seed: int = 0, **train):
    data = tmp / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows(labels, 60)))
    cfg = TrainConfig(model=minilm_path, task="classify", data=str(data), out_dir=str(tmp / name), max_steps=6,
                      batch_size=8, max_length=16, lr=5e-3, eval_every=0, eval_before=False, checkpoint_every=0,
                      progress=False, keep_best=False, seed=seed, **train)
    return loop.train(cfg, deltatune.make_config("lora", {"r": 2}))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, minilm_path):
    tmp = tmp_path_factory.mktemp("heads")
    return {"feel": _train(tmp, minilm_path, "feel", FEELINGS).delta_dir,
            "mood": _train(tmp, minilm_path, "mood", MOODS).delta_dir,
            "feel2": _train(tmp, minilm_path, "feel2", FEELINGS, seed=1).delta_dir}


def _batch(minilm_path, texts: list[str]):
    return AutoTokenizer.from_pretrained(minilm_path)(texts, padding=True, return_tensors="pt")


def _logits_alone(delta, batch) -> torch.Tensor:
    net = load_base_for(delta).eval()
    apply_delta(net, delta)
    with torch.no_grad():
        return net(**batch).logits


# ---------------------------------------------------------------------------------------------------------------
# merge of two classifier deltas
# ---------------------------------------------------------------------------------------------------------------
def test_merge_of_two_tasks_keeps_each_head_and_routes_rows_to_it(runs, minilm_path, tmp_path):
    feel, mood = deltatune.load_delta(runs["feel"]), deltatune.load_delta(runs["mood"])
    merge([runs["feel"], runs["mood"]], "ties", params={"density": 0.5}, output="dense", out=tmp_path / "m")
    merged = deltatune.load_delta(tmp_path / "m")  # the kept heads survive saving and loading
    assert sorted(merged.heads) == ["classifier@feel", "classifier@mood"]
    assert task_names(merged) == ["feel", "mood"]
    views = {"feel": for_task(merged, "feel"), "mood": for_task(merged, "mood")}
    for name, source in (("feel", feel), ("mood", mood)):
        view = views[name]
        assert list(view.heads) == ["classifier"]
        assert all(torch.equal(v, source.heads["classifier"][k]) for k, v in view.heads["classifier"].items())
        assert view.provenance.task["label_names"] == source.provenance.task["label_names"]
    texts = [r["text"] for r in _rows(FEELINGS, 6, start=300)]
    batch = _batch(minilm_path, texts)
    net = load_base_for(views["feel"]).eval()
    for name, view in views.items():
        apply_delta(net, view, name=name)
    route = ["feel", "mood", "mood", "feel", "feel", "mood"]
    with torch.no_grad(), mixed_batch(net, route):
        routed = net(**batch).logits
    alone = {name: _logits_alone(view, batch) for name, view in views.items()}
    for i, name in enumerate(route):
        assert (routed[i] - alone[name][i]).abs().max() < 1e-5, (i, name)
    assert not torch.allclose(alone["feel"], alone["mood"])  # two heads, not one head twice

    inputs = tmp_path / "in.jsonl"
    inputs.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    rows = predict([views["feel"], views["mood"]], str(inputs))
    assert {r["delta0"]["label"] for r in rows} <= set(FEELINGS)
    assert {r["delta1"]["label"] for r in rows} <= set(MOODS)


def test_routed_view_gives_its_own_deltas_predictions(runs, minilm_path):
    """Weights (1, 0): the merged body is ``feel``'s own, so routing a row to ``feel`` gives exactly what the
    ``feel`` delta gives alone, and ``mood`` rows get the ``mood`` head on that body."""
    feel = deltatune.load_delta(runs["feel"])
    merged = merge([runs["feel"], runs["mood"]], "linear", weights=[1.0, 0.0], output="dense")
    batch = _batch(minilm_path, [r["text"] for r in _rows(FEELINGS, 4, start=500)])
    view = for_task(merged, "feel")
    assert (_logits_alone(view, batch) - _logits_alone(feel, batch)).abs().max() < 1e-5


def test_soup_of_one_task_still_averages_its_head(runs):
    a, b = deltatune.load_delta(runs["feel"]), deltatune.load_delta(runs["feel2"])
    soup = merge([a, b], "linear", output="dense")
    assert list(soup.heads) == ["classifier"] and task_names(soup) == []
    expected = (a.heads["classifier"]["weight"] + b.heads["classifier"]["weight"]) / 2
    assert torch.allclose(soup.heads["classifier"]["weight"], expected)
    assert soup.provenance.task["label_names"] == a.provenance.task["label_names"]


def test_checkpoint_output_of_two_tasks_is_refused_before_writing(runs, minilm_path, tmp_path):
    with pytest.raises(ConfigError, match=r"different tasks.*\(feel, mood\).*heads='first'"):
        merge([runs["feel"], runs["mood"]], "task_arithmetic", output="checkpoint", base=minilm_path,
              out=tmp_path / "ck")
    assert not (tmp_path / "ck").exists()
    merged = merge([runs["feel"], runs["mood"]], "task_arithmetic", output="dense")
    with pytest.raises(ConfigError, match="for_task"):
        apply_to_checkpoint(merged, tmp_path / "ck2")
    assert not (tmp_path / "ck2").exists()
    with pytest.raises(ConfigError, match=r"keeps: \['feel', 'mood'\]"):
        for_task(merged, "sst2")


# ---------------------------------------------------------------------------------------------------------------
# apply / checkpoint merges write a classifier config
# ---------------------------------------------------------------------------------------------------------------
def _check_classifier_checkpoint(out, delta, minilm_path, labels: list[str]) -> None:
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]
    assert config["id2label"] == {str(i): n for i, n in enumerate(labels)}
    assert config["label2id"] == {n: i for i, n in enumerate(labels)}
    loaded = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert loaded.config.id2label == dict(enumerate(labels))
    batch = _batch(minilm_path, [r["text"] for r in _rows(FEELINGS, 5, start=700)])
    with torch.no_grad():
        got = loaded(**batch).logits
    assert (got - _logits_alone(delta, batch)).abs().max() < 1e-4  # the trained head, not a fresh one


def test_apply_writes_the_classifier_with_its_label_names(runs, minilm_path, tmp_path):
    feel = deltatune.load_delta(runs["feel"])
    apply_to_checkpoint(runs["feel"], tmp_path / "out")
    _check_classifier_checkpoint(tmp_path / "out", feel, minilm_path, sorted(FEELINGS))
    merged = merge([runs["feel"], runs["mood"]], "ties", params={"density": 0.5}, output="dense")
    view = for_task(merged, "mood")  # one task of a multi-task merge: its own head and labels
    apply_to_checkpoint(view, tmp_path / "mood")
    _check_classifier_checkpoint(tmp_path / "mood", view, minilm_path, sorted(MOODS))


def test_checkpoint_merge_writes_the_classifier_with_its_label_names(runs, minilm_path, tmp_path):
    soup = merge([runs["feel"], runs["feel2"]], "linear", output="dense")
    merge([runs["feel"], runs["feel2"]], "linear", output="checkpoint", base=minilm_path, out=tmp_path / "ck")
    _check_classifier_checkpoint(tmp_path / "ck", soup, minilm_path, sorted(FEELINGS))


# ---------------------------------------------------------------------------------------------------------------
# learning rate of fresh heads
# ---------------------------------------------------------------------------------------------------------------
def _groups(optimizer) -> dict[str, dict]:
    return {g["name"]: g for g in optimizer.param_groups}


def test_prepare_puts_the_head_in_its_own_group_at_head_lr(minilm):
    delta = deltatune.attach(minilm, deltatune.make_config("lora", {"r": 2}))
    head = list(minilm.classifier.parameters())
    optimizer, _ = prepare(minilm, delta, lr=1e-3, total_steps=2)
    groups = _groups(optimizer)
    assert groups["delta"]["lr"] == 1e-3 and groups["heads"]["lr"] == default_head_lr(1e-3) == 1e-2
    assert default_head_lr(5e-3) == 2e-2 and default_head_lr(3e-2) == 3e-2  # capped; never below the delta's
    assert {id(p) for p in groups["heads"]["params"]} == {id(p) for p in head}
    part_ids = {id(p) for part in delta.parts.values() for p in part.parameters()}
    assert {id(p) for p in groups["delta"]["params"]} == part_ids
    explicit = _groups(make_optimizer(minilm, delta, lr=1e-3, head_lr=7e-3))
    assert explicit["heads"]["lr"] == 7e-3 and explicit["delta"]["lr"] == 1e-3
    sparse = deltatune.attach(minilm, deltatune.make_config("sparse", {"num_tunable": 500}), name="s")
    assert type(make_optimizer(minilm, sparse, lr=1e-3)).__name__ == "SparseAdamW"  # the method's own, grouped


def test_the_loop_trains_the_head_at_head_lr(minilm_path, tmp_path, monkeypatch):
    seen = {}
    real = loop.param_groups

    def spy(model, delta, lr, head_lr=None):
        groups = real(model, delta, lr, head_lr)
        seen.update({g["name"]: (g["lr"], len(g["params"])) for g in groups})
        return groups

    monkeypatch.setattr(loop, "param_groups", spy)
    result = _train(tmp_path, minilm_path, "lr", FEELINGS, head_lr=2e-2, lr_schedule="constant", warmup_ratio=0.0)
    assert seen["delta"][0] == 5e-3 and seen["heads"] == (2e-2, 2)  # classifier weight and bias
    lines = [json.loads(line) for line in (tmp_path / "lr" / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in lines if "loss" in line]
    assert steps and all(line["lr"] == 5e-3 and line["head_lr"] == 2e-2 for line in steps)
    assert result.delta.provenance.train["head_lr"] == 2e-2
    with pytest.raises(ConfigError, match="head_lr"):
        TrainConfig(head_lr=0.0)


def test_predict_on_a_multi_task_merge_answers_once_per_kept_task(runs, minilm_path, tmp_path):
    """``predict`` expands a merge that kept several heads into one entry per task (``NAME/TASK``), each equal to
    predicting with :func:`for_task`'s view; applying the merged delta whole is refused with the way out."""
    merge([runs["feel"], runs["mood"]], "linear", output="dense", out=tmp_path / "m")
    merged = deltatune.load_delta(tmp_path / "m")
    inputs = tmp_path / "in.jsonl"
    inputs.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in _rows(FEELINGS, 4, start=700)))
    rows = predict(tmp_path / "m", str(inputs))
    assert set(rows[0]) == {"m/feel", "m/mood"}
    views = predict([for_task(merged, "feel"), for_task(merged, "mood")], str(inputs))
    for row, view in zip(rows, views, strict=True):
        assert row["m/feel"]["label"] == view["delta0"]["label"] and row["m/mood"]["label"] == view["delta1"]["label"]
        assert abs(row["m/feel"]["score"] - view["delta0"]["score"]) < 1e-5
    with pytest.raises(ConfigError, match="for_task"):
        apply_delta(load_base_for(merged).eval(), merged)


def test_a_delta_without_heads_loads_its_base_as_the_class_its_parts_name(tmp_path):
    """A delta whose task heads were dropped (``merge --heads none``) over a base saved as a classifier names its
    modules as that class does (``bert.encoder…``): its base loads as the folder's own class, not as ``AutoModel``
    (a bare ``BertModel`` without the ``bert.`` prefix), so apply writes the checkpoint."""
    from transformers import BertConfig, BertForSequenceClassification


    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=32, num_labels=2)
    BertForSequenceClassification(cfg).save_pretrained(tmp_path / "base")
    model = BertForSequenceClassification.from_pretrained(tmp_path / "base")
    delta = deltatune.attach(model, deltatune.make_config("lora", {"r": 2, "targets": ["query"]}))
    with torch.no_grad():
        for part in delta.parts.values():
            part.lora_B.normal_()
    delta.heads = {}
    delta.fingerprint = deltatune.fingerprint.fingerprint(BertForSequenceClassification.from_pretrained(
        tmp_path / "base"))
    delta.provenance.base = str(tmp_path / "base")
    assert all(name.startswith("bert.") for name in delta.parts)
    net = load_base_for(delta)
    assert isinstance(net, BertForSequenceClassification)
    apply_to_checkpoint(delta, tmp_path / "out")
    out = BertForSequenceClassification.from_pretrained(tmp_path / "out")
    want = BertForSequenceClassification.from_pretrained(tmp_path / "base")
    deltatune.merge_delta(want, delta)
    assert torch.equal(out.bert.encoder.layer[0].attention.self.query.weight,
                       want.bert.encoder.layer[0].attention.self.query.weight)
