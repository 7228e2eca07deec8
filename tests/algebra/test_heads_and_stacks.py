"""Combining deltas that carry different task heads, or that are stacked on one another.

* The base fingerprint of a merged or composed delta is the one for the heads the output carries (a fingerprint
  leaves out its delta's own heads): merge ``heads="none"`` applies to its own base, a merge or composition of
  deltas that differ only in which heads they carry is accepted (and another base still refused), ``--heads-of``.
* ``heads="auto"`` averages heads only with weights that make an average.
* Composing or merging a stacked delta with the delta it was trained on does not put that delta beneath again.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import logits, randomize_delta, tiny_bert, tiny_inputs, tiny_llama

import deltatune
from deltatune.algebra import merge
from deltatune.algebra.checkpoint import CheckpointReader
from deltatune.algebra.sum_deltas import compose_deltas
from deltatune.delta import Delta
from deltatune.errors import ConfigError, FingerprintMismatch
from deltatune.fingerprint import fingerprint
from deltatune.model import apply_delta
from deltatune.provenance import Provenance, recorded_stack

pytestmark = pytest.mark.usefixtures("one_thread")
BERT_LORA = deltatune.LoRAConfig(r=2, alpha=4.0, targets=["query", "value"])
HEADS_ASIDE = {"model_type", "probe"}


def classifier_delta(seed: int, model_seed: int = 0, task: str = "sst2") -> Delta:
    """A LoRA delta on the tiny BERT classifier with its own classifier head (fingerprint: classifier left out)."""
    model = tiny_bert(model_seed)
    delta = randomize_delta(model, BERT_LORA, seed, 0.05)
    with torch.no_grad():
        model.classifier.weight.add_(seed)
    delta.snapshot_heads(model)
    delta.provenance = Provenance(operation="train", task={"name": task})
    return delta


def headless_delta(seed: int, model_seed: int = 0, task: str = "sst2") -> Delta:
    """A LoRA delta without heads on the same tiny BERT (fingerprint of the whole model)."""
    model = tiny_bert(model_seed)
    delta = randomize_delta(model, BERT_LORA, seed, 0.05)
    delta.heads, delta.fingerprint = {}, fingerprint(model)
    delta.provenance = Provenance(operation="train", task={"name": task})
    return delta


# --- fingerprints for the heads the output carries ---------------------------------------------------------------

def test_merge_without_heads_applies_to_its_own_base_only() -> None:
    a, b = classifier_delta(1), classifier_delta(2)
    assert set(a.heads) == {"classifier"}
    for heads in ("none", "auto", "first"):
        out = merge([a, b], "task_arithmetic", heads=heads)
        apply_delta(tiny_bert(0), out)  # its own base, whatever heads it carries
    out = merge([a, b], "task_arithmetic", heads="none")
    assert out.heads == {} and set(out.fingerprint) == HEADS_ASIDE  # no input was taken without heads
    with pytest.raises(FingerprintMismatch, match="probe"):
        apply_delta(tiny_bert(1), out)
    assert merge([a, b], "task_arithmetic", heads="first").fingerprint == a.fingerprint
    # an input without heads has the fingerprint a head-less output needs
    assert merge([a, headless_delta(3)], "task_arithmetic", heads="none").fingerprint == fingerprint(tiny_bert(0))


def test_merge_and_compose_accept_deltas_differing_only_in_their_heads() -> None:
    a, lang = classifier_delta(1), headless_delta(3)
    merged = merge([a, lang], "task_arithmetic")  # the same check compose makes
    composed = compose_deltas([a, lang])
    assert set(composed.heads) == {"classifier"} and composed.fingerprint == a.fingerprint
    apply_delta(tiny_bert(0), composed)
    assert merged.parts and merge([a, lang], "task_arithmetic", heads="first").fingerprint == a.fingerprint
    other = headless_delta(3, model_seed=1)
    with pytest.raises(FingerprintMismatch, match="probe.*force=True"):
        merge([a, other], "task_arithmetic")
    with pytest.raises(FingerprintMismatch, match="probe"):
        compose_deltas([a, other])
    assert merge([a, other], "task_arithmetic", force=True).parts


def test_merge_without_heads_writes_a_checkpoint_of_its_base(tmp_path) -> None:
    # classifier deltas trained from a causal-LM checkpoint, merged head-less into that checkpoint: streamed, and
    # through the model path (the merged delta applied with apply_to_checkpoint)
    import transformers

    from deltatune.api import apply_to_checkpoint

    tiny_llama(0).save_pretrained(tmp_path / "base")
    deltas = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = transformers.LlamaForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=3).eval()
        deltas.append(randomize_delta(model, deltatune.LoRAConfig(r=2, alpha=4.0, targets=["q_proj"]), seed, 0.05))
    assert all(set(d.heads) == {"score"} for d in deltas)
    kw = dict(base=str(tmp_path / "base"), heads="none")
    written = merge(deltas, "task_arithmetic", output="checkpoint", out=tmp_path / "out", **kw)
    dense = merge(deltas, "task_arithmetic", **kw)
    apply_to_checkpoint(dense, tmp_path / "model", model=str(tmp_path / "base"))
    key = "model.layers.0.self_attn.q_proj.weight"
    want = CheckpointReader(tmp_path / "base").get(key) + dense.parts[key.rsplit(".", 1)[0]].delta_weight()
    for out in (written, tmp_path / "model"):
        got = CheckpointReader(out)
        assert "score.weight" not in got and torch.allclose(got.get(key), want, atol=1e-6)


def test_a_merge_keeping_each_tasks_heads_applies_every_task_even_when_one_input_holds_all_heads() -> None:
    """A merge that keeps each task's heads is used with more than one head set (one per task view), so it carries
    the partial fingerprint — also when one input's heads happen to be all of them, and with or without force."""
    from deltatune.algebra.task_heads import for_task, task_names

    def make(seed: int, heads: list[str], task: str) -> Delta:
        d = randomize_delta(tiny_bert(0), deltatune.make_config("lora", {"r": 2}), seed, 0.05)
        ref = tiny_bert(0)
        d.heads = {h: {k: v.detach().clone() + seed for k, v in ref.get_submodule(h).state_dict().items()}
                   for h in heads}
        d.fingerprint = fingerprint(tiny_bert(0), exclude=heads)
        d.provenance.task = {"name": task}
        return d

    a, b = make(1, ["classifier"], "a"), make(2, ["classifier", "bert.pooler.dense"], "b")
    for force in (False, True):
        out = merge([a, b], "task_arithmetic", force=force)
        assert sorted(out.fingerprint) == ["model_type", "probe"]
        for name in task_names(out):
            apply_delta(tiny_bert(0), for_task(out, name))


def test_compose_heads_of_keeps_one_inputs_heads_with_their_fingerprint(tmp_path) -> None:
    from deltatune.commands.compose import compose_paths

    a, b, lang = classifier_delta(1, task="sst2"), classifier_delta(2, task="mnli"), headless_delta(3, task="wiki")
    for name, d in (("a", a), ("b", b), ("lang", lang)):
        d.save(tmp_path / name)
    for order in (["a", "b", "lang"], ["a", "lang", "b"]):
        out = compose_paths([tmp_path / n for n in order], heads_of=1)
        assert set(out.heads) == {"classifier"} and torch.equal(out.heads["classifier"]["weight"],
                                                                a.heads["classifier"]["weight"])
        assert out.fingerprint == a.fingerprint and out.provenance.task == {"name": "sst2"}
        apply_delta(tiny_bert(0), out)
    bare = compose_paths([tmp_path / n for n in ("a", "lang")], heads_of=2)
    assert bare.heads == {} and bare.fingerprint == lang.fingerprint
    apply_delta(tiny_bert(0), bare)
    headless_delta(4, model_seed=1).save(tmp_path / "other")
    with pytest.raises(FingerprintMismatch, match="probe"):
        compose_paths([tmp_path / "a", tmp_path / "b", tmp_path / "other"], heads_of=1)


# --- head averaging ------------------------------------------------------------------------------------------------

def test_auto_heads_average_only_with_nonnegative_weights() -> None:
    a, b = classifier_delta(1), classifier_delta(2)
    h1, h2 = a.heads["classifier"]["weight"], b.heads["classifier"]["weight"]
    for weights in ([1.0, -1.0], [1.0, -0.5], [0.0, 0.0]):
        with pytest.raises(ConfigError, match="heads='first'.*heads='none'"):
            merge([a, b], "task_arithmetic", weights=weights)
    assert torch.equal(merge([a, b], "task_arithmetic", weights=[1.0, -1.0], heads="first")
                       .heads["classifier"]["weight"], h1)
    avg = merge([a, b], "task_arithmetic", weights=[2.0, 1.0]).heads["classifier"]["weight"]
    assert torch.allclose(avg, (2 * h1 + h2) / 3, atol=1e-6)
    assert torch.allclose(merge([a, b], "task_arithmetic", weights=[1.0, 0.0]).heads["classifier"]["weight"], h1)
    # deltas of different tasks keep their heads side by side: nothing is averaged, signed weights are fine
    c = classifier_delta(2, task="mnli")
    assert set(merge([a, c], "task_arithmetic", weights=[1.0, -1.0]).heads) == {"classifier@input0",
                                                                                 "classifier@input1"}


# --- stacked deltas --------------------------------------------------------------------------------------------------

@pytest.fixture
def stack(tmp_path):
    """``A`` (sparse, bare base), ``B`` trained on top of ``A`` (``train --on``), ``C`` (bare base), saved."""
    from deltatune.train.stacking import prepare_stack

    cfg = deltatune.SparseConfig(num_tunable=300, regrow=False)
    a = randomize_delta(tiny_llama(0), cfg, 1, 0.2)
    a.save(tmp_path / "A")
    model = tiny_llama(0)
    under = prepare_stack(model, [tmp_path / "A"])
    b = randomize_delta(model, deltatune.SparseConfig(num_tunable=300, regrow=False, seed=2), 2, 0.2)
    b.provenance = Provenance(operation="train")
    under.record(b)
    b.save(tmp_path / "B")
    c = randomize_delta(tiny_llama(0), deltatune.SparseConfig(num_tunable=300, regrow=False, seed=3), 3, 0.2)
    return tmp_path, Delta.load(tmp_path / "A"), Delta.load(tmp_path / "B"), c


def _used(delta: Delta) -> torch.Tensor:
    """Logits of ``delta`` as ``deltatune apply`` and evaluation use it (the deltas beneath it merged first)."""
    from deltatune.train.stacking import attach_for_use, merge_for_use

    merged, attached = tiny_llama(0), tiny_llama(0)
    merge_for_use(merged, delta)
    attach_for_use(attached, delta, "d")
    inputs = tiny_inputs("llama")
    assert torch.allclose(logits(merged, inputs), logits(attached, inputs), atol=1e-5)
    return logits(merged, inputs)


def _by_hand(*deltas: Delta) -> torch.Tensor:
    model = tiny_llama(0)
    for d in deltas:
        deltatune.merge_delta(model, copy.deepcopy(d), force=True, heads=False)
    return logits(model, tiny_inputs("llama"))


def test_composing_or_merging_a_stacked_delta_with_the_one_beneath_counts_it_once(stack) -> None:
    root, a, b, c = stack
    assert [r["path"] for r in recorded_stack(b)] == [str((root / "A").resolve())]
    want = _by_hand(a, b)
    assert torch.allclose(_used(b), want, atol=1e-5)  # B alone: A merged beneath it
    for made in (compose_deltas([a, b]), compose_deltas([b, a]), merge([a, b], "task_arithmetic")):
        assert recorded_stack(made) == []  # A is inside the sum already
        assert torch.allclose(_used(made), want, atol=1e-5)
    for made in (compose_deltas([b, c]), merge([b, c], "task_arithmetic")):  # A is not an input: it stays beneath
        assert [r["path"] for r in recorded_stack(made)] == [str((root / "A").resolve())]
        assert torch.allclose(_used(made), _by_hand(a, b, c), atol=1e-5)


def test_a_weighted_or_base_reading_merge_of_deltas_on_different_stacks_is_refused(stack) -> None:
    """``B`` (on ``A``) beside ``A`` or beside ``C`` (bare base): only the plain sum is defined; deltas on one stack
    merge in that stack's space, unless the method reads the base (θ₀ + Δ_A, which the merge never reads)."""
    from deltatune.provenance import StackedDeltaRefused

    root, a, b, c = stack
    for inputs in ([a, b], [b, c]):
        for method, options in (("task_arithmetic", {"weights": [0.5, 0.5]}), ("linear", {}),
                                ("task_arithmetic", {"params": {"lambda": 0.7}}),
                                ("ties", {"params": {"density": 0.5}})):
            with pytest.raises(StackedDeltaRefused, match="different stacks"):
                merge(inputs, method, **options)
    with pytest.raises(StackedDeltaRefused, match="reads the base"):
        merge([b, b], "model_stock", base=None)
    d = copy.deepcopy(b)  # a second delta on the same stack as B: a weighted merge works in A's space
    for p in d.parts.values():
        for t in p.parameters():
            t.data.mul_(-0.5)
    made = merge([b, d], "linear")
    assert [r["path"] for r in recorded_stack(made)] == [str((root / "A").resolve())]
    half = copy.deepcopy(b)
    for p in half.parts.values():
        for t in p.parameters():
            t.data.mul_(0.25)  # (Δ_B − ½Δ_B) / 2
    assert torch.allclose(_used(made), _by_hand(a, half), atol=1e-5)
