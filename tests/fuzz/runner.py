"""Run mutants in a pool of worker processes with a per-mutant time limit and a memory cap.

``run_fuzz(originals, plan)`` returns one record per mutant (see :meth:`fuzz.worker.Worker.run_one`);
a mutant that runs past ``timeout`` seconds is a ``hang`` (its worker is killed and replaced), one whose
worker dies is ``other``.  :func:`summarise` makes the per-target table and :func:`signatures` the
distinct failures, each with a seed that reproduces it.

Seeds: mutant ``i`` of target ``t`` under base seed ``s`` has seed ``crc32("t:s:i")``; its original is
``originals[t][seed % len(originals[t])]``, so ``(target, seed)`` alone reproduces a mutant
(:func:`replay`).
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FUZZ_DIR = Path(__file__).resolve().parent
TESTS_DIR = FUZZ_DIR.parent
FAILURES = ("other", "hang", "memory", "silent", "harness")
OUTCOMES = ("typed", "identical", "valid", *FAILURES)


def mutant_seed(target: str, base_seed: int, i: int) -> int:
    return zlib.crc32(f"{target}:{base_seed}:{i}".encode())


def plan(targets: list[str], per_target: int, base_seed: int = 0) -> list[tuple[str, int]]:
    """``(target, seed)`` for ``per_target`` mutants of each target, interleaved across targets."""
    return [(t, mutant_seed(t, base_seed, i)) for i in range(per_target) for t in targets]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MALLOC_ARENA_MAX="2", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    return env


@dataclass
class _Proc:
    proc: subprocess.Popen
    buf: bytes = b""
    task: tuple[str, int, str, str] | None = None
    phase: str = ""
    mutant: dict[str, Any] = field(default_factory=dict)  # file, kind, what of the mutant in progress
    deadline: float = 0.0
    lines: list[dict[str, Any]] = field(default_factory=list)


class Pool:
    """``workers`` fuzz worker processes fed one mutant at a time."""

    def __init__(self, originals: dict[str, list[str]], workers: int, timeout: float, mem_mb: int,
                 startup_timeout: float = 300.0) -> None:
        self.originals, self.timeout, self.mem_mb = originals, timeout, mem_mb
        self.startup_timeout = startup_timeout
        self.sel = selectors.DefaultSelector()
        self.procs = [self._start() for _ in range(workers)]
        self.skipped: list[str] = []
        for p in self.procs:
            self._await_ready(p)

    def _start(self) -> _Proc:
        proc = subprocess.Popen([sys.executable, "-m", "fuzz.worker"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=_env(), cwd=TESTS_DIR)
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write((json.dumps({"originals": self.originals, "mem_mb": self.mem_mb}) + "\n").encode())
        proc.stdin.flush()
        os.set_blocking(proc.stdout.fileno(), False)
        p = _Proc(proc)
        self.sel.register(proc.stdout, selectors.EVENT_READ, p)
        return p

    def _await_ready(self, p: _Proc) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while not p.lines:
            if time.monotonic() > deadline or not self._pump(p, deadline - time.monotonic()):
                raise RuntimeError(f"fuzz worker did not start (exit code {p.proc.poll()}); run "
                                   f"`PYTHONPATH={TESTS_DIR} python -m fuzz.worker` to see why")
        ready = p.lines.pop(0)
        self.skipped = ready.get("skipped", [])

    def _pump(self, p: _Proc, wait: float) -> bool:
        """Read what ``p`` wrote (waiting up to ``wait`` s); ``False`` if it died."""
        assert p.proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(p.proc.stdout, selectors.EVENT_READ)
        sel.select(max(0.0, wait))
        sel.close()
        try:
            chunk = os.read(p.proc.stdout.fileno(), 1 << 20)
        except BlockingIOError:
            return True
        if not chunk:
            return False
        p.buf += chunk
        *lines, p.buf = p.buf.split(b"\n")
        p.lines += [json.loads(line) for line in lines if line.strip()]
        return True

    def _kill(self, p: _Proc) -> _Proc:
        """Replace ``p`` by a fresh worker; the others' deadlines move by the time that took."""
        t0 = time.monotonic()
        self.sel.unregister(p.proc.stdout)
        p.proc.kill()
        p.proc.wait()
        fresh = self._start()
        self._await_ready(fresh)
        self.procs[self.procs.index(p)] = fresh
        for other in self.procs:
            other.deadline += time.monotonic() - t0
        return fresh

    def run(self, tasks: list[tuple[str, int]], workdir: Path, progress: bool = False) -> list[dict[str, Any]]:
        todo = list(reversed(tasks))
        results: list[dict[str, Any]] = []
        shown = 0
        while todo or any(p.task for p in self.procs):
            for p in list(self.procs):
                if p.task is None and todo:
                    target, seed = todo.pop()
                    origs = self.originals[target]
                    orig = origs[seed % len(origs)]
                    dst = str(workdir / f"{target}-{seed}")
                    p.task, p.phase, p.deadline = (target, seed, orig, dst), "mutate", time.monotonic() + self.timeout
                    p.mutant = {}
                    assert p.proc.stdin is not None
                    try:
                        p.proc.stdin.write((json.dumps({"target": target, "seed": seed, "orig": orig,
                                                        "dst": dst}) + "\n").encode())
                        p.proc.stdin.flush()
                    except BrokenPipeError:
                        pass
            now = time.monotonic()
            wait = min((p.deadline for p in self.procs if p.task), default=now + 1) - now
            for key, _ in self.sel.select(max(0.01, wait)):
                p = key.data
                alive = self._pump(p, 0)
                self._collect(p, results)
                if not alive and p.task:
                    results.append(self._dead(p, "other", f"worker died (exit code {p.proc.wait()})"))
                    self._kill(p)
            for p in list(self.procs):
                if p.task and time.monotonic() > p.deadline:
                    self._pump(p, 0)  # a result that arrived while another worker was being replaced
                    self._collect(p, results)
                if p.task and time.monotonic() > p.deadline:
                    results.append(self._dead(p, "hang", f"no result after {self.timeout:g} s (phase: {p.phase})"))
                    self._kill(p)
            if progress and len(results) > shown:
                shown = self._progress(len(results), len(tasks), shown)
        return results

    @staticmethod
    def _progress(done: int, total: int, shown: int) -> int:
        """Print ``done/total`` (in place on a terminal, else at every tenth); returns what was shown."""
        if sys.stderr.isatty():
            print(f"\r{done}/{total}", end="\n" if done == total else "", file=sys.stderr, flush=True)
            return done
        step = max(1, total // 10)
        if done // step > shown // step or done == total:
            print(f"{done}/{total} mutants", file=sys.stderr, flush=True)
            return done
        return shown

    def _collect(self, p: _Proc, results: list[dict[str, Any]]) -> None:
        while p.lines:
            msg = p.lines.pop(0)
            if "phase" in msg:
                p.phase = msg.pop("phase")
                p.mutant.update(msg)
            elif p.task is not None:
                results.append(msg)
                p.task = None

    def _dead(self, p: _Proc, outcome: str, message: str) -> dict[str, Any]:
        assert p.task is not None
        target, seed, orig, dst = p.task
        p.task = None
        rec = {"target": target, "seed": seed, "orig": Path(orig).name, "outcome": outcome, "message": message,
               "exc_type": outcome, "file": "?", "kind": "?", "what": "(died while making the mutant)",
               "seconds": self.timeout, **p.mutant}
        shutil.rmtree(dst, ignore_errors=True)
        return rec

    def close(self) -> None:
        for p in self.procs:
            if p.proc.stdin:
                p.proc.stdin.close()
            try:
                p.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.proc.kill()
                p.proc.wait()


def run_fuzz(originals: dict[str, list[str]], tasks: list[tuple[str, int]], workers: int = 2,
             timeout: float = 10.0, mem_mb: int = 512, progress: bool = False) -> tuple[list[dict[str, Any]],
                                                                                       list[str]]:
    """Run ``tasks`` (``(target, seed)``) on ``originals`` (target → folders); returns (records, skipped
    targets: ``verify=False`` variants of loaders without that parameter)."""
    with tempfile.TemporaryDirectory(prefix="deltatune-fuzz-") as tmp:
        pool = Pool(originals, workers, timeout, mem_mb)
        try:
            skipped = pool.skipped
            results = pool.run([t for t in tasks if t[0] not in skipped], Path(tmp), progress)
        finally:
            pool.close()
    return results, skipped


def summarise(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per target: mutants, each outcome's count, and the largest per-mutant peak RSS increase."""
    rows = []
    for target in dict.fromkeys(r["target"] for r in records):
        mine = [r for r in records if r["target"] == target]
        counts = Counter(r["outcome"] for r in mine)
        rows.append({"target": target, "mutants": len(mine), **{o: counts.get(o, 0) for o in OUTCOMES},
                     "peak_mb": max((r.get("peak_mb", 0.0) for r in mine), default=0.0),
                     "max_s": max((r.get("seconds", 0.0) for r in mine), default=0.0)})
    return rows


def signature(r: dict[str, Any]) -> tuple[str, ...]:
    """What makes two failures the same bug: target, outcome, exception type and the line that raised it
    (for a silent difference: the mutation kind)."""
    if r["outcome"] == "silent":
        return (r["target"], "silent", r.get("kind", "?"))
    return (r["target"], r["outcome"], r.get("exc_type", ""), r.get("where", ""))


def signatures(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Distinct failures (first record of each signature), with how many mutants share it and their kinds."""
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for r in records:
        if r["outcome"] in FAILURES:
            groups.setdefault(signature(r), []).append(r)
    out = [{**rs[0], "count": len(rs), "kinds": sorted({x.get("kind", "?") for x in rs})}
           for rs in groups.values()]
    return sorted(out, key=lambda r: (r["target"], -r["count"]))


def describe_failure(r: dict[str, Any]) -> str:
    """One line per failure: target, seed, mutation, outcome and exception (how to reproduce it)."""
    kinds = r.get("kinds") or []
    also = f" [kinds: {', '.join(kinds[:6])}{' …' if len(kinds) > 6 else ''}]" if len(kinds) > 1 else ""
    return (f"[{r['outcome']}] target={r['target']} seed={r['seed']} orig={r.get('orig')} file={r.get('file')} "
            f"mutation={r.get('kind')} ({r.get('what')}) -> {r.get('exc_type', '')}: {r.get('message', '')}"
            f"{(' at ' + r['where']) if r.get('where') else ''}{also}")


def replay(originals: dict[str, list[str]], target: str, seed: int, workdir: Path) -> dict[str, Any]:
    """Run one mutant in this process (no pool, no limits): for debugging a reported seed."""
    from fuzz.worker import Worker

    worker = Worker({target: originals[target]})
    origs = originals[target]
    return worker.run_one(target, seed, origs[seed % len(origs)], str(workdir / f"{target}-{seed}"))
