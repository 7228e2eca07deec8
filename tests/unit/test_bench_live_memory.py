"""benchmarks/_common.LiveTensorPeak (the CPU counterpart of max_memory_allocated) and train_step.py's live pass."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
MB = 2**20


def _meter(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    from _common import LiveTensorPeak

    return LiveTensorPeak()


def test_peak_is_the_largest_live_sum_not_the_total_allocated(monkeypatch) -> None:
    before = torch.empty(5 * MB, dtype=torch.uint8)
    meter = _meter(monkeypatch)
    meter.start()
    a = torch.empty(1 * MB, dtype=torch.uint8)
    b = torch.empty(3 * MB, dtype=torch.uint8)  # live: 4 MB — the peak
    del a, b
    c = torch.empty(2 * MB, dtype=torch.uint8)  # live: 2 MB (6 MB allocated in all)
    del before  # allocated before start: its free is not counted against the peak
    assert meter.stop() == 4.0
    assert meter.peak_bytes == 4 * MB
    del c


def test_stop_without_start_is_refused(monkeypatch) -> None:
    with pytest.raises(RuntimeError, match="without start"):
        _meter(monkeypatch).stop()


def test_train_step_writes_live_memory_beside_peak_rss(tmp_path, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(BENCH))
    import train_step

    out = tmp_path / "ts.json"
    assert train_step.main(["--models", "llama_50m", "--steps", "2", "--only", "peft_lora", "deltatune_sparse",
                            "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {r["name"]: r for r in report["rows"]}
    assert set(rows) == {"peft_lora", "deltatune_sparse"}
    assert all(r["live_mb"] > 0 and r["peak_mb"] > 0 for r in rows.values())
    assert rows["peft_lora"]["live_vs_peft_lora"] == 1
    assert rows["deltatune_sparse"]["live_vs_peft_lora"] == round(
        rows["deltatune_sparse"]["live_mb"] / rows["peft_lora"]["live_mb"], 3)
    assert "live_mb" in out.with_suffix(".md").read_text()
    sys.modules.pop("train_step", None)
