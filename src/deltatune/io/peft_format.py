"""PEFT LoRA adapters: read them as a :class:`Delta` and write LoRA deltas in PEFT's layout.

A PEFT adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or
``adapter_model.bin``).  Tensor keys are ``base_model.model.<module>.<name>`` with the adapter name
removed (checked against PEFT 0.21.2):

* ``<module>.lora_A.weight`` ``(r, in)`` and ``<module>.lora_B.weight`` ``(out, r)`` for ``nn.Linear``
  and GPT-2 ``Conv1D`` (``fan_in_fan_out``; ``in``/``out`` of the map, as in :class:`LoRAPart`);
* ``<module>.lora_embedding_A`` ``(r, num_embeddings)`` and ``<module>.lora_embedding_B``
  ``(embedding_dim, r)`` for ``nn.Embedding`` (no ``.weight``);
* ``modules_to_save`` tensors as ``<module>.<tensor>`` (0.21.2 removes the wrapper's
  ``modules_to_save.<adapter>`` segment on save; the older ``<module>.modules_to_save.<tensor>`` is
  also read);
* ``<module>.base_layer.weight``: a copy of a targeted embedding's *base* weight, which PEFT saves on
  its own when ``embed_tokens``/``lm_head`` is a target (``save_embedding_layers="auto"``).

The scale of module ``m`` is ``α_m / r_m`` (``α_m / √r_m`` with ``use_rslora``), where ``r_m`` and
``α_m`` come from ``rank_pattern`` / ``alpha_pattern`` when a key matches (PEFT's rule: the first key
``k`` with ``re.match(rf"(.*\\.)?({k})$", m)``), else from ``r`` / ``lora_alpha``.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from deltatune.delta import Delta
from deltatune.errors import DeltaFormatError, ShapeMismatch, TargetError
from deltatune.fingerprint import fingerprint
from deltatune.io.atomic import atomic_dir
from deltatune.io.json_io import read_json_object
from deltatune.parts.base import base_layer_kind
from deltatune.parts.layers import LayerKind, in_out_features
from deltatune.parts.lora import LoRAPart

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
REQUIRED_FIELDS = ("peft_type", "r", "lora_alpha")
# PEFT's ``EMBEDDING_LAYER_NAMES``: layers whose base weight PEFT may save alongside the adapter.
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")
# LoRA variants and extras whose adapters a plain ``s·B·A`` part cannot represent.
UNSUPPORTED_FIELDS = {
    "use_dora": "DoRA (a learned magnitude vector on top of B·A)",
    "lora_bias": "a trainable bias on lora_B",
    "use_qalora": "QALoRA (GPTQ input pooling)",
    "use_bdlora": "BD-LoRA (block-diagonal factors)",
    "layer_replication": "layer replication (changes the model's structure)",
    "trainable_token_indices": "trainable tokens (embedding rows stored separately)",
    "alora_invocation_tokens": "activated LoRA (depends on invocation tokens)",
    "target_parameters": "LoRA on raw nn.Parameters",
    "kasa_config": "KaSA (SVD truncation of the base weight)",
    "monteclora_config": "MonteCLoRA (variational LoRA)",
    "arrow_config": "Arrow routing over several LoRAs",
}
# Initialisations that rewrite the base weights: the adapter is relative to that *modified* base.
BASE_MUTATING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")


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
        except re.error as exc:
            raise DeltaFormatError(f"{where}: key {key!r} is not a valid regular expression "
                                   f"({exc})") from None
    return None


def _pattern_value(pattern: dict[str, Any], module: str, default: Any, where: str) -> Any:
    key = pattern_key(list(pattern), module, where)
    return default if key is None else pattern[key]


# --------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------
def _read_config(path: Path) -> dict[str, Any]:
    file = path / CONFIG_NAME
    config = read_json_object(file, "PEFT adapter", f"{CONFIG_NAME} and {SAFETENSORS_NAME}")
    missing = [f for f in REQUIRED_FIELDS if f not in config]
    if missing:
        raise DeltaFormatError(f"{file}: missing field(s) {missing}")
    if config["peft_type"] != "LORA":
        raise DeltaFormatError(f"{file}: peft_type is {config['peft_type']!r}; deltatune reads only LORA "
                               "adapters")
    r, alpha = config["r"], config["lora_alpha"]
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise DeltaFormatError(f"{file}: field 'r' must be a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float):
        raise DeltaFormatError(f"{file}: field 'lora_alpha' must be a number, got {alpha!r}")
    for name, what in UNSUPPORTED_FIELDS.items():
        if config.get(name):
            raise DeltaFormatError(f"{file}: field {name!r} is {config[name]!r}: {what} is not supported; "
                                   "only plain LoRA/rsLoRA adapters convert to a deltatune delta")
    bias = config.get("bias", "none")
    if bias not in (None, "none"):
        raise DeltaFormatError(f"{file}: field 'bias' is {bias!r}; only 'none' is supported (trained base "
                               "biases are not part of a LoRA delta)")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(BASE_MUTATING_INITS):
        raise DeltaFormatError(f"{file}: init_lora_weights is {init!r}, which rewrites the base weights, so "
                               "the adapter only fits that modified base; save it with PEFT's "
                               "path_initial_model_for_weight_conversion to get a plain LoRA")
    for name in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(name) or {}
        if not isinstance(pattern, dict) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in pattern.values()
        ):
            raise DeltaFormatError(f"{file}: field {name!r} must map patterns to numbers, got {pattern!r}")
    for name in ("rank_pattern", "alpha_pattern"):
        for key in config.get(name) or {}:
            pattern_key([key], "", f"{file}: field {name!r}")
    modules_to_save = config.get("modules_to_save") or []
    if isinstance(modules_to_save, str) or not all(isinstance(m, str) for m in modules_to_save):
        raise DeltaFormatError(f"{file}: field 'modules_to_save' must be a list of module names, "
                               f"got {modules_to_save!r}")
    return config


def _read_tensors(path: Path) -> tuple[Path, dict[str, Tensor]]:
    st, bin_ = path / SAFETENSORS_NAME, path / BIN_NAME
    if st.is_file():
        try:
            return st, load_file(str(st))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise DeltaFormatError(f"{st}: truncated or corrupt safetensors file ({exc})") from None
    if bin_.is_file():
        try:
            state = torch.load(bin_, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch.load raises many exception types on bad input
            raise DeltaFormatError(f"{bin_}: cannot be read as a weights-only torch file ({exc})") from None
        if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
            raise DeltaFormatError(f"{bin_}: expected a dict of tensors")
        return bin_, state
    raise DeltaFormatError(f"{path}: holds neither {SAFETENSORS_NAME} nor {BIN_NAME}")


_LORA_SUFFIXES = {
    ".lora_A.weight": ("A", False),
    ".lora_B.weight": ("B", False),
    ".lora_embedding_A": ("A", True),
    ".lora_embedding_B": ("B", True),
}
_EXPLAINED_SUFFIXES = {
    ".lora_magnitude_vector": "a DoRA magnitude vector (DoRA is not supported)",
    ".lora_B.bias": "a lora_B bias (lora_bias is not supported)",
    ".lora_A.bias": "a lora_A bias (not supported)",
}


def _head_split(rest: str, modules_to_save: list[str]) -> tuple[str, str] | None:
    """``(module, tensor)`` if ``rest`` is a tensor of a ``modules_to_save`` module.

    PEFT's rule: the module name ends with an entry (no dot boundary).
    """
    pieces = rest.split(".")
    for i in range(1, len(pieces)):
        module = ".".join(pieces[:i])
        if any(module.endswith(m) for m in modules_to_save):
            tensor = ".".join(pieces[i:])
            tensor = tensor.removeprefix("modules_to_save.")
            return module, tensor
    return None


def _embedding_names(model: nn.Module | None) -> set[str]:
    """Module names of the model's input/output embeddings (PEFT may save their base weights)."""
    if model is None:
        return set()
    wanted = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        fn = getattr(model, getter, None)
        try:
            module = fn() if callable(fn) else None
        except (NotImplementedError, AttributeError):
            module = None
        if module is not None:
            wanted.append(module)
    return {n for n, m in model.named_modules() if any(m is w for w in wanted)}


def _is_base_copy(module: str, targets: set[str], embeddings: set[str], tensor: str) -> bool:
    if module in targets and tensor.startswith("base_layer."):
        return True
    if tensor != "weight":
        return False
    return module in embeddings or any(re.match(rf"(.*\.)?{e}$", module) for e in EMBEDDING_LAYER_NAMES)


def _check_base_copy(model: nn.Module | None, module: str, tensor: str, value: Tensor, file: Path,
                     key: str) -> None:
    """A base weight PEFT saved next to the adapter must equal the model's (it is not part of the delta)."""
    from deltatune.model import get_module

    if model is None:
        warnings.warn(f"{file}: {key!r} is a copy of a base weight (PEFT saves targeted or resized embedding "
                      "layers); it is not part of the delta and was not checked: pass model= to check it",
                      stacklevel=3)
        return
    try:
        base = get_module(model, module)
    except AttributeError:
        raise TargetError(f"{file}: {key!r} is a base weight of {module!r}, which is not a module of this "
                          "model") from None
    own = base.state_dict().get(tensor.removeprefix("base_layer."))
    if own is None or tuple(own.shape) != tuple(value.shape):
        got = "missing" if own is None else tuple(own.shape)
        raise ShapeMismatch(f"{file}: {key!r} is a saved base weight of {module!r} with shape "
                            f"{tuple(value.shape)}, the model has {got} (resized vocabulary?)")
    if not torch.equal(own.detach().cpu().to(value.dtype), value):
        raise DeltaFormatError(f"{file}: {key!r} holds a base weight of {module!r} that differs from this "
                               "model's (resized or retrained embeddings?); a LoRA delta cannot carry "
                               "base-weight changes")


def load_peft_adapter(path: str | Path, model: nn.Module | None = None) -> Delta:
    """Read a PEFT LoRA adapter directory as a ``"lora"`` :class:`Delta`.

    Supports plain LoRA and rsLoRA on ``nn.Linear``, GPT-2 ``Conv1D`` and ``nn.Embedding`` modules,
    with ``rank_pattern``/``alpha_pattern`` and ``modules_to_save`` (those become ``Delta.heads``).
    DoRA, ``lora_bias``, trained biases and the other variants raise :class:`DeltaFormatError`, as do
    unknown tensor keys and inconsistent ranks.

    With ``model`` (the base model, unwrapped or with deltatune layers), each part takes its layer kind
    and ``in``/``out`` features from the model's module, shapes are checked (:class:`ShapeMismatch`
    naming the module) and the delta gets the model's fingerprint.  Without it, the kind is inferred
    (``lora_embedding_*`` → embedding, else ``fan_in_fan_out`` → Conv1D, else Linear), and the
    fingerprint is ``None``: PEFT records no fingerprint of its base, so :func:`deltatune.model.apply_delta`
    then cannot check that the delta meets the right base model.
    """
    from deltatune.model import get_module

    path = Path(path)
    config = _read_config(path)
    cfg_file = path / CONFIG_NAME
    file, state = _read_tensors(path)
    modules_to_save = list(config.get("modules_to_save") or [])
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora", False))
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    dropout = float(config.get("lora_dropout", 0.0) or 0.0)

    # 1. classify every key
    factors: dict[str, dict[str, tuple[str, Tensor]]] = {}
    is_embedding: dict[str, bool] = {}
    others: list[tuple[str, str, Tensor]] = []
    for key, value in state.items():
        if not key.startswith(PREFIX):
            raise DeltaFormatError(f"{file}: unknown tensor key {key!r} (PEFT keys start with {PREFIX!r})")
        rest = key[len(PREFIX):]
        for suffix, why in _EXPLAINED_SUFFIXES.items():
            if rest.endswith(suffix):
                raise DeltaFormatError(f"{file}: tensor {key!r} is {why}")
        for suffix, (which, emb) in _LORA_SUFFIXES.items():
            if rest.endswith(suffix):
                module = rest[: -len(suffix)]
                if module in is_embedding and is_embedding[module] != emb:
                    raise DeltaFormatError(f"{file}: module {module!r} has both lora_A/B and "
                                           "lora_embedding_A/B tensors")
                is_embedding[module] = emb
                if which in factors.setdefault(module, {}):
                    raise DeltaFormatError(f"{file}: tensor {key!r} appears twice")
                factors[module][which] = (key, value)
                break
        else:
            others.append((key, rest, value))

    # 2. heads (modules_to_save) and saved base weights
    targets = set(factors)
    embeddings = _embedding_names(model)
    heads: dict[str, dict[str, Tensor]] = {}
    for key, rest, value in others:
        split = _head_split(rest, modules_to_save) if modules_to_save else None
        if split is not None:
            heads.setdefault(split[0], {})[split[1]] = value
            continue
        module, _, tensor = rest.rpartition(".")
        if module.endswith(".base_layer"):
            module, tensor = module.removesuffix(".base_layer"), "base_layer." + tensor
        if module and _is_base_copy(module, targets, embeddings, tensor):
            _check_base_copy(model, module, tensor, value, file, key)
            continue
        raise DeltaFormatError(f"{file}: unknown tensor key {key!r} (not a LoRA factor, a modules_to_save "
                               f"tensor of {modules_to_save} or a saved embedding base weight)")
    if not factors:
        raise DeltaFormatError(f"{file}: no LoRA tensors (lora_A/lora_B or lora_embedding_A/B) found")

    # 3. parts
    parts: dict[str, LoRAPart] = {}
    for module in sorted(factors):
        got = factors[module]
        for which in ("A", "B"):
            if which not in got:
                other = next(iter(got.values()))[0]
                raise DeltaFormatError(f"{file}: {other!r} has no matching lora_{which} tensor for "
                                       f"{module!r}")
        (key_a, a), (key_b, b) = got["A"], got["B"]
        if a.dim() != 2 or b.dim() != 2:
            raise ShapeMismatch(f"{file}: {module!r}: LoRA factors must be 2-D, got {key_a} {tuple(a.shape)} "
                                f"and {key_b} {tuple(b.shape)}")
        if a.shape[0] != b.shape[1]:
            raise DeltaFormatError(f"{file}: {module!r}: rank mismatch, {key_a} has rank {a.shape[0]} "
                                   f"({tuple(a.shape)}) but {key_b} has rank {b.shape[1]} ({tuple(b.shape)})")
        rank = a.shape[0]
        r_cfg = _pattern_value(rank_pattern, module, config["r"], f"{cfg_file}: field 'rank_pattern'")
        alpha = _pattern_value(alpha_pattern, module, config["lora_alpha"],
                               f"{cfg_file}: field 'alpha_pattern'")
        if int(r_cfg) != rank:
            raise DeltaFormatError(f"{cfg_file}: module {module!r} has rank {r_cfg} by field "
                                   f"'r'/'rank_pattern' but its tensors in {file.name} have rank {rank}")
        scale = alpha / math.sqrt(rank) if rslora else alpha / rank
        if model is not None:
            try:
                base = get_module(model, module)
            except AttributeError:
                raise TargetError(f"{file}: the adapter has LoRA tensors for {module!r}, which is not a "
                                  "module of this model") from None
            kind = base_layer_kind(base, f"{file}: {module}")
            d_in, d_out = in_out_features(base)
            if is_embedding[module] != (kind is LayerKind.EMBEDDING):
                stored = "embedding" if is_embedding[module] else "linear"
                raise ShapeMismatch(f"{file}: {module!r} is a {kind} module in the model but the adapter "
                                    f"stores {stored} LoRA tensors for it")
            if tuple(a.shape) != (rank, d_in) or tuple(b.shape) != (d_out, rank):
                raise ShapeMismatch(
                    f"{file}: {module!r}: the model's {kind} module maps {d_in}→{d_out}, so LoRA rank {rank} "
                    f"needs A {(rank, d_in)} and B {(d_out, rank)}; the adapter has {key_a} {tuple(a.shape)} "
                    f"and {key_b} {tuple(b.shape)}"
                )
        else:
            d_in, d_out = a.shape[1], b.shape[0]
            if is_embedding[module]:
                kind = LayerKind.EMBEDDING
            else:
                kind = LayerKind.CONV1D if fan_in_fan_out else LayerKind.LINEAR
        dtype = a.dtype if a.dtype.is_floating_point else torch.float32
        part = LoRAPart(d_in, d_out, rank, scale, layer=kind, dropout=dropout, dtype=dtype)
        part.load_tensors({"lora_A": a.to(dtype), "lora_B": b.to(dtype)}, f"{file}: {module}")
        parts[module] = part

    # 4. heads against the model
    if model is not None:
        for head, tensors in heads.items():
            try:
                own = model.get_submodule(head).state_dict()
            except AttributeError:
                raise TargetError(f"{file}: modules_to_save module {head!r} is not a module of this "
                                  "model") from None
            for name, value in tensors.items():
                if name not in own or tuple(own[name].shape) != tuple(value.shape):
                    got = tuple(own[name].shape) if name in own else "missing"
                    raise ShapeMismatch(f"{file}: modules_to_save tensor {head}.{name} has shape "
                                        f"{tuple(value.shape)}, the model has {got}")
    missing_heads = [m for m in modules_to_save if not any(h.endswith(m) for h in heads)]
    if missing_heads and model is not None:
        present = [m for m in missing_heads if any(n.endswith(m) for n, _ in model.named_modules() if n)]
        if present:
            warnings.warn(f"{cfg_file}: modules_to_save {present} have no tensors in {file.name}",
                          stacklevel=2)

    delta_config = {
        "r": int(config["r"]),
        "alpha": float(config["lora_alpha"]),
        "dropout": dropout,
        "targets": sorted(parts),
        "rslora": rslora,
        "init": "kaiming",
    }
    fp = fingerprint(model, exclude=list(heads)) if model is not None else None
    return Delta(method="lora", config=delta_config, parts=dict(parts), heads=heads, fingerprint=fp)


# --------------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------------
def _number(x: float) -> int | float:
    """JSON-friendly: integral floats as ints (PEFT annotates ``r``/``lora_alpha`` as int)."""
    return int(x) if float(x).is_integer() else float(x)


def _patterns(values: dict[str, Any], default: Any) -> dict[str, Any]:
    """Pattern dict giving each module in ``values`` its own value under PEFT's first-match rule."""
    differing = {m: v for m, v in values.items() if v != default}
    if not differing:
        return {}
    ordered = dict(sorted(differing.items(), key=lambda kv: (-len(kv[0]), kv[0])))
    if all(_pattern_value(ordered, m, default, "export") == v for m, v in values.items()):
        return ordered
    escaped = {re.escape(m): v for m, v in ordered.items()}
    if all(_pattern_value(escaped, m, default, "export") == v for m, v in values.items()):
        return escaped
    raise DeltaFormatError("cannot express the per-module ranks/scales as PEFT rank_pattern/alpha_pattern "
                           "(module names that are suffixes of one another)")


def export_peft(delta: Delta, path: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write a LoRA ``delta`` as a PEFT adapter directory (``PeftModel.from_pretrained`` loads it).

    ``r`` is the largest rank and ``lora_alpha`` the most common ``α`` among the modules of that rank
    (``α = s·r``, or ``s·√r`` with ``use_rslora`` when the delta's config says ``rslora``); modules
    whose rank or scale differ get full-module-name entries in ``rank_pattern`` / ``alpha_pattern``,
    so every module keeps exactly its own scale.  Heads are written as ``modules_to_save`` tensors.
    ``task_type`` is left ``null`` (the delta does not record the model class), so load it with
    :class:`peft.PeftModel`.
    The directory is replaced atomically.
    """
    path = Path(path)
    if not delta.parts:
        raise DeltaFormatError("the delta has no parts; a PEFT adapter needs at least one LoRA module")
    bad = sorted(f"{n} ({p.kind})" for n, p in delta.parts.items() if not isinstance(p, LoRAPart))
    if bad:
        raise DeltaFormatError(f"only LoRA deltas export to PEFT; parts {bad[:5]} are not LoRA. Extract a "
                               "low-rank approximation (SVD of each ΔW) into a LoRA delta first")
    parts: dict[str, LoRAPart] = dict(delta.parts)  # type: ignore[arg-type]
    rslora = bool(delta.config.get("rslora", False))
    ranks = {n: p.rank for n, p in parts.items()}
    alphas = {n: _number(p.scale * (math.sqrt(p.rank) if rslora else p.rank)) for n, p in parts.items()}
    r = max(ranks.values())
    lora_alpha = Counter(alphas[n] for n in sorted(parts) if ranks[n] == r).most_common(1)[0][0]
    dropouts = {p.dropout_p for p in parts.values()}
    dropout = float(delta.config.get("dropout", max(dropouts)))
    kinds = {p.layer for p in parts.values()}
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": lora_alpha,
        "lora_dropout": dropout,
        "use_rslora": rslora,
        "target_modules": sorted(parts),
        "exclude_modules": None,
        "rank_pattern": _patterns(ranks, r),
        "alpha_pattern": _patterns(alphas, lora_alpha),
        "fan_in_fan_out": LayerKind.CONV1D in kinds,
        "bias": "none",
        "modules_to_save": sorted(delta.heads) or None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "use_dora": False,
        "lora_bias": False,
    }
    tensors: dict[str, Tensor] = {}
    for name, part in parts.items():
        a, b = (t.detach().to("cpu").contiguous() for t in (part.lora_A, part.lora_B))
        if part.layer is LayerKind.EMBEDDING:
            tensors[f"{PREFIX}{name}.lora_embedding_A"] = a
            tensors[f"{PREFIX}{name}.lora_embedding_B"] = b
        else:
            tensors[f"{PREFIX}{name}.lora_A.weight"] = a
            tensors[f"{PREFIX}{name}.lora_B.weight"] = b
    for head, head_tensors in delta.heads.items():
        if not head_tensors:
            raise DeltaFormatError(f"head {head!r} has no tensors; call delta.snapshot_heads(model) first")
        for k, v in head_tensors.items():
            tensors[f"{PREFIX}{head}.{k}"] = v.detach().to("cpu").contiguous()
    with atomic_dir(path) as tmp:
        save_file(tensors, str(tmp / SAFETENSORS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2))  # keep pattern order
    return path
