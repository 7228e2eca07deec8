"""Slow tier: the behaviour the papers claim, reproduced at our small scale on real data.

SpIEL (Ansell et al., 2024) finds sparse fine-tuning at LoRA's parameter count as good as or better
than LoRA.  At our scale single-seed runs scatter by about ±1.4 points (872 dev rows), and across our
benchmarks sparse lands within about one point of LoRA on either side, so the test checks parity
(sparse no more than 1.5 points below LoRA), not superiority.  Setup: MiniLM on SST-2, LoRA r=8 on
every linear layer vs SpIEL with exactly LoRA's trainable count on the same modules, same steps,
batches and seed; dev accuracy on all 872 rows.
"""

from __future__ import annotations

import pytest

import deltatune as dt
from deltatune.train import loop
from deltatune.train.config import TrainConfig

pytestmark = pytest.mark.slow

STEPS = 300


def _run(tmp_path, name: str, method_config, lr: float) -> float:
    cfg = TrainConfig(out_dir=str(tmp_path / name), max_steps=STEPS, batch_size=16, max_length=64, lr=lr,
                      lr_schedule="constant", warmup_ratio=0.0, eval_every=0, eval_before=False,
                      checkpoint_every=0, progress=False)
    return loop.train(cfg, method_config).final["accuracy"]


def test_sparse_matches_or_beats_lora_at_equal_trainable_count(tmp_path, data_dir, minilm):
    lora_cfg = dt.LoRAConfig(r=8, alpha=8)
    lora_count = dt.attach(minilm, lora_cfg).trainable_count
    lora_acc = _run(tmp_path, "lora", lora_cfg, lr=5e-4)  # each method at its best LR of
    sparse_acc = _run(tmp_path, "sparse", dt.SparseConfig(num_tunable=lora_count), lr=5e-4)  # sst2_lr_sweep
    assert lora_acc > 0.78  # both actually learned the task
    assert sparse_acc >= lora_acc - 0.015, (sparse_acc, lora_acc)
