"""Tensors kept on disk while their memory is lent to something else: the base values ``θ₀`` of a dense part that
trains ``θ`` in the base module's own storage (:meth:`deltatune.parts.dense.DensePart.bind`).

One anonymous temporary file per spill, in ``TMPDIR`` (``tempfile.TemporaryFile``: unlinked at once, gone when closed
or when the process ends), shared by every part a training run binds; each tensor is written as its raw bytes,
without an intermediate copy for a contiguous CPU tensor, and read back into a fresh tensor on its original device
and dtype.
"""

from __future__ import annotations

import tempfile

import numpy as np
import torch
from torch import Tensor


class TensorSpill:
    """``put`` a tensor (its handle back), ``get`` a fresh copy of it; ``close`` deletes the file."""

    def __init__(self) -> None:
        self._file = tempfile.TemporaryFile(prefix="deltatune-spill-")  # noqa: SIM115 - open for the spill's life
        self._where: list[tuple[int, int, torch.Size, torch.dtype, torch.device]] = []

    def put(self, tensor: Tensor) -> int:
        flat = tensor.detach().contiguous().reshape(-1).cpu().view(torch.uint8)
        self._file.seek(0, 2)
        offset = self._file.tell()
        self._file.write(memoryview(flat.numpy()))
        self._where.append((offset, flat.numel(), tensor.shape, tensor.dtype, tensor.device))
        return len(self._where) - 1

    def get(self, handle: int) -> Tensor:
        offset, nbytes, shape, dtype, device = self._where[handle]
        if not nbytes:
            return torch.empty(shape, dtype=dtype, device=device)
        self._file.seek(offset)
        raw = np.fromfile(self._file, dtype=np.uint8, count=nbytes)
        if raw.size != nbytes:
            raise OSError(f"spill file: tensor {handle} has {raw.size} of its {nbytes} bytes")
        return torch.from_numpy(raw).view(dtype).reshape(shape).to(device)

    def close(self) -> None:
        self._file.close()

    def __deepcopy__(self, memo: dict[int, object]) -> TensorSpill:
        return self  # written once, then only read: a copied (bound) part reads the same θ₀
