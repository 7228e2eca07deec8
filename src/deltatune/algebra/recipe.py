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
    verify: true            # check the inputs' digests

mergekit form: ``merge_method``, ``base_model``, ``models: [{model, parameters}]``, ``parameters``,
``dtype``, ``out_dtype``, ``tokenizer_source: base`` (the base's vocabulary: ``vocab: truncate``; slices, LoRA
``model+adapter`` references and tokenizer surgery are refused with a clear error).  Unknown keys are errors, never
ignored.

A recipe is untrusted input.  :func:`deltatune.config.read_yaml` reads it (UTF-8, at most 1 MiB, at most
100,000 nodes after alias expansion, nested at most 32 deep: an alias bomb is refused before anything is
built); it may list at most :data:`~deltatune.algebra.options.MAX_INPUTS` inputs; every field gets its
declared type from :func:`deltatune.config.parse_config` and every number must be finite.  Error messages
show at most 80 characters of a value.  ``verify: false`` (CLI ``--no-verify``) skips the inputs' digest
checks.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any, Literal

from deltatune.algebra.engine import lines_params, run_merge
from deltatune.algebra.options import BOOLEAN, CHOICES, MAX_INPUTS, NUMERIC, check_input_count, coerce_param
from deltatune.algebra.spec import DTYPE_NAMES, MergeSpec
from deltatune.config import brief, finite_float, parse_config, read_yaml
from deltatune.delta import Delta
from deltatune.errors import ConfigError

MERGEKIT = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source"}
MERGEKIT_REFUSED = {"slices": "layer slices (frankenmerges)", "modules": "per-module configurations",
                    "tokenizer": "tokenizer surgery", "chat_template": "chat templates"}
CHECKED = NUMERIC | BOOLEAN | set(CHOICES)


@dataclass
class MergeRecipe:
    """A merge as a recipe describes it; :func:`run_recipe` runs it.  ``verify=False`` skips the digest
    check of delta inputs (CLI ``--no-verify``)."""

    method: str
    inputs: list[str]
    input_params: list[dict[str, Any]]
    base: str | None = None
    preset: Literal["paper", "mergekit", "peft"] = "paper"
    params: dict[str, Any] = field(default_factory=dict)
    output: Literal["dense", "sparse", "lowrank", "checkpoint"] = "dense"
    out: str | None = None
    rank: int | None = None
    seed: int = 0
    lines: dict[str, Any] | None = None
    vocab: Literal["error", "truncate", "extend"] = "error"
    heads: Literal["auto", "first", "none"] = "auto"
    out_dtype: str | None = None
    shard_size: str | int = "5GB"
    force: bool = False
    target_base: str | None = None
    verify: bool = True

    def to_spec(self, out: str | None = None, progress: bool = False, overwrite: bool = False) -> MergeSpec:
        """The :class:`MergeSpec` the engine runs (``out`` overrides the recipe's); every recipe field is a spec
        field of the same name, already typed (``MergeSpec`` turns the ``out_dtype`` name into a torch dtype)."""
        values = {f.name: getattr(self, f.name) for f in dataclass_fields(self)}
        values.update(inputs=list(self.inputs), out=out or self.out, progress=progress, overwrite=overwrite)
        return MergeSpec(**values)


NATIVE = {f.name for f in dataclass_fields(MergeRecipe)} - {"input_params"}  # the keys of a deltatune recipe


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):  # a name too long for the file system
        return False


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: expected a path (a non-empty string), got {brief(value)}")
    if "\0" in value:
        raise ConfigError(f"{where}: the path {brief(value)} contains a NUL character")
    return value


def _path(value: Any, where: str, root: Path) -> str:
    """A recipe's path: as given when absolute or when it exists only from the working folder (mergekit reads
    them so), from the recipe's folder ``root`` when it exists only there; a relative path that exists from both
    and names two different things is refused (:class:`ConfigError`), never resolved by a silent preference."""
    value = _text(value, where)
    if "+" in value and not _exists(Path(value)) and not _exists(root / value):
        raise ConfigError(f"{where}: {brief(value)} looks like mergekit's 'model+lora' reference; give the LoRA "
                          "adapter folder itself as an input (deltatune merges LoRA deltas directly)")
    p = Path(value)
    if p.is_absolute() or not _exists(root / p):
        return value
    if not _exists(p):
        return str(root / p)
    if not _same_file(p, root / p):
        raise ConfigError(f"{where}: the relative path {brief(value)} names two different things, "
                          f"{_shown(p)} from the working folder and {_shown(root / p)} from the recipe's folder; "
                          "give an absolute path, or run from the folder you mean")
    return value


def _same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` are one file or folder (through links, hard links and other mounts)."""
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


def _shown(path: Path) -> str:
    """``path`` resolved (as given where it cannot be: a symlink loop)."""
    try:
        return str(path.resolve())
    except (OSError, RuntimeError, ValueError):  # a symlink loop
        return str(path)


def _same_path(a: str, b: str) -> bool:
    return _shown(Path(a)) == _shown(Path(b))


def _dtype(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or value not in DTYPE_NAMES:
        raise ConfigError(f"{where}: dtype must be one of {sorted(DTYPE_NAMES)}, got {brief(value)}")
    return value


def _mapping(value: Any, where: str) -> dict[str, Any]:
    """``value`` (``None`` → ``{}``) as a dict with string keys; the known parameters coerced (finite numbers,
    booleans, choices) by the same rule as :func:`~deltatune.algebra.options.resolve_params`, any other float
    finite (unknown names are refused by the merge, which knows the method)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a mapping of parameters, got {brief(value)}")
    out = {}
    for key, v in value.items():
        if not isinstance(key, str):
            raise ConfigError(f"{where}: parameter names are strings, got {brief(key)}")
        if key in CHECKED:
            v = coerce_param(key, v, where)
        elif isinstance(v, float):  # a parameter the merge will name as unknown, but never a NaN meanwhile
            v = finite_float(v, f"{where}: {key!r}")
        out[key] = v
    return out


def _unknown(doc: Mapping[Any, Any], accepted: set[str]) -> list[Any]:
    return sorted(set(doc) - accepted, key=str)


def _build(fields: dict[str, Any], where: str) -> MergeRecipe:
    """The recipe from ``fields``, each coerced to its declared type; seed and rank range-checked."""
    recipe = parse_config(MergeRecipe, fields, f"{where}: recipe")
    if not 0 <= recipe.seed < 1 << 63:
        raise ConfigError(f"{where}: seed must be in [0, 2^63), got {brief(recipe.seed)}")
    if recipe.rank is not None and recipe.rank < 1:
        raise ConfigError(f"{where}: rank must be ≥ 1, got {recipe.rank}")
    if recipe.out is not None:
        _text(recipe.out, f"{where}: out")
    if recipe.lines:
        lines_params(recipe.lines, f"{where}: lines")
    return recipe


def _refuse_duplicate(seen: dict[str, int], path: str, i: int, where: str) -> None:
    """:class:`ConfigError` when ``models[i]`` names a model an earlier entry named (``seen``: resolved path →
    index), as mergekit refuses "Duplicate merge inputs": one model twice would vote twice in a sign election."""
    key = _shown(Path(path))
    if key in seen:
        raise ConfigError(f"{where}: models[{i}] ({brief(path)}) is the model models[{seen[key]}] already lists; "
                          "mergekit refuses duplicate merge inputs: list each model once")
    seen[key] = i


def _mergekit(doc: dict[Any, Any], root: Path, where: str, max_inputs: int) -> MergeRecipe:
    for key, what in MERGEKIT_REFUSED.items():
        if key in doc:
            raise ConfigError(f"{where}: mergekit's {key!r} ({what}) is not supported; use 'models'")
    unknown = _unknown(doc, MERGEKIT)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {brief(unknown)}; mergekit keys accepted: {sorted(MERGEKIT)}")
    if doc.get("tokenizer_source") not in (None, "base"):
        raise ConfigError(f"{where}: tokenizer_source {brief(doc['tokenizer_source'])} is not supported (only "
                          "'base'); use deltatune's vocab: truncate | extend")
    base = _path(doc["base_model"], f"{where}: base_model", root) if doc.get("base_model") else None
    models = doc.get("models")
    if not isinstance(models, list) or not models:
        raise ConfigError(f"{where}: 'models' must be a non-empty list of {{model: path, parameters: {{...}}}}")
    check_input_count(len(models), where, max_inputs)
    method = doc.get("merge_method")
    if not isinstance(method, str):
        raise ConfigError(f"{where}: 'merge_method' is required (a string), got {brief(method)}")
    inputs, params, seen = [], [], {}
    for i, entry in enumerate(models):
        if not isinstance(entry, dict) or "model" not in entry or set(entry) - {"model", "parameters"}:
            raise ConfigError(f"{where}: models[{i}] must have 'model' and optional 'parameters', got {brief(entry)}")
        path = _path(entry["model"], f"{where}: models[{i}].model", root)
        _refuse_duplicate(seen, path, i, where)
        own = _mapping(entry.get("parameters"), f"{where}: models[{i}].parameters")
        if base is not None and method != "linear" and _same_path(path, base):
            continue  # the base may appear among the models: no task vector (linear averages it in, as mergekit)
        inputs.append(path)
        params.append(own)
    gparams = _mapping(doc.get("parameters"), f"{where}: parameters")
    gparams.pop("int8_mask", None)  # a memory optimisation in mergekit; the numbers do not change
    out_dtype = _dtype(doc.get("out_dtype") or doc.get("dtype"), where)
    # tokenizer_source: base keeps the base's vocabulary: rows a fine-tune added are dropped (deltatune's truncate)
    vocab = {"vocab": "truncate"} if doc.get("tokenizer_source") == "base" else {}
    return _build({"method": method, "inputs": inputs, "input_params": params, "base": base, "preset": "mergekit",
                   "params": gparams, "output": "checkpoint", "out_dtype": out_dtype, **vocab}, where)


def _native(doc: dict[Any, Any], root: Path, where: str, max_inputs: int) -> MergeRecipe:
    unknown = _unknown(doc, NATIVE)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {brief(unknown)}; accepted: {sorted(NATIVE)}")
    if not isinstance(doc.get("method"), str):
        raise ConfigError(f"{where}: 'method' is required (e.g. ties, task_arithmetic), got {brief(doc.get('method'))}")
    entries = doc.get("inputs")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{where}: 'inputs' must be a non-empty list of paths or {{path: ..., weight: ...}}")
    check_input_count(len(entries), where, max_inputs)
    inputs, params = [], []
    for i, entry in enumerate(entries):
        entry = {"path": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict) or "path" not in entry:
            raise ConfigError(f"{where}: inputs[{i}] needs 'path', got {brief(entry)}")
        inputs.append(_path(entry["path"], f"{where}: inputs[{i}].path", root))
        params.append(_mapping({k: v for k, v in entry.items() if k != "path"}, f"{where}: inputs[{i}]"))
    fields = {k: doc[k] for k in NATIVE - {"inputs", "params", "base", "target_base", "out_dtype"} if k in doc}
    for key in ("base", "target_base"):
        if doc.get(key):
            fields[key] = _path(doc[key], f"{where}: {key}", root)
    return _build({**fields, "inputs": inputs, "input_params": params,
                   "params": _mapping(doc.get("params"), f"{where}: params"),
                   "out_dtype": _dtype(doc.get("out_dtype"), where)}, where)


def load_recipe(path: str | Path, max_inputs: int = MAX_INPUTS) -> MergeRecipe:
    """Read a deltatune or mergekit merge YAML (mergekit keys select the ``mergekit`` preset); at most
    ``max_inputs`` inputs (:class:`InputTooLarge`)."""
    path = Path(path)
    doc = read_yaml(path)
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {brief(doc)}")
    root = path.resolve().parent
    is_mergekit = bool(set(doc) & ({"merge_method", "models", "base_model"} | set(MERGEKIT_REFUSED)))
    build = _mergekit if is_mergekit else _native
    return build(doc, root, str(path), max_inputs)


def run_recipe(recipe: MergeRecipe, out: str | None = None, progress: bool = False, overwrite: bool = False
               ) -> Delta | Path:
    """Run ``recipe`` through :func:`deltatune.algebra.merge` (``out`` overrides the recipe's; an existing output
    folder is replaced only if it is an earlier output of the same kind, or with ``overwrite``)."""
    return run_merge(recipe.to_spec(out=out, progress=progress, overwrite=overwrite))
