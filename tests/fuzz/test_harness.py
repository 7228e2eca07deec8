"""The fuzzer's judge: a loader that accepts damage silently, or raises an untyped error, is caught."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fuzz import targets as targets_mod
from fuzz.runner import plan, signatures, summarise
from fuzz.targets import Target
from fuzz.worker import Worker


def _trusting(path: Path) -> dict:
    """A loader that checks nothing: damage either raises a raw exception or loads silently."""
    return json.loads((path / "m.json").read_text())


def _typed(path: Path) -> dict:
    from deltatune.errors import ConfigError

    try:
        doc = json.loads((path / "m.json").read_text())
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ConfigError(f"{path}: bad JSON") from exc
    if json.dumps(doc) != json.dumps({"scale": 2.0, "shape": [3, 4]}):  # 4.0 is not 4: the judge sees types
        raise ConfigError(f"{path}: not the expected document")
    return doc


@pytest.fixture
def toy(tmp_path, monkeypatch) -> Path:
    orig = tmp_path / "orig"
    orig.mkdir()
    (orig / "m.json").write_text(json.dumps({"scale": 2.0, "shape": [3, 4]}))
    for name, load, strict in (("trusting-strict", _trusting, True), ("trusting-lenient", _trusting, False),
                               ("typed", _typed, True)):
        monkeypatch.setitem(targets_mod.TARGETS, name, Target(name, load, strict, "toy"))
    return orig


def _run(target: str, orig: Path, tmp_path: Path, n: int = 150) -> list[dict]:
    worker = Worker({target: [str(orig)]})
    return [worker.run_one(t, seed, str(orig), str(tmp_path / f"m{seed}")) for t, seed in plan([target], n)]


def test_silent_and_untyped_failures_are_reported(toy, tmp_path) -> None:
    records = _run("trusting-strict", toy, tmp_path)
    row = summarise(records)[0]
    assert row["silent"] > 10 and row["other"] > 10 and row["typed"] == 0
    sig = signatures(records)
    assert {s["outcome"] for s in sig} == {"silent", "other"}
    assert all(s["seed"] in {r["seed"] for r in records} for s in sig)


def test_lenient_targets_may_change_values_but_not_to_nan(toy, tmp_path) -> None:
    records = _run("trusting-lenient", toy, tmp_path)
    outcomes = {r["outcome"] for r in records}
    assert "valid" in outcomes
    silent = [r for r in records if r["outcome"] == "silent"]
    assert silent and all("invalid" in r["message"] for r in silent)
    nan_loads = [r for r in records if r["outcome"] == "valid" and "nan" in r.get("kind", "")]
    assert not nan_loads, "a NaN that loads must count as a failure"


def test_a_loader_that_types_every_error_passes(toy, tmp_path) -> None:
    records = _run("typed", toy, tmp_path)
    assert not signatures(records)
    assert {r["outcome"] for r in records} <= {"typed", "identical"}


def test_pool_reports_hangs_allocation_bombs_and_crashes(tmp_path, monkeypatch) -> None:
    """Real worker processes: a loader that hangs is killed after the time limit, one that allocates 4 GB
    is stopped by the address-space cap, one that kills its process is reported, and the pool goes on."""
    from fuzz.runner import Pool

    orig = tmp_path / "orig"
    orig.mkdir()
    (orig / "m.json").write_text(json.dumps({"a": 1}))
    monkeypatch.setenv("DELTATUNE_FUZZ_EXTRA", "fuzz.toy_targets")
    names = ["toy-sleepy", "toy-hog", "toy-crash"]
    import fuzz.toy_targets  # noqa: F401 - registers the toy targets here too (to describe a dead worker's mutant)

    pool = Pool({n: [str(orig)] for n in names}, workers=1, timeout=3.0, mem_mb=512)
    try:
        records = pool.run([(n, 7) for n in names], tmp_path / "work")
    finally:
        pool.close()
    got = {r["target"]: r for r in records}
    assert got["toy-sleepy"]["outcome"] == "hang" and "3 s" in got["toy-sleepy"]["message"]
    assert got["toy-hog"]["outcome"] == "memory", got["toy-hog"]
    assert got["toy-crash"]["outcome"] == "other" and "died" in got["toy-crash"]["message"]
    assert all(r["seed"] == 7 and r["kind"] != "?" for r in records)
