"""TIES' and PCB's global trim (the ``paper`` preset: one threshold per task vector, ``k = ⌊ρ·N_t⌋``) trims a
fine-tune given as a delta and the same fine-tune given as a merged checkpoint to the same entries: a tensor no
input changes counts in no ``N_t`` (the checkpoint's untouched tensors counted as zeros, so the same density kept
~50 % more entries: 62 % relative L2 apart on three LoRAs in the review's script)."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_delta, tiny_llama

import deltatune
from deltatune.algebra import merge
from deltatune.algebra.checkpoint import CheckpointReader
from deltatune.api import apply_to_checkpoint


@pytest.mark.parametrize("method", ["ties", "pcb"])
def test_a_delta_and_its_merged_checkpoint_trim_alike(tmp_path, method):
    tiny_llama(0).save_pretrained(tmp_path / "base")
    deltas, checkpoints = [], []
    for seed in (1, 2, 3):
        model = tiny_llama(0)
        delta = randomize_delta(model, deltatune.LoRAConfig(r=2, alpha=4.0, targets=["q_proj", "down_proj"]),
                                seed, 0.1)
        delta.provenance.base = str(tmp_path / "base")
        deltas.append(delta)
        apply_to_checkpoint(delta, tmp_path / f"ft{seed}", model=str(tmp_path / "base"))
        checkpoints.append(str(tmp_path / f"ft{seed}"))
    options = dict(base=str(tmp_path / "base"), preset="paper", output="checkpoint",
                   input_params=[{"density": 0.3}] * 3, weights=[1.0, 0.5, 2.0])
    from_deltas = CheckpointReader(merge(deltas, method, out=tmp_path / "d", **options))
    from_checkpoints = CheckpointReader(merge(checkpoints, method, out=tmp_path / "c", **options))
    base = CheckpointReader(tmp_path / "base")
    changed = 0
    for key in base.names():
        a, b = from_deltas.get(key), from_checkpoints.get(key)
        changed += int((a != base.get(key)).sum())
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert changed > 0
