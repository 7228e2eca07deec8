"""deltatune inside HF ``Trainer`` and a plain PyTorch loop: the same data, seed and steps give the same delta as
deltatune's own loop (SpIEL sparse with drop/regrow: the hooks really run), the callback saves the delta in
deltatune's format with its trained head, and a trainer optimizer that is not the method's gets a warning."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch.utils.data import SequentialSampler
from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments

import deltatune
from deltatune.train import loop
from deltatune.train.collate import pad_collate
from deltatune.train.config import TrainConfig
from deltatune.train.integration import DeltaTuneCallback, make_optimizer, prepare
from deltatune.train.tasks import build_task

STEPS, BATCH, LR = 6, 8, 5e-3
SPARSE = dict(num_tunable=3000, reselection_steps=2, accumulation_steps=1, initial_reselection_rate=0.3)
WORDS = ["happy glad great", "angry mad furious", "scared afraid nervous"]


@pytest.fixture
def no_dropout(monkeypatch):
    """Dropout off everywhere: the routes consume the global RNG differently (Trainer reseeds), nothing else."""
    load = AutoModelForSequenceClassification.from_pretrained.__func__

    def from_pretrained(cls, *args, **kwargs):
        kwargs.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
        return load(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForSequenceClassification, "from_pretrained", classmethod(from_pretrained))


def _cfg(tmp_path, minilm_path, name: str) -> TrainConfig:
    data = tmp_path / "train.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps({"text": f"{WORDS[i % 3].split()[i % 3]} day {i}", "label": WORDS[i % 3]
                                            .split()[0]}) + "\n" for i in range(80)))
    return TrainConfig(model=minilm_path, task="classify", data=str(data), out_dir=str(tmp_path / name),
                       max_steps=STEPS, batch_size=BATCH, max_length=16, lr=LR, lr_schedule="constant",
                       warmup_ratio=0.0, eval_every=0, eval_before=False, checkpoint_every=0, progress=False,
                       keep_best=False)


def _route_inputs(cfg: TrainConfig):
    """The model, delta and batches (in deltatune's loop order) that the loop builds from ``cfg``."""
    from accelerate.utils import set_seed

    set_seed(cfg.seed)
    task = build_task(cfg)
    set_seed(cfg.seed)
    model = task.load_model()
    delta = deltatune.attach(model, deltatune.SparseConfig(**SPARSE))
    gen = torch.Generator().manual_seed(cfg.seed * 100_003)
    order = torch.randperm(len(task.train), generator=gen).tolist()[:STEPS * BATCH]
    return task, model, delta, task.train.select(order)


def _assert_same(a: deltatune.Delta, b: deltatune.Delta) -> None:
    assert set(a.parts) == set(b.parts)
    for name in a.parts:
        sa, sb = a.parts[name].state(), b.parts[name].state()
        assert torch.equal(sa["indices"], sb["indices"]), f"{name}: the support differs (regrow)"
        assert torch.allclose(sa["values"], sb["values"], atol=1e-5), name
    for h in a.heads:
        for k, v in a.heads[h].items():
            assert torch.allclose(v, b.heads[h][k], atol=1e-5)


class _InOrder(Trainer):
    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


def test_trainer_with_the_callback_matches_deltatunes_loop(tmp_path, minilm_path, no_dropout):
    ours = loop.train(_cfg(tmp_path, minilm_path, "ours"), deltatune.SparseConfig(**SPARSE)).delta
    cfg = _cfg(tmp_path, minilm_path, "trainer")
    task, model, delta, rows = _route_inputs(cfg)
    start = {n: p.state()["indices"].clone() for n, p in delta.parts.items()}
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=BATCH,
                             max_steps=STEPS, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
                             weight_decay=0.0, max_grad_norm=0.0, save_strategy="no", report_to=[], use_cpu=True,
                             logging_strategy="no", remove_unused_columns=False, seed=cfg.seed)
    callback = DeltaTuneCallback(delta)
    trainer = _InOrder(model=model, args=args, train_dataset=rows, callbacks=[callback],
                       data_collator=lambda feats: pad_collate(feats, task.pad_token_id),
                       optimizers=(make_optimizer(model, delta, LR), None))
    trainer.train()
    assert callback.schedule.calls == STEPS and len(callback.schedule.hooks) == 1
    assert any(not torch.equal(start[n], p.state()["indices"]) for n, p in delta.parts.items()), "no regrow ran"
    saved = deltatune.load_delta(tmp_path / "trainer" / "delta")
    _assert_same(saved, ours)  # the callback saved it, with the trained head (live heads)
    _assert_same(delta, ours)


def test_a_plain_loop_with_prepare_matches_deltatunes_loop(tmp_path, minilm_path, no_dropout):
    ours = loop.train(_cfg(tmp_path, minilm_path, "ours"), deltatune.SparseConfig(**SPARSE)).delta
    cfg = _cfg(tmp_path, minilm_path, "plain")
    task, model, delta, rows = _route_inputs(cfg)
    optimizer, schedule = prepare(model, delta, lr=LR, total_steps=STEPS)
    model.train()
    for step in range(STEPS):
        batch = pad_collate([rows[i] for i in range(step * BATCH, (step + 1) * BATCH)], task.pad_token_id)
        with schedule.step(step):
            loss = model(**batch).loss
            aux = delta.aux_loss()
            (loss if aux is None else loss + aux).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    delta.save(tmp_path / "plain" / "delta")  # no snapshot_heads: the delta reads its live head
    _assert_same(deltatune.load_delta(tmp_path / "plain" / "delta"), ours)


def test_a_trainer_optimizer_that_is_not_the_methods_is_warned(tmp_path, minilm_path):
    cfg = _cfg(tmp_path, minilm_path, "warn")
    _, model, delta, _ = _route_inputs(cfg)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from deltatune.train.integration import schedule_for

        schedule_for(model, delta, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]), 4)
    assert any("SparseAdamW" in str(w.message) and "AdamW" in str(w.message) for w in caught)


def test_trl_sft_trainer_with_the_callback(tmp_path, minilm_path):
    """TRL's SFTTrainer trains a deltatune LoRA on a causal LM; the callback saves it, and the saved delta on a
    fresh base reproduces the trained model's logits."""
    trl = pytest.importorskip("trl")
    import datasets
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    def base() -> LlamaForCausalLM:
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=30522, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    tokenizer.eos_token = "[SEP]"  # a WordPiece tokenizer stands in for an LM's: SFT appends EOS
    model = base()
    delta = deltatune.attach(model, deltatune.LoRAConfig(r=2))
    rows = datasets.Dataset.from_dict({"text": [f"{WORDS[i % 3]} and a day {i}" for i in range(24)]})
    args = trl.SFTConfig(output_dir=str(tmp_path / "sft"), per_device_train_batch_size=4, max_steps=3,
                         learning_rate=1e-2, save_strategy="no", report_to=[], use_cpu=True, logging_strategy="no",
                         max_length=16, bf16=False)
    callback = DeltaTuneCallback(delta)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer,
                             callbacks=[callback], optimizers=(make_optimizer(model, delta, 1e-2), None))
    trainer.train()
    assert callback.schedule.calls == 3
    saved = deltatune.load_delta(tmp_path / "sft" / "delta")
    fresh = base()
    deltatune.apply_delta(fresh, saved)
    ids = tokenizer(["happy glad day"], return_tensors="pt")["input_ids"]
    model.eval()
    with torch.no_grad():
        assert torch.allclose(fresh(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)
        assert not torch.allclose(base()(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-4)


@pytest.mark.parametrize("method", ["lora", "lisa"])
def test_resuming_a_trainer_run_is_refused_where_the_schedule_holds_state(tmp_path, method):
    """A Trainer checkpoint carries the model and optimizer, not the schedule's state (LISA's active and visited
    blocks, the parts made for them): resuming such a run is a ConfigError; a stateless method (LoRA) resumes."""
    import datasets
    from conftest import tiny_llama

    from deltatune.errors import ConfigError

    ids = torch.randint(1, 100, (16, 8), generator=torch.Generator().manual_seed(0)).tolist()
    rows = datasets.Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * 8] * 16, "labels": ids})
    config = deltatune.make_config(method, {"layers": 1, "interval": 1} if method == "lisa" else {"r": 2})

    def trainer(max_steps: int) -> Trainer:
        model = tiny_llama()
        delta = deltatune.attach(model, config)
        args = TrainingArguments(output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=4,
                                 save_strategy="steps", save_steps=1, report_to=[], use_cpu=True, disable_tqdm=True)
        return Trainer(model=model, args=args, train_dataset=rows, callbacks=[DeltaTuneCallback(delta)],
                       optimizers=(make_optimizer(model, delta, lr=1e-3), None))

    trainer(1).train()
    if method == "lisa":
        with pytest.raises(ConfigError, match="resuming a Trainer run of the lisa method at step 1"):
            trainer(2).train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
    else:
        trainer(2).train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
        assert (tmp_path / "checkpoint-2" / "delta" / "manifest.json").is_file()


def test_the_aux_loss_weighs_the_same_under_gradient_accumulation_in_a_trainer(tmp_path) -> None:
    """A causal LM takes ``num_items_in_batch`` from the Trainer, which then does not divide its loss by the
    accumulation steps: MixLoRA's load-balancing loss added to each micro-batch weighed ×2 at 2 steps. Now the
    loss the Trainer backpropagates for two identical rows is the same at batch 2 as at 2 × batch 1."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from deltatune.methods.mixlora import MixLoRAConfig

    ids = torch.randint(0, 64, (8,), generator=torch.Generator().manual_seed(1))
    rows = [{"input_ids": ids, "labels": ids} for _ in range(2)]

    def collate(features):
        return {k: torch.stack([f[k] for f in features]) for k in ("input_ids", "labels")}

    losses = {}
    for accumulation, batch in ((1, 2), (2, 1)):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64))
        delta = deltatune.attach(model, MixLoRAConfig(num_experts=4, top_k=1, r=2, dropout=0.0, aux_loss_coef=10.0,
                                                      seed=0))
        args = TrainingArguments(output_dir=str(tmp_path / f"ga{accumulation}"), per_device_train_batch_size=batch,
                                 gradient_accumulation_steps=accumulation, max_steps=1, learning_rate=0.0,
                                 save_strategy="no", report_to=[], use_cpu=True, logging_steps=1,
                                 remove_unused_columns=False, max_grad_norm=0.0)
        trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate,
                          callbacks=[DeltaTuneCallback(delta, save_to=tmp_path / f"d{accumulation}")],
                          optimizers=(make_optimizer(model, delta, 0.0), None))
        assert trainer.model_accepts_loss_kwargs
        trainer.train()
        losses[accumulation] = next(h["loss"] for h in trainer.state.log_history if "loss" in h)
        model.train()
        with torch.no_grad():
            lm = float(model(**collate(rows)).loss)
        assert float(delta.aux_loss()) > 1.0 and losses[accumulation] > lm + 1.0  # the aux loss is in there
    assert losses[1] == pytest.approx(losses[2], rel=1e-5)
