"""Merging the hottest delta into the base while it carries the traffic (dLoRA's merge/unmerge trade-off).

dLoRA (Wu et al., "dLoRA: Dynamically Orchestrating Requests and Adapters for LoRA LLM Serving", OSDI 2024)
observes that an unmerged adapter costs extra work in every layer at every step, while a merged one costs
nothing per step but must be unmerged before any other request can run; it switches between the two modes by
traffic.  :class:`HotMerge` is the engine's version of that switch:

* the engine tells it, every step, which delta each running row (and each prefilling or encoding request) uses;
* **merge** when every row of the step uses one delta ``d``, ``d`` carried at least ``share`` of the rows of the
  last ``window`` steps, no training job shares the model, and every part of ``d`` is additive: ``W ← W + ΔW``
  in place (:class:`deltatune.algebra.compose.DeltaStack` in merge mode, which snapshots exactly the entries it
  writes), and the rows of ``d`` are routed to the (merged) base;
* **unmerge** as soon as a row of any other delta (or of the base) is in the step, before the model runs: the
  snapshot is written back, so the base is bit for bit what it was.

Outputs are exact either way in the sense the library uses everywhere: a merged row's output equals the unmerged
one up to float rounding of ``W + ΔW`` (greedy fp32 tokens equal, tested), and every other row runs on the
restored base exactly.  The cost of a switch is one pass over the weights the delta touches (and a copy of the
entries it overwrites while merged).
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Sequence

from torch import nn

from deltatune.algebra.compose import DeltaStack
from deltatune.config import require
from deltatune.serve.store import Entry


class HotMerge:
    """Keeps at most one delta merged into ``model`` (see the module docstring)."""

    def __init__(self, model: nn.Module, share: float, window: int) -> None:
        require(0.0 < share <= 1.0, f"merge share must be in (0, 1], got {share}")
        require(window >= 1, f"merge window must be ≥ 1 step, got {window}")
        self.model, self.share, self.window = model, share, window
        self._recent: deque[Counter[str | None]] = deque(maxlen=window)
        self._stack: DeltaStack | None = None
        self.key: str | None = None  # the merged copy's key (``None``: nothing merged)
        self.merges = self.unmerges = 0
        self._released = False  # unmerged outside settle(): the caller's routing is stale

    def settle(self, rows: Sequence[tuple[str | None, Entry | None]], training: bool) -> bool:
        """Observe one step's rows ``(key, entry)`` and merge or unmerge for it; whether the merged state changed
        (the caller's routing is then stale)."""
        self._recent.append(Counter(key for key, _ in rows))
        changed, self._released = self._released, False
        keys = {key for key, _ in rows}
        if self.key is not None and (keys != {self.key} or training):
            self._unmerge()
            return True
        if self.key is None and not training and len(keys) == 1:
            key, entry = rows[0]  # every row leases the same copy
            if key is not None and entry is not None and self._hot(key) and _mergeable(entry):
                self._merge(key, entry)
                return True
        return changed

    def route(self, key: str | None) -> str | None:
        """The key a row of ``key`` is routed to: the base (``None``) for the merged delta's rows."""
        return None if key is not None and key == self.key else key

    def release(self) -> None:
        """Unmerge if merged (the engine stops, or someone reads the base's values); the next :meth:`settle`
        reports the change."""
        if self.key is not None:
            self._unmerge()
            self._released = True

    # --- internals -------------------------------------------------------------------------------
    def _hot(self, key: str) -> bool:
        total = sum(sum(c.values()) for c in self._recent)
        return len(self._recent) == self.window and total > 0 and (
            sum(c[key] for c in self._recent) >= self.share * total)

    def _merge(self, key: str, entry: Entry) -> None:
        stack = DeltaStack(self.model, mode="merge", force=True)
        stack.push(entry.delta, where=f"delta {entry.name!r} (merged while hot)")
        self._stack, self.key = stack, key
        self.merges += 1

    def _unmerge(self) -> None:
        assert self._stack is not None
        self._stack.revert()
        self._stack, self.key = None, None
        self.unmerges += 1


def _mergeable(entry: Entry) -> bool:
    """Only deltas whose every part is additive, with no task heads (a head swap is not a merge)."""
    return not entry.delta.heads and all(p.additive and not p.is_alias for p in entry.delta.parts.values())
