"""``--task tokens`` with the real MiniLM: entity F1 equal to seqeval's, CoNLL and record readers (WNUT-17's
traps), first-sub-token label alignment, CLI train → eval --json (only --data) → predict (words and labels,
consistent with eval), and typed errors for bad input."""

from __future__ import annotations

import json
import random

import datasets
import pytest
from typer.testing import CliRunner

from deltatune.errors import ConfigError, DataError
from deltatune.prediction import predict
from deltatune.train import tokens as tok
from deltatune.train.collate import IGNORE_INDEX
from deltatune.train.entities import entity_scores, entity_spans, split_tag

PEOPLE = [["John", "Smith"], ["Mary"], ["Anna", "Lee"], ["Bob"]]
PLACES = [["Paris"], ["New", "York"], ["Berlin"], ["Rome"]]
VERBS = ["visited", "left", "loves", "saw"]


def _sentence(i: int) -> tuple[list[str], list[str]]:
    person, place = PEOPLE[i % 4], PLACES[(i // 4) % 4]
    words = [*person, VERBS[i % 3], *place, "today"]
    tags = ["B-person"] + ["I-person"] * (len(person) - 1) + ["O"] + ["B-location"] + \
        ["I-location"] * (len(place) - 1) + ["O"]
    return words, tags


def _conll(path, start: int, n: int, with_tags: bool = True) -> None:
    blocks = []
    for i in range(start, start + n):
        words, tags = _sentence(i)
        blocks.append("".join(f"{w}\t{t}\n" if with_tags else f"{w}\n" for w, t in zip(words, tags, strict=True)))
    path.write_text("\n".join(blocks))


FAST = ["--set", "max_length=24", "--set", "eval_every=0", "--set", "progress=false", "--set", "checkpoint_every=0",
        "--set", "eval_before=false", "--batch-size", "8"]


@pytest.mark.filterwarnings("ignore::UserWarning")  # seqeval warns when a sample has no entity at all
def test_entity_scores_equal_seqeval_on_random_and_ill_formed_tags():
    seqeval = pytest.importorskip("seqeval.metrics")
    rng = random.Random(0)
    tags = ["O", "B-a", "I-a", "B-b", "I-b", "E-a", "S-b", "B-x-y", "I-x-y"]
    for _ in range(200):
        gold = [[rng.choice(tags) for _ in range(rng.randint(0, 9))] for _ in range(rng.randint(1, 5))]
        pred = [[rng.choice(tags) if rng.random() < 0.5 else t for t in s] for s in gold]
        ours = entity_scores(gold, pred)
        assert ours["entity_precision"] == pytest.approx(seqeval.precision_score(gold, pred), abs=1e-12)
        assert ours["entity_recall"] == pytest.approx(seqeval.recall_score(gold, pred), abs=1e-12)
        assert ours["entity_f1"] == pytest.approx(seqeval.f1_score(gold, pred), abs=1e-12)
    # by hand: an I- after O opens an entity; a type change splits one
    assert entity_spans(["O", "I-x", "I-x", "B-y", "I-z"]) == [("x", 1, 3), ("y", 3, 4), ("z", 4, 5)]
    assert entity_scores([["B-a", "I-a", "O"]], [["B-a", "O", "O"]])["entity_f1"] == 0.0
    with pytest.raises(DataError, match="'PER' is not a BIO tag"):
        split_tag("PER")


def test_column_reader_handles_wnut_traps(tmp_path, data_dir):
    path = tmp_path / "a.conll"
    path.write_text("-DOCSTART- -X- O O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n \nPeter NNP B-NP B-PER\n")
    rows = tok.read_column_file(path)
    assert rows.tokens == [["EU", "rejects"], ["Peter"]] and rows.tags == [["B-ORG", "O"], ["B-PER"]]
    assert rows.where(0, 1) == f"{path}:4" and rows.where(1) == f"{path}:6"
    marked = tmp_path / "bom.conll"  # a byte-order mark does not hide -DOCSTART- (nor start the first token)
    marked.write_text("\ufeff" + path.read_text(), encoding="utf-8")
    again = tok.read_column_file(marked)
    assert again.tokens == rows.tokens and again.tags == rows.tags
    wnut = tok.read_sentences(str(data_dir / "wnut17" / "train.conll"), "tokens", "tags")
    assert len(wnut) == 3394  # 1,000 blank lines and 2,394 lines of a single tab all end sentences
    assert wnut.tokens[0][:3] == ["@paulwalk", "It", "'s"]
    assert len(tok.read_sentences(str(data_dir / "wnut17" / "test.conll"), "tokens", "tags")) == 1287


def test_records_read_class_label_tags(tmp_path):
    feature = datasets.Sequence(datasets.ClassLabel(names=["O", "B-person", "I-person"]))
    table = datasets.Dataset.from_dict({"words": [["Ann", "Lee", "ran"]], "ner": [[1, 2, 0]]},
                                       features=datasets.Features({"words": datasets.Sequence(datasets.Value("string")),
                                                                   "ner": feature}))
    table.save_to_disk(str(tmp_path / "saved"))
    rows = tok.read_sentences(str(tmp_path / "saved"), "words", "ner")
    assert rows.tags == [["B-person", "I-person", "O"]]
    csv = tmp_path / "t.csv"
    csv.write_text("tokens,tags\nAnn Lee ran,B-person I-person O\n")
    rows = tok.read_sentences(str(csv), "tokens", "tags")
    assert rows.tokens == [["Ann", "Lee", "ran"]] and rows.tags == [["B-person", "I-person", "O"]]


def test_first_sub_token_gets_the_label(tokenizer):
    rows = tok.Sentences("x", [["Unaffable", "Kowalczyk", "ran", ""]], [["B-p", "I-p", "O", "O"]], None, [1])
    enc = tok.encode(rows, tokenizer, 32, ["B-p", "I-p", "O"])
    ids, labels, first = enc["input_ids"][0], enc["labels"][0], enc["positions"][0]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    assert pieces[0] == "[CLS]" and pieces[-1] == "[SEP]"
    assert first[3] == -1  # an empty word has no sub-token
    assert [labels[p] for p in first[:3]] == [0, 1, 2]
    supervised = [i for i, y in enumerate(labels) if y != IGNORE_INDEX]
    assert supervised == first[:3]  # exactly the first sub-token of each word; all continuations are -100
    assert all(pieces[i].startswith("##") for i in range(1, len(ids) - 1) if i not in supervised)
    assert len(ids) > 5  # the names really were split


@pytest.fixture(scope="module")
def run(tmp_path_factory, minilm_path):
    from deltatune.cli import app

    root = tmp_path_factory.mktemp("tokens")
    _conll(root / "train.conll", 0, 48)
    _conll(root / "eval.conll", 100, 12)
    res = CliRunner().invoke(app, ["train", "--task", "tokens", "--model", minilm_path, "--data",
                                   str(root / "train.conll"), "--method", "lora", "--steps", "3", "--lr", "5e-3",
                                   "--out", str(root / "run"), "--set", "r=4", *FAST])
    assert res.exit_code == 0, res.output
    assert "held out 5 of 48 sentences" in res.output
    import deltatune
    from deltatune.train import loop
    from deltatune.train.config import TrainConfig

    cfg = TrainConfig(model=minilm_path, task="tokens", data=str(root / "train.conll"), out_dir=str(root / "sparse"),
                      max_steps=3, batch_size=8, lr=5e-3, max_length=24, eval_every=0, eval_before=False,
                      checkpoint_every=0, progress=False, keep_best=False, seed=1)
    loop.train(cfg, deltatune.make_config("sparse", {"density": 0.02}))
    return root


def test_cli_train_eval_json_and_provenance(run):
    from deltatune.cli import app

    manifest = json.loads((run / "run" / "delta" / "manifest.json").read_text())
    info = manifest["provenance"]["task"]
    assert info["task"] == "tokens" and info["text_column"] == "tokens" and info["label_column"] == "tags"
    assert info["label_names"] == ["B-location", "B-person", "I-location", "I-person", "O"]
    keys = {"entity_precision", "entity_recall", "entity_f1", "word_accuracy", "loss"}
    assert manifest["metrics"]["final"].keys() == keys
    runner = CliRunner()
    again = json.loads(runner.invoke(app, ["eval", str(run / "run" / "delta"), "--json"]).stdout)
    assert again["entity_f1"] == pytest.approx(manifest["metrics"]["final"]["entity_f1"])  # the same hold-out
    shown = runner.invoke(app, ["eval", str(run / "run" / "delta"), "--data", str(run / "eval.conll"), "--json"])
    assert shown.exit_code == 0, shown.output
    doc = json.loads(shown.stdout)
    assert doc.keys() == keys and 0.0 <= doc["entity_f1"] <= 1.0


def test_predict_words_and_labels_agree_with_eval(run, tmp_path):
    from deltatune.api import evaluate_delta

    delta = run / "run" / "delta"
    bare = tmp_path / "in.conll"
    _conll(bare, 100, 12, with_tags=False)  # tokens only
    rows = predict(delta, str(bare), out=tmp_path / "p.jsonl")
    lines = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert lines == rows and len(rows) == 12
    gold = [_sentence(i) for i in range(100, 112)]
    for row, (words, _) in zip(rows, gold, strict=True):
        assert row["words"] == words and len(row["labels"]) == len(words) == len(row["scores"])
        assert all(0 < s <= 1 for s in row["scores"])
        assert [e["type"] for e in row["entities"]] == [t for t, _, _ in entity_spans(row["labels"])]
    scored = entity_scores([t for _, t in gold], [r["labels"] for r in rows])
    metrics = evaluate_delta(delta, data=str(run / "eval.conll"))["delta"]
    assert scored["entity_f1"] == pytest.approx(metrics["entity_f1"])  # same alignment, same reading of tags
    as_records = tmp_path / "in.jsonl"
    as_records.write_text("".join(json.dumps({"tokens": " ".join(w)}) + "\n" for w, _ in gold[:3]))
    assert [r["labels"] for r in predict(delta, str(as_records))] == [r["labels"] for r in rows[:3]]
    with pytest.raises(ConfigError, match="top-k"):
        predict(delta, str(bare), top_k=2)


def test_several_token_deltas_in_one_routed_run_equal_each_alone(run, tmp_path):
    bare = tmp_path / "in.conll"
    _conll(bare, 200, 6, with_tags=False)
    paths = {"run": run / "run" / "delta", "sparse": run / "sparse" / "delta"}
    together = predict(list(paths.values()), str(bare))
    assert all(set(row) == {"run", "sparse"} for row in together)
    for name, path in paths.items():
        alone = predict(path, str(bare))
        for row, ref in zip(together, alone, strict=True):
            assert row[name]["labels"] == ref["labels"]
            assert row[name]["scores"] == pytest.approx(ref["scores"], abs=1e-5)
    assert any(r["run"]["scores"] != r["sparse"]["scores"] for r in together)  # two different deltas


def test_bad_input(run, tmp_path, minilm_path):
    from deltatune.train.config import TrainConfig
    from deltatune.train.tasks import build_task

    def cfg(data, **kw):
        return TrainConfig(model=minilm_path, task="tokens", data=str(data), max_length=16, **kw)

    short = tmp_path / "short.conll"
    short.write_text("Ann\tB-person\nran\n")
    with pytest.raises(DataError, match=r"short\.conll:2: 1 token and 0 tags"):
        build_task(cfg(short))
    wide = tmp_path / "wide.conll"
    wide.write_text("Ann NNP B-person\nran O\n")
    with pytest.raises(DataError, match=r"wide\.conll:2: 2 columns .* line 1 has 3"):
        build_task(cfg(wide))
    records = tmp_path / "r.jsonl"
    records.write_text(json.dumps({"tokens": ["a", "b"], "tags": ["O", "O"]}) + "\n\n" +
                       json.dumps({"tokens": ["Ann", "ran"], "tags": ["B-person"]}) + "\n")
    with pytest.raises(DataError, match=r"r\.jsonl: row 3 \(line 3\): 2 tokens but 1 tags"):
        build_task(cfg(records))
    with pytest.raises(DataError, match=r"no column 'words' \(columns: \['tokens', 'tags'\]\)"):
        build_task(cfg(records, text_column="words"))
    odd = tmp_path / "odd.conll"
    odd.write_text("Ann\tB-person\nran\tO\n\nBob\tPERSON\n")
    with pytest.raises(DataError, match=r"odd\.conll:4: tag 'PERSON' is not a BIO tag"):
        build_task(cfg(odd))
    unseen = tmp_path / "unseen.conll"
    unseen.write_text("Ann\tB-person\nin\tO\nOslo\tB-city\n")
    from deltatune.api import as_delta, evaluate_delta

    with pytest.raises(DataError, match=r"unseen\.conll:3: tag 'B-city' is not in the training label map"):
        evaluate_delta(run / "run" / "delta", data=str(unseen))
    # a tokens delta saved without its head: predict names what is missing
    stripped = as_delta(run / "run" / "delta")
    stripped.heads = {}
    stripped.save(tmp_path / "stripped")
    with pytest.raises(DataError, match=r"no classification head \(heads: \[\]; task: 'tokens'\)"):
        predict(tmp_path / "stripped", str(unseen))
    # an encoder delta without any head, alone and beside a tokens delta
    from transformers import AutoModel

    import deltatune

    deltatune.attach(AutoModel.from_pretrained(minilm_path), deltatune.LoRAConfig(r=2)).save(tmp_path / "encoder")
    with pytest.raises(DataError, match="no classification head"):
        predict(tmp_path / "encoder", str(unseen))
    with pytest.raises(ConfigError, match="cannot mix token-classification deltas"):
        predict([run / "run" / "delta", tmp_path / "encoder"], str(unseen))


def test_a_stacked_token_delta_predicts_over_its_underlying_delta_on_a_model_of_its_own(run, tmp_path, minilm_path):
    """A tokens delta trained on top of another (``on``) predicts from θ₀ + Δ_under + Δ_top; beside a plain delta
    in one run it gets a model of its own, so the plain delta still sees the bare base."""
    import dataclasses

    import deltatune
    from deltatune.provenance import ON_ROLE
    from deltatune.train import loop
    from deltatune.train.config import TrainConfig

    under = run / "run" / "delta"
    cfg = TrainConfig(model=minilm_path, task="tokens", data=str(run / "train.conll"), out_dir=str(tmp_path / "top"),
                      max_steps=2, batch_size=8, lr=5e-2, max_length=24, eval_every=0, eval_before=False,
                      checkpoint_every=0, progress=False, keep_best=False, seed=2, on=[str(under)])
    top = loop.train(cfg, deltatune.make_config("ia3", {})).delta_dir
    loaded = deltatune.load_delta(top)
    loaded.provenance = dataclasses.replace(loaded.provenance, parents=[
        p for p in loaded.provenance.parents if p.get("role") != ON_ROLE])
    unstacked = loaded.save(tmp_path / "unstacked")  # the same parts and head, nothing beneath
    bare = tmp_path / "in.conll"
    _conll(bare, 300, 6, with_tags=False)
    alone = predict(top, str(bare))
    without = predict(unstacked, str(bare))
    assert any(a["scores"] != pytest.approx(w["scores"], abs=1e-4) for a, w in zip(alone, without, strict=True))
    together = predict([under, top], str(bare))
    for name, path in (("run", under), ("top", top)):
        ref = predict(path, str(bare))
        for row, r in zip(together, ref, strict=True):
            assert row[name]["labels"] == r["labels"] and row[name]["scores"] == pytest.approx(r["scores"], abs=1e-5)
