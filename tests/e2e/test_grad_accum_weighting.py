"""Gradient accumulation weighs each micro-batch by its labelled items: ``batch_size`` b × ``grad_accum`` k gives
the gradient of one batch of b·k rows (a causal LM over rows of different lengths, token classification, sequence
classification), logs the same loss, and deltatune's loop trains the same delta as HF ``Trainer`` (which
normalises by ``num_items_in_batch``) with the callback.  Before, each micro-batch weighed 1/k: 40% off on
prompt/response rows of uneven lengths."""

from __future__ import annotations

import json
import random

import pytest
import torch
from torch.utils.data import SequentialSampler
from transformers import Trainer, TrainingArguments

import deltatune
from deltatune.methods.registry import unwrap_optimizer
from deltatune.train import loop
from deltatune.train.accumulate import labelled_items, window_share
from deltatune.train.collate import IGNORE_INDEX, pad_collate
from deltatune.train.config import TrainConfig
from deltatune.train.evaluate import MODEL_INPUTS
from deltatune.train.integration import DeltaTuneCallback, make_optimizer
from deltatune.train.tasks import build_task

ROWS = 8  # one optimiser step: 8 × 1 against 2 × 4


# --------------------------------------------------------------------------------------------------
# the counting and the weight, by hand
# --------------------------------------------------------------------------------------------------
def test_labelled_items_are_counted_as_each_loss_counts_them() -> None:
    lm = torch.tensor([[5, 6, 7, IGNORE_INDEX], [IGNORE_INDEX, IGNORE_INDEX, 8, 9]])
    assert labelled_items(lm, is_lm=True) == 2 + 2  # shifted: position 0 predicts nothing
    assert labelled_items(lm, is_lm=False) == 3 + 2  # token classification: every labelled position
    assert labelled_items(torch.tensor([0, 2, 1]), is_lm=False) == 3  # a label per row
    assert labelled_items(torch.tensor([0.5, 1.5]), is_lm=False) == 2  # regression


def test_window_share_weighs_by_items_and_an_empty_micro_batch_weighs_nothing() -> None:
    x = torch.tensor(2.0, requires_grad=True)
    assert float(window_share(x * 3, items=3, total=12).detach()) == pytest.approx(6.0 * 3 / 12)
    assert window_share(x, items=5, total=5) is x  # the whole window: the loss itself (grad_accum 1 unchanged)
    assert torch.equal(window_share(x * 1.0, items=4, total=16), x * 1.0 / 4)  # equal micro-batches: / k exactly
    logits = torch.randn(3, 4, requires_grad=True)
    empty = torch.nn.functional.cross_entropy(logits, torch.full((3,), IGNORE_INDEX))  # 0/0
    share = window_share(empty, items=0, total=7)
    assert float(share.detach()) == 0.0
    share.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


# --------------------------------------------------------------------------------------------------
# one step of deltatune's loop: b × k against b·k × 1
# --------------------------------------------------------------------------------------------------
def _qa(path) -> str:
    """Prompt/response rows whose responses have 2 to ~26 tokens: micro-batches of very different token counts."""
    r = random.Random(1)
    with open(path, "w") as f:
        for i in range(64):
            f.write(json.dumps({"prompt": f"Q: {i}?", "response": " " + "alpha beta gamma " * r.choice([0, 8])
                                + "ok"}) + "\n")
    return str(path)


def _conll(path) -> str:
    """Sentences of 2 to 12 words (1 to 3 entities): micro-batches of very different labelled-token counts."""
    r = random.Random(2)
    blocks = []
    for i in range(40):
        words, tags = ["Ann", "saw"], ["B-person", "O"]
        for _ in range(r.choice([0, 0, 2, 5])):
            words += ["the", "Paris"] if i % 2 else ["a", "Rome"]
            tags += ["O", "B-location"]
        blocks.append("".join(f"{w}\t{t}\n" for w, t in zip(words, tags, strict=True)))
    path.write_text("\n".join(blocks))
    return str(path)


def _classify(path) -> str:
    words = ["happy glad great", "angry mad furious"]
    path.write_text("".join(json.dumps({"text": " ".join(words[i % 2].split()[: 1 + i % 3]) + f" day {i}",
                                        "label": words[i % 2].split()[0]}) + "\n" for i in range(40)))
    return str(path)


def _task_cfg(kind: str, tmp_path, tiny_lm_dir, minilm_path) -> dict:
    if kind == "jsonl":
        data = _qa(tmp_path / "qa.jsonl")
        return dict(model=str(tiny_lm_dir), task="jsonl", data=data, max_length=32)
    data = _conll(tmp_path / "train.conll") if kind == "tokens" else _classify(tmp_path / "train.jsonl")
    return dict(model=minilm_path, task=kind, data=data, eval_data=data, max_length=24)


@pytest.fixture
def no_dropout(monkeypatch):
    """MiniLM's dropout off: batches of 8 and of 2 draw its masks differently, nothing else differs."""
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    for auto in (AutoModelForSequenceClassification, AutoModelForTokenClassification):
        load = auto.from_pretrained.__func__

        def from_pretrained(cls, *args, _load=load, **kwargs):
            kwargs.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
            return _load(cls, *args, **kwargs)

        monkeypatch.setattr(auto, "from_pretrained", classmethod(from_pretrained))


def _first_step(monkeypatch, cfg: TrainConfig, method_config) -> tuple[torch.Tensor, float]:
    """The gradient the first optimiser step of ``loop.train(cfg)`` uses, and its logged loss."""
    grads: list[torch.Tensor] = []
    real = loop.step_lrs

    def capture(optimizer):  # called right before optimizer.step(), after the window's backward passes
        if not grads:
            inner = unwrap_optimizer(optimizer)
            grads.append(torch.cat([p.grad.detach().flatten().clone() for g in inner.param_groups
                                    for p in g["params"] if p.grad is not None]))
        return real(optimizer)

    monkeypatch.setattr(loop, "step_lrs", capture)
    result = loop.train(cfg, method_config)
    return grads[0], result.history[0]["loss"]


@pytest.mark.parametrize("kind", ["jsonl", "tokens", "classify"])
def test_a_window_of_micro_batches_has_the_gradient_of_one_batch_of_its_rows(kind, tmp_path, monkeypatch, no_dropout,
                                                                              tiny_lm_dir, minilm_path, one_thread):
    base = dict(_task_cfg(kind, tmp_path, tiny_lm_dir, minilm_path), max_steps=1, eval_every=0, eval_before=False,
                progress=False, checkpoint_every=0, keep_best=False, warmup_ratio=0.0, eval_limit=4)
    mc = deltatune.LoRAConfig(r=2, dropout=0.0)
    whole, whole_loss = _first_step(monkeypatch, TrainConfig(out_dir=str(tmp_path / "b8"), batch_size=ROWS,
                                                             grad_accum=1, **base), mc)
    accumulated, accumulated_loss = _first_step(monkeypatch, TrainConfig(out_dir=str(tmp_path / "b2x4"),
                                                                         batch_size=2, grad_accum=4, **base), mc)
    assert float(whole.norm()) > 0
    assert float((whole - accumulated).norm() / whole.norm()) < 1e-5
    assert accumulated_loss == pytest.approx(whole_loss, rel=1e-5)  # the window's item-weighted mean


# --------------------------------------------------------------------------------------------------
# deltatune's loop and HF Trainer with the callback agree under accumulation (causal LM)
# --------------------------------------------------------------------------------------------------
class _InOrder(Trainer):
    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


STEPS, BATCH, ACCUM, LR = 3, 2, 4, 1e-2


@pytest.mark.parametrize("method", ["lora", "mixlora"])
def test_the_trainer_route_trains_the_same_delta_under_accumulation(method, tmp_path, tiny_lm_dir, one_thread):
    """MixLoRA also checks the load-balancing loss: the window's mean on both routes."""
    mc = deltatune.make_config(method, {"r": 2, "dropout": 0.0} if method == "lora" else
                               {"r": 2, "dropout": 0.0, "num_experts": 4, "top_k": 1, "aux_loss_coef": 1.0})
    cfg = TrainConfig(model=str(tiny_lm_dir), task="jsonl", data=_qa(tmp_path / "qa.jsonl"), max_length=32,
                      out_dir=str(tmp_path / "ours"), max_steps=STEPS, batch_size=BATCH, grad_accum=ACCUM, lr=LR,
                      lr_schedule="constant", warmup_ratio=0.0, eval_every=0, eval_before=False,
                      checkpoint_every=0, progress=False, keep_best=False)
    ours = loop.train(cfg, mc).delta

    from accelerate.utils import set_seed

    set_seed(cfg.seed)  # as the loop builds its model, delta and data order
    task = build_task(cfg)
    set_seed(cfg.seed)
    model = task.load_model()
    delta = deltatune.attach(model, mc)
    gen = torch.Generator().manual_seed(cfg.seed * 100_003)
    rows = task.train.select(torch.randperm(len(task.train), generator=gen).tolist()[:STEPS * BATCH * ACCUM])
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=BATCH,
                             gradient_accumulation_steps=ACCUM, max_steps=STEPS, learning_rate=LR,
                             lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0,
                             save_strategy="no", report_to=[], use_cpu=True, logging_strategy="no",
                             remove_unused_columns=False, seed=cfg.seed)
    trainer = _InOrder(model=model, args=args, train_dataset=rows, callbacks=[DeltaTuneCallback(delta)],
                       data_collator=lambda feats: pad_collate([{k: f[k] for k in MODEL_INPUTS if k in f}
                                                                for f in feats], task.pad_token_id),
                       optimizers=(make_optimizer(model, delta, LR), None))
    assert trainer.model_accepts_loss_kwargs  # the Trainer normalises by num_items_in_batch
    start = {name: {k: t.clone() for k, t in part.state().items()} for name, part in delta.parts.items()}
    trainer.train()
    assert set(delta.parts) == set(ours.parts)
    moved = 0.0
    for name in ours.parts:
        a, b = ours.parts[name].state(), delta.parts[name].state()
        for key in a:
            if a[key].is_floating_point():
                assert torch.allclose(a[key], b[key], atol=2e-6, rtol=1e-4), f"{name}.{key}"
                moved = max(moved, float((b[key] - start[name][key]).abs().max()))
    assert moved > 1e-3  # the steps really trained
