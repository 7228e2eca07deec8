"""PEFT ``adapter_config.json``: which reader loads the adapter, the checks every method's schema shares, and
PEFT 0.21's ``LoraConfig`` schema.

:func:`load_peft_adapter` reads only ``peft_type`` (:func:`read_peft_type`) and dispatches to the reader that
:data:`PEFT_READERS` registers for it (each PEFT method's reader lives in its own file and is imported when
used); a type without a reader is a :class:`DeltaFormatError` saying why deltatune cannot represent it.
Every method's config reader uses :func:`read_config_file`, :func:`check_field_types` (with the field checks
:data:`SHARED_FIELD_TYPES`, :data:`IS_BOOL`, :data:`NAMES` …), :func:`read_modules_to_save` and
:func:`warn_unknown_fields`; the adapter's tensor file is :mod:`deltatune.io.peft_files`.
For LoRA adapters (:func:`read_adapter_config`), every field deltatune reads must have the type PEFT
annotates (``r`` a positive integer, not a bool; ``lora_alpha`` and the pattern values finite numbers;
``fan_in_fan_out`` a real bool; …).  LoRA variants and initialisations that neither a plain ``s·B·A`` part nor a
DoRA part (``use_dora``) can represent are refused, saying what and why.  A wrong type raises
:class:`DeltaFormatError`, NaN/±Inf :class:`NonFiniteError`, both naming the file and the field.
"""

from __future__ import annotations

import importlib
import math
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deltatune.errors import DeltaFormatError, NonFiniteError
from deltatune.io.digest import DIGEST_FIELD, json_digest
from deltatune.io.json_io import read_json_object
from deltatune.parts.meta_checks import short

if TYPE_CHECKING:
    from torch import nn

    from deltatune.delta import Delta

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."  # how PEFT prefixes module names in the adapter's tensor keys
# Safetensors metadata key of the digests written by ``export_peft`` (PEFT ignores the metadata).
DIGEST_METADATA_KEY = f"deltatune.{DIGEST_FIELD}"
REQUIRED_FIELDS = ("peft_type", "r", "lora_alpha")
# LoRA variants and extras whose adapters neither a plain ``s·B·A`` part nor a DoRA part can represent.
UNSUPPORTED_FIELDS = {
    "lora_bias": "a trainable bias on lora_B",
    "use_qalora": "QALoRA (GPTQ input pooling)",
    "use_bdlora": "BD-LoRA (block-diagonal factors)",
    "layer_replication": "layer replication (changes the model's structure)",
    "megatron_config": "Megatron tensor-parallel LoRA layers",
    "trainable_token_indices": "trainable tokens (embedding rows stored separately)",
    "alora_invocation_tokens": "activated LoRA (depends on invocation tokens)",
    "target_parameters": "LoRA on raw nn.Parameters",
    "kasa_config": "KaSA (SVD truncation of the base weight)",
    "monteclora_config": "MonteCLoRA (variational LoRA)",
    "arrow_config": "Arrow routing over several LoRAs",
}
# Initialisations that rewrite the base weights: the adapter is relative to that *modified* base.
BASE_MUTATING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")
# Initialisations after which the adapter is a plain ``s·B·A`` on the unchanged base.
PLAIN_INITS = ("gaussian", "eva", "orthogonal", "mica")
# Why PEFT methods without a deltatune reader are not a LoRA delta.
OTHER_PEFT_TYPES = {
    "ADALORA": "it stores an SVD-form update (lora_E, ranknum) instead of B·A",
    "LOHA": "its update is a Hadamard product of factor pairs, not B·A",
    "LOKR": "its update is a Kronecker product, not B·A",
    "P_TUNING": "it learns virtual tokens and changes no weight",
    "PREFIX_TUNING": "it learns key/value prefixes and changes no weight",
}
# Every field of PEFT 0.21.2's ``LoraConfig`` (with ``PeftConfig``'s); others come from another version.
KNOWN_FIELDS = frozenset((
    "alora_invocation_tokens", "alpha_pattern", "arrow_config", "auto_mapping", "base_model_name_or_path",
    "bias", "corda_config", "ensure_weight_tying", "eva_config", "exclude_modules", "fan_in_fan_out",
    "inference_mode", "init_lora_weights", "kasa_config", "layer_replication", "layers_pattern",
    "layers_to_transform", "loftq_config", "lora_alpha", "lora_bias", "lora_dropout", "lora_ga_config",
    "megatron_config", "megatron_core", "modules_to_save", "monteclora_config", "peft_type", "peft_version",
    "qalora_group_size", "r", "rank_pattern", "revision", "runtime_config", "target_modules",
    "target_parameters", "task_type", "trainable_token_indices", "use_bdlora", "use_dora", "use_qalora",
    "use_rslora", "velora_config",
))


# --------------------------------------------------------------------------------------------------
# PEFT's pattern rule
# --------------------------------------------------------------------------------------------------
def pattern_key(keys: list[str], module: str, where: str = "pattern") -> str | None:
    """The first key of a PEFT ``rank_pattern``/``alpha_pattern`` that matches ``module``, or ``None``.

    Same rule as ``peft.utils.other.get_pattern_key`` (0.21.2): the key is a regular expression that
    must match the whole name or a dot-separated suffix of it.
    """
    for key in keys:
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return key
        except (re.error, RecursionError, OverflowError) as exc:
            raise DeltaFormatError(f"{where}: key {short(key)} is not a valid regular expression "
                                   f"({str(exc)[:80]})") from None
    return None


def pattern_value(pattern: dict[str, Any], module: str, default: Any, where: str) -> Any:
    """``pattern``'s value for ``module`` under PEFT's first-match rule, else ``default``."""
    key = pattern_key(list(pattern), module, where)
    return default if key is None else pattern[key]


# --------------------------------------------------------------------------------------------------
# adapter_config.json: what every PEFT method's schema checks the same way
# --------------------------------------------------------------------------------------------------
#: A field check: (predicate on the JSON value, what is expected, for the error).
FieldCheck = tuple[Callable[[Any], bool], str]


def is_str_list(v: Any) -> bool:
    """Whether ``v`` is a JSON list of strings."""
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


IS_STR: FieldCheck = (lambda v: isinstance(v, str), "a string")
IS_BOOL: FieldCheck = (lambda v: isinstance(v, bool), "true or false")
STR_OR_NONE: FieldCheck = (lambda v: v is None or isinstance(v, str), "a string or null")
NAMES: FieldCheck = (lambda v: v is None or isinstance(v, str) or is_str_list(v), "a string, a list of strings or null")
MODULE_NAMES: FieldCheck = (lambda v: v is None or is_str_list(v), "a list of module names or null")
#: The fields PEFT 0.21.2's ``LoraConfig`` and ``IA3Config`` share, after their annotations.
SHARED_FIELD_TYPES: dict[str, FieldCheck] = {
    "peft_type": IS_STR,
    "task_type": STR_OR_NONE,
    "base_model_name_or_path": STR_OR_NONE,
    "revision": STR_OR_NONE,
    "inference_mode": IS_BOOL,
    "fan_in_fan_out": IS_BOOL,
    "target_modules": NAMES,
    "exclude_modules": NAMES,
    "modules_to_save": MODULE_NAMES,
}


def read_config_file(path: Path, required: tuple[str, ...] = (), types: dict[str, FieldCheck] | None = None
                     ) -> tuple[Path, dict[str, Any]]:
    """``path/adapter_config.json`` and the JSON object it holds, with the ``required`` fields present and the
    fields of ``types`` of their types (:func:`check_field_types`); a missing folder or file, anything but a JSON
    object, a missing field or a wrong type is a :class:`DeltaFormatError`."""
    file = path / CONFIG_NAME
    config = read_json_object(file, "PEFT adapter", f"{CONFIG_NAME} and {SAFETENSORS_NAME}")
    missing = [f for f in required if f not in config]
    if missing:
        raise DeltaFormatError(f"{file}: missing field(s) {missing}")
    check_field_types(config, types or {}, file)
    return file, config


def check_field_types(config: dict[str, Any], types: dict[str, FieldCheck], file: Path) -> None:
    """Every field of ``types`` present in ``config`` must pass its check (:class:`DeltaFormatError` naming the
    field, what was expected and what it holds)."""
    for name, (check, expected) in types.items():
        if name in config and not check(config[name]):
            raise DeltaFormatError(f"{file}: field {name!r} must be {expected}, got {short(config[name])}")


def read_modules_to_save(config: dict[str, Any], file: Path) -> list[str]:
    """The config's ``modules_to_save`` (a list of non-empty module names or null) as a list."""
    check, expected = MODULE_NAMES
    value = config.get("modules_to_save")
    if not check(value):
        raise DeltaFormatError(f"{file}: field 'modules_to_save' must be {expected}, got {short(value)}")
    names = list(value or [])
    if "" in names:
        raise DeltaFormatError(f"{file}: field 'modules_to_save' holds an empty module name")
    return names


def warn_unknown_fields(config: dict[str, Any], known: frozenset[str], schema: str, file: Path,
                        stacklevel: int) -> None:
    """Warn about set fields that PEFT 0.21's ``schema`` (``LoraConfig`` …) lacks (PEFT ignores them, and so does
    deltatune); ``stacklevel`` as for :func:`warnings.warn` called where this is called."""
    unknown = sorted(k for k, v in config.items() if k not in known and v not in (None, False, 0, "", [], {}))
    if unknown:
        warnings.warn(f"{file}: fields {short(unknown)} are not in PEFT 0.21's {schema} and were ignored "
                      "(as PEFT ignores them)", stacklevel=stacklevel + 1)


# --------------------------------------------------------------------------------------------------
# adapter_config.json against PEFT's LoraConfig schema
# --------------------------------------------------------------------------------------------------
# Field → (check, what is expected), after PEFT 0.21.2's ``LoraConfig`` annotations.
FIELD_TYPES: dict[str, FieldCheck] = {
    **SHARED_FIELD_TYPES,
    "use_rslora": IS_BOOL,
    "use_dora": IS_BOOL,
    "lora_bias": IS_BOOL,
    "use_qalora": IS_BOOL,
    "ensure_weight_tying": IS_BOOL,
    "bias": (lambda v: isinstance(v, str), "'none', 'all' or 'lora_only'"),
    "init_lora_weights": (lambda v: isinstance(v, bool | str), "true, false or an initialisation name"),
    "layers_pattern": NAMES,
    "layers_to_transform": (lambda v: v is None or _is_int(v) or (isinstance(v, list) and all(map(_is_int, v))),
                            "an integer, a list of integers or null"),
    "rank_pattern": (lambda v: v is None or isinstance(v, dict), "an object {pattern: rank} or null"),
    "alpha_pattern": (lambda v: v is None or isinstance(v, dict), "an object {pattern: alpha} or null"),
}


def finite_number(value: Any, where: str) -> float:
    """``value`` as a finite float; ``DeltaFormatError`` for a non-number, ``NonFiniteError`` for NaN/±Inf."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DeltaFormatError(f"{where} must be a number, got {short(value)}")
    try:
        out = float(value)
    except OverflowError:
        out = math.inf
    if not math.isfinite(out):
        raise NonFiniteError(f"{where} must be a finite number, got {short(value)}")
    return out


def _positive_int(value: Any, where: str) -> int:
    if not _is_int(value) or value < 1:
        raise DeltaFormatError(f"{where} must be a positive integer, got {short(value)}")
    return value


@dataclass(frozen=True)
class AdapterConfig:
    """The fields of a PEFT ``adapter_config.json`` that deltatune reads, validated."""

    raw: dict[str, Any]
    r: int
    alpha: float
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    modules_to_save: list[str]
    rslora: bool
    fan_in_fan_out: bool
    dropout: float
    dora: bool = False  # use_dora: every module also has a lora_magnitude_vector


def _check_variants(config: dict[str, Any], file: Path) -> None:
    """Refuse other PEFT methods, LoRA variants and inits that neither a plain ``s·B·A`` part nor a DoRA part
    can represent."""
    peft_type = config["peft_type"]
    if peft_type != "LORA":
        why = OTHER_PEFT_TYPES.get(peft_type, "only LoRA is a low-rank update s·B·A of existing weights")
        raise DeltaFormatError(f"{file}: peft_type is {short(peft_type)}; this reader reads only LORA adapters "
                               f"({why})")
    for name, what in UNSUPPORTED_FIELDS.items():
        if config.get(name):
            raise DeltaFormatError(f"{file}: field {name!r} is {short(config[name])}: {what} is not supported; "
                                   "only plain LoRA/rsLoRA and DoRA adapters convert to a deltatune delta")
    bias = config.get("bias", "none")
    if bias != "none":
        raise DeltaFormatError(f"{file}: field 'bias' is {short(bias)}; only 'none' is supported (trained base "
                               "biases are not part of a LoRA delta)")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(BASE_MUTATING_INITS):
        raise DeltaFormatError(f"{file}: init_lora_weights is {short(init)}, which rewrites the base weights, "
                               "so the adapter only fits that modified base; save it with PEFT's "
                               "path_initial_model_for_weight_conversion to get a plain LoRA")
    if isinstance(init, str) and init not in PLAIN_INITS:
        raise DeltaFormatError(f"{file}: init_lora_weights is {short(init)}, not one PEFT 0.21 knows; "
                               f"expected true, false or one of {list(PLAIN_INITS)}")
    warn_unknown_fields(config, KNOWN_FIELDS, "LoraConfig", file, stacklevel=4)


def _read_patterns(config: dict[str, Any], file: Path) -> tuple[dict[str, int], dict[str, float]]:
    ranks: dict[str, int] = {}
    for key, value in (config.get("rank_pattern") or {}).items():
        ranks[key] = _positive_int(value, f"{file}: field 'rank_pattern' entry {short(key)}")
    alphas: dict[str, float] = {}
    for key, value in (config.get("alpha_pattern") or {}).items():
        alphas[key] = finite_number(value, f"{file}: field 'alpha_pattern' entry {short(key)}")
    for name, pattern in (("rank_pattern", ranks), ("alpha_pattern", alphas)):
        for key in pattern:
            pattern_key([key], "", f"{file}: field {name!r}")
    return ranks, alphas


def read_peft_type(path: Path) -> str:
    """The ``peft_type`` of ``path/adapter_config.json`` (present and a string), read before any method's schema."""
    _, config = read_config_file(path, ("peft_type",), {"peft_type": IS_STR})
    return config["peft_type"]


def read_adapter_config(path: Path) -> AdapterConfig:
    """Read ``path/adapter_config.json`` and check it against PEFT 0.21's ``LoraConfig`` schema."""
    file, config = read_config_file(path, REQUIRED_FIELDS, FIELD_TYPES)
    _check_variants(config, file)
    r = _positive_int(config["r"], f"{file}: field 'r'")
    alpha = finite_number(config["lora_alpha"], f"{file}: field 'lora_alpha'")
    dropout = finite_number(config.get("lora_dropout", 0.0), f"{file}: field 'lora_dropout'")
    if not 0.0 <= dropout < 1.0:
        raise DeltaFormatError(f"{file}: field 'lora_dropout' must be in [0, 1), got {dropout}")
    rank_pattern, alpha_pattern = _read_patterns(config, file)
    return AdapterConfig(raw=config, r=r, alpha=alpha, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
                         modules_to_save=read_modules_to_save(config, file), rslora=config.get("use_rslora", False),
                         fan_in_fan_out=config.get("fan_in_fan_out", False), dropout=dropout,
                         dora=config.get("use_dora", False))


def config_digest(config: dict[str, Any]) -> str:
    """Digest of an adapter config; pattern dicts as ordered pairs, since PEFT's first match depends on order."""
    body = dict(config)
    for name in ("rank_pattern", "alpha_pattern"):
        if isinstance(body.get(name), dict):
            body[name] = [list(kv) for kv in body[name].items()]
    return json_digest(body)


# --------------------------------------------------------------------------------------------------
# dispatch on peft_type
# --------------------------------------------------------------------------------------------------
def lazy_peft_function(module: str, function: str, what: str) -> Callable[..., Any]:
    """``module.function``, imported on first call: each PEFT method's reader and writer live in their own file.
    A missing module is a :class:`DeltaFormatError` saying which (not an ``ImportError`` from deep inside)."""

    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            raise DeltaFormatError(f"PEFT {what} adapters need {module}, which this deltatune installation "
                                   "lacks") from None
        return getattr(mod, function)(*args, **kwargs)

    call.__name__ = call.__qualname__ = function
    return call


#: ``peft_type`` → ``reader(path, model=None, verify=True) -> Delta`` for that PEFT method's adapters.
PEFT_READERS: dict[str, Callable[..., Delta]] = {
    "LORA": lazy_peft_function("deltatune.io.peft_format", "load_lora_adapter", "LORA"),
    "IA3": lazy_peft_function("deltatune.io.peft_ia3", "load_ia3_adapter", "IA3"),
    "PROMPT_TUNING": lazy_peft_function("deltatune.io.peft_prompt", "load_prompt_adapter", "PROMPT_TUNING"),
}


def load_peft_adapter(path: str | Path, model: nn.Module | None = None, verify: bool = True) -> Delta:
    """Read a PEFT adapter directory as a :class:`~deltatune.delta.Delta`, with the reader :data:`PEFT_READERS`
    has for its ``peft_type`` (``LORA``: :func:`deltatune.io.peft_format.load_lora_adapter`, plain LoRA, rsLoRA
    and DoRA; ``IA3``: ``deltatune.io.peft_ia3.load_ia3_adapter``; ``PROMPT_TUNING``:
    ``deltatune.io.peft_prompt.load_prompt_adapter``).

    A ``peft_type`` without a reader is a :class:`DeltaFormatError` naming it and why deltatune cannot represent
    it.  ``model`` (the base model: shapes checked against it, fingerprint taken) and ``verify`` (check the digests
    an export recorded) are passed to the reader.
    """
    path = Path(path)
    peft_type = read_peft_type(path)
    reader = PEFT_READERS.get(peft_type)
    if reader is None:
        why = OTHER_PEFT_TYPES.get(peft_type, "no deltatune part kind represents its tensors")
        *others, last = PEFT_READERS
        readable = f"{', '.join(others)} and {last}" if others else last
        raise DeltaFormatError(f"{path / CONFIG_NAME}: peft_type is {short(peft_type)}; deltatune reads only "
                               f"{readable} adapters ({why})")
    return reader(path, model=model, verify=verify)
