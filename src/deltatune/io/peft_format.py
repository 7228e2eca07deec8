"""PEFT adapters: read them as a :class:`Delta` (LoRA and DoRA here; other methods through :data:`PEFT_READERS`).

:func:`load_peft_adapter` (:mod:`deltatune.io.peft_config`) reads the config's ``peft_type`` and dispatches to the
reader registered for it in :data:`PEFT_READERS`: :func:`load_lora_adapter` here for ``LORA``, ``IA3`` in
:mod:`deltatune.io.peft_ia3`.  Writing is :mod:`deltatune.io.peft_export`.

A PEFT adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors``.  Tensor
keys are ``base_model.model.<module>.<name>`` with the adapter name removed (checked against PEFT
0.21.2):

* ``<module>.lora_A.weight`` ``(r, in)`` and ``<module>.lora_B.weight`` ``(out, r)`` for ``nn.Linear``
  and GPT-2 ``Conv1D`` (``fan_in_fan_out``; ``in``/``out`` of the map, as in :class:`LoRAPart`);
* ``<module>.lora_embedding_A`` ``(r, num_embeddings)`` and ``<module>.lora_embedding_B``
  ``(embedding_dim, r)`` for ``nn.Embedding`` (no ``.weight``);
* with ``use_dora``, ``<module>.lora_magnitude_vector`` ``(out,)`` for every module (no ``.weight``; ``out`` is
  ``embedding_dim`` for an embedding): the adapter becomes a ``"dora"`` delta of :class:`DoRAPart`;
* ``modules_to_save`` tensors as ``<module>.<tensor>`` (0.21.2 removes the wrapper's
  ``modules_to_save.<adapter>`` segment on save; the older ``<module>.modules_to_save.<tensor>`` is
  also read);
* ``<module>.base_layer.weight``: a copy of a targeted embedding's *base* weight, which PEFT saves on
  its own when ``embed_tokens``/``lm_head`` is a target (``save_embedding_layers="auto"``).

The scale of module ``m`` is ``α_m / r_m`` (``α_m / √r_m`` with ``use_rslora``), where ``r_m`` and
``α_m`` come from ``rank_pattern`` / ``alpha_pattern`` when a key matches (PEFT's rule: the first key
``k`` with ``re.match(rf"(.*\\.)?({k})$", m)``), else from ``r`` / ``lora_alpha``.

Nothing is trusted: ``adapter_config.json`` is checked against PEFT's ``LoraConfig`` schema (types,
finite numbers, variants a plain ``s·B·A`` part cannot represent), tensor dtypes and shapes are checked
from the safetensors header (against each other, the config and the base model) before any tensor data
is read, and values must be finite.  The pickle-based ``adapter_model.bin`` is refused, not loaded.
:func:`export_peft` records a SHA-256 digest of every tensor and of the config in the safetensors
metadata (``deltatune.digests``, which PEFT ignores); loading verifies it when present.  Those checks, the
same for every PEFT method, are :mod:`deltatune.io.peft_files`; this module holds what is LoRA's own (tensor
keys, factor shapes against the config and the model, PEFT's saved base weights).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from deltatune.delta import Delta
from deltatune.errors import DeltaFormatError, ShapeMismatch
from deltatune.fingerprint import fingerprint
from deltatune.io.peft_config import (
    CONFIG_NAME,
    DIGEST_METADATA_KEY,
    PEFT_READERS,
    AdapterConfig,
    load_peft_adapter,
    pattern_value,
    read_adapter_config,
)
from deltatune.io.peft_export import export_peft
from deltatune.io.peft_files import (
    FLOAT_DTYPES,
    TensorInfo,
    check_heads,
    head_split,
    head_values,
    is_float,
    model_module,
    module_before,
    read_header,
    strip_prefix,
    verified_record,
    weights_file,
)
from deltatune.io.peft_files import read_values as _read_values  # module-level name: tests swap it out
from deltatune.io.peft_ties import OUTPUT, drop_tied_twins
from deltatune.parts.base import Part, base_layer_kind
from deltatune.parts.dora import DoRAPart
from deltatune.parts.layers import LayerKind, in_out_features
from deltatune.parts.lora import LoRAPart, lora_scale
from deltatune.parts.meta_checks import short

# PEFT's ``EMBEDDING_LAYER_NAMES``: layers whose base weight PEFT may save alongside the adapter.
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")


# --------------------------------------------------------------------------------------------------
# tensor keys → LoRA factors, heads and saved base weights (names only)
# --------------------------------------------------------------------------------------------------
_LORA_SUFFIXES = {
    ".lora_A.weight": ("A", False),
    ".lora_B.weight": ("B", False),
    ".lora_embedding_A": ("A", True),
    ".lora_embedding_B": ("B", True),
}
MAGNITUDE_SUFFIX = ".lora_magnitude_vector"  # DoRA's m (use_dora), one per module, no ``.weight``
_EXPLAINED_SUFFIXES = {
    ".lora_B.bias": "a lora_B bias (lora_bias is not supported)",
    ".lora_A.bias": "a lora_A bias (not supported)",
}


@dataclass
class _Layout:
    """Where each tensor key goes."""

    factors: dict[str, dict[str, str]]  # module → {"A": key, "B": key} (and "M": key with use_dora)
    embedding: dict[str, bool]  # module → lora_embedding_* (True) or lora_A/B.weight (False)
    heads: dict[str, dict[str, str]]  # modules_to_save module → {tensor name: key}
    base_copies: list[tuple[str, str, str]]  # (module, tensor name, key) of PEFT's saved base weights


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


def _classify(file: Path, keys: list[str], modules_to_save: list[str], embeddings: set[str],
              dora: bool = False) -> _Layout:
    layout = _Layout({}, {}, {}, [])
    others: list[tuple[str, str]] = []
    magnitudes: dict[str, str] = {}
    for key in keys:
        rest = strip_prefix(key, file)
        for suffix, why in _EXPLAINED_SUFFIXES.items():
            if rest.endswith(suffix):
                raise DeltaFormatError(f"{file}: tensor {short(key)} is {why}")
        if rest.endswith(MAGNITUDE_SUFFIX):
            if not dora:
                raise DeltaFormatError(f"{file}: tensor {short(key)} is a DoRA magnitude vector, but "
                                       f"{CONFIG_NAME} has use_dora false; set use_dora only if the adapter is DoRA")
            magnitudes[rest[: -len(MAGNITUDE_SUFFIX)]] = key
            continue
        for suffix, (which, emb) in _LORA_SUFFIXES.items():
            if rest.endswith(suffix):
                module = module_before(suffix, rest, key, file)
                if layout.embedding.setdefault(module, emb) != emb:
                    raise DeltaFormatError(f"{file}: module {short(module)} has both lora_A/B and "
                                           "lora_embedding_A/B tensors")
                if which in layout.factors.setdefault(module, {}):
                    raise DeltaFormatError(f"{file}: module {short(module)} has two lora_{which} tensors")
                layout.factors[module][which] = key
                break
        else:
            others.append((key, rest))
    targets = set(layout.factors)
    for key, rest in others:
        split = head_split(rest, modules_to_save) if modules_to_save else None
        if split is not None:
            layout.heads.setdefault(split[0], {})[split[1]] = key
            continue
        module, _, tensor = rest.rpartition(".")
        if module.endswith(".base_layer"):
            module, tensor = module.removesuffix(".base_layer"), "base_layer." + tensor
        if module and _is_base_copy(module, targets, embeddings, tensor):
            layout.base_copies.append((module, tensor, key))
            continue
        raise DeltaFormatError(f"{file}: unknown tensor key {short(key)} (not a LoRA factor, a modules_to_save "
                               f"tensor of {short(modules_to_save)} or a saved embedding base weight)")
    if not layout.factors:
        raise DeltaFormatError(f"{file}: no LoRA tensors (lora_A/lora_B or lora_embedding_A/B) found")
    for module, got in layout.factors.items():
        for which in ("A", "B"):
            if which not in got:
                raise DeltaFormatError(f"{file}: {short(next(iter(got.values())))} has no matching lora_{which} "
                                       f"tensor for {short(module)}")
    if dora:
        _pair_magnitudes(file, layout, magnitudes)
    return layout


def _pair_magnitudes(file: Path, layout: _Layout, magnitudes: dict[str, str]) -> None:
    """With ``use_dora``, every LoRA module has exactly one magnitude vector and every vector a LoRA module."""
    stray = sorted(set(magnitudes) - set(layout.factors))
    if stray:
        raise DeltaFormatError(f"{file}: DoRA magnitude vector {short(magnitudes[stray[0]])} has no lora_A/lora_B "
                               f"tensors for {short(stray[0])}")
    lacking = sorted(set(layout.factors) - set(magnitudes))
    if lacking:
        raise DeltaFormatError(f"{file.parent / CONFIG_NAME}: field 'use_dora' is True: DoRA needs a "
                               f"lora_magnitude_vector for every module, but {file.name} has none for "
                               f"{short(lacking[0])}; a DoRA adapter without its magnitudes is not supported")
    for module, key in magnitudes.items():
        layout.factors[module]["M"] = key


# --------------------------------------------------------------------------------------------------
# shapes and dtypes from the header, against each other, the config and the model
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _PartSpec:
    """A LoRA part as the header, the config and the model describe it, before any data is read."""

    module: str
    key_a: str
    key_b: str
    key_m: str | None  # DoRA's magnitude vector (use_dora), else None
    layer: LayerKind
    in_features: int
    out_features: int
    rank: int
    scale: float
    dtype: torch.dtype


def _part_spec(module: str, keys: dict[str, str], embedding: bool, infos: dict[str, TensorInfo],
               cfg: AdapterConfig, model: nn.Module | None, file: Path) -> _PartSpec:
    key_a, key_b = keys["A"], keys["B"]
    a, b = infos[key_a], infos[key_b]
    for key, info in ((key_a, a), (key_b, b)):
        if info.dtype not in FLOAT_DTYPES:
            raise DeltaFormatError(f"{file}: tensor {short(key)} has dtype {short(info.dtype)}; LoRA factors "
                                   f"must be floating point ({', '.join(FLOAT_DTYPES)})")
    if len(a.shape) != 2 or len(b.shape) != 2 or 0 in a.shape + b.shape:
        raise ShapeMismatch(f"{file}: {module!r}: LoRA factors must be non-empty 2-D, got {key_a} {list(a.shape)} "
                            f"and {key_b} {list(b.shape)}")
    rank = a.shape[0]
    if rank != b.shape[1]:
        raise ShapeMismatch(f"{file}: {module!r}: rank mismatch, {key_a} has rank {rank} ({list(a.shape)}) but "
                            f"{key_b} has rank {b.shape[1]} ({list(b.shape)})")
    cfg_file = file.parent / CONFIG_NAME
    r_cfg = pattern_value(cfg.rank_pattern, module, cfg.r, f"{cfg_file}: field 'rank_pattern'")
    alpha = pattern_value(cfg.alpha_pattern, module, cfg.alpha, f"{cfg_file}: field 'alpha_pattern'")
    # a tied lm_head twin holds the embedding's factors (of the embedding's rank), while PEFT scales it by the
    # α and r its own name gets (:mod:`deltatune.io.peft_ties`); drop_tied_twins then checks its ΔW
    twin = bool(cfg.raw.get("ensure_weight_tying", False)) and module.rsplit(".", 1)[-1] == OUTPUT
    if r_cfg != rank and not twin:
        raise DeltaFormatError(f"{cfg_file}: module {module!r} has rank {short(r_cfg)} by field 'r'/'rank_pattern' "
                               f"but its tensors in {file.name} have rank {rank}")
    scale = lora_scale(alpha, r_cfg if twin else rank, cfg.rslora)
    if model is not None:
        base = model_module(model, module, file, "LoRA tensors")
        layer = base_layer_kind(base, f"{file}: {module}")
        d_in, d_out = in_out_features(base)
        if embedding != (layer is LayerKind.EMBEDDING):
            stored = "embedding" if embedding else "linear"
            raise ShapeMismatch(f"{file}: {module!r} is a {layer} module in the model but the adapter stores "
                                f"{stored} LoRA tensors for it")
        if a.shape != (rank, d_in) or b.shape != (d_out, rank):
            raise ShapeMismatch(f"{file}: {module!r}: the model's {layer} module maps {d_in}→{d_out}, so LoRA rank "
                                f"{rank} needs A {[rank, d_in]} and B {[d_out, rank]}; the adapter has {key_a} "
                                f"{list(a.shape)} and {key_b} {list(b.shape)}")
    else:
        d_in, d_out = a.shape[1], b.shape[0]
        layer = LayerKind.CONV1D if cfg.fan_in_fan_out else LayerKind.LINEAR
        layer = LayerKind.EMBEDDING if embedding else layer
    dtype = torch.promote_types(FLOAT_DTYPES[a.dtype], FLOAT_DTYPES[b.dtype])
    key_m = keys.get("M")
    if key_m is not None:
        m = infos[key_m]
        if m.dtype not in FLOAT_DTYPES:
            raise DeltaFormatError(f"{file}: tensor {short(key_m)} has dtype {short(m.dtype)}; a DoRA magnitude "
                                   f"must be floating point ({', '.join(FLOAT_DTYPES)})")
        if m.shape != (d_out,):
            raise ShapeMismatch(f"{file}: {module!r}: the DoRA magnitude {key_m} has shape {list(m.shape)}, but the "
                                f"module has {d_out} output features, so it must be {[d_out]}")
        dtype = torch.promote_types(dtype, FLOAT_DTYPES[m.dtype])
    return _PartSpec(module, key_a, key_b, key_m, layer, d_in, d_out, rank, scale, dtype)


def _check_base_copies_against(model: nn.Module, layout: _Layout, infos: dict[str, TensorInfo], file: Path) -> None:
    """PEFT's saved base weights must have the shapes of the model's own tensors and be floating point."""
    for module, tensor, key in layout.base_copies:
        own = model_module(model, module, file, "a saved base weight").state_dict().get(
            tensor.removeprefix("base_layer."))
        info = infos[key]
        if own is None or tuple(own.shape) != info.shape or not is_float(info.dtype):
            got = "missing" if own is None else f"{own.dtype} {list(own.shape)}"
            raise ShapeMismatch(f"{file}: {key!r} is a saved base weight of {module!r} ({info.dtype} "
                                f"{list(info.shape)}), the model has {got} (resized vocabulary?)")


def _check_base_copy(model: nn.Module, module: str, tensor: str, value: Tensor, file: Path, key: str) -> None:
    """A base weight PEFT saved next to the adapter must equal the model's (it is not part of the delta)."""
    own = model_module(model, module, file, "a saved base weight").state_dict()[tensor.removeprefix("base_layer.")]
    if not torch.equal(own.detach().cpu().to(value.dtype), value):
        raise DeltaFormatError(f"{file}: {key!r} holds a base weight of {module!r} that differs from this "
                               "model's (resized or retrained embeddings?); a LoRA delta cannot carry "
                               "base-weight changes")


def _build_part(spec: _PartSpec, values: dict[str, Tensor], dropout: float, file: Path) -> Part:
    """A :class:`LoRAPart`, or a :class:`DoRAPart` when the spec has a magnitude vector."""
    tensors = {"lora_A": values[spec.key_a].to(spec.dtype), "lora_B": values[spec.key_b].to(spec.dtype)}
    cls: type[LoRAPart] | type[DoRAPart] = LoRAPart
    if spec.key_m is not None:
        cls, tensors["magnitude"] = DoRAPart, values[spec.key_m].to(spec.dtype)
    part = cls(spec.in_features, spec.out_features, spec.rank, spec.scale, layer=spec.layer, dropout=dropout,
               dtype=spec.dtype)
    part.load_tensors(tensors, f"{file}: {spec.module}")
    return part


# --------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------
def load_lora_adapter(path: str | Path, model: nn.Module | None = None, verify: bool = True) -> Delta:
    """Read a PEFT LoRA adapter directory (``peft_type`` ``LORA``) as a ``"lora"`` or ``"dora"`` :class:`Delta`.

    Supports plain LoRA and rsLoRA on ``nn.Linear``, GPT-2 ``Conv1D`` and ``nn.Embedding`` modules,
    with ``rank_pattern``/``alpha_pattern`` and ``modules_to_save`` (those become ``Delta.heads``);
    with ``use_dora`` every module also needs its ``lora_magnitude_vector`` and becomes a :class:`DoRAPart`.
    ``lora_bias``, trained biases and the other variants raise :class:`DeltaFormatError`, as do
    unknown tensor keys, config fields of the wrong type, non-floating factors and inconsistent ranks;
    NaN/±Inf numbers raise :class:`NonFiniteError`.  ``adapter_model.bin`` (pickle) is refused.

    With ``model`` (the base model, unwrapped or with deltatune layers), each part takes its layer kind
    and ``in``/``out`` features from the model's module, shapes are checked (:class:`ShapeMismatch`
    naming the module) before any tensor data is read, and the delta gets the model's fingerprint.
    Without it, the kind is inferred (``lora_embedding_*`` → embedding, else ``fan_in_fan_out`` →
    Conv1D, else Linear), and the fingerprint is ``None``: PEFT records no fingerprint of its base, so
    :func:`deltatune.model.apply_delta` then cannot check that the delta meets the right base model.
    With ``model``, tied weights are matched to PEFT's semantics (:func:`deltatune.io.peft_ties.drop_tied_twins`):
    with ``ensure_weight_tying`` the ``lm_head`` twin of a tied ``embed_tokens`` LoRA is dropped (deltatune updates
    the shared weight once); any other part on a tied weight, which PEFT applies to its own module only, is a
    :class:`DeltaFormatError`.

    With ``verify`` (the default), an adapter written by :func:`export_peft` is checked against the
    digests it carries (:class:`IntegrityError` naming the tensor or the config); adapters written by
    PEFT carry none and load unchecked.
    """
    path = Path(path)
    cfg = read_adapter_config(path)
    file = weights_file(path)
    infos, metadata = read_header(file)
    layout = _classify(file, list(infos), cfg.modules_to_save, _embedding_names(model), cfg.dora)
    specs = [_part_spec(m, layout.factors[m], layout.embedding[m], infos, cfg, model, file)
             for m in sorted(layout.factors)]
    if model is not None:
        check_heads(model, layout.heads, infos, file)
        _check_base_copies_against(model, layout, infos, file)
    record = verified_record(file, metadata, cfg.raw, infos, verify)
    if record is not None:
        wanted = list(infos)  # every recorded tensor is checked
    else:
        wanted = [k for s in specs for k in (s.key_a, s.key_b, s.key_m) if k is not None]
        wanted += [k for t in layout.heads.values() for k in t.values()]
        wanted += [key for _, _, key in layout.base_copies] if model is not None else []
    values = _read_values(file, wanted, record)

    heads = head_values(layout.heads, values)
    for module, tensor, key in layout.base_copies:
        if model is None:
            warnings.warn(f"{file}: {key!r} is a copy of a base weight (PEFT saves targeted or resized embedding "
                          "layers); it is not part of the delta and was not checked: pass model= to check it",
                          stacklevel=2)
        else:
            _check_base_copy(model, module, tensor, values[key], file, key)
    parts = {s.module: _build_part(s, values, cfg.dropout, file) for s in specs}
    if model is not None:
        parts = drop_tied_twins(parts, model, bool(cfg.raw.get("ensure_weight_tying", False)), file)

    missing_heads = [m for m in cfg.modules_to_save if not any(h.endswith(m) for h in heads)]
    if missing_heads and model is not None:
        present = [m for m in missing_heads if any(n.endswith(m) for n, _ in model.named_modules() if n)]
        if present:
            warnings.warn(f"{path / CONFIG_NAME}: modules_to_save {present} have no tensors in {file.name}",
                          stacklevel=2)
    delta_config = {
        "r": cfg.r,
        "alpha": cfg.alpha,
        "dropout": cfg.dropout,
        "targets": sorted(parts),
        "rslora": cfg.rslora,
        "init": "kaiming",
    }
    fp = fingerprint(model, exclude=list(heads)) if model is not None else None
    method = "dora" if cfg.dora else "lora"
    return Delta(method=method, config=delta_config, parts=parts, heads=heads, fingerprint=fp)


__all__ = ["DIGEST_METADATA_KEY", "PEFT_READERS", "export_peft", "load_lora_adapter", "load_peft_adapter",
           "read_header"]
