"""Sharded safetensors output with an index file, written tensor by tensor and atomically.

Tensors are appended to the current shard until it would pass ``max_shard_bytes``; shards are named
``model-0000i-of-0000N.safetensors`` with a ``model.safetensors.index.json`` weight map (a single
shard is just ``model.safetensors``), as ``transformers`` expects.  Everything is written into a
temporary directory that replaces the target only when complete, so a failure (a full disk, an
interrupt) leaves no partial output behind.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor

from deltatune.io.atomic import atomic_dir

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
        n = len(self.shards)
        if n == 1:
            (self.dir / "shard-0.tmp").rename(self.dir / "model.safetensors")
            return ["model.safetensors"]
        names, weight_map = [], {}
        for i, keys in enumerate(self.shards):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.dir / f"shard-{i}.tmp").rename(self.dir / name)
            names.append(name)
            weight_map.update(dict.fromkeys(keys, name))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.dir / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))
        return names


def write_sharded(out: str | Path, tensors: Iterable[tuple[str, Tensor]], max_shard_bytes: int,
                  extra_files: Iterable[tuple[str, bytes]] = ()) -> list[str]:
    """Write ``(name, tensor)`` pairs as a sharded checkpoint in ``out`` (atomic), plus extra files."""
    with atomic_dir(out) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes)
        for name, tensor in tensors:
            writer.add(name, tensor)
        names = writer.finish()
        for fname, data in extra_files:
            (tmp / fname).write_bytes(data)
    return names
