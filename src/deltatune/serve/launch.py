"""Build a server from folders: the base model, its tokenizer, the delta store, the engine and the app."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from deltatune.config import require
from deltatune.errors import ConfigError
from deltatune.serve.app import ServerLimits, create_app
from deltatune.serve.engine import Engine, EngineConfig
from deltatune.serve.store import DeltaStore


@dataclass
class ServeConfig:
    """What ``deltatune serve`` starts."""

    model: str = field(metadata={"help": "local base-model folder (with its tokenizer)"})
    deltas: dict[str, str] = field(default_factory=dict, metadata={"help": "{name: delta folder} served at start"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind (loopback by default)"})
    port: int = field(default=8000, metadata={"help": "TCP port"})
    served_name: str | None = field(default=None, metadata={"help": "the base model's name in the API "
                                                                    "(default: the model folder's name)"})
    max_delta_bytes: int | None = field(default=None, metadata={"help": "LRU bound on attached deltas (bytes)"})
    preload: bool = field(default=True, metadata={"help": "attach every --delta at start (else on first use)"})
    verify: bool = field(default=True, metadata={"help": "check the deltas' content digests when reading them"})
    engine: EngineConfig = field(default_factory=EngineConfig, metadata={"help": "batch bounds"})
    limits: ServerLimits = field(default_factory=ServerLimits, metadata={"help": "request bounds and API key"})

    def __post_init__(self) -> None:
        require(Path(self.model).is_dir(), f"--model {self.model!r} is not a local folder")
        require(0 <= self.port < 65536, f"--port must be in 0..65535, got {self.port}")
        require(self.max_delta_bytes is None or self.max_delta_bytes > 0, "--max-delta-bytes must be > 0")

    @property
    def base_name(self) -> str:
        return self.served_name or Path(self.model).resolve().name

    @property
    def loopback(self) -> bool:
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return self.host == "localhost"


def load_base(path: str, deltas: dict[str, str], verify: bool = True) -> nn.Module:
    """The base architecture the deltas need: a sequence classifier when the first delta carries a task head,
    else the architecture the folder's config names (causal LM or encoder)."""
    from deltatune.api import as_delta, load_base_for
    from deltatune.delta import Delta

    first = as_delta(next(iter(deltas.values())), verify=verify) if deltas else Delta(method="none", config={},
                                                                                          parts={})
    return load_base_for(first, path).eval()


def build_app(cfg: ServeConfig) -> Any:
    """The FastAPI app serving ``cfg`` (the engine thread starts with the app)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    model = load_base(cfg.model, cfg.deltas, cfg.verify)
    store = DeltaStore(model, cfg.base_name, max_bytes=cfg.max_delta_bytes, verify=cfg.verify)
    for name, path in cfg.deltas.items():
        store.add(name, path, preload=cfg.preload)
    engine = Engine(model, tokenizer, store, cfg.engine)
    return create_app(engine, tokenizer, cfg.limits)


def parse_deltas(items: list[str]) -> dict[str, str]:
    """``["name=PATH", …]`` (or a bare PATH, named by its folder) → ``{name: path}``."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = Path(item).name, item
        if not name or not path:
            raise ConfigError(f"--delta expects name=PATH, got {item!r}")
        if name in out:
            raise ConfigError(f"--delta: the name {name!r} is given twice")
        out[name] = path
    return out
