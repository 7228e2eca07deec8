"""Tensors kept on disk while their memory is lent to something else: the base values ``θ₀`` of a dense part that
trains ``θ`` in the base module's own storage (:meth:`deltatune.parts.dense.DensePart.bind`).

One anonymous temporary file per spill (``tempfile.TemporaryFile``: unlinked at once, gone when closed or when the
process ends); each tensor is written as its raw bytes, without an intermediate copy for a contiguous CPU tensor,
and read back into a fresh tensor on its original device and dtype.
"""

from __future__ import annotations

import tempfile

import numpy as np
import torch
from torch import Tensor


class TensorSpill:
    """``put`` tensors by name, ``get`` fresh copies back; ``close`` deletes the file."""

    def __init__(self) -> None:
        self._file = tempfile.TemporaryFile(prefix="deltatune-spill-")  # noqa: SIM115 - open for the spill's life
        self._where: dict[str, tuple[int, int, torch.Size, torch.dtype, torch.device]] = {}

    def put(self, name: str, tensor: Tensor) -> None:
        flat = tensor.detach().contiguous().reshape(-1).cpu().view(torch.uint8)
        self._file.seek(0, 2)
        offset = self._file.tell()
        self._file.write(memoryview(flat.numpy()))
        self._where[name] = (offset, flat.numel(), tensor.shape, tensor.dtype, tensor.device)

    def get(self, name: str) -> Tensor:
        offset, nbytes, shape, dtype, device = self._where[name]
        self._file.seek(offset)
        raw = np.fromfile(self._file, dtype=np.uint8, count=nbytes)
        if raw.size != nbytes:
            raise OSError(f"spill file: {name} has {raw.size} of its {nbytes} bytes")
        return torch.from_numpy(raw).view(dtype).reshape(shape).to(device)

    def close(self) -> None:
        self._file.close()
