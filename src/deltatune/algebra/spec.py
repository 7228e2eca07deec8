"""The typed description of one merge: what :func:`deltatune.algebra.engine.run_merge` consumes.

:func:`deltatune.algebra.merge` builds a :class:`MergeSpec` from its keyword arguments with
:func:`deltatune.config.parse_config` (the coercer of method, training and recipe configs), and a YAML recipe
(:class:`deltatune.algebra.recipe.MergeRecipe`) becomes one with :meth:`MergeRecipe.to_spec`, so a bad
value or an unknown key gets the same :class:`ConfigError` from the API, the CLI and a YAML file.  The merge
parameters themselves (``params``, ``weights``, ``input_params``) are checked per method by
:func:`deltatune.algebra.options.resolve_params`, which knows which keys each method reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from deltatune.config import brief, option, require

DTYPE_NAMES = ("float32", "bfloat16", "float16")
VocabRule = Literal["error", "truncate", "extend"]


def _opt(default: Any, text: str, **kwargs: Any) -> Any:
    """:func:`deltatune.config.option` with the default first (reads better in this long field list)."""
    return option(text, default, **kwargs)


@dataclass
class MergeSpec:
    """One merge, fully described: inputs, method and parameters, where the result goes and how."""

    inputs: list[Any] = _opt(None, "deltas (objects or folders) or fine-tuned checkpoint folders",
                             default_factory=list)
    method: str = _opt("task_arithmetic", "merge method (deltatune.algebra.methods.METHODS)")
    base: str | Path | None = _opt(None, "base checkpoint (checkpoint inputs, checkpoint output, model_stock…)")
    weights: list[Any] | None = _opt(None, "one weight per input (checked per input by the method)")
    params: dict[str, Any] | None = _opt(None, "global method parameters (lambda, normalize, scope, …)")
    input_params: list[dict[str, Any]] | None = _opt(None, "per-input parameters (weight, density, …)")
    preset: Literal["paper", "mergekit", "peft"] = _opt("paper", "defaults of the papers, mergekit or PEFT")
    output: Literal["dense", "sparse", "lowrank", "checkpoint"] = _opt("dense", "what to produce")
    out: str | Path | None = _opt(None, "folder to write (required for checkpoint output)")
    rank: int | None = _opt(None, "rank of a lowrank output")
    seed: int = _opt(0, "seed of the random masks (DARE, DELLA)")
    lines: dict[str, Any] | None = _opt(None, "LiNeS depth scaling {alpha: number | auto, beta: number}")
    target_base: str | Path | None = _opt(None, "checkpoint the merged task vector is added to (default: base)")
    vocab: VocabRule = _opt("error", "checkpoints with different vocabularies: error, truncate or extend")
    heads: Literal["auto", "first", "none"] = _opt("auto", "task heads of a delta output")
    out_dtype: Any = _opt(None, "checkpoint dtype (torch dtype or float32 | bfloat16 | float16; default: base's)")
    shard_size: str | int = _opt("5GB", "largest checkpoint shard, e.g. 2GB")
    force: bool = _opt(False, "merge deltas trained on different bases")
    progress: bool = _opt(False, "show progress bars")
    verify: bool = _opt(True, "check the digests of delta folders")
    overwrite: bool = _opt(False, "replace an existing output of another kind")

    def __post_init__(self) -> None:
        if isinstance(self.out_dtype, str):
            import torch

            require(self.out_dtype in DTYPE_NAMES, f"merge: out_dtype must be one of {list(DTYPE_NAMES)}, got "
                                                   f"{brief(self.out_dtype)}")
            self.out_dtype = getattr(torch, self.out_dtype)
