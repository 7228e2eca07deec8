"""The tensor file of a PEFT adapter folder, the same for every PEFT method's reader and writer.

A PEFT adapter folder holds ``adapter_config.json`` (read by each method's schema, with the shared checks of
:mod:`deltatune.io.peft_config`) and ``adapter_model.safetensors``.  Reading it trusts nothing, in this order:

1. :func:`weights_file` finds the safetensors file and refuses the pickle ``adapter_model.bin``;
2. :func:`read_header` gives every tensor's dtype and shape (:class:`TensorInfo`) and the metadata, without
   reading tensor data, so the method's reader checks names and shapes first (and :func:`check_heads` checks
   ``modules_to_save`` tensors against the model's own);
3. :func:`verified_record` takes the digest record a deltatune export stored in the metadata
   (:data:`~deltatune.io.peft_config.DIGEST_METADATA_KEY`, which PEFT ignores; PEFT's own adapters have none)
   and checks the tensor names and the config against it (:func:`stored_record`, :func:`verify_record`);
4. :func:`read_values` reads the tensors, checks each against its recorded SHA-256 digest and refuses NaN/±Inf.

Writing is :func:`head_tensors` (``modules_to_save`` tensors under PEFT's keys) and :func:`write_adapter` (finite
values, digests recorded, the folder written atomically).  Errors are typed (:class:`DeltaFormatError`,
:class:`IntegrityError`, :class:`ShapeMismatch`, :class:`TargetError`,
:class:`~deltatune.errors.NonFiniteError`) and name the file and the tensor or module.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from deltatune.errors import DeltaFormatError, IntegrityError, ShapeMismatch, TargetError
from deltatune.io.atomic import atomic_dir
from deltatune.io.digest import tensor_digest, verify_tensor
from deltatune.io.outputs import PEFT_KIND
from deltatune.io.peft_config import CONFIG_NAME, DIGEST_METADATA_KEY, PREFIX, SAFETENSORS_NAME, config_digest
from deltatune.io.tensor_file import safetensors_errors
from deltatune.parts.meta_checks import check_finite, short

BIN_NAME = "adapter_model.bin"
#: The floating dtypes an adapter's trained tensors may have (safetensors header names → torch).
FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
# What safetensors / torch raise on a corrupt or truncated file.


# --------------------------------------------------------------------------------------------------
# adapter_model.safetensors: the header first, tensor data only once it is validated
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorInfo:
    """A tensor's entry in the safetensors header: dtype name (``F32``, ``BF16``, ``I32`` …) and shape."""

    dtype: str
    shape: tuple[int, ...]


def weights_file(path: Path) -> Path:
    """The adapter folder's safetensors file; the pickle ``adapter_model.bin`` is refused with how to convert it,
    a folder with neither is a :class:`DeltaFormatError`."""
    st, bin_ = path / SAFETENSORS_NAME, path / BIN_NAME
    if st.is_file():
        return st
    if bin_.is_file():
        raise DeltaFormatError(
            f"{bin_}: deltatune does not load pickle files (unpickling can run arbitrary code). Convert it once, "
            f"where you trust it: PeftModel.from_pretrained(base, dir).save_pretrained(out, "
            f"safe_serialization=True) writes {SAFETENSORS_NAME}")
    raise DeltaFormatError(f"{path}: holds no {SAFETENSORS_NAME}")


def read_header(file: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Every tensor's dtype and shape, and the metadata, from the safetensors header (no tensor data)."""
    with safetensors_errors(file), safe_open(str(file), framework="pt") as fh:
        metadata = dict(fh.metadata() or {})
        infos = {}
        keys = fh.keys()
        for key in keys:
            sl = fh.get_slice(key)
            infos[key] = TensorInfo(str(sl.get_dtype()), tuple(int(d) for d in sl.get_shape()))
    return infos, metadata


def read_values(file: Path, keys: list[str], record: dict[str, Any] | None) -> dict[str, Tensor]:
    """Read ``keys``; with a digest ``record``, check each tensor against it (:class:`IntegrityError`); then every
    value must be finite (:class:`~deltatune.errors.NonFiniteError` naming the tensor)."""
    with safetensors_errors(file), safe_open(str(file), framework="pt") as fh:
        values = {key: fh.get_tensor(key) for key in keys}
    if record is not None:
        for key, value in values.items():
            verify_tensor(file, key, value, record["tensors"][key])
    for key, value in values.items():
        check_finite(value, f"{file}: tensor {key!r}")
    return values


# --------------------------------------------------------------------------------------------------
# digests (written by write_adapter; PEFT's own adapters have none)
# --------------------------------------------------------------------------------------------------
def stored_record(file: Path, metadata: dict[str, str]) -> dict[str, Any] | None:
    """The digest record in the safetensors metadata, or ``None`` for an adapter PEFT wrote.

    A record under a damaged key (another key whose name mentions digests or whose value holds a
    ``"tensors"`` map) is an :class:`IntegrityError`, not a reason to skip the check.
    """
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
        raise IntegrityError(f"{file}: metadata {DIGEST_METADATA_KEY!r} is not a digest record (corrupt or "
                             "modified)")
    return record


def verify_record(file: Path, config: dict[str, Any], infos: dict[str, TensorInfo], record: dict[str, Any]) -> None:
    """The tensor names and the config (the whole ``adapter_config.json`` object) must be the ones recorded at
    export (values are checked on read, by :func:`read_values`)."""
    stored = record["tensors"]
    missing, extra = sorted(set(stored) - set(infos)), sorted(set(infos) - set(stored))
    if missing or extra:
        raise IntegrityError(f"{file}: tensors differ from the recorded digests (missing {short(missing[:3])}, "
                             f"unrecorded {short(extra[:3])}); the file is corrupt or was modified")
    try:
        got = config_digest(config)
    except (ValueError, TypeError, RecursionError):
        got = None
    if got != record["config"]:
        raise IntegrityError(f"{file.parent / CONFIG_NAME}: differs from the digest recorded in {file.name} at "
                             "export (edited or corrupt); pass verify=False (--no-verify) to load it anyway")


def verified_record(file: Path, metadata: dict[str, str], config: dict[str, Any], infos: dict[str, TensorInfo],
                    verify: bool) -> dict[str, Any] | None:
    """With ``verify``, the stored digest record (:func:`stored_record`), its tensor names and config checked
    (:func:`verify_record`); ``None`` without ``verify`` or for an adapter that carries none."""
    record = stored_record(file, metadata) if verify else None
    if record is not None:
        verify_record(file, config, infos, record)
    return record


# --------------------------------------------------------------------------------------------------
# tensor keys, modules_to_save tensors (task heads) and the model's modules
# --------------------------------------------------------------------------------------------------
def strip_prefix(key: str, file: Path) -> str:
    """``key`` without PEFT's ``base_model.model.`` prefix; a key without it is a :class:`DeltaFormatError`."""
    if not key.startswith(PREFIX):
        raise DeltaFormatError(f"{file}: unknown tensor key {short(key)} (PEFT keys start with {PREFIX!r})")
    return key[len(PREFIX):]


def module_before(suffix: str, rest: str, key: str, file: Path) -> str:
    """The module name in ``rest`` (``key`` without the prefix, ending with ``suffix``) before ``suffix``; an empty
    one is a :class:`DeltaFormatError`."""
    module = rest[: -len(suffix)]
    if not module:
        raise DeltaFormatError(f"{file}: tensor {short(key)} names no module")
    return module


def head_split(rest: str, modules_to_save: list[str]) -> tuple[str, str] | None:
    """``(module, tensor)`` if ``rest`` (a key without PEFT's prefix) is a tensor of a ``modules_to_save`` module.

    PEFT's rule: the module name ends with an entry (no dot boundary); the older wrapper segment
    ``modules_to_save.`` before the tensor name is dropped.
    """
    pieces = rest.split(".")
    for i in range(1, len(pieces)):
        module = ".".join(pieces[:i])
        if any(module.endswith(m) for m in modules_to_save):
            tensor = ".".join(pieces[i:])
            tensor = tensor.removeprefix("modules_to_save.")
            return module, tensor
    return None


def model_module(model: nn.Module, module: str, file: Path, what: str) -> nn.Module:
    """``model``'s submodule ``module``; a name the model lacks is a :class:`TargetError` saying the adapter has
    ``what`` for it."""
    from deltatune.model import get_module

    try:
        return get_module(model, module)
    except AttributeError:
        raise TargetError(f"{file}: the adapter has {what} for {short(module)}, which is not a module of this "
                          "model") from None


def is_float(dtype: str) -> bool:
    """Whether a safetensors dtype name is a floating type (``F16``, ``BF16``, ``F8_E4M3`` …)."""
    return dtype.startswith("F") or dtype == "BF16"


def check_heads(model: nn.Module, heads: dict[str, dict[str, str]], infos: dict[str, TensorInfo], file: Path) -> None:
    """``modules_to_save`` tensors (``{module: {tensor name: key}}``) must have the shapes and dtype kinds (floating
    or not) of the model's own tensors (:class:`ShapeMismatch`), and their modules must exist."""
    for head, tensors in heads.items():
        own = model_module(model, head, file, "modules_to_save tensors").state_dict()
        for name, key in tensors.items():
            info = infos[key]
            if name not in own or tuple(own[name].shape) != info.shape:
                got = list(own[name].shape) if name in own else "missing"
                raise ShapeMismatch(f"{file}: modules_to_save tensor {head}.{name} has shape {list(info.shape)}, "
                                    f"the model has {got}")
            if is_float(info.dtype) != own[name].is_floating_point():
                raise ShapeMismatch(f"{file}: modules_to_save tensor {head}.{name} has dtype {info.dtype}, the "
                                    f"model has {own[name].dtype}")


def head_values(heads: dict[str, dict[str, str]], values: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """``{module: {tensor name: key}}`` with each key replaced by its value: the delta's ``heads``."""
    return {head: {name: values[key] for name, key in tensors.items()} for head, tensors in heads.items()}


# --------------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------------
def exported_config_base(peft_type: str, base_model_name_or_path: str | None, task_type: str | None = None
                         ) -> dict[str, Any]:
    """The ``PeftConfig`` fields an exported ``adapter_config.json`` starts with (an adapter for inference, of no
    recorded revision); ``task_type`` ``None`` means loading it with :class:`peft.PeftModel`."""
    return {"peft_type": peft_type, "task_type": task_type, "base_model_name_or_path": base_model_name_or_path,
            "revision": None, "inference_mode": True}


def check_head_names(heads: Iterable[str], modules: Iterable[str], where: str) -> None:
    """:class:`DeltaFormatError` when a head's name ends another adapted module's name (``classifier`` and
    DistilBERT's ``pre_classifier``): PEFT 0.21 wraps every module whose name *ends with* a ``modules_to_save``
    entry (no dot boundary), so it would wrap that module too and fail to load the adapter (or save a copy of it)."""
    names = list(modules)
    for head in heads:
        clash = sorted(n for n in names if n != head and n.endswith(head))
        if clash:
            raise DeltaFormatError(f"{where}: head {head!r} would be written as modules_to_save, and PEFT would also "
                                   f"wrap {clash[:3]} (it matches every module name ending in {head!r}), which this "
                                   "delta adapts: PEFT cannot load that adapter. Train with targets that leave "
                                   "those modules out to export it")


def head_tensors(heads: dict[str, dict[str, Tensor]], prefix: str) -> dict[str, Tensor]:
    """A delta's heads as ``modules_to_save`` tensors ``<prefix><module>.<tensor>`` (on the CPU, contiguous); a
    head without tensors is a :class:`DeltaFormatError`."""
    tensors: dict[str, Tensor] = {}
    for head, own in heads.items():
        if not own:
            raise DeltaFormatError(f"head {head!r} has no tensors; call delta.snapshot_heads(model) first")
        for k, v in own.items():
            tensors[f"{prefix}{head}.{k}"] = v.detach().to("cpu").contiguous()
    return tensors


def write_adapter(path: Path, config: dict[str, Any], tensors: dict[str, Tensor], overwrite: bool) -> Path:
    """Write ``config`` and ``tensors`` as a PEFT adapter folder at ``path``.

    Non-finite values are refused (:class:`~deltatune.errors.NonFiniteError` naming the tensor) before anything is
    written; the safetensors metadata :data:`~deltatune.io.peft_config.DIGEST_METADATA_KEY` records a SHA-256
    digest of every tensor and of the config (:func:`verified_record` and :func:`read_values` check them); the
    folder is written atomically, and an existing ``path`` that is not an earlier PEFT export is refused
    (:class:`~deltatune.errors.OutputExists`) unless ``overwrite``.
    """
    for key, value in tensors.items():
        check_finite(value, f"cannot export to {path}: tensor {key!r}")
    record = {"tensors": {k: tensor_digest(k, v) for k, v in tensors.items()}, "config": config_digest(config)}
    metadata = {"format": "pt", DIGEST_METADATA_KEY: json.dumps(record, sort_keys=True)}
    with atomic_dir(path, PEFT_KIND, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / SAFETENSORS_NAME), metadata=metadata)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2))  # keeps the order of pattern keys
    return path
