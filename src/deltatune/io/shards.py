"""Sharded safetensors output with an index file, written tensor by tensor and atomically.

Tensors are appended to the current shard until it would pass ``max_shard_bytes``; shards are named
``model-0000i-of-0000N.safetensors`` with a ``model.safetensors.index.json`` weight map (a single
shard is just ``model.safetensors``), as ``transformers`` expects.  Everything is written into a
temporary directory that replaces the target only when complete, so a failure (a full disk, an
interrupt) leaves no partial output behind.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from deltatune.io.atomic import atomic_dir
from deltatune.io.outputs import CHECKPOINT_KIND

INDEX = "model.safetensors.index.json"


def parse_size(text: str | int) -> int:
    """``"2GB"`` → bytes (KB/MB/GB are powers of 1000, KiB/MiB/GiB of 1024)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read {text!r} as a size such as 500MB or 2GB")
    value, unit = float(m.group(1)), (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(value * scale)


class ShardWriter:
    """Accumulate tensors into shards of at most ``max_shard_bytes`` (one oversize tensor per shard)."""

    def __init__(self, directory: Path, max_shard_bytes: int) -> None:
        self.dir, self.limit = directory, max_shard_bytes
        self.pending: dict[str, Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.limit:
            self._flush()
        self.pending[name] = tensor.detach().to("cpu").contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        if not self.pending:
            return
        index = len(self.shards)
        save_file(self.pending, str(self.dir / f"shard-{index}.tmp"), metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[str]:
        self._flush()
        return _rename_shards(self.dir, self.shards, self.total_bytes)


def _rename_shards(directory: Path, shards: list[list[str]], total_bytes: int) -> list[str]:
    """``shard-i.tmp`` → ``model.safetensors``, or ``model-0000i-of-0000N.safetensors`` plus the index."""
    n = len(shards)
    if n == 1:
        (directory / "shard-0.tmp").rename(directory / "model.safetensors")
        return ["model.safetensors"]
    names, weight_map = [], {}
    for i, keys in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        (directory / f"shard-{i}.tmp").rename(directory / name)
        names.append(name)
        weight_map.update(dict.fromkeys(keys, name))
    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    (directory / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))
    return names


SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}


class PlannedShardWriter:
    """Shards whose tensors (name, dtype, shape) are known before any is computed, written straight to disk.

    Each shard's safetensors header is written first; tensors then arrive one at a time, in plan order,
    and go to the file at once, so memory holds one tensor instead of a whole shard.  Shard boundaries
    follow the same rule as :class:`ShardWriter`.
    """

    def __init__(self, directory: Path, plan: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 max_shard_bytes: int) -> None:
        self.dir = directory
        self.shards: list[list[tuple[str, torch.dtype, tuple[int, ...], int]]] = [[]]
        used = 0
        for name, dtype, shape in plan:
            size = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
            if self.shards[-1] and used + size > max_shard_bytes:
                self.shards.append([])
                used = 0
            self.shards[-1].append((name, dtype, tuple(shape), size))
            used += size
        self.total_bytes = sum(e[3] for shard in self.shards for e in shard)
        self._queue = [(i, e) for i, shard in enumerate(self.shards) for e in shard]
        self._next = 0
        self._file: Any = None
        self._shard = -1

    def _open(self, index: int) -> None:
        if self._file is not None:
            self._file.close()
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, dtype, shape, size in self.shards[index]:
            header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._file = open(self.dir / f"shard-{index}.tmp", "wb")  # noqa: SIM115  (closed in _open/finish)
        self._file.write(len(raw).to_bytes(8, "little") + raw)
        self._shard = index

    def add(self, name: str, tensor: Tensor) -> None:
        if self._next >= len(self._queue):
            raise ValueError(f"tensor {name!r} was not planned")
        index, (want, dtype, shape, size) = self._queue[self._next]
        if name != want or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"expected {want} {dtype}{list(shape)} next, got {name} {tensor.dtype}"
                             f"{list(tensor.shape)}")
        if index != self._shard:
            self._open(index)
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self._file.write(memoryview(data))
        self._next += 1

    def finish(self) -> list[str]:
        if self._next != len(self._queue):
            raise ValueError(f"{len(self._queue) - self._next} planned tensor(s) were never written")
        if self._file is not None:
            self._file.close()
        return _rename_shards(self.dir, [[e[0] for e in shard] for shard in self.shards], self.total_bytes)


def write_sharded(out: str | Path, tensors: Iterable[tuple[str, Tensor]], max_shard_bytes: int,
                  extra_files: Iterable[tuple[str, bytes]] = (), overwrite: bool = False) -> list[str]:
    """Write ``(name, tensor)`` pairs as a sharded checkpoint in ``out`` (atomic), plus extra files.

    An existing ``out`` must be an earlier checkpoint output unless ``overwrite`` (see :func:`atomic_dir`)."""
    with atomic_dir(out, CHECKPOINT_KIND, overwrite=overwrite) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes)
        for name, tensor in tensors:
            writer.add(name, tensor)
        names = writer.finish()
        for fname, data in extra_files:
            (tmp / fname).write_bytes(data)
    return names
