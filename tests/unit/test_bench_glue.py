"""benchmarks/glue.py and glue_plan.py: the run plan (LR sweep at seed 0, then seeds at the best LR), the
resumable runs file, the budget rules and the aggregation, without training (a fake executor); plus one tiny
real run in fresh processes."""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))  # the script's children unpickle `glue.run_one` by module name

import glue  # noqa: E402
import glue_plan  # noqa: E402

# the scripts put benchmarks/ first on the path; move it last, so that `fuzz` stays the tests' package for the
# tests collected after this one (benchmarks/fuzz.py is a script of the same name)
sys.path[:] = [p for p in sys.path if p != str(BENCH)] + [str(BENCH)]

S = glue_plan.Settings(steps=5, seeds=3, lr_mults=(0.5, 1.0, 2.0))
LRS = [1e-4, 2e-4, 4e-4]
G = glue_plan.Group("sparse", "sst2", "r8")


def record(run: glue_plan.Run, metric: float | None, error: str | None = None, **extra) -> dict:
    rec = {"key": run.key, "method": run.method, "task": run.task, "budget": run.budget, "lr": run.lr,
           "seed": run.seed, "metric_name": "accuracy", "metric": metric, "trainable": 100, "step_s": 0.1,
           "step_mean_s": 0.12, "peak_mb": 50.0}
    if error:
        rec["error"] = error
    return rec | extra


def seed0(group: glue_plan.Group, lr: float, s: glue_plan.Settings = S) -> glue_plan.Run:
    return glue_plan._make_run(group, lr, 0, s)


def test_plan_runs_fixed_methods_once_per_task() -> None:
    groups = glue_plan.plan_groups(["lora", "sparse", "bitfit"], ["sst2", "rte"], ["r8", "r32"])
    assert len(groups) == 2 * (2 * 2 + 1)
    assert [g for g in groups if g.method == "bitfit"] == [glue_plan.Group("bitfit", "sst2", "fixed"),
                                                           glue_plan.Group("bitfit", "rte", "fixed")]
    assert glue_plan.total_runs(len(groups), 3, 3) == len(groups) * 5
    assert glue_plan.sweep_lrs(5e-4, (0.5, 1.0, 2.0)) == [2.5e-4, 5e-4, 1e-3]


def test_sweep_first_then_seeds_at_the_best_seed0_lr() -> None:
    records: dict[str, dict] = {}
    todo = glue_plan.pending_runs(G, LRS, records, S)
    assert [(r.lr, r.seed) for r in todo] == [(lr, 0) for lr in LRS]
    assert glue_plan.choose_lr(G, LRS, records, S) is None
    assert glue_plan.remaining(G, LRS, records, S) == 5
    for run, score in zip(todo[:2], (0.7, 0.9), strict=True):
        records[run.key] = record(run, score)
    assert glue_plan.choose_lr(G, LRS, records, S) is None  # sweep incomplete: no choice yet
    assert [r.lr for r in glue_plan.pending_runs(G, LRS, records, S)] == [4e-4]
    records[todo[2].key] = record(todo[2], 0.8)
    assert glue_plan.choose_lr(G, LRS, records, S) == 2e-4
    todo = glue_plan.pending_runs(G, LRS, records, S)
    assert [(r.lr, r.seed) for r in todo] == [(2e-4, 1), (2e-4, 2)]
    assert glue_plan.remaining(G, LRS, records, S) == 2
    for run in todo:
        records[run.key] = record(run, 0.85)
    assert glue_plan.pending_runs(G, LRS, records, S) == []
    assert glue_plan.remaining(G, LRS, records, S) == 0


def test_lr_choice_failed_runs_lose_and_ties_take_the_first() -> None:
    records = {seed0(G, LRS[0]).key: record(seed0(G, LRS[0]), 0.6),
               seed0(G, LRS[1]).key: record(seed0(G, LRS[1]), None, error="TrainingDiverged: nan"),
               seed0(G, LRS[2]).key: record(seed0(G, LRS[2]), 0.6)}
    assert glue_plan.choose_lr(G, LRS, records, S) == LRS[0]
    records[seed0(G, LRS[2]).key]["metric"] = 0.61
    assert glue_plan.choose_lr(G, LRS, records, S) == LRS[2]
    records[seed0(G, LRS[2]).key]["metric"] = float("nan")  # an undefined correlation never wins
    assert glue_plan.choose_lr(G, LRS, records, S) == LRS[0]
    for lr in LRS:
        records[seed0(G, lr).key] = record(seed0(G, lr), None, error="TrainingDiverged: nan")
    assert glue_plan.pending_runs(G, LRS, records, S) == [] and glue_plan.remaining(G, LRS, records, S) == 0


def test_keys_separate_settings() -> None:
    a = seed0(G, 1e-4)
    assert a.key != seed0(G, 1e-4, glue_plan.Settings(steps=6, seeds=3, lr_mults=(1.0,))).key
    assert a.key != seed0(G, 1e-4, glue_plan.Settings(5, 3, (1.0,), train_limit=32)).key
    assert a.key != glue_plan._make_run(G, 1e-4, 1, S).key
    assert a.key == glue_plan.Run("sparse", "sst2", "r8", 1e-4, 0, 5).key


def test_runs_file_appends_atomically_and_a_later_line_wins(tmp_path) -> None:
    store = glue_plan.RunStore(glue_plan.runs_path(tmp_path / "out.json"))
    assert store.path.name == "out.runs.jsonl" and store.load() == {}
    run = seed0(G, 1e-4)
    store.append(record(run, None, error="ValueError: x"))
    store.append(record(seed0(G, 2e-4), 0.5))
    store.append(record(run, 0.7))
    loaded = store.load()
    assert len(loaded) == 2 and loaded[run.key]["metric"] == 0.7
    assert len(store.path.read_text().splitlines()) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["out.runs.jsonl"]  # no temporaries left


def test_summary_mean_std_seeds_and_incomplete_sweeps() -> None:
    records = {}
    for lr, score in zip(LRS, (0.70, 0.80, 0.75), strict=True):
        records[seed0(G, lr).key] = record(seed0(G, lr), score)
    for seed, score in ((1, 0.90), (2, 0.85)):
        run = glue_plan._make_run(G, 2e-4, seed, S)
        records[run.key] = record(run, score, step_s=0.3)
    lora = glue_plan.Group("lora", "sst2", "r8")
    records[seed0(lora, LRS[0]).key] = record(seed0(lora, LRS[0]), 0.9)
    rows = glue.summarize([G, lora, glue_plan.Group("lift", "sst2", "r8")], lambda m: LRS, records, S)
    assert [r["method"] for r in rows] == ["sparse", "lora"]  # lift: nothing recorded, no row
    sp, lo = rows
    assert sp["lr"] == 2e-4 and sp["seeds"] == 3 and sp["sweep"] == "3/3" and sp["complete"]
    assert sp["metric"] == pytest.approx((0.80 + 0.90 + 0.85) / 3, abs=1e-4)
    assert sp["std"] == pytest.approx(0.05, abs=1e-4)  # sample std of 0.80, 0.90, 0.85
    assert sp["step_s"] == 0.3  # median over the seeds' medians
    assert sp["heldout"] == pytest.approx((0.90 + 0.85) / 2, abs=1e-4)  # seed 0 chose the LR: left out
    assert lo["sweep"] == "1/3" and lo["seeds"] == 1 and lo["std"] is None and not lo["complete"]


def test_averages_and_the_verdict_are_computed() -> None:
    def row(method, task, metric, budget="r8", complete=True):
        return {"method": method, "task": task, "budget": budget, "metric": metric, "trainable": 10,
                "step_s": 0.1, "peak_mb": 5.0, "complete": complete}

    rows = [row("lora", "sst2", 0.8), row("lora", "rte", 0.6), row("sparse", "sst2", 0.82), row("sparse", "rte", 0.6),
            row("s2ft", "sst2", 0.9),  # one task only: not comparable with LoRA's two
            row("lora", "sst2", 0.85, "r32"), row("lora", "rte", 0.65, "r32"), row("sparse", "sst2", 0.8, "r32"),
            row("sparse", "rte", 0.6, "r32", complete=False), row("bitfit", "sst2", 0.99, "fixed")]
    avg = {(r["method"], r["budget"]): r for r in glue.averages(rows, ["sst2", "rte"])}
    assert avg["sparse", "r8"]["metric"] == pytest.approx(0.71)
    assert avg["sparse", "r8"]["vs_lora"] == pytest.approx(0.01)
    assert avg["s2ft", "r8"]["vs_lora"] is None and avg["bitfit", "fixed"]["vs_lora"] is None
    assert avg["sparse", "r32"]["provisional"] and avg["lora", "r32"]["tasks"] == "2/2"
    lines = glue.verdicts(list(avg.values()), ["r8", "r32"])
    assert "**yes**" in lines[0] and "sparse 0.7100" in lines[0]
    assert "**no**" in lines[1] and "provisional" in lines[1]
    assert "no LoRA" in glue.verdicts(list(avg.values()), ["r8", "r32"] + ["r64"])[2]
    assert avg["s2ft", "r8"]["provisional"], "an average over 1 of 2 tasks is provisional"


def test_the_verdict_compares_unrounded_averages_and_reports_the_held_out_seeds() -> None:
    def row(method, task, metric, heldout):
        return {"method": method, "task": task, "budget": "r8", "metric": metric, "heldout": heldout,
                "trainable": 10, "step_s": 0.1, "peak_mb": 5.0, "complete": True}

    rows = [row("lora", "sst2", 0.80000, 0.79), row("sparse", "sst2", 0.79996, 0.80)]  # 0.00004 below LoRA
    avg = {r["method"]: r for r in glue.averages(rows, ["sst2"])}
    assert avg["sparse"]["vs_lora"] == 0.0 and not avg["sparse"]["ge_lora"]
    assert avg["sparse"]["heldout_vs_lora"] == pytest.approx(0.01) and avg["sparse"]["heldout_ge_lora"]
    (line,) = glue.verdicts(list(avg.values()), ["r8"])
    assert "average: **no**" in line and "did not choose the LR (seed 0 chose it): **yes**" in line


def test_budget_rules_hit_the_target() -> None:
    """Fake probes with the real counting rules' shapes: affine in the knob."""
    def probe(method, m):
        if method == "dsee":
            return 1000 * m["r"] + 7 * m["num_sparse"]
        if method == "s2ft":
            return 640 * m["o_count"] + 20 * m["d_count"]
        if method == "sara":
            return round(5000 * m["fraction"])
        raise AssertionError(method)

    assert glue_plan.budget_mapping("sparse", "r8", 4000, probe)["num_tunable"] == 4000
    assert glue_plan.budget_mapping("lift", "r32", 4000, probe)["lora_rank"] == 32
    assert glue_plan.budget_mapping("lora", "r32", None, probe) == {"r": 32, "alpha": 32.0, "targets": ["all-linear"]}
    assert glue_plan.budget_mapping("bitfit", "r8", 4000, probe) == {}
    assert abs(probe("dsee", glue_plan.budget_mapping("dsee", "r8", 8000, probe)) - 8000) <= 7
    s2 = glue_plan.budget_mapping("s2ft", "r8", 8000, probe)
    assert s2["o_count"] == 5 and abs(probe("s2ft", s2) - 8000) <= 20
    assert abs(probe("sara", glue_plan.budget_mapping("sara", "r8", 400, probe)) - 400) <= 1
    assert glue_plan.solve_affine(lambda k: 3 * k + 10, 100) == 30


class FakeExecutor:
    """Runs complete at once; sparse at 1e-3 diverges."""

    calls: list[glue_plan.Run] = []

    def __init__(self, workers: int = 1) -> None:
        self.workers = workers

    @staticmethod
    def result(run, mapping):
        FakeExecutor.calls.append(run)
        score = {2.5e-4: 0.7, 5e-4: 0.8, 1e-3: float("nan")}.get(run.lr, 0.75) + 0.01 * run.seed
        if run.method == "sparse" and run.lr == 1e-3:
            raise RuntimeError("diverged\nTrainingDiverged: loss nan at step 3")
        return {"metric_name": "accuracy", "metric": score, "metrics": {"accuracy": score},
                "trainable": mapping.get("num_tunable", 337920), "step_s": 0.1, "step_mean_s": 0.1,
                "peak_mb": 10.0, "peak_method": "fake", "wall_s": 1.0, "device": "cpu"}

    def submit(self, run, mapping, work) -> Future:
        future: Future = Future()
        try:
            future.set_result(self.result(run, mapping))
        except Exception as exc:  # noqa: BLE001 - as a child's error reaches the parent
            future.set_exception(exc)
        return future

    def close(self):
        pass


class ThreadedFake(FakeExecutor):
    """Runs take 50 ms each in threads, ``workers`` at a time; records when each started and ended."""

    spans: dict[str, tuple[float, float]] = {}
    in_flight = peak = 0
    lock = threading.Lock()

    def __init__(self, workers: int = 1) -> None:
        super().__init__(workers)
        self.pool = ThreadPoolExecutor(max_workers=8)  # more than asked: the scheduler must limit itself

    def _run(self, run, mapping):
        cls = ThreadedFake
        with cls.lock:
            cls.in_flight += 1
            cls.peak = max(cls.peak, cls.in_flight)
        t0 = time.perf_counter()
        time.sleep(0.05)
        try:
            return self.result(run, mapping)
        finally:
            with cls.lock:
                cls.in_flight -= 1
                cls.spans[run.key] = (t0, time.perf_counter())

    def submit(self, run, mapping, work) -> Future:
        return self.pool.submit(self._run, run, mapping)

    def close(self):
        self.pool.shutdown(wait=True)


def test_workers_run_at_once_and_seeds_wait_for_their_sweep(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(glue, "Executor", ThreadedFake)
    monkeypatch.setattr(glue, "Prober", lambda: (lambda method, mapping: 337920))
    out = tmp_path / "g.json"
    FakeExecutor.calls, ThreadedFake.spans, ThreadedFake.peak = [], {}, 0
    glue.main(["--tasks", "sst2", "rte", "--methods", "lora", "--budgets", "r8", "--steps", "3", "--seeds", "2",
               "--workers", "2", "--out", str(out), "--work", str(tmp_path / "work")])
    recs = glue_plan.RunStore(glue_plan.runs_path(out)).load()
    assert len(recs) == len(FakeExecutor.calls) == 2 * (3 + 1) and ThreadedFake.peak == 2  # each run once
    assert all(r["workers"] == 2 for r in recs.values())
    for task in ("sst2", "rte"):
        sweep_end = max(ThreadedFake.spans[k][1] for k, r in recs.items() if r["task"] == task and r["seed"] == 0)
        seed1 = next(k for k, r in recs.items() if r["task"] == task and r["seed"] == 1)
        assert ThreadedFake.spans[seed1][0] >= sweep_end and recs[seed1]["lr"] == 5e-4
    assert json.loads(out.read_text())["meta"]["workers"] == 2


def test_main_resumes_skipping_recorded_runs(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(glue, "Executor", FakeExecutor)
    monkeypatch.setattr(glue, "Prober", lambda: (lambda method, mapping: 337920))
    out = tmp_path / "g.json"
    argv = ["--tasks", "sst2", "--methods", "lora", "sparse", "--budgets", "r8", "--steps", "3", "--seeds", "2",
            "--out", str(out), "--work", str(tmp_path / "work")]
    FakeExecutor.calls = []
    glue.main(argv)
    assert len(FakeExecutor.calls) == 2 * (3 + 1)
    recs = glue_plan.RunStore(glue_plan.runs_path(out)).load()
    assert len(recs) == 8 and sum("error" in r for r in recs.values()) == 1
    assert recs[glue_plan.Run("lora", "sst2", "r8", 1e-3, 0, 3).key]["metric"] is None  # NaN stored as None
    assert {r.lr for r in FakeExecutor.calls if r.seed == 1} == {5e-4}  # best seed-0 LR (default 5e-4)
    FakeExecutor.calls = []
    glue.main(argv)
    assert FakeExecutor.calls == []  # everything recorded
    glue.main([*argv, "--seeds", "3"])  # one more seed: only those runs
    assert [(r.method, r.seed) for r in FakeExecutor.calls] == [("lora", 2), ("sparse", 2)]
    FakeExecutor.calls = []
    glue.main([*argv, "--retry-failed"])
    assert [(r.method, r.lr) for r in FakeExecutor.calls] == [("sparse", 1e-3)]
    report = json.loads(out.read_text())
    rows = [r for r in report["rows"] if r["task"] == "sst2"]
    assert {r["method"]: (r["seeds"], r["seeds_asked"]) for r in rows} == {"lora": (2, 2), "sparse": (2, 2)}
    assert all(math.isclose(r["metric"], 0.805) for r in rows) and report["meta"]["verdict"]
    assert "**yes**" in report["meta"]["verdict"][0]
    assert "GLUE average" in out.with_suffix(".md").read_text()


def test_quick_defaults_and_explicit_flags_win() -> None:
    args = glue.parse_args(["--quick", "--steps", "4"])
    assert args.steps == 4 and args.seeds == 1 and args.lrs == [1.0] and args.out.endswith("glue_quick.json")
    full = glue.parse_args([])
    assert full.steps == 300 and full.seeds == 3 and full.lrs == [0.5, 1.0, 2.0] and len(full.methods) == 11


@pytest.mark.slow  # 30 s measured at load 12 on the shared 2-core machine (a few seconds when idle)
def test_run_one_times_steps_and_restores_the_method(tmp_path, data_dir, minilm_path) -> None:
    """One real 1-step LoRA run on 16 SST-2 rows, in this process (no log redirection): the timing hooks come off."""
    import deltatune as dt

    run = glue_plan.Run("lora", "sst2", "r8", 5e-4, 0, 1, train_limit=16, eval_limit=16)
    rec = glue.run_one(glue.dataclasses.asdict(run), {"r": 2, "alpha": 2.0}, str(tmp_path))
    assert rec["metric_name"] == "accuracy" and 0 <= rec["metric"] <= 1 and rec["trainable"] > 0
    assert rec["step_s"] > 0 and rec["peak_mb"] >= 0 and rec["wall_s"] > 0
    assert "hooks" not in vars(dt.get_method("lora"))  # the class's own hooks again
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # 60–95 s measured on the shared 2-core machine (fresh processes, MiniLM loaded 3 times)
def test_tiny_real_run_in_fresh_processes(tmp_path, data_dir, minilm_path) -> None:
    """Two real 2-step runs (LoRA, SpIEL at LoRA's count) on 32 SST-2 rows, each in its own process, both at once."""
    out = tmp_path / "g.json"
    glue.main(["--tasks", "sst2", "--methods", "lora", "sparse", "--budgets", "r8", "--steps", "2", "--seeds", "1",
               "--lrs", "1", "--train-limit", "32", "--eval-limit", "32", "--out", str(out),
               "--work", str(tmp_path / "work"), "--workers", "2"])
    recs = list(glue_plan.RunStore(glue_plan.runs_path(out)).load().values())
    assert [r.get("error") for r in recs] == [None, None]
    assert {r["method"]: r["trainable"] for r in recs} == {"lora": 337920, "sparse": 337920}
    assert all(0 <= r["metric"] <= 1 and r["step_s"] > 0 and r["peak_mb"] > 0 for r in recs)
    env = os.environ.get("OMP_NUM_THREADS")  # else each child gets its share of the cores
    assert {r["threads"] for r in recs} == {int(env) if env else max(1, len(os.sched_getaffinity(0)) // 2)}
    assert [p.name for p in (tmp_path / "work").iterdir()] == ["logs"]  # run folders removed, logs kept
    assert all(Path(r["log"]).is_file() for r in recs)


def test_glue_pair_matches_keys_and_averages_the_differences(tmp_path) -> None:
    import glue_pair

    def run(key: str, task: str, metric: float | None) -> dict:
        return {"key": key, "method": "sparse", "task": task, "budget": "r8", "lr": 5e-4, "seed": 0,
                "metric_name": "accuracy", "metric": metric}

    before, after = tmp_path / "a.runs.jsonl", tmp_path / "b.runs.jsonl"
    before.write_text("\n".join(json.dumps(r) for r in [run("k1", "sst2", 0.8), run("k2", "rte", 0.5),
                                                          run("k3", "mrpc", 0.7)]) + "\n")
    after.write_text("\n".join(json.dumps(r) for r in [run("k2", "rte", 0.56), run("k1", "sst2", 0.81),
                                                         run("k4", "cola", 0.1), run("k3", "mrpc", None)]) + "\n")
    out = tmp_path / "pair.json"
    assert glue_pair.main([str(before), str(after), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    summary, *pairs = report["rows"]
    assert [(p["task"], p["diff"]) for p in pairs] == [("rte", 0.06), ("sst2", 0.01)]  # k3 failed, k4 unpaired
    assert summary == {"method": "sparse", "budget": "r8", "tasks": 2, "before": 0.65, "after": 0.685,
                       "diff": 0.035}
    assert glue_pair.main([str(before), str(tmp_path / "a.runs.jsonl"), "--out", str(out)]) == 0
    empty = tmp_path / "none.runs.jsonl"
    empty.write_text("")
    assert glue_pair.main([str(before), str(empty), "--out", str(out)]) == 2
