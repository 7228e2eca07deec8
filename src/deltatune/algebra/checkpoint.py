"""Lazy, memory-mapped reading of a (sharded) safetensors checkpoint, one tensor at a time.

A checkpoint is a folder with ``model.safetensors``, or ``model.safetensors.index.json`` and the shards
its ``weight_map`` names (or any ``*.safetensors`` files), or a single ``.safetensors`` file.  Only the
header of each shard is read up front; :meth:`CheckpointReader.get` materialises one tensor from the
mmap'd shard, so memory stays bounded by the largest tensor, never the model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from deltatune.errors import ConfigError, DeltaFormatError

INDEX = "model.safetensors.index.json"
COPIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "vocab.txt", "merges.txt", "vocab.json", "tokenizer.model")


def is_checkpoint(path: str | Path) -> bool:
    """True for a folder (or file) holding full-model safetensors rather than a delta or an adapter."""
    p = Path(path)
    if p.is_file():
        return p.suffix == ".safetensors"
    return p.is_dir() and ((p / "model.safetensors").is_file() or (p / INDEX).is_file())


def _shard_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise ConfigError(f"checkpoint {root} does not exist (expected a folder with model.safetensors)")
    index = root / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DeltaFormatError(f"{index}: not a safetensors index with a 'weight_map' ({exc})") from None
        files = sorted({root / str(f) for f in weight_map.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise DeltaFormatError(f"{index} names shard(s) that do not exist: {missing}")
        return files
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{root} holds no *.safetensors checkpoint")
    return files


class CheckpointReader:
    """``name → tensor`` view of a checkpoint; tensors are read on demand from mmap'd shards."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._handles: dict[Path, object] = {}
        self._where: dict[str, Path] = {}
        self._shape: dict[str, tuple[int, ...]] = {}
        self._dtype: dict[str, str] = {}
        for shard in _shard_files(self.path):
            handle = self._open(shard)
            for name in handle.keys():  # noqa: SIM118  (safe_open is not a dict)
                if name in self._where:
                    raise DeltaFormatError(f"{self.path}: tensor {name!r} appears in two shards")
                sl = handle.get_slice(name)
                self._where[name] = shard
                self._shape[name] = tuple(int(d) for d in sl.get_shape())
                self._dtype[name] = sl.get_dtype()

    def _open(self, shard: Path):
        if shard not in self._handles:
            try:
                self._handles[shard] = safe_open(str(shard), framework="pt")
            except (SafetensorError, OSError) as exc:
                raise DeltaFormatError(f"{shard}: cannot read as safetensors ({exc})") from None
        return self._handles[shard]

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shape[name]

    def is_floating(self, name: str) -> bool:
        return self._dtype[name].upper() in ("F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2")

    def get(self, name: str) -> Tensor:
        if name not in self._where:
            raise DeltaFormatError(f"{self.path}: no tensor named {name!r}")
        try:
            return self._open(self._where[name]).get_tensor(name)
        except SafetensorError as exc:
            raise DeltaFormatError(f"{self._where[name]}: cannot read tensor {name!r} ({exc})") from None

    def get_float(self, name: str) -> Tensor:
        """The tensor as a new fp32 tensor, safe to modify in place.

        ``get`` may return a view of the private memory map: writing into it would change what later
        reads of the same tensor return, so fp32 tensors are cloned here.
        """
        t = self.get(name)
        return t.clone() if t.dtype == torch.float32 else t.float()

    def dtype(self, name: str) -> torch.dtype:
        return {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}.get(
            self._dtype[name].upper(), torch.float32)

    def extra_files(self) -> list[tuple[str, bytes]]:
        """``config.json``, tokenizer and generation files to copy next to a merged checkpoint."""
        if not self.path.is_dir():
            return []
        return [(n, (self.path / n).read_bytes()) for n in COPIED_FILES if (self.path / n).is_file()]
