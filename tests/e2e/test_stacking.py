"""Composition as a workflow: train a delta on top of others (``train --on``, ``TrainConfig.on``), use it over the
recorded or swapped underlying deltas, sum several sparse deltas and revert to the base bit for bit, and the
``deltatune compose`` verb; bad stacks are typed errors."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil

import pytest
import torch
from conftest import TINY_MODELS, base_state, logits, max_diff, randomize_delta, tiny_inputs
from typer.testing import CliRunner

import deltatune as dt
from deltatune.algebra.compose import compose
from deltatune.errors import ConfigError, FingerprintMismatch
from deltatune.fingerprint import base_parameters
from deltatune.train import loop
from deltatune.train.config import TrainConfig
from deltatune.train.stacking import (
    UnderlyingDeltaChanged,
    UnderlyingDeltaMissing,
    apply_stacked,
    content_digest,
    prepare_stack,
    resolve_underlying,
)

SMALL = dict(task="sst2", train_limit=32, eval_limit=16, eval_every=0, eval_before=False, max_length=24,
             batch_size=8, progress=False, checkpoint_every=0, lr=1e-3)
pytestmark = pytest.mark.usefixtures("one_thread")


def _same_base(model, ref, heads) -> bool:
    return all(torch.equal(p, ref[n]) for n, p in base_parameters(model, heads))


@pytest.fixture(scope="module")
def small_base(tmp_path_factory, minilm_path) -> str:
    """A one-layer BERT (hidden 32) with MiniLM's vocabulary and tokenizer, saved as a model folder: the real
    training loop and data at a fraction of MiniLM's cost."""
    from transformers import BertConfig, BertForSequenceClassification

    folder = tmp_path_factory.mktemp("small_base")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=2)
    BertForSequenceClassification(cfg).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(f"{minilm_path}/{name}", folder / name)
    return str(folder)


@pytest.fixture(scope="module")
def stacked(tmp_path_factory, data_dir, small_base):
    """A (random-sparse, SST-2) → B trained on top of A with the CLI (lt-sft) → C (another SST-2 delta)."""
    from deltatune.cli import app

    root = tmp_path_factory.mktemp("stack")
    small = dict(SMALL, model=small_base)
    a = loop.train(TrainConfig(out_dir=str(root / "a"), max_steps=2, **small), dt.make_config(
        "random-sparse", {"num_tunable": 4000}))
    c = loop.train(TrainConfig(out_dir=str(root / "c"), max_steps=2, seed=1, **small), dt.make_config(
        "random-sparse", {"num_tunable": 4000, "seed": 3}))
    args = ["train", "--method", "lt-sft", "--out", str(root / "b"), "--steps", "3", "--on", str(a.delta_dir),
            "--set", "num_tunable=3000", "--set", "full_steps=1"] + [f"--set={k}={v}" for k, v in small.items()]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    return root, a.delta_dir, root / "b" / "delta", c.delta_dir


def _classifier(path):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()


def _batch(tokenizer):
    return dict(tokenizer(["a fine film", "dull and slow", "it is what it is"], padding=True, return_tensors="pt"))


def test_train_on_records_the_underlying_delta_and_the_pristine_base(stacked) -> None:
    _, a_dir, b_dir, _ = stacked
    a, b = dt.load_delta(a_dir), dt.load_delta(b_dir)
    parents = b.provenance.parents
    assert len(parents) == 1 and parents[0]["role"] == "on"
    assert parents[0]["path"] == str(a_dir.resolve()) and parents[0]["digest"] == content_digest(a)
    assert b.provenance.train["on"] == [str(a_dir)]
    assert b.fingerprint == a.fingerprint, "a stacked delta belongs to the pristine base"
    assert {p.kind for p in b.parts.values()} == {"sparse"}


def test_stacked_delta_over_recorded_and_swapped_underlying_deltas(stacked, small_base, tokenizer) -> None:
    _, a_dir, b_dir, c_dir = stacked
    a, b, c = dt.load_delta(a_dir), dt.load_delta(b_dir), dt.load_delta(c_dir)
    batch = _batch(tokenizer)
    model = _classifier(small_base)
    ref = base_state(model, ["classifier"])
    for under in (None, [c]):  # recorded (A), then swapped (C)
        expected = _classifier(small_base)
        dt.merge_delta(expected, under[0] if under else a, heads=False)
        dt.apply_delta(expected, b, force=True)
        for mode in ("attach", "merge"):
            with apply_stacked(model, b, on=under, mode=mode):
                got = model(**batch).logits
                assert max_diff(got, expected(**batch).logits) <= 1e-5, (under, mode)
            assert _same_base(model, ref, ["classifier"]), f"{mode}: the base was not restored bit for bit"


def test_missing_or_changed_underlying_delta_is_refused(stacked, tmp_path) -> None:
    _, a_dir, b_dir, _ = stacked
    b = dt.load_delta(b_dir)
    moved = tmp_path / "a"
    shutil.copytree(a_dir, moved)
    b.provenance.parents[0]["path"] = str(moved)
    assert len(resolve_underlying(b)) == 1
    shutil.rmtree(moved)
    with pytest.raises(UnderlyingDeltaMissing):
        resolve_underlying(b)
    changed = dt.load_delta(a_dir)
    with torch.no_grad():
        next(iter(changed.parts.values())).values.add_(1e-3)
    changed.save(moved)
    with pytest.raises(UnderlyingDeltaChanged):
        resolve_underlying(b)


def test_resuming_a_stacked_run_on_a_changed_underlying_delta_stops(stacked, tmp_path, small_base) -> None:
    _, a_dir, _, _ = stacked
    under = tmp_path / "under"
    shutil.copytree(a_dir, under)
    cfg = dict(SMALL, model=small_base, out_dir=str(tmp_path / "run"), max_steps=3, checkpoint_every=2, on=[str(under)])
    mc = dt.make_config("random-sparse", {"num_tunable": 1000})
    loop.train(TrainConfig(**cfg), mc)
    changed = dt.load_delta(under)
    with torch.no_grad():
        next(iter(changed.parts.values())).values.mul_(2)
    changed.save(under, overwrite=True)
    with pytest.raises(UnderlyingDeltaChanged, match="changed since the run started"):
        loop.train(TrainConfig(**cfg, resume=True), mc)
    shutil.rmtree(under)
    with pytest.raises(UnderlyingDeltaMissing):
        loop.train(TrainConfig(**cfg, resume=True), mc)


def test_training_on_a_delta_inside_the_runs_own_output_is_refused(stacked, tmp_path, small_base) -> None:
    """``train --on RUN/delta --out RUN`` would replace the delta it trains on (and leave its new delta's record of
    it pointing at a delta that is gone): refused before anything in RUN changes, also for a delta the ``--on``
    delta was itself trained on."""
    _, a_dir, b_dir, _ = stacked
    run = tmp_path / "run"
    shutil.copytree(a_dir.parent, run)  # an earlier run's folder: marker, delta, …
    before = {p.name: p.stat().st_mtime_ns for p in (run / "delta").iterdir()}
    mc = dt.make_config("random-sparse", {"num_tunable": 1000})
    for on in (run / "delta", run / "delta" / "."):
        with pytest.raises(ConfigError, match="which this run writes"):
            loop.train(TrainConfig(**dict(SMALL, model=small_base, out_dir=str(run), max_steps=1, on=[str(on)])), mc)
    assert {p.name: p.stat().st_mtime_ns for p in (run / "delta").iterdir()} == before
    b = dt.load_delta(b_dir)  # trained on a_dir: training on b into a_dir's run would replace b's underlying delta
    assert b.provenance.parents[0]["path"] == str(a_dir)
    with pytest.raises(ConfigError, match="which this run writes"):
        loop.train(TrainConfig(**dict(SMALL, model=small_base, out_dir=str(a_dir.parent), max_steps=1,
                                      on=[str(b_dir)])), mc)
    assert dt.load_delta(a_dir).method == "random-sparse"


def test_a_new_run_into_an_earlier_runs_folder_leaves_none_of_that_run_behind(tmp_path, small_base) -> None:
    """A new run into an earlier run's folder (allowed without --overwrite) starts from an empty run: no ``best``
    or checkpoint of the earlier run is left beside its own delta."""
    run = tmp_path / "run"
    first = dict(SMALL, model=small_base, out_dir=str(run), max_steps=2, checkpoint_every=1, eval_every=1,
                 keep_best=True)
    loop.train(TrainConfig(**first), dt.make_config("lora", {"r": 2}))
    assert {"best", "checkpoint", "delta"} <= {p.name for p in run.iterdir()}
    second = dict(first, checkpoint_every=0, eval_every=0, keep_best=False)
    from deltatune.errors import TargetError

    with pytest.raises(TargetError):  # a run that fails to set up leaves the earlier one as it was
        loop.train(TrainConfig(**second), dt.make_config("lora", {"r": 2, "targets": ["no_such_module"]}))
    assert {"best", "checkpoint", "delta"} <= {p.name for p in run.iterdir()}
    result = loop.train(TrainConfig(**second), dt.make_config("ia3", {}))
    assert result.best_dir is None
    assert not (run / "best").exists() and not (run / "checkpoint").exists()
    assert dt.load_delta(run / "delta").method == "ia3"
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_sum_of_sparse_deltas_applies_and_reverts_bit_exactly_and_compose_verb(stacked, tmp_path, small_base,
                                                                                  tokenizer) -> None:
    from deltatune.cli import app

    _, a_dir, b_dir, c_dir = stacked
    deltas = [dt.load_delta(p) for p in (a_dir, b_dir, c_dir)]
    batch = _batch(tokenizer)
    model = _classifier(small_base)
    ref = base_state(model, ["classifier"])
    heads_kept = [deltas[0], *(copy.copy(d) for d in deltas[1:])]
    for d in heads_kept[1:]:
        d.heads = {}
    with compose(model, heads_kept, mode="merge", force=True) as stack:
        merged = model(**batch).logits
        assert len(stack) == 3
    assert _same_base(model, ref, ["classifier"])
    res = CliRunner().invoke(app, ["compose", str(a_dir), str(b_dir), str(c_dir), "--heads-of", "1", "--out",
                                   str(tmp_path / "sum")])
    assert res.exit_code == 0, res.output
    total = dt.load_delta(tmp_path / "sum")
    assert {p.kind for p in total.parts.values()} == {"sparse"}
    assert sum(p.indices.numel() for p in total.parts.values()) <= sum(
        p.indices.numel() for d in deltas for p in d.parts.values())
    fresh = _classifier(small_base)
    dt.merge_delta(fresh, total, force=True)
    assert max_diff(fresh(**batch).logits, merged) <= 1e-5
    res = CliRunner().invoke(app, ["compose", str(a_dir), str(c_dir), "--out", str(tmp_path / "clash")])
    assert res.exit_code != 0 and isinstance(res.exception, ConfigError)  # two different SST-2 heads


def test_stacking_or_composing_deltas_of_another_base_is_refused(tmp_path) -> None:
    other = randomize_delta(TINY_MODELS["bert"](seed=1), dt.SparseConfig(num_tunable=200, regrow=False), 0, 0.1)
    other.save(tmp_path / "other")
    mine = randomize_delta(TINY_MODELS["bert"](), dt.SparseConfig(num_tunable=200, regrow=False), 1, 0.1)
    mine.save(tmp_path / "mine")
    model = TINY_MODELS["bert"]()
    ref = base_state(model, ["classifier"])
    with pytest.raises(FingerprintMismatch):
        prepare_stack(model, [tmp_path / "mine", tmp_path / "other"])
    assert _same_base(model, ref, ["classifier"]), "nothing is merged before every check passed"
    from deltatune.commands.compose import compose_paths

    with pytest.raises(FingerprintMismatch):
        compose_paths([tmp_path / "mine", tmp_path / "other"], heads_of=1)
    with pytest.raises(UnderlyingDeltaMissing):
        prepare_stack(model, [tmp_path / "nowhere"])
    with pytest.raises(ConfigError):
        compose_paths([tmp_path / "mine"])


def test_prepare_stack_merges_in_order_and_keeps_the_new_runs_head() -> None:
    model = TINY_MODELS["bert"]()
    inputs = tiny_inputs("bert")
    d = randomize_delta(TINY_MODELS["bert"](), dt.SparseConfig(num_tunable=300, regrow=False), 2, 0.2)
    head = {k: v.clone() for k, v in model.classifier.state_dict().items()}
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        d.save(tmp + "/d")
        expected = copy.deepcopy(model)
        dt.merge_delta(expected, d, heads=False)
        stack = prepare_stack(model, [tmp + "/d"])
    assert stack is not None and len(stack.deltas) == 1
    assert max_diff(logits(model, inputs), logits(expected, inputs)) == 0.0
    assert all(torch.equal(model.classifier.state_dict()[k], v) for k, v in head.items())


def test_eval_and_predict_of_a_stacked_delta_use_its_underlying_delta(stacked, small_base, tokenizer,
                                                                        tmp_path) -> None:
    """``evaluate_delta`` and ``predict`` on B run θ₀ + Δ_A + Δ_B (A from B's provenance), not θ₀ + Δ_B."""
    from deltatune.api import _eval_task, evaluate_delta
    from deltatune.prediction import predict
    from deltatune.train.evaluate import evaluate

    _, a_dir, b_dir, _ = stacked
    a, b = dt.load_delta(a_dir), dt.load_delta(b_dir)
    texts = ["a fine film", "dull and slow", "it is what it is"]
    expected = _classifier(small_base)
    dt.merge_delta(expected, a, heads=False)
    dt.apply_delta(expected, b, force=True)
    want = expected(**_batch(tokenizer)).logits.softmax(-1)
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"sentence": t}) + "\n" for t in texts))
    rows = predict(b_dir, str(data), model=small_base)
    got = torch.tensor([r["score"] for r in rows])
    assert max_diff(got, want.max(-1).values) <= 1e-5
    alone = _classifier(small_base)  # B without A gives other outputs: the test can tell the two apart
    dt.apply_delta(alone, b)
    assert max_diff(alone(**_batch(tokenizer)).logits.softmax(-1), want) > 1e-6
    metrics = evaluate_delta(b_dir, model=small_base, limit=16)["delta"]
    net = _classifier(small_base)
    with apply_stacked(net, b):
        ref = evaluate(net, _eval_task(b, small_base, None, None, 16), 64, torch.device("cpu"))
    assert metrics == ref


@pytest.fixture()
def stacked_ia3(tmp_path):
    """An (IA)³ delta (its update depends on the weights it scales) trained on top of a sparse one: the stack merged
    into the base, the scales set; returns the folders, the training-time logits and the inputs."""
    from conftest import stacked_ia3_delta, tiny_llama

    from deltatune.provenance import Provenance

    tiny_llama().save_pretrained(tmp_path / "base")
    a = randomize_delta(tiny_llama(), dt.SparseConfig(num_tunable=3000, regrow=False), 0, 0.3)
    a.provenance = Provenance(operation="train", base=str(tmp_path / "base"))
    a.save(tmp_path / "a")
    model = tiny_llama()
    b = stacked_ia3_delta(model, [tmp_path / "a"], str(tmp_path / "base"), 1)
    inputs = tiny_inputs("llama")
    trained = logits(model, inputs)
    b.save(tmp_path / "b")
    return tmp_path, trained, inputs


@pytest.mark.parametrize("mode", ["attach", "merge"])
def test_a_base_dependent_delta_on_top_is_applied_on_the_weights_it_was_trained_on(stacked_ia3, mode) -> None:
    from conftest import tiny_llama

    root, trained, inputs = stacked_ia3
    net = tiny_llama()
    ref = base_state(net, [])
    b = dt.load_delta(root / "b")
    with apply_stacked(net, b, mode=mode):
        assert max_diff(logits(net, inputs), trained) <= 1e-5  # (IA)³ scales θ₀ + Δ_A, not θ₀
    assert _same_base(net, ref, [])
    with compose(net, [dt.load_delta(root / "a"), b], mode=mode, force=True):  # a sum scales θ₀: not the same
        assert max_diff(logits(net, inputs), trained) > 1e-3


def test_apply_writes_the_underlying_deltas_beneath_a_stacked_one(stacked_ia3) -> None:
    from transformers import AutoModelForCausalLM

    from deltatune.api import apply_to_checkpoint

    root, trained, inputs = stacked_ia3
    apply_to_checkpoint(root / "b", root / "ckpt", model=str(root / "base"))
    ckpt = AutoModelForCausalLM.from_pretrained(root / "ckpt").eval()
    assert max_diff(logits(ckpt, inputs), trained) <= 1e-5


def test_serving_or_exporting_a_stacked_delta_is_refused(stacked_ia3) -> None:
    from conftest import tiny_llama

    from deltatune.io.peft_export import export_peft
    from deltatune.provenance import StackedDeltaRefused
    from deltatune.serve.store import DeltaStore

    root, _, _ = stacked_ia3
    store = DeltaStore(tiny_llama(), "base")
    with pytest.raises(StackedDeltaRefused, match=r"serving delta 'b'.*trained on top of"):
        store.add("b", root / "b")
    assert store.names() == []
    with pytest.raises(StackedDeltaRefused, match="export to PEFT"):
        export_peft(dt.load_delta(root / "b"), root / "peft")
    assert not (root / "peft").exists()


def test_the_underlying_delta_s_digest_sees_its_metadata_not_its_heads_or_index_width(tmp_path) -> None:
    from conftest import tiny_llama

    from deltatune.train.loop import delta_digest
    from deltatune.train.stacking import digest_matches

    lora = randomize_delta(tiny_llama(), dt.make_config("lora", {"r": 2}), 0, 0.1)
    digest = content_digest(lora)
    rescaled = copy.deepcopy(lora)
    next(iter(rescaled.parts.values())).scale *= 2  # the same tensors, another update
    assert content_digest(rescaled) != digest and not digest_matches(digest, rescaled)
    headed = dataclasses.replace(lora, heads={"lm_head": {"weight": torch.ones(2, 2)}})
    assert content_digest(headed) == digest  # an underlying delta's heads are never applied
    sparse = randomize_delta(tiny_llama(), dt.SparseConfig(num_tunable=500, regrow=False), 0, 0.1)
    wide = copy.deepcopy(sparse)
    for part in wide.parts.values():
        part.indices = part.indices.long()
    assert content_digest(wide) == content_digest(sparse)
    assert digest_matches(delta_digest(lora), lora)  # a record of the first version is still read
    assert not digest_matches(delta_digest(lora), sparse)


def test_a_changed_scale_of_the_underlying_delta_is_refused(tmp_path) -> None:
    from conftest import tiny_llama

    from deltatune.provenance import Provenance

    a = randomize_delta(tiny_llama(), dt.make_config("lora", {"r": 2}), 0, 0.1)
    a.provenance = Provenance(operation="train", base="tiny")
    a.save(tmp_path / "a")
    model = tiny_llama()
    stack = prepare_stack(model, [tmp_path / "a"])
    b = randomize_delta(model, dt.SparseConfig(num_tunable=500, regrow=False), 1, 0.1)
    stack.record(b)
    assert len(resolve_underlying(b)) == 1
    changed = dt.load_delta(tmp_path / "a")
    next(iter(changed.parts.values())).scale *= 2
    changed.save(tmp_path / "a", overwrite=True)
    with pytest.raises(UnderlyingDeltaChanged):
        resolve_underlying(b)


def test_training_on_a_stacked_delta_trains_on_the_deltas_beneath_it_too(tmp_path) -> None:
    from conftest import tiny_llama

    from deltatune.provenance import Provenance

    def trained(model, seed: int, under: list) -> dt.Delta:
        stack = prepare_stack(model, under)
        d = randomize_delta(model, dt.SparseConfig(num_tunable=400, regrow=False, seed=seed), seed, 0.3)
        d.provenance = Provenance(operation="train", base="tiny")
        if stack is not None:
            stack.record(d)
        return d

    trained(tiny_llama(), 0, []).save(tmp_path / "a")
    trained(tiny_llama(), 1, [tmp_path / "a"]).save(tmp_path / "b")  # B on A
    model = tiny_llama()
    stack = prepare_stack(model, [tmp_path / "b"])  # C on B: on θ₀ + Δ_A + Δ_B, the function B is
    assert stack.paths == [str((tmp_path / p).resolve()) for p in ("a", "b")]
    expected = tiny_llama()
    for name in ("a", "b"):
        dt.merge_delta(expected, dt.load_delta(tmp_path / name), force=True, heads=False)
    inputs = tiny_inputs("llama")
    assert torch.equal(logits(model, inputs), logits(expected, inputs))
    c = randomize_delta(model, dt.SparseConfig(num_tunable=400, regrow=False, seed=2), 2, 0.3)
    stack.record(c)
    assert [content_digest(u) for u in resolve_underlying(c)] == stack.digests


def test_what_is_made_of_a_stacked_delta_keeps_its_stack_and_rebasing_it_is_refused(stacked_ia3) -> None:
    from deltatune.algebra.compress import compress_delta
    from deltatune.algebra.rebase import rebase_delta
    from deltatune.algebra.sum_deltas import compose_deltas
    from deltatune.io.peft_export import export_peft
    from deltatune.provenance import StackedDeltaRefused, recorded_stack

    root, _, _ = stacked_ia3
    b = dt.load_delta(root / "b")
    for made in (compress_delta(b, "quantize", dtype="bf16"), compose_deltas([b, b])):
        assert [r["path"] for r in recorded_stack(made)] == [r["path"] for r in recorded_stack(b)]
        with pytest.raises(StackedDeltaRefused):
            export_peft(made, root / "peft")
    with pytest.raises(StackedDeltaRefused, match="rebase"):
        rebase_delta(b, str(root / "base"), force=True)
