"""PEFT (IA)³ adapters both ways: read one as an ``"ia3"`` :class:`Delta`, write an ``"ia3"`` delta in PEFT's layout.

Layout (checked against PEFT 0.21.2 by saving real ``IA3Config`` models): ``adapter_config.json`` with
``peft_type: "IA3"``, ``target_modules``, ``feedforward_modules``, ``fan_in_fan_out``, ``modules_to_save`` …,
and ``adapter_model.safetensors`` with one tensor per module, ``base_model.model.<module>.ia3_l``, of shape
``(out, 1)`` for a module scaled at its output and ``(1, in)`` for a *feedforward* module (scaled at its input),
for ``nn.Linear`` and GPT-2 ``Conv1D`` alike; task heads are ``modules_to_save`` tensors
``base_model.model.<head>.<tensor>``.  A module is *feedforward* by PEFT's rule: ``re.fullmatch`` of a string
``feedforward_modules``, else ``module.endswith(entry)`` for some list entry.

Nothing is trusted, as for LoRA (:mod:`deltatune.io.peft_format`): the config is checked against PEFT 0.21.2's
``IA3Config`` fields and types; tensor names, dtypes and shapes are checked from the safetensors header
(against the config's feedforward rule and the base model, when given) before any tensor data is read; values
must be finite; the pickle ``adapter_model.bin`` is refused.  :func:`export_ia3` writes atomically and records
SHA-256 digests of every tensor and of the config in the safetensors metadata, which loading verifies.  Those
steps, the same for every PEFT method, are :mod:`deltatune.io.peft_files`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from deltatune.delta import Delta
from deltatune.errors import DeltaFormatError, ShapeMismatch
from deltatune.fingerprint import fingerprint
from deltatune.io.peft_config import (
    IS_BOOL,
    NAMES,
    PREFIX,
    SHARED_FIELD_TYPES,
    STR_OR_NONE,
    FieldCheck,
    read_config_file,
    read_modules_to_save,
    warn_unknown_fields,
)
from deltatune.io.peft_files import (
    FLOAT_DTYPES,
    TensorInfo,
    check_heads,
    exported_config_base,
    head_split,
    head_tensors,
    head_values,
    model_module,
    module_before,
    read_header,
    read_values,
    strip_prefix,
    verified_record,
    weights_file,
    write_adapter,
)
from deltatune.parts.ia3 import IA3Part
from deltatune.parts.layers import LayerKind, in_out_features, layer_kind
from deltatune.parts.meta_checks import short

PEFT_TYPE = "IA3"
SUFFIX = ".ia3_l"
# Every field of PEFT 0.21.2's ``IA3Config`` (with ``PeftConfig``'s); others come from another version.
KNOWN_FIELDS = frozenset((
    "auto_mapping", "base_model_name_or_path", "exclude_modules", "fan_in_fan_out", "feedforward_modules",
    "inference_mode", "init_ia3_weights", "modules_to_save", "peft_type", "peft_version", "revision",
    "target_modules", "task_type",
))
# Tensor suffixes of other PEFT methods, named in the error when one turns up in an IA3 adapter.
FOREIGN_SUFFIXES = {
    ".lora_A.weight": "a LoRA factor", ".lora_B.weight": "a LoRA factor", ".lora_embedding_A": "a LoRA factor",
    ".lora_embedding_B": "a LoRA factor", ".lora_magnitude_vector": "a DoRA magnitude vector",
    ".hada_w1_a": "a LoHa factor", ".lokr_w1": "a LoKr factor", ".vera_lambda_b": "a VeRA vector",
}

# Field → (check, what is expected), after PEFT 0.21.2's ``IA3Config`` annotations.
FIELD_TYPES: dict[str, FieldCheck] = {
    **SHARED_FIELD_TYPES,
    "peft_version": STR_OR_NONE,
    "auto_mapping": (lambda v: v is None or isinstance(v, dict), "an object or null"),
    "init_ia3_weights": IS_BOOL,
    "feedforward_modules": NAMES,
}


# --------------------------------------------------------------------------------------------------
# adapter_config.json
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class IA3AdapterConfig:
    """The fields of a PEFT IA3 ``adapter_config.json`` that deltatune reads, validated (``raw``: the whole
    object, for the digest check)."""

    raw: dict[str, Any]
    feedforward: str | list[str] | None
    fan_in_fan_out: bool
    modules_to_save: list[str]

    def is_feedforward(self, module: str) -> bool | None:
        """PEFT's rule (``IA3Model._check_target_module_feedforward``); ``None`` when the config has no
        ``feedforward_modules``."""
        if self.feedforward is None:
            return None
        if isinstance(self.feedforward, str):
            return re.fullmatch(self.feedforward, module) is not None
        return any(module.endswith(entry) for entry in self.feedforward)


def read_ia3_config(path: Path) -> IA3AdapterConfig:
    """Read ``path/adapter_config.json`` and check it against PEFT 0.21.2's ``IA3Config`` schema."""
    file, config = read_config_file(path, ("peft_type",), FIELD_TYPES)
    if config["peft_type"] != PEFT_TYPE:
        raise DeltaFormatError(f"{file}: peft_type is {short(config['peft_type'])}; this reader takes IA3 adapters "
                               "only")
    feedforward = config.get("feedforward_modules")
    if isinstance(feedforward, str):
        try:
            re.compile(feedforward)
        except (re.error, RecursionError, OverflowError) as exc:
            raise DeltaFormatError(f"{file}: field 'feedforward_modules' is not a valid regular expression "
                                   f"({str(exc)[:80]})") from None
    if isinstance(feedforward, list) and "" in feedforward:
        raise DeltaFormatError(f"{file}: field 'feedforward_modules' holds an empty module name (it would match "
                               "every module)")
    modules_to_save = read_modules_to_save(config, file)
    warn_unknown_fields(config, KNOWN_FIELDS, "IA3Config", file, stacklevel=3)
    return IA3AdapterConfig(raw=config, feedforward=feedforward, fan_in_fan_out=config.get("fan_in_fan_out", False),
                            modules_to_save=modules_to_save)


# --------------------------------------------------------------------------------------------------
# tensor keys and shapes, from the header
# --------------------------------------------------------------------------------------------------
def _classify(file: Path, keys: list[str], modules_to_save: list[str]
              ) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """``{module: ia3_l key}`` and the heads ``{module: {tensor name: key}}``; any other key is an error naming it."""
    vectors: dict[str, str] = {}
    heads: dict[str, dict[str, str]] = {}
    for key in keys:
        rest = strip_prefix(key, file)
        if rest.endswith(SUFFIX):
            vectors[module_before(SUFFIX, rest, key, file)] = key
            continue
        foreign = next((why for suffix, why in FOREIGN_SUFFIXES.items() if rest.endswith(suffix)), None)
        if foreign is not None:
            raise DeltaFormatError(f"{file}: tensor {short(key)} is {foreign}, which an IA3 adapter does not hold "
                                   "(a mixed or mislabelled adapter?)")
        split = head_split(rest, modules_to_save) if modules_to_save else None
        if split is None:
            raise DeltaFormatError(f"{file}: unknown tensor key {short(key)} (not an IA3 vector "
                                   f"'<module>{SUFFIX}' or a modules_to_save tensor of {short(modules_to_save)})")
        heads.setdefault(split[0], {})[split[1]] = key
    if not vectors:
        raise DeltaFormatError(f"{file}: no IA3 tensors ('<module>{SUFFIX}') found")
    return vectors, heads


def _part_for(module: str, key: str, info: TensorInfo, cfg: IA3AdapterConfig, model: nn.Module | None,
              file: Path) -> IA3Part:
    """An (empty) :class:`IA3Part` for ``module`` from its header entry, the config and the model."""
    if info.dtype not in FLOAT_DTYPES:
        raise DeltaFormatError(f"{file}: tensor {short(key)} has dtype {short(info.dtype)}; IA3 vectors must be "
                               f"floating point ({', '.join(FLOAT_DTYPES)})")
    shape = info.shape
    if len(shape) != 2 or 1 not in shape or 0 in shape:
        raise ShapeMismatch(f"{file}: {short(key)} has shape {list(shape)}; PEFT stores an IA3 vector as (out, 1) "
                            "or, for a feedforward module, (1, in)")
    feedforward = cfg.is_feedforward(module)
    if feedforward is None:
        if shape == (1, 1):
            raise DeltaFormatError(f"{file}: {short(key)} has shape [1, 1] and the config has no "
                                   "feedforward_modules, so its position (input or output) is unknown")
        feedforward = shape[0] == 1
    want = (1, max(shape)) if feedforward else (max(shape), 1)
    if shape != want:
        where = "is" if feedforward else "is not"
        raise ShapeMismatch(f"{file}: module {module!r} {where} a feedforward module by feedforward_modules "
                            f"{short(cfg.feedforward)}, so PEFT stores its vector as "
                            f"{'(1, in)' if feedforward else '(out, 1)'}; {short(key)} has {list(shape)}")
    n = max(shape)
    position = "input" if feedforward else "output"
    dtype = FLOAT_DTYPES[info.dtype]
    if model is None:
        layer = LayerKind.CONV1D if cfg.fan_in_fan_out else LayerKind.LINEAR
        d_in, d_out = (n, None) if feedforward else (None, n)
        return IA3Part(d_in, d_out, position, layer, None, dtype=dtype)  # type: ignore[arg-type]
    base = model_module(model, module, file, "an IA3 vector")
    layer = layer_kind(base)
    if layer not in (LayerKind.LINEAR, LayerKind.CONV1D):
        raise ShapeMismatch(f"{file}: the adapter scales {module!r}, a {type(base).__name__} in the model; IA3 "
                            "acts on Linear and Conv1D modules")
    d_in, d_out = in_out_features(base)
    if n != (d_in if feedforward else d_out):
        raise ShapeMismatch(f"{file}: {module!r} maps {d_in}→{d_out} in the model, so its IA3 vector at the "
                            f"{position} needs {d_in if feedforward else d_out} entries; {short(key)} has "
                            f"{list(shape)}")
    return IA3Part(d_in, d_out, position, layer, getattr(base, "bias", None) is not None, dtype=dtype)


# --------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------
def load_ia3_adapter(path: str | Path, model: nn.Module | None = None, verify: bool = True) -> Delta:
    """Read a PEFT IA3 adapter directory as an ``"ia3"`` :class:`Delta`.

    Each ``<module>.ia3_l`` becomes an :class:`~deltatune.parts.ia3.IA3Part` at the input position (PEFT's
    feedforward modules) or the output position; ``modules_to_save`` tensors become ``Delta.heads``.  With
    ``model`` (the base, bare or with deltatune layers), every module must exist and be a Linear/Conv1D whose
    size matches its vector (:class:`ShapeMismatch` naming it, before any tensor data is read), and the delta
    gets the model's fingerprint.  Without it, the layer kind comes from ``fan_in_fan_out`` and the part does
    not know the other weight dimension or the bias: it attaches, runs and merges, but the algebra needs it
    loaded with ``model=``; the fingerprint is ``None``.

    Errors: a config of another ``peft_type`` or with fields of the wrong type, unknown tensor keys (or keys
    of another method), non-floating or misshapen vectors, a shape that contradicts ``feedforward_modules``:
    :class:`DeltaFormatError` / :class:`ShapeMismatch` naming the file and key; NaN/±Inf:
    :class:`~deltatune.errors.NonFiniteError`; an adapter written by :func:`export_ia3` whose digests do not
    match (``verify``): :class:`~deltatune.errors.IntegrityError`.  ``adapter_model.bin`` (pickle) is refused.
    """
    path = Path(path)
    cfg = read_ia3_config(path)
    file = weights_file(path)
    infos, metadata = read_header(file)
    vectors, head_keys = _classify(file, list(infos), cfg.modules_to_save)
    parts = {m: _part_for(m, vectors[m], infos[vectors[m]], cfg, model, file) for m in sorted(vectors)}
    if model is not None:
        check_heads(model, head_keys, infos, file)
    record = verified_record(file, metadata, cfg.raw, infos, verify)
    values = read_values(file, list(infos), record)
    for module, part in parts.items():
        part.load_tensors({"ia3_l": values[vectors[module]].reshape(-1).to(part.ia3_l.dtype)}, f"{file}: {module}")
    heads = head_values(head_keys, values)
    config = {"targets": sorted(parts), "feedforward": sorted(m for m, p in parts.items() if p.position == "input")}
    fp = fingerprint(model, exclude=list(heads)) if model is not None else None
    return Delta(method="ia3", config=config, parts=parts, heads=heads, fingerprint=fp)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------------
def _feedforward_field(parts: dict[str, IA3Part]) -> list[str] | str:
    """``feedforward_modules`` naming exactly the input-position modules under PEFT's rule: their full names, or
    (when a full name is a suffix of an output-position module's name) an anchored regular expression."""
    names = sorted(m for m, p in parts.items() if p.position == "input")
    if all(any(m.endswith(f) for f in names) == (p.position == "input") for m, p in parts.items()):
        return names
    return "(?:" + "|".join(re.escape(m) for m in names) + ")"


def export_ia3(delta: Delta, path: str | Path, base_model_name_or_path: str | None = None,
               overwrite: bool = False) -> Path:
    """Write an ``"ia3"`` ``delta`` as a PEFT IA3 adapter directory (``PeftModel.from_pretrained`` loads it).

    ``target_modules`` lists every module by its full name, ``feedforward_modules`` the input-position ones;
    vectors are stored ``(out, 1)`` / ``(1, in)``; heads as ``modules_to_save`` tensors; ``task_type`` is
    ``null`` (load it with :class:`peft.PeftModel`).  Parts of another kind raise :class:`DeltaFormatError`,
    non-finite values :class:`~deltatune.errors.NonFiniteError`; the directory is written atomically and an
    existing ``path`` that is not an earlier PEFT export is refused unless ``overwrite``.
    """
    path = Path(path)
    if not delta.parts:
        raise DeltaFormatError("the delta has no parts; a PEFT IA3 adapter needs at least one IA3 vector")
    bad = sorted(f"{n} ({p.kind})" for n, p in delta.parts.items() if p.kind != IA3Part.kind)
    if bad:
        raise DeltaFormatError(f"only (IA)³ deltas export to a PEFT IA3 adapter; parts {bad[:5]} are not ia3")
    parts: dict[str, IA3Part] = dict(delta.parts)  # type: ignore[arg-type]
    config = {
        **exported_config_base(PEFT_TYPE, base_model_name_or_path),
        "target_modules": sorted(parts),
        "exclude_modules": None,
        "feedforward_modules": _feedforward_field(parts),
        "fan_in_fan_out": any(p.layer is LayerKind.CONV1D for p in parts.values()),
        "modules_to_save": sorted(delta.heads) or None,
        "init_ia3_weights": True,
    }
    tensors: dict[str, Tensor] = {}
    for name, part in parts.items():
        vector = part.ia3_l.detach().to("cpu")
        shape = (1, -1) if part.position == "input" else (-1, 1)
        tensors[f"{PREFIX}{name}{SUFFIX}"] = vector.reshape(shape).contiguous()
    tensors.update(head_tensors(delta.heads, PREFIX))
    return write_adapter(path, config, tensors, overwrite)


__all__ = ["export_ia3", "load_ia3_adapter", "read_ia3_config"]
