"""``DeltaLayer``: wraps one base module and routes its forward through attached parts.

The original module stays as ``.base`` (no class swapping, no patched ``forward``).  Several named
parts can be attached; ``active`` decides which ones the forward uses.  For mixed batches,
``route(names)`` sets a per-row choice of part (``None`` = base) used by one batched pass.
Merging is never implicit: see :func:`deltatune.model.merge_delta`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from deltatune.parts.base import Part, forward_with_delta
from deltatune.parts.layers import layer_kind


class DeltaLayer(nn.Module):
    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.parts = nn.ModuleDict()
        self.active: list[str] = []
        self._rows: tuple[list[str | None], Tensor] | None = None

    def add(self, name: str, part: Part, activate: bool = True) -> None:
        self.parts[name] = part
        if activate and name not in self.active:
            self.active.append(name)

    def remove(self, name: str) -> Part:
        part = self.parts[name]
        del self.parts[name]
        if name in self.active:
            self.active.remove(name)
        return part

    def route(self, names: Sequence[str | None] | None, row_ids: Tensor | None = None) -> None:
        """Per-row part choice for the next forwards: row ``i`` uses ``names[row_ids[i]]``."""
        self._rows = None if names is None else (list(names), row_ids)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if args or kwargs:
            if not self.active:
                return self.base(x, *args, **kwargs)
            if len(self.active) == 1 and hasattr(self.parts[self.active[0]], "forward_args"):
                return self.parts[self.active[0]].forward_args(self.base, x, *args, **kwargs)
            raise TypeError(f"{type(self.base).__name__} called with extra arguments; only dense parts support that")
        if self._rows is not None:
            names, row_ids = self._rows
            used = [n for n in names if n is not None and n in self.parts]
            if not used:
                return self.base(x)
            parts = [self.parts[n] if (n is not None and n in self.parts) else None for n in names]
            cls = type(self.parts[used[0]])
            if any(p is not None and type(p) is not cls for p in parts):
                cls = Part
            return cls.mixed_forward(x, self.base, parts, row_ids.to(x.device))
        if not self.active:
            return self.base(x)
        if len(self.active) == 1:
            return self.parts[self.active[0]](x, self.base)
        kind = layer_kind(self.base)
        total = torch.stack([self.parts[n].delta_weight() for n in self.active]).sum(0)
        return forward_with_delta(self.base, kind, x, total)
