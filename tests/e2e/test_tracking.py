"""``metrics.jsonl`` is always written (one line per step and per evaluation, flushed), a resumed run keeps
no step twice, and ``report_to=["tensorboard"]`` writes TensorBoard event files through accelerate."""

from __future__ import annotations

import json

import pytest

import deltatune
from deltatune.errors import ConfigError
from deltatune.train import loop
from deltatune.train.config import TrainConfig
from deltatune.train.tracking import METRICS_FILE, flatten

WORDS = ["happy glad", "angry mad", "scared afraid"]


def _config(tmp_path, minilm_path, **kw) -> TrainConfig:
    data = tmp_path / "train.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps({"text": f"{WORDS[i % 3]} {i}", "label": i % 3}) + "\n" for i in range(40)))
    base = dict(model=minilm_path, task="classify", data=str(data), out_dir=str(tmp_path / "run"), max_steps=4,
                batch_size=8, max_length=16, eval_every=2, checkpoint_every=2, progress=False, keep_best=False)
    return TrainConfig(**(base | kw))


def _lines(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "run" / METRICS_FILE).read_text().splitlines()]


def test_metrics_jsonl_and_tensorboard(tmp_path, minilm_path):
    pytest.importorskip("tensorboard")
    loop.train(_config(tmp_path, minilm_path, report_to=["tensorboard"]), deltatune.LoRAConfig(r=2))
    lines = _lines(tmp_path)
    assert [entry["step"] for entry in lines] == [0, 1, 2, 3, 4]
    assert set(lines[0]) == {"step", "eval"} and "accuracy" in lines[0]["eval"]  # the base, before training
    assert all({"loss", "lr"} <= set(entry) for entry in lines[1:])
    assert [("eval" in entry) for entry in lines[1:]] == [False, True, False, True]
    events = list((tmp_path / "run" / "logs").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_a_resumed_run_keeps_each_step_once(tmp_path, minilm_path):
    cfg = _config(tmp_path, minilm_path)
    loop.train(cfg, deltatune.LoRAConfig(r=2))
    first = _lines(tmp_path)
    # as after a crash between the step-2 checkpoint and the end: the later lines are there, the run resumes at 2
    loop.train(_config(tmp_path, minilm_path, resume=True), deltatune.LoRAConfig(r=2))
    again = _lines(tmp_path)
    assert [e["step"] for e in again] == [0, 1, 2, 3, 4]
    assert again[:3] == first[:3]
    assert [e["loss"] for e in again[3:]] == pytest.approx([e["loss"] for e in first[3:]], abs=1e-6)


def test_unknown_or_missing_tracker_is_a_config_error(tmp_path, minilm_path):
    with pytest.raises(ConfigError, match="unknown tracker 'nope'"):
        _config(tmp_path, minilm_path, report_to=["nope"])
    assert flatten({"step": 3, "loss": 1.0, "eval": {"accuracy": 0.5}}) == {"loss": 1.0, "eval/accuracy": 0.5}


def test_bf16_mixed_precision_run(tmp_path, minilm_path):
    """``mixed_precision="bf16"``: the loop trains under bf16 autocast (CPU here); the delta stays fp32 and its
    loss tracks the fp32 run's."""
    import torch

    fp32 = loop.train(_config(tmp_path, minilm_path, out_dir=str(tmp_path / "fp32"), eval_every=0),
                      deltatune.LoRAConfig(r=2))
    bf16 = loop.train(_config(tmp_path, minilm_path, out_dir=str(tmp_path / "bf16"), eval_every=0,
                              mixed_precision="bf16"), deltatune.LoRAConfig(r=2))
    assert all(t.dtype == torch.float32 for p in bf16.delta.parts.values() for t in p.state().values())
    assert bf16.history[-1]["loss"] == pytest.approx(fp32.history[-1]["loss"], rel=0.05)
    assert bf16.history[-1]["loss"] != fp32.history[-1]["loss"]  # autocast really ran
