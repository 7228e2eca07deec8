"""Small helpers shared by the benchmark scripts: isolation, timing, peak memory, reports.

* :func:`run_isolated` runs one measurement in a fresh child process (so peaks and allocator caches
  of one configuration never leak into the next); :func:`run_lockstep` runs several such processes
  interleaved step by step, so background load hits every configuration alike;
* :class:`PeakMemory` measures the peak memory *increase* over a baseline: CUDA
  ``max_memory_allocated`` on a GPU, else the process's peak RSS (VmHWM, reset through
  ``/proc/self/clear_refs`` where Linux allows it, ``ru_maxrss`` otherwise);
* :class:`LiveTensorPeak` is the CPU counterpart of ``max_memory_allocated``: the peak of the bytes held by
  tensors allocated since :meth:`~LiveTensorPeak.start`, from the profiler's allocator events (no allocator
  cache, no fragmentation, no malloc arenas — what a GPU would count);
* :class:`StepTimer` collects per-step wall times (synchronising CUDA) and summarises them;
* :func:`machine_meta`, :func:`markdown_table` and :func:`write_report` produce ``FILE.json`` and
  ``FILE.md`` side by side.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

_CONTEXT: Any = None


# --- process isolation -----------------------------------------------------------------------
def _context(preload: Sequence[str]) -> Any:
    """A forkserver context (children fork from a clean server that pre-imported ``preload``), or spawn."""
    global _CONTEXT
    if _CONTEXT is None:
        if sys.platform.startswith("linux"):
            _CONTEXT = mp.get_context("forkserver")
            _CONTEXT.set_forkserver_preload(list(preload))
        else:
            _CONTEXT = mp.get_context("spawn")
    return _CONTEXT


def _child(queue: Any, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    try:
        queue.put(("ok", fn(*args)))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        queue.put(("error", traceback.format_exc()))


def run_isolated(fn: Callable[..., Any], *args: Any, preload: Sequence[str] = ("torch",)) -> Any:
    """``fn(*args)`` in a fresh process; returns its (picklable) result or raises with its traceback.

    ``fn`` must be a module-level function of an importable module (the script's ``__main__`` works
    when it is guarded by ``if __name__ == "__main__"``).
    """
    ctx = _context(preload)
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, fn, args))
    proc.start()
    try:
        status, payload = queue.get()
    finally:
        proc.join()
    if status != "ok":
        raise RuntimeError(f"isolated run of {getattr(fn, '__name__', fn)} failed:\n{payload}")
    return payload


def _lockstep_child(conn: Any, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    try:
        gen = fn(*args)
        next(gen)
        conn.send(("ready", None))
        while True:
            conn.recv()
            try:
                next(gen)
            except StopIteration as stop:
                conn.send(("done", stop.value))
                return
            conn.send(("ready", None))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        conn.send(("error", traceback.format_exc()))


def run_lockstep(jobs: Sequence[tuple[Callable[..., Any], tuple[Any, ...]]],
                 preload: Sequence[str] = ("torch",), max_procs: int | None = None) -> list[Any]:
    """Run generator jobs in fresh processes, interleaved one step at a time (round-robin).

    Each ``fn(*args)`` is a generator: it sets up (all jobs concurrently), ``yield``s when ready, then
    does one unit of work (a timed step) per resume and ``yield``s again; its ``return`` value (after
    the last yield: e.g. peak memory, evaluation) is its result.  After set-up exactly one job runs at
    a time, and slow drifts in background load spread evenly over the jobs instead of biasing one.
    With ``max_procs``, the jobs run in consecutive groups of at most that many live processes (each group
    interleaved as above), for machines without the memory to hold every job at once; results keep the
    order of ``jobs``.  A worker that fails or dies (even by SIGKILL) raises ``RuntimeError``.
    """
    if max_procs is not None and max_procs < 1:
        raise ValueError(f"max_procs must be ≥ 1, got {max_procs}")
    step = max_procs or max(1, len(jobs))
    return [r for k in range(0, len(jobs), step) for r in _lockstep_group(jobs[k:k + step], preload)]


def _lockstep_group(jobs: Sequence[tuple[Callable[..., Any], tuple[Any, ...]]],
                    preload: Sequence[str]) -> list[Any]:
    ctx = _context(preload)
    procs, conns = [], []
    for fn, args in jobs:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_lockstep_child, args=(child, fn, args))
        proc.start()
        child.close()
        procs.append(proc)
        conns.append(parent)

    def receive(i: int) -> tuple[str, Any]:
        # poll with the process's liveness: a worker killed outright (the OOM killer's SIGKILL) may leave its pipe
        # open elsewhere, and a bare recv() would then wait forever
        while not conns[i].poll(1.0) and procs[i].is_alive():
            pass
        try:
            status, payload = conns[i].recv() if conns[i].poll() else ("error", None)
        except EOFError:
            status, payload = "error", None
        if status == "error" and payload is None:
            procs[i].join()
            payload = f"worker died with exit code {procs[i].exitcode} (-9: SIGKILL, e.g. out of memory)"
        if status == "error":
            for p in procs:
                if p.is_alive():
                    p.terminate()
            raise RuntimeError(f"lockstep job {i} ({getattr(jobs[i][0], '__name__', '?')}) failed:\n{payload}")
        return status, payload

    results: list[Any] = [None] * len(jobs)
    try:
        for i in range(len(jobs)):
            receive(i)
        active = list(range(len(jobs)))
        while active:
            for i in list(active):
                conns[i].send("go")
                status, payload = receive(i)
                if status == "done":
                    results[i] = payload
                    active.remove(i)
    finally:
        for p in procs:
            p.join()
    return results


# --- memory ------------------------------------------------------------------------------------
def rss_mb() -> float:
    """Current resident set size in MB (psutil where /proc is missing)."""
    from deltatune.search.peak import status_kib

    kb = status_kib("VmRSS")
    if kb is not None:
        return kb / 1024
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _maxrss_mb() -> float:
    from deltatune.search.peak import status_kib

    kb = status_kib("VmHWM")
    if kb is not None:
        return kb / 1024
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


class PeakMemory:
    """Peak memory increase (MB) between :meth:`start` and :meth:`peak_mb`.

    On CUDA: ``max_memory_allocated − memory_allocated at start``.  On CPU: peak RSS − RSS at start;
    when the peak mark cannot be reset, a peak reached *before* ``start`` hides smaller later peaks,
    which ``reset_ok`` reports.
    """

    def __init__(self, device: Any = "cpu") -> None:
        self.cuda = str(device).startswith("cuda")
        self.base = 0.0
        self.reset_ok = True

    def start(self) -> None:
        import gc

        gc.collect()
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated() / 2**20
        else:
            from deltatune.search.peak import reset_peak_rss

            self.reset_ok = reset_peak_rss()
            self.base = rss_mb()

    def peak_mb(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20 - self.base
        return max(0.0, _maxrss_mb() - self.base)

    @property
    def method(self) -> str:
        if self.cuda:
            return "torch.cuda.max_memory_allocated increase"
        return "peak RSS increase (VmHWM reset via clear_refs)" if self.reset_ok else "ru_maxrss - baseline RSS"


class LiveTensorPeak:
    """Peak bytes (MB) of live tensors allocated between :meth:`start` and :meth:`stop` — on CPU.

    ``torch.profiler`` with ``profile_memory=True`` reports every allocation and free of PyTorch's CPU
    allocator as a signed ``nbytes`` event.  In time order, the running sum ``L(t) = Σ_{events ≤ t} nbytes``
    is the live tensor bytes above the state at ``start``; the result is ``max(0, max_t L(t))``.  Frees of
    tensors allocated before ``start`` are not reported (the profiler does not know their size), so the figure
    never drops below what ``start`` held: like ``max_memory_allocated − memory_allocated`` at start on CUDA.
    The profiler slows every op down: measure in a pass of its own, never around timed steps.
    """

    def __init__(self) -> None:
        self._prof: Any = None
        self.peak_bytes: int | None = None

    def start(self) -> None:
        import gc

        from torch.profiler import ProfilerActivity, profile

        gc.collect()
        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._prof.__enter__()

    def stop(self) -> float:
        """Stop profiling; return the peak in MB (also kept in :attr:`peak_bytes`)."""
        prof, self._prof = self._prof, None
        if prof is None:
            raise RuntimeError("LiveTensorPeak.stop() without start()")
        prof.__exit__(None, None, None)
        from torch.autograd import DeviceType

        events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                        if e.name() == "[memory]" and e.device_type() == DeviceType.CPU)
        live = peak = 0
        for _, nbytes in events:
            live += nbytes
            peak = max(peak, live)
        self.peak_bytes = peak
        return peak / 2**20


# --- timing --------------------------------------------------------------------------------------
class StepTimer:
    """Wall time of each step; ``with timer.step(): ...``; CUDA is synchronised at both ends."""

    def __init__(self, cuda: bool = False) -> None:
        self.cuda = cuda
        self.times: list[float] = []

    def _sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def step(self) -> _Step:
        return _Step(self)

    def summary(self, skip: int = 0) -> dict[str, float]:
        """Median / mean / min / max over the steps after the first ``skip`` (warm-up)."""
        t = self.times[skip:] or self.times
        return {"median_s": statistics.median(t), "mean_s": statistics.fmean(t), "min_s": min(t),
                "max_s": max(t), "n": len(t)}


class _Step:
    def __init__(self, timer: StepTimer) -> None:
        self.timer = timer

    def __enter__(self) -> _Step:
        self.timer._sync()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.timer._sync()
        self.timer.times.append(time.perf_counter() - self.t0)


# --- reports --------------------------------------------------------------------------------------
def machine_meta() -> dict[str, Any]:
    import torch

    meta: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    for mod in ("transformers", "peft"):
        try:
            meta[mod] = __import__(mod).__version__
        except ImportError:
            meta[mod] = None
    return meta


def ratio(value: float | None, ref: float | None) -> float | None:
    if value is None or not ref:
        return None
    return round(value / ref, 3)


def _cell(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_report(out: str | Path, meta: dict[str, Any], rows: list[dict[str, Any]], columns: Sequence[str],
                 title: str = "") -> str:
    """Write ``out`` (JSON: ``{"meta", "rows"}``) and the Markdown table beside it (``.md``); return it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    md = (f"# {title}\n\n" if title else "") + markdown_table(rows, columns)
    out.with_suffix(".md").write_text(md)
    return md


def write_sections(out: str | Path, meta: dict[str, Any], sections: Sequence[dict[str, Any]], title: str = "") -> str:
    """Like :func:`write_report` for a report of several tables.

    Each section is ``{"title", "rows", "columns"}`` plus optional ``"notes"`` (bullets printed above the
    table).  ``out`` gets ``{"meta", "rows" (every section's rows, in order), "sections" (title, columns,
    notes)}``; the ``.md`` beside it one ``##`` heading, notes and table per section (booleans shown as
    yes/no).  Returns the Markdown.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = [r for s in sections for r in s["rows"]]
    index = [{"title": s["title"], "columns": list(s["columns"]), "notes": list(s.get("notes", []))}
             for s in sections]
    out.write_text(json.dumps({"meta": meta, "rows": rows, "sections": index}, indent=2, default=str) + "\n")
    md = f"# {title}\n\n" if title else ""
    for s in sections:
        md += f"## {s['title']}\n\n"
        md += "".join(f"- {line}\n" for line in s.get("notes", [])) + ("\n" if s.get("notes") else "")
        shown = [{k: ("yes" if v else "no") if isinstance(v, bool) else v for k, v in r.items()} for r in s["rows"]]
        md += markdown_table(shown, s["columns"]) + "\n"
    out.with_suffix(".md").write_text(md)
    return md
