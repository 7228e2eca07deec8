"""Reusable scratch buffers for the streaming merge, one per role, sized by the largest tensor.

A merge of checkpoints touches every tensor of T + 2 models; allocating each tensor's read buffer,
task vectors and output afresh costs a page fault per 4 KiB of new memory (the allocator returns large
blocks to the kernel on free), which was most of the system time of a merge.  A :class:`Workspace`
keeps one flat byte buffer per role and hands out views of it, so after the largest tensor every
request reuses warm pages.  The merge uses ``"raw"`` (stored bytes: each read, then the cast output),
``"base"`` (θ₀ in fp32, later the target base) and ``("tau", i)``: about ``(T + 1.5)×`` the largest
tensor in fp32.

A view is valid until the next :meth:`Workspace.take` of the same role: callers that keep results
(a merged delta collected in memory) must not use a workspace.
"""

from __future__ import annotations

import math
from collections.abc import Hashable

import torch
from torch import Tensor

from deltatune.algebra.checkpoint import CheckpointReader

NARROW_FLOATS = (torch.bfloat16, torch.float16, torch.float32)  # promote to fp32 exactly


class Workspace:
    """``role → flat byte buffer`` grown on demand; :meth:`take` returns a typed, shaped view of it."""

    def __init__(self) -> None:
        self._buffers: dict[Hashable, Tensor] = {}
        self._holds: dict[Hashable, tuple[str, str]] = {}  # role → (checkpoint, tensor) last read into it

    def _view(self, role: Hashable, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> Tensor:
        nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        buffer = self._buffers.get(role)
        if buffer is None or buffer.numel() < nbytes:
            self._buffers.pop(role, None)  # free the smaller buffer before allocating its replacement
            buffer = self._buffers[role] = torch.empty(max(nbytes, 1), dtype=torch.uint8)
        return buffer[:nbytes].view(dtype).view(tuple(shape))

    def take(self, role: Hashable, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> Tensor:
        """An uninitialised ``dtype`` tensor of ``shape`` backed by ``role``'s buffer."""
        self._holds.pop(role, None)
        return self._view(role, shape, dtype)

    def read_fp32(self, reader: CheckpointReader, name: str, role: Hashable) -> Tensor:
        """``reader``'s tensor ``name`` as fp32 in ``role``'s buffer (read through the shared ``"raw"``
        buffer when stored narrower): the values of :meth:`CheckpointReader.get_float`, without fresh
        allocations; the caller may modify it."""
        shape, dtype = reader.shape(name), reader.dtype(name)
        if dtype == torch.float32:
            return reader.get(name, into=self.take(role, shape, dtype))
        raw = reader.get(name, into=self.take("raw", shape, dtype))
        return self.take(role, shape, torch.float32).copy_(raw)

    def read_float(self, reader: CheckpointReader, name: str, role: Hashable) -> Tensor:
        """:meth:`read_fp32`, except that asking again for what ``role`` already holds reads nothing (the
        writer's ``θ₀ + τ_m`` reuses the base read for ``τ``); callers must not modify the returned view."""
        source = (str(reader.path), name)
        if self._holds.get(role) == source:
            return self._view(role, reader.shape(name), torch.float32)
        value = self.read_fp32(reader, name, role)
        self._holds[role] = source
        return value

    @property
    def nbytes(self) -> int:
        return sum(b.numel() for b in self._buffers.values())
