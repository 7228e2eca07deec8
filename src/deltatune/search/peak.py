"""Peak memory of one block of work (a search trial), for the ``peak_memory`` objective.

On CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (bytes the caching allocator
handed out).  On CPU (Linux): the peak resident set ``VmHWM`` of ``/proc/self/status``, reset at the start by
writing ``5`` to ``/proc/self/clear_refs`` (Linux ≥ 4.0, ``Documentation/admin-guide/mm/soft-dirty``), minus the
resident set at the start: the extra memory the work needed at its peak.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


def status_kib(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``, …); ``None`` where there is none."""
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return None if match is None else int(match.group(1))


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (``VmHWM``) to the current RSS (Linux ≥ 4.0); False where it cannot."""
    try:
        CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def cpu_peak_supported() -> bool:
    """Whether this process can reset and read its peak resident set."""
    return reset_peak_rss() and status_kib("VmHWM") is not None


class PeakMemory:
    """``with PeakMemory() as peak: ...`` then ``peak.bytes``: the block's peak memory (see the module doc)."""

    def __init__(self) -> None:
        self.cuda = torch.cuda.is_available()
        self.bytes = 0
        self._start = 0

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            reset_peak_rss()
            self._start = status_kib("VmRSS") or 0
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            self.bytes = int(torch.cuda.max_memory_allocated())
        else:
            self.bytes = max(0, (status_kib("VmHWM") or 0) - self._start) * 1024
