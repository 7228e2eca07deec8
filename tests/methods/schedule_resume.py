"""Shared by the LIFT, SaRA, LISA and SpIEL-MA tests: the real training loop on MiniLM / SST-2, crashed after a
schedule event and resumed from the checkpoint before it, gives the uninterrupted run's delta bit for bit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import deltatune as dt
from deltatune.methods import get_method
from deltatune.methods.registry import TrainHook
from deltatune.train import loop
from deltatune.train.config import TrainConfig

SMALL = dict(train_limit=64, eval_limit=16, eval_every=0, eval_before=False, max_length=24, batch_size=4,
             progress=False, max_steps=6, checkpoint_every=3, lr=1e-3)


def crash_and_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str, config: dict[str, Any],
                     crash_after: int = 5) -> dt.Delta:
    """Train ``method`` straight and crashed-then-resumed; assert equal digests and tensors; return the delta."""
    mc = dt.make_config(method, config)
    full = loop.train(TrainConfig(out_dir=str(tmp_path / "a"), **SMALL), mc)
    armed = [True]

    class Crash(TrainHook):
        def after_step(self, step: int) -> None:
            if armed[0] and step == crash_after:
                raise KeyboardInterrupt

    cls = type(get_method(method))
    original = cls.hooks
    monkeypatch.setattr(cls, "hooks", lambda self, *a, **k: original(self, *a, **k) + [Crash()])
    with pytest.raises(KeyboardInterrupt):
        loop.train(TrainConfig(out_dir=str(tmp_path / "b"), **SMALL), mc)
    armed[0] = False
    resumed = loop.train(TrainConfig(out_dir=str(tmp_path / "b"), resume=True, **SMALL), mc)
    assert resumed.delta.metrics["digest"] == full.delta.metrics["digest"]
    a, b = dt.load_delta(tmp_path / "a" / "delta"), dt.load_delta(tmp_path / "b" / "delta")
    assert set(a.parts) == set(b.parts)
    for name, part in a.parts.items():
        got = b.parts[name].state()
        assert all(torch.equal(got[k], v) for k, v in part.state().items()), name
    return a
