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
(``deltatune.digests``, which PEFT ignores); loading verifies it when present.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from deltatune.delta import Delta
from deltatune.errors import DeltaFormatError, IntegrityError, ShapeMismatch, TargetError
from deltatune.fingerprint import fingerprint
from deltatune.io.atomic import atomic_dir
from deltatune.io.digest import tensor_digest, verify_tensor
from deltatune.io.json_io import read_json_object
from deltatune.io.outputs import PEFT_KIND
from deltatune.io.peft_config import CONFIG_NAME, DIGEST_METADATA_KEY, SAFETENSORS_NAME, config_digest
from deltatune.methods.prompt_tuning import PromptTuningConfig
from deltatune.parts.base import MODEL_LEVEL
from deltatune.parts.meta_checks import check_finite, short
from deltatune.parts.prompt import PromptPart, input_embedding, model_context

PEFT_TYPE = "PROMPT_TUNING"
PROMPT_KEY = "prompt_embeddings"
HEAD_PREFIX = "base_model."  # modules_to_save keys of a prompt-learning adapter
BIN_NAME = "adapter_model.bin"
FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
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
_READ_ERRORS = (SafetensorError, OSError, ValueError, RuntimeError, TypeError, OverflowError)


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
    file = path / CONFIG_NAME
    config = read_json_object(file, "PEFT adapter", f"{CONFIG_NAME} and {SAFETENSORS_NAME}")
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
    heads = _optional(config, "modules_to_save", list, "a list of module names", file) or []
    if not all(isinstance(h, str) and h for h in heads):
        raise DeltaFormatError(f"{file}: field 'modules_to_save' must hold non-empty module names, got {short(heads)}")
    unknown = sorted(k for k, v in config.items() if k not in KNOWN_FIELDS and v not in (None, False, 0, "", [], {}))
    if unknown:
        warnings.warn(f"{file}: fields {short(unknown)} are not in PEFT 0.21's PromptTuningConfig and were ignored "
                      "(as PEFT ignores them)", stacklevel=3)
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
def _weights_file(path: Path) -> Path:
    st, bin_ = path / SAFETENSORS_NAME, path / BIN_NAME
    if st.is_file():
        return st
    if bin_.is_file():
        raise DeltaFormatError(f"{bin_}: deltatune does not load pickle files (unpickling can run arbitrary code); "
                               f"re-save the adapter with save_pretrained(..., safe_serialization=True)")
    raise DeltaFormatError(f"{path}: holds no {SAFETENSORS_NAME}")


def _header(file: Path) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict[str, str]]:
    """``{key: (dtype name, shape)}`` and the metadata, from the header alone."""
    try:
        with safe_open(str(file), framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
            keys = fh.keys()
            infos = {k: (str(fh.get_slice(k).get_dtype()), tuple(int(d) for d in fh.get_slice(k).get_shape()))
                     for k in keys}
    except _READ_ERRORS as exc:
        raise DeltaFormatError(f"{file}: truncated or corrupt safetensors file ({str(exc)[:80]})") from None
    return infos, metadata


def _head_split(key: str, modules_to_save: list[str], file: Path) -> tuple[str, str]:
    """``(module, tensor)`` of a ``modules_to_save`` key (PEFT's rule: the module name ends with an entry)."""
    if key.startswith(HEAD_PREFIX):
        pieces = key[len(HEAD_PREFIX):].split(".")
        for i in range(1, len(pieces)):
            module = ".".join(pieces[:i])
            if any(module.endswith(m) for m in modules_to_save):
                return module, ".".join(pieces[i:]).removeprefix("modules_to_save.")
    raise DeltaFormatError(f"{file}: unknown tensor key {short(key)}: a prompt-tuning adapter holds "
                           f"{PROMPT_KEY!r} and the modules_to_save {short(modules_to_save)} as "
                           f"'{HEAD_PREFIX}<module>.<tensor>'")


def _record(file: Path, metadata: dict[str, str]) -> dict[str, Any] | None:
    """The digest record :func:`export_prompt` wrote, ``None`` for an adapter PEFT wrote."""
    text = metadata.get(DIGEST_METADATA_KEY)
    if text is None:
        damaged = [k for k, v in metadata.items() if "digest" in k.lower() or '"tensors"' in v]
        if damaged:
            raise IntegrityError(f"{file}: metadata key {short(damaged[0])} looks like a damaged "
                                 f"{DIGEST_METADATA_KEY!r} digest record (corrupt or modified)")
        return None
    try:
        record = json.loads(text)
    except (ValueError, RecursionError):
        record = None
    ok = (isinstance(record, dict) and isinstance(record.get("config"), str)
          and isinstance(record.get("tensors"), dict) and all(isinstance(v, str) for v in record["tensors"].values()))
    if not ok:
        raise IntegrityError(f"{file}: metadata {DIGEST_METADATA_KEY!r} is not a digest record (corrupt or modified)")
    return record


def _check_model(model: nn.Module, tokens: int, dim: int, heads: dict[str, dict[str, str]],
                 infos: dict[str, tuple[str, tuple[int, ...]]], file: Path) -> None:
    from deltatune.model import get_module

    own_dim = input_embedding(model, str(file)).weight.shape[1]
    if own_dim != dim:
        raise ShapeMismatch(f"{file}: {PROMPT_KEY!r} has token dimension {dim}, the model's input embeddings {own_dim}")
    context = model_context(model)
    if context is not None and tokens >= context[0]:
        raise ShapeMismatch(f"{file}: a prompt of {tokens} virtual tokens leaves no room for input in the model's "
                            f"context of {context[0]} positions (config.{context[1]})")
    for head, tensors in heads.items():
        try:
            own = get_module(model, head).state_dict()
        except AttributeError:
            raise TargetError(f"{file}: modules_to_save tensors for {short(head)}, which is not a module of this "
                              "model") from None
        for name, key in tensors.items():
            dtype, shape = infos[key]
            if name not in own or tuple(own[name].shape) != shape:
                got = list(own[name].shape) if name in own else "missing"
                raise ShapeMismatch(f"{file}: modules_to_save tensor {head}.{name} has shape {list(shape)}, the "
                                    f"model has {got}")


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
    file = _weights_file(path)
    infos, metadata = _header(file)
    if PROMPT_KEY not in infos:
        raise DeltaFormatError(f"{file}: no {PROMPT_KEY!r} tensor (keys: {short(sorted(infos))})")
    modules_to_save = list(config.get("modules_to_save") or [])
    heads: dict[str, dict[str, str]] = {}
    for key in sorted(infos):
        if key != PROMPT_KEY:
            module, tensor = _head_split(key, modules_to_save, file)
            if tensor in heads.setdefault(module, {}):
                raise DeltaFormatError(f"{file}: two tensors for {module}.{tensor}")
            heads[module][tensor] = key
    dtype, shape = infos[PROMPT_KEY]
    tokens, dim = config["num_virtual_tokens"], config.get("token_dim")
    if dtype not in FLOAT_DTYPES:
        raise DeltaFormatError(f"{file}: {PROMPT_KEY!r} has dtype {short(dtype)}; it must be floating point "
                               f"({', '.join(FLOAT_DTYPES)})")
    if len(shape) != 2 or shape[0] != tokens or (dim is not None and shape[1] != dim) or 0 in shape:
        raise ShapeMismatch(f"{file}: {PROMPT_KEY!r} has shape {list(shape)}, but {CONFIG_NAME} says "
                            f"num_virtual_tokens={tokens} and token_dim={dim}")
    for tensors in heads.values():
        for key in tensors.values():
            if infos[key][0] not in FLOAT_DTYPES:
                raise DeltaFormatError(f"{file}: head tensor {key!r} has dtype {infos[key][0]}, not floating point")
    if model is not None:
        _check_model(model, tokens, shape[1], heads, infos, file)
    record = _record(file, metadata) if verify else None
    if record is not None:
        missing, extra = sorted(set(record["tensors"]) - set(infos)), sorted(set(infos) - set(record["tensors"]))
        if missing or extra:
            raise IntegrityError(f"{file}: tensors differ from the recorded digests (missing {short(missing[:3])}, "
                                 f"unrecorded {short(extra[:3])}); the file is corrupt or was modified")
        if config_digest(config) != record["config"]:
            raise IntegrityError(f"{path / CONFIG_NAME}: differs from the digest recorded in {file.name} at export "
                                 "(edited or corrupt); pass verify=False to load it anyway")
    try:
        with safe_open(str(file), framework="pt") as fh:
            values = {key: fh.get_tensor(key) for key in infos}
    except _READ_ERRORS as exc:
        raise DeltaFormatError(f"{file}: truncated or corrupt safetensors file ({str(exc)[:80]})") from None
    for key, value in values.items():
        if record is not None:
            verify_tensor(file, key, value, record["tensors"][key])
        check_finite(value, f"{file}: tensor {key!r}")

    prompt = values[PROMPT_KEY]
    part = PromptPart(tokens, shape[1], dtype=prompt.dtype)
    part.load_tensors({PROMPT_KEY: prompt}, f"{file}: {PROMPT_KEY}")
    head_values = {h: {n: values[k] for n, k in t.items()} for h, t in heads.items()}
    fp = fingerprint(model, exclude=list(head_values)) if model is not None else None
    return Delta(method="prompt_tuning", config=_delta_config(config, path / CONFIG_NAME),
                 parts={MODEL_LEVEL: part}, heads=head_values, fingerprint=fp)


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
        "peft_type": PEFT_TYPE,
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
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
    for head, head_tensors in delta.heads.items():
        if not head_tensors:
            raise DeltaFormatError(f"head {head!r} has no tensors; call delta.snapshot_heads(model) first")
        for k, v in head_tensors.items():
            tensors[f"{HEAD_PREFIX}{head}.{k}"] = v.detach().to("cpu").contiguous()
    for key, value in tensors.items():
        check_finite(value, f"cannot export to {path}: tensor {key!r}")
    record = {"tensors": {k: tensor_digest(k, v) for k, v in tensors.items()}, "config": config_digest(config)}
    metadata = {"format": "pt", DIGEST_METADATA_KEY: json.dumps(record, sort_keys=True)}
    with atomic_dir(path, PEFT_KIND, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / SAFETENSORS_NAME), metadata=metadata)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    return path


__all__ = ["export_prompt", "load_prompt_adapter", "read_prompt_config"]
