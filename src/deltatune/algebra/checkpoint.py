"""Lazy, memory-mapped reading of a (sharded) safetensors checkpoint, one tensor at a time.

A checkpoint is a folder with ``model.safetensors``, or ``model.safetensors.index.json`` and the shards
its ``weight_map`` names (or any ``*.safetensors`` files), or a single ``.safetensors`` file.  Only the
header of each shard is read up front; :meth:`CheckpointReader.get` reads one tensor's bytes, so memory
stays bounded by the tensors in use, never the model.
"""

from __future__ import annotations

import copy
import fnmatch
import json
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from deltatune.errors import ConfigError, DeltaFormatError
from deltatune.io.json_io import parse_json

INDEX = "model.safetensors.index.json"
COPIED_FILES = ("config.json", "generation_config.json")
#: every tokenizer artifact ``save_pretrained`` may write next to a model (``fnmatch`` patterns): the fast and slow
#: tokenizers and their configs, added tokens, chat templates (transformers ≥ 4.43 writes ``chat_template.json``,
#: ≥ 4.50 ``chat_template.jinja``), SentencePiece models (``tokenizer.model``, ``spiece.model``,
#: ``sentencepiece.bpe.model``), BPE/WordPiece vocabularies and tiktoken files
TOKENIZER_PATTERNS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "chat_template*", "*.model",
                      "vocab*", "merges.txt", "*.tiktoken", "preprocessor_config.json", "processor_config.json")
"""The base's files a merged or applied checkpoint needs beside its weights to be used as the base is: the
tokenizer's (chat template included) and, for multimodal bases (CLIP-like), the processor's."""


def tokenizer_files(folder: str | Path) -> list[tuple[str, bytes]]:
    """``(name, bytes)`` of every file in ``folder`` matching :data:`TOKENIZER_PATTERNS` (sorted; none when
    ``folder`` is not a local folder, e.g. a Hub id), so a merged checkpoint loads the base's tokenizer whole."""
    root = Path(folder)
    if not root.is_dir():
        return []
    names = sorted(p.name for p in root.iterdir()
                   if p.is_file() and any(fnmatch.fnmatchcase(p.name, pat) for pat in TOKENIZER_PATTERNS))
    return [(name, (root / name).read_bytes()) for name in names]


def meta_architecture(path: str | Path) -> nn.Module | None:
    """The model class the folder's ``config.json`` names first in ``architectures``, built from that config on
    ``meta`` (no weights read): which modules it has and which weights it ties.  ``None`` when there is no config,
    no named class, or it cannot be built."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(path)
        archs = getattr(config, "architectures", None) or []
        cls = getattr(transformers, archs[0], None) if archs else None
        if cls is None:
            return None
        with torch.device("meta"):
            return cls._from_config(config)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ImportError):
        return None


def config_with_dtype(config: bytes, dtype: torch.dtype | None) -> bytes:
    """``config.json`` with ``dtype`` (and ``torch_dtype``, where present) set to ``dtype``'s name; unchanged when
    ``dtype`` is ``None``.  transformers' ``from_pretrained`` (``dtype="auto"``) loads in the config's dtype, so a
    checkpoint written in another dtype than its base's must say so, or an fp32 merge of a bf16 base loads as bf16."""
    if dtype is None:
        return config
    doc = parse_json(config.decode("utf-8"), "config.json")
    name = str(dtype).removeprefix("torch.")
    doc["dtype"] = name
    if "torch_dtype" in doc:
        doc["torch_dtype"] = name
    return (json.dumps(doc, indent=2) + "\n").encode()


def is_checkpoint(path: str | Path) -> bool:
    """True for a folder (or file) holding full-model safetensors rather than a delta or an adapter."""
    p = Path(path)
    try:
        if p.is_file():
            return p.suffix == ".safetensors"
        return p.is_dir() and ((p / "model.safetensors").is_file() or (p / INDEX).is_file())
    except OSError as exc:  # a name too long for the file system, a permission error on a parent
        raise ConfigError(f"input {str(path)[:80]!r} cannot be inspected ({exc.strerror or exc})") from None


def _shard_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise ConfigError(f"checkpoint {root} does not exist (expected a folder with model.safetensors)")
    index = root / INDEX
    if index.is_file():
        try:
            weight_map = parse_json(index.read_text(encoding="utf-8"), str(index))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DeltaFormatError(f"{index}: not a safetensors index with a 'weight_map' ({exc})") from None
        if not isinstance(weight_map, dict):
            raise DeltaFormatError(f"{index}: 'weight_map' must map tensor names to shard files")
        files = sorted({root / str(f) for f in weight_map.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise DeltaFormatError(f"{index} names shard(s) that do not exist: {missing}")
        return files
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{root} holds no *.safetensors checkpoint")
    return files


DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
FLOATING = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


def _read_header(shard: Path) -> tuple[dict[str, dict], int]:
    """Parse a safetensors header: ``(entries, offset of the data section)``, validated against the file size."""
    size = shard.stat().st_size
    try:
        with open(shard, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > size - 8:
                raise ValueError(f"header length {n} does not fit a file of {size} bytes")
            header = parse_json(f.read(n).decode("utf-8"), str(shard))
    except (OSError, ValueError) as exc:
        raise DeltaFormatError(f"{shard}: cannot read as safetensors ({exc})") from None
    if not isinstance(header, dict):
        raise DeltaFormatError(f"{shard}: safetensors header must be a JSON object")
    header.pop("__metadata__", None)
    data_start = 8 + n
    for name, entry in header.items():
        try:
            begin, end = (int(x) for x in entry["data_offsets"])
            numel = 1
            for d in entry["shape"]:
                numel *= int(d)
            width = torch.empty(0, dtype=DTYPES[entry["dtype"]]).element_size()
        except (KeyError, TypeError, ValueError):
            raise DeltaFormatError(f"{shard}: tensor {name!r} has a malformed header entry {entry!r}") from None
        if end - begin != numel * width or data_start + end > size:
            raise DeltaFormatError(f"{shard}: tensor {name!r} needs bytes {begin}..{end} of the data section, "
                                   f"which the file ({size} bytes) does not hold as {entry['dtype']}{entry['shape']}")
    return header, data_start


class CheckpointReader:
    """``name → tensor`` view of a checkpoint; each tensor is read on demand with ``pread``.

    Explicit reads (rather than a memory map) keep the process's resident memory to the tensors in
    use: a mapped shard's pages would stay resident, and counted, once touched.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._entries: dict[str, tuple[Path, dict, int]] = {}
        for shard in _shard_files(self.path):
            header, data_start = _read_header(shard)
            for name, entry in header.items():
                if name in self._entries:
                    raise DeltaFormatError(f"{self.path}: tensor {name!r} appears in two shards")
                self._entries[name] = (shard, entry, data_start)

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self._entries[name][1]["shape"])

    def is_floating(self, name: str) -> bool:
        return self._entries[name][1]["dtype"] in FLOATING

    def dtype(self, name: str) -> torch.dtype:
        return DTYPES[self._entries[name][1]["dtype"]]

    def get(self, name: str, into: Tensor | None = None) -> Tensor:
        """The stored values: a new tensor, or a view of ``into`` (a tensor of the stored dtype and shape,
        e.g. a :class:`~deltatune.algebra.workspace.Workspace` buffer) filled in place."""
        if name not in self._entries:
            raise DeltaFormatError(f"{self.path}: no tensor named {name!r}")
        shard, entry, data_start = self._entries[name]
        begin, end = (int(x) for x in entry["data_offsets"])
        dtype, shape = self.dtype(name), self.shape(name)
        if into is None:
            into = torch.empty(shape, dtype=dtype)
        elif into.dtype != dtype or tuple(into.shape) != shape or not into.is_contiguous():
            raise ValueError(f"{name}: buffer {into.dtype}{list(into.shape)} cannot hold {dtype}{list(shape)}")
        got = 0
        if end > begin:
            raw = memoryview(into.view(-1).view(torch.uint8).numpy())
            with open(shard, "rb", buffering=0) as f:
                f.seek(data_start + begin)
                while got < end - begin:
                    n = f.readinto(raw[got:])
                    if not n:
                        break
                    got += n
        if got != end - begin:
            raise DeltaFormatError(f"{shard}: tensor {name!r} is truncated ({got} of {end - begin} bytes)")
        return into

    def view(self, names: Mapping[str, tuple[CheckpointReader, str]]) -> CheckpointReader:
        """A reader of this checkpoint's folder (its ``path``, config and tokenizer files) whose tensors are
        ``names``: ``{name: (reader, its name there)}``, each read from that reader's shard, nothing copied.
        Renames a fine-tune's tensors to its base's names, or adds a fine-tune's task head to a new base."""
        out = copy.copy(self)
        out._entries = {new: reader._entries[old] for new, (reader, old) in names.items()}
        return out

    def get_float(self, name: str) -> Tensor:
        """The tensor as fp32 (a new tensor, safe to modify in place)."""
        return self.get(name).float()

    def extra_files(self) -> list[tuple[str, bytes]]:
        """``config.json``, generation and tokenizer files (:func:`tokenizer_files`) to copy next to a merged
        checkpoint."""
        if not self.path.is_dir():
            return []
        copied = [(n, (self.path / n).read_bytes()) for n in COPIED_FILES if (self.path / n).is_file()]
        return copied + tokenizer_files(self.path)
