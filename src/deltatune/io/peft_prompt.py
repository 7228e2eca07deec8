"""PEFT prompt-tuning adapters: read them as a ``"prompt_tuning"`` :class:`Delta` and write prompt deltas in
PEFT 0.21's layout.

A PEFT ``PROMPT_TUNING`` adapter directory holds ``adapter_config.json`` (``peft_type``,
``num_virtual_tokens``, ``token_dim``, ``prompt_tuning_init`` …) and ``adapter_model.safetensors`` with one
un-prefixed tensor ``prompt_embeddings`` ``(num_virtual_tokens, token_dim)`` — plus, for a sequence
classifier, its ``modules_to_save`` head as ``base_model.<module>.<tensor>`` (prompt-learning models have no
``.model.`` segment; checked against PEFT 0.21.2).  The prompt becomes a :class:`PromptPart` under the module
name ``""``, the head tensors ``Delta.heads``.

Nothing is trusted: the config is checked against PEFT's ``PromptTuningConfig`` schema (types, positive
sizes, a task type and layout deltatune runs the same way), tensor dtypes and shapes are checked from the
safetensors header (against the config and, with ``model``, the model's embedding size, context and heads)
before any tensor data is read, and values must be finite.  Encoder-decoder prompts
(``num_transformer_submodules = 2``) and span (question-answering) heads are refused, saying why.
:func:`export_prompt` records a SHA-256 digest of every tensor and of the config in the safetensors metadata
(``deltatune.digests``, which PEFT ignores); loading verifies it when present.  Those steps, the same for every
PEFT method, are :mod:`deltatune.io.peft_files`.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from deltatune.delta import Delta
from deltatune.errors import DeltaFormatError, ShapeMismatch
from deltatune.fingerprint import fingerprint
from deltatune.io.peft_config import CONFIG_NAME, read_config_file, read_modules_to_save, warn_unknown_fields
from deltatune.io.peft_files import (
    FLOAT_DTYPES,
    TensorInfo,
    check_heads,
    exported_config_base,
    head_split,
    head_tensors,
    head_values,
    read_header,
    read_values,
    verified_record,
    weights_file,
    write_adapter,
)
from deltatune.methods.prompt_tuning import PromptTuningConfig
from deltatune.parts.base import MODEL_LEVEL
from deltatune.parts.meta_checks import short
from deltatune.parts.prompt import PromptPart, input_embedding, model_context

PEFT_TYPE = "PROMPT_TUNING"
PROMPT_KEY = "prompt_embeddings"
HEAD_PREFIX = "base_model."  # modules_to_save keys of a prompt-learning adapter
# PEFT task types whose prompted forward deltatune reproduces, and the ones it refuses (why).
TASK_TYPES = (None, "CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS", "FEATURE_EXTRACTION")
REFUSED_TASKS = {
    "SEQ_2_SEQ_LM": "encoder-decoder prompts (deltatune prompts decoder-only and encoder-only models)",
    "QUESTION_ANS": "span heads, whose start/end labels deltatune does not shift past the virtual tokens",
}
INITS = {"RANDOM": "random", "SAMPLE_VOCAB": "vocab", "TEXT": "text"}
# Every field of PEFT 0.21.2's ``PromptTuningConfig`` (with ``PeftConfig``'s / ``PromptLearningConfig``'s).
KNOWN_FIELDS = frozenset((
    "auto_mapping", "base_model_name_or_path", "inference_mode", "modules_to_save", "num_attention_heads",
    "num_layers", "num_transformer_submodules", "num_virtual_tokens", "peft_type", "peft_version",
    "prompt_tuning_init", "prompt_tuning_init_text", "revision", "task_type", "token_dim", "tokenizer_kwargs",
    "tokenizer_name_or_path",
))


# --------------------------------------------------------------------------------------------------
# adapter_config.json
# --------------------------------------------------------------------------------------------------
def _positive(config: dict[str, Any], name: str, file: Path, required: bool) -> int | None:
    value = config.get(name)
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DeltaFormatError(f"{file}: field {name!r} must be a positive integer, got {short(value)}")
    return value


def _optional(config: dict[str, Any], name: str, types: type | tuple[type, ...], what: str, file: Path) -> Any:
    value = config.get(name)
    if value is not None and not isinstance(value, types):
        raise DeltaFormatError(f"{file}: field {name!r} must be {what} or null, got {short(value)}")
    return value


def read_prompt_config(path: Path) -> dict[str, Any]:
    """``path/adapter_config.json`` checked against PEFT 0.21's ``PromptTuningConfig`` schema."""
    file, config = read_config_file(path)
    peft_type = config.get("peft_type")
    if peft_type != PEFT_TYPE:
        raise DeltaFormatError(f"{file}: peft_type is {short(peft_type)}; this reader takes {PEFT_TYPE} adapters "
                               "(LoRA adapters load with deltatune.io.peft_format.load_peft_adapter)")
    task = config.get("task_type")
    if task in REFUSED_TASKS:
        raise DeltaFormatError(f"{file}: task_type {task!r} is not supported: {REFUSED_TASKS[task]}")
    if task not in TASK_TYPES:
        raise DeltaFormatError(f"{file}: task_type must be one of {list(TASK_TYPES)}, got {short(task)}")
    _positive(config, "num_virtual_tokens", file, required=True)
    for name in ("token_dim", "num_layers", "num_attention_heads"):
        _positive(config, name, file, required=False)
    submodules = _positive(config, "num_transformer_submodules", file, required=False)
    if submodules not in (None, 1):
        raise DeltaFormatError(f"{file}: num_transformer_submodules is {submodules}: {REFUSED_TASKS['SEQ_2_SEQ_LM']}")
    init = config.get("prompt_tuning_init", "RANDOM")
    if init not in INITS:
        raise DeltaFormatError(f"{file}: field 'prompt_tuning_init' must be one of {list(INITS)}, got {short(init)}")
    for name in ("prompt_tuning_init_text", "tokenizer_name_or_path", "base_model_name_or_path", "revision",
                 "peft_version"):
        _optional(config, name, str, "a string", file)
    _optional(config, "tokenizer_kwargs", dict, "an object", file)
    if not isinstance(config.get("inference_mode", True), bool):
        raise DeltaFormatError(f"{file}: field 'inference_mode' must be true or false, got "
                               f"{short(config['inference_mode'])}")
    read_modules_to_save(config, file)
    warn_unknown_fields(config, KNOWN_FIELDS, "PromptTuningConfig", file, stacklevel=3)
    return config


def _delta_config(config: dict[str, Any], file: Path) -> dict[str, Any]:
    """The deltatune method config recording the adapter's size and initialisation."""
    init = INITS[config.get("prompt_tuning_init", "RANDOM")]
    text, tokenizer = config.get("prompt_tuning_init_text"), config.get("tokenizer_name_or_path")
    if init == "text" and not (text and text.strip()):
        raise DeltaFormatError(f"{file}: prompt_tuning_init is TEXT but prompt_tuning_init_text is {short(text)}")
    fields = {"init_text": text, "tokenizer": tokenizer} if init == "text" else {}
    return asdict(PromptTuningConfig(num_virtual_tokens=config["num_virtual_tokens"], init=init, **fields))


# --------------------------------------------------------------------------------------------------
# adapter_model.safetensors
# --------------------------------------------------------------------------------------------------
def _head_key(key: str, modules_to_save: list[str], file: Path) -> tuple[str, str]:
    """``(module, tensor)`` of a ``modules_to_save`` key ``base_model.<module>.<tensor>``; any other key is an
    error naming it."""
    split = head_split(key[len(HEAD_PREFIX):], modules_to_save) if key.startswith(HEAD_PREFIX) else None
    if split is None:
        raise DeltaFormatError(f"{file}: unknown tensor key {short(key)}: a prompt-tuning adapter holds "
                               f"{PROMPT_KEY!r} and the modules_to_save {short(modules_to_save)} as "
                               f"'{HEAD_PREFIX}<module>.<tensor>'")
    return split


def _check_model(model: nn.Module, tokens: int, dim: int, heads: dict[str, dict[str, str]],
                 infos: dict[str, TensorInfo], file: Path) -> None:
    """The prompt's token dimension and length against the model's embeddings and context, then the heads."""
    own_dim = input_embedding(model, str(file)).weight.shape[1]
    if own_dim != dim:
        raise ShapeMismatch(f"{file}: {PROMPT_KEY!r} has token dimension {dim}, the model's input embeddings {own_dim}")
    context = model_context(model)
    if context is not None and tokens >= context[0]:
        raise ShapeMismatch(f"{file}: a prompt of {tokens} virtual tokens leaves no room for input in the model's "
                            f"context of {context[0]} positions (config.{context[1]})")
    check_heads(model, heads, infos, file)


# --------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------
def load_prompt_adapter(path: str | Path, model: nn.Module | None = None, verify: bool = True) -> Delta:
    """Read a PEFT prompt-tuning adapter directory as a ``"prompt_tuning"`` :class:`Delta`: one
    :class:`PromptPart` under ``""`` and the ``modules_to_save`` tensors as ``Delta.heads``.

    With ``model``, the token dimension, the context (the prompt must leave room for input) and the heads'
    shapes are checked (:class:`ShapeMismatch`) before any tensor data is read, and the delta gets the
    model's fingerprint; without it the fingerprint is ``None`` (PEFT records none).  With ``verify``, an
    adapter written by :func:`export_prompt` is checked against its digests (:class:`IntegrityError`)."""
    path = Path(path)
    config = read_prompt_config(path)
    file = weights_file(path)
    infos, metadata = read_header(file)
    if PROMPT_KEY not in infos:
        raise DeltaFormatError(f"{file}: no {PROMPT_KEY!r} tensor (keys: {short(sorted(infos))})")
    modules_to_save = list(config.get("modules_to_save") or [])
    heads: dict[str, dict[str, str]] = {}
    for key in sorted(infos):
        if key != PROMPT_KEY:
            module, tensor = _head_key(key, modules_to_save, file)
            if tensor in heads.setdefault(module, {}):
                raise DeltaFormatError(f"{file}: two tensors for {module}.{tensor}")
            heads[module][tensor] = key
    dtype, shape = infos[PROMPT_KEY].dtype, infos[PROMPT_KEY].shape
    tokens, dim = config["num_virtual_tokens"], config.get("token_dim")
    if dtype not in FLOAT_DTYPES:
        raise DeltaFormatError(f"{file}: {PROMPT_KEY!r} has dtype {short(dtype)}; it must be floating point "
                               f"({', '.join(FLOAT_DTYPES)})")
    if len(shape) != 2 or shape[0] != tokens or (dim is not None and shape[1] != dim) or 0 in shape:
        raise ShapeMismatch(f"{file}: {PROMPT_KEY!r} has shape {list(shape)}, but {CONFIG_NAME} says "
                            f"num_virtual_tokens={tokens} and token_dim={dim}")
    for tensors in heads.values():
        for key in tensors.values():
            if infos[key].dtype not in FLOAT_DTYPES:
                raise DeltaFormatError(f"{file}: head tensor {key!r} has dtype {infos[key].dtype}, not floating "
                                       "point")
    if model is not None:
        _check_model(model, tokens, shape[1], heads, infos, file)
    record = verified_record(file, metadata, config, infos, verify)
    values = read_values(file, list(infos), record)

    prompt = values[PROMPT_KEY]
    part = PromptPart(tokens, shape[1], dtype=prompt.dtype)
    part.load_tensors({PROMPT_KEY: prompt}, f"{file}: {PROMPT_KEY}")
    fp = fingerprint(model, exclude=list(heads)) if model is not None else None
    return Delta(method="prompt_tuning", config=_delta_config(config, path / CONFIG_NAME),
                 parts={MODEL_LEVEL: part}, heads=head_values(heads, values), fingerprint=fp)


# --------------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------------
def export_prompt(delta: Delta, path: str | Path, base_model_name_or_path: str | None = None,
                  overwrite: bool = False, task_type: str | None = None) -> Path:
    """Write a prompt-tuning ``delta`` as a PEFT adapter directory (``PeftModel.from_pretrained`` loads it).

    ``task_type`` picks PEFT's model class, which decides how PEFT prepends the prompt; by default
    ``SEQ_CLS`` when the delta carries task heads (they are written as ``modules_to_save``), else
    ``CAUSAL_LM``.  ``prompt_tuning_init`` records the delta's initialisation where PEFT's config can
    (``TEXT`` needs the init text and a tokenizer name; a prompt initialised from token ids is written as
    ``RANDOM``): a loaded adapter's trained values never depend on it.  Non-finite values are refused
    (:class:`NonFiniteError`); the directory is written atomically; an existing ``path`` that is not an
    earlier PEFT export is refused (:class:`OutputExists`) unless ``overwrite``."""
    path = Path(path)
    part = delta.parts.get(MODEL_LEVEL)
    if len(delta.parts) != 1 or part is None or part.kind != PromptPart.kind:
        kinds = sorted(f"{n or '<model>'} ({p.kind})" for n, p in delta.parts.items())
        raise DeltaFormatError(f"only a delta holding exactly one prompt part (under the module name '') exports "
                               f"as a PEFT prompt-tuning adapter; this one has {kinds[:5]}")
    task_type = task_type or ("SEQ_CLS" if delta.heads else "CAUSAL_LM")
    if task_type not in TASK_TYPES or task_type is None:
        raise DeltaFormatError(f"task_type must be one of {[t for t in TASK_TYPES if t]}, got {short(task_type)}")
    init, text, tokenizer = (delta.config.get(k) for k in ("init", "init_text", "tokenizer"))
    peft_init = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB"}.get(init, "RANDOM")
    if init == "text" and isinstance(text, str) and isinstance(tokenizer, str):
        peft_init = "TEXT"
    config = {
        **exported_config_base(PEFT_TYPE, base_model_name_or_path, task_type),
        "num_virtual_tokens": part.num_virtual_tokens,
        "token_dim": part.dim,
        "num_transformer_submodules": 1,
        "num_attention_heads": None,
        "num_layers": None,
        "modules_to_save": sorted(delta.heads) or None,
        "prompt_tuning_init": peft_init,
        "prompt_tuning_init_text": text if peft_init == "TEXT" else None,
        "tokenizer_name_or_path": tokenizer if peft_init == "TEXT" else None,
        "tokenizer_kwargs": None,
    }
    tensors: dict[str, Tensor] = {PROMPT_KEY: part.prompt_embeddings.detach().to("cpu").contiguous()}
    tensors.update(head_tensors(delta.heads, HEAD_PREFIX))
    return write_adapter(path, config, tensors, overwrite)


__all__ = ["export_prompt", "load_prompt_adapter", "read_prompt_config"]
