"""benchmarks/_common.LiveTensorPeak (the CPU counterpart of max_memory_allocated) and train_step.py's live pass."""

from __future__ import annotations

import json
import sys
import time
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


def _counting_job(tag: str, steps: int):
    """A run_lockstep job: set up, ``steps`` resumes; returns its tag, pid and start and end times."""
    import os

    start = time.monotonic()
    yield
    for _ in range(steps):
        yield
    return tag, os.getpid(), start, time.monotonic()


def _killed_job():
    """A run_lockstep job killed outright after set-up (as the OOM killer does), while a process it forked
    still holds its end of the pipe open, so the parent never sees end-of-file."""
    import os
    import signal

    yield
    if os.fork() == 0:
        time.sleep(15)
        os._exit(0)
    os.kill(os.getpid(), signal.SIGKILL)
    yield


def test_lockstep_groups_keep_job_order_and_cap_live_processes(monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(BENCH))
    from _common import run_lockstep

    jobs = [(_counting_job, (f"j{i}", 2)) for i in range(5)]
    results = run_lockstep(jobs, max_procs=2)
    assert [r[0] for r in results] == ["j0", "j1", "j2", "j3", "j4"]
    assert len({r[1] for r in results}) == 5  # a fresh process per job
    # groups j0 j1 | j2 j3 | j4: a group's processes start only after the previous group's have finished
    assert min(results[2][2], results[3][2]) > max(results[0][3], results[1][3])
    assert results[4][2] > max(results[2][3], results[3][3])
    with pytest.raises(ValueError, match="max_procs"):
        run_lockstep(jobs, max_procs=0)


def test_lockstep_reports_a_worker_killed_by_sigkill_instead_of_hanging(monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(BENCH))
    from _common import run_lockstep

    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="exit code -9"):
        run_lockstep([(_counting_job, ("a", 3)), (_killed_job, ())])
    assert time.monotonic() - t0 < 10  # the pipe stays open for 15 s: a bare recv() would have waited that long
