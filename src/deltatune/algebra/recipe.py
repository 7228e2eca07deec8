"""Merge recipes from YAML: deltatune's own keys, or a mergekit configuration (same numbers under the
``mergekit`` preset).

deltatune form::

    method: ties            # see deltatune.algebra.methods.METHODS
    preset: paper           # paper | mergekit | peft
    base: path/to/base      # needed for checkpoint inputs / checkpoint output
    inputs:
      - {path: runs/sst2/delta, weight: 1.0, density: 0.2}
    params: {lambda: 1.0}
    output: dense           # dense | sparse | lowrank | checkpoint
    out: merged/

mergekit form: ``merge_method``, ``base_model``, ``models: [{model, parameters}]``, ``parameters``,
``dtype``, ``out_dtype`` (slices, LoRA ``model+adapter`` references and tokenizer surgery are refused
with a clear error).  Unknown keys are errors, never ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from deltatune.errors import ConfigError

NATIVE = {"method", "preset", "base", "inputs", "params", "output", "out", "rank", "seed", "lines", "vocab",
          "heads", "out_dtype", "shard_size", "force", "target_base"}
MERGEKIT = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source"}
MERGEKIT_REFUSED = {"slices": "layer slices (frankenmerges)", "modules": "per-module configurations",
                    "tokenizer": "tokenizer surgery", "chat_template": "chat templates"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class MergeRecipe:
    method: str
    inputs: list[str]
    input_params: list[dict[str, Any]]
    base: str | None = None
    preset: str = "paper"
    params: dict[str, Any] = field(default_factory=dict)
    output: str = "dense"
    out: str | None = None
    rank: int | None = None
    seed: int = 0
    lines: dict[str, Any] | None = None
    vocab: str = "error"
    heads: str = "auto"
    out_dtype: str | None = None
    shard_size: str = "5GB"
    force: bool = False
    target_base: str | None = None


def _path(value: Any, where: str, root: Path) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: expected a path, got {value!r}")
    if "+" in value and not Path(value).exists():
        raise ConfigError(f"{where}: {value!r} looks like mergekit's 'model+lora' reference; give the LoRA "
                          "adapter folder itself as an input (deltatune merges LoRA deltas directly)")
    p = Path(value)
    if not p.is_absolute() and not p.exists() and (root / p).exists():
        return str(root / p)
    return value


def _dtype(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if value not in DTYPES:
        raise ConfigError(f"{where}: dtype must be one of {sorted(DTYPES)}, got {value!r}")
    return str(value)


def _mergekit(doc: dict[str, Any], root: Path, where: str) -> MergeRecipe:
    for key, what in MERGEKIT_REFUSED.items():
        if key in doc:
            raise ConfigError(f"{where}: mergekit's {key!r} ({what}) is not supported; use 'models'")
    unknown = sorted(set(doc) - MERGEKIT)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; mergekit keys accepted: {sorted(MERGEKIT)}")
    if doc.get("tokenizer_source") not in (None, "base"):
        raise ConfigError(f"{where}: tokenizer_source {doc['tokenizer_source']!r} is not supported (only 'base'); "
                          "use deltatune's vocab: truncate | extend")
    base = _path(doc["base_model"], f"{where}: base_model", root) if doc.get("base_model") else None
    models = doc.get("models")
    if not isinstance(models, list) or not models:
        raise ConfigError(f"{where}: 'models' must be a non-empty list of {{model: path, parameters: {{...}}}}")
    inputs, params = [], []
    for i, entry in enumerate(models):
        if not isinstance(entry, dict) or "model" not in entry or set(entry) - {"model", "parameters"}:
            raise ConfigError(f"{where}: models[{i}] must have 'model' and optional 'parameters', got {entry!r}")
        path = _path(entry["model"], f"{where}: models[{i}].model", root)
        if base is not None and Path(path).resolve() == Path(base).resolve() and doc.get("merge_method") != "linear":
            continue  # the base may appear among the models: no task vector (linear averages it in, as mergekit)
        inputs.append(path)
        params.append(dict(entry.get("parameters") or {}))
    gparams = dict(doc.get("parameters") or {})
    gparams.pop("int8_mask", None)  # a memory optimisation in mergekit; the numbers do not change
    method = doc.get("merge_method")
    if not isinstance(method, str):
        raise ConfigError(f"{where}: 'merge_method' is required")
    out_dtype = _dtype(doc.get("out_dtype") or doc.get("dtype"), where)
    return MergeRecipe(method=method, inputs=inputs, input_params=params, base=base, preset="mergekit",
                       params=gparams, output="checkpoint", out_dtype=out_dtype)


def _native(doc: dict[str, Any], root: Path, where: str) -> MergeRecipe:
    unknown = sorted(set(doc) - NATIVE)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; accepted: {sorted(NATIVE)}")
    if not isinstance(doc.get("method"), str):
        raise ConfigError(f"{where}: 'method' is required (e.g. ties, task_arithmetic)")
    entries = doc.get("inputs")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{where}: 'inputs' must be a non-empty list of paths or {{path: ..., weight: ...}}")
    inputs, params = [], []
    for i, entry in enumerate(entries):
        entry = {"path": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict) or "path" not in entry:
            raise ConfigError(f"{where}: inputs[{i}] needs 'path', got {entry!r}")
        inputs.append(_path(entry["path"], f"{where}: inputs[{i}].path", root))
        params.append({k: v for k, v in entry.items() if k != "path"})
    kw = {k: doc[k] for k in ("preset", "output", "out", "rank", "seed", "lines", "vocab", "heads", "shard_size",
                              "force") if k in doc}
    for key in ("base", "target_base"):
        if doc.get(key):
            kw[key] = _path(doc[key], f"{where}: {key}", root)
    params_doc = doc.get("params") or {}
    if not isinstance(params_doc, dict):
        raise ConfigError(f"{where}: 'params' must be a mapping")
    return MergeRecipe(method=doc["method"], inputs=inputs, input_params=params, params=dict(params_doc),
                       out_dtype=_dtype(doc.get("out_dtype"), where), **kw)


def load_recipe(path: str | Path) -> MergeRecipe:
    """Read a deltatune or mergekit merge YAML (mergekit keys select the ``mergekit`` preset)."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read YAML ({exc})") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    root = path.resolve().parent
    is_mergekit = bool(set(doc) & ({"merge_method", "models", "base_model"} | set(MERGEKIT_REFUSED)))
    return _mergekit(doc, root, str(path)) if is_mergekit else _native(doc, root, str(path))


def run_recipe(recipe: MergeRecipe, out: str | None = None, progress: bool = False):
    """Run ``recipe`` through :func:`deltatune.algebra.merge` (``out`` overrides the recipe's)."""
    from deltatune.algebra.engine import merge

    return merge(recipe.inputs, recipe.method, base=recipe.base, params=recipe.params,
                 input_params=recipe.input_params, preset=recipe.preset, output=recipe.output,
                 out=out or recipe.out, rank=recipe.rank, seed=recipe.seed, lines=recipe.lines,
                 target_base=recipe.target_base, vocab=recipe.vocab, heads=recipe.heads,  # type: ignore[arg-type]
                 out_dtype=DTYPES[recipe.out_dtype] if recipe.out_dtype else None, shard_size=recipe.shard_size,
                 force=recipe.force, progress=progress)
