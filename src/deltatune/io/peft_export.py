"""Write a delta as a PEFT 0.21 adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).

:func:`export_peft` dispatches on the delta's part kinds through :data:`PEFT_WRITERS`: ``lora`` and ``dora``
parts are written here (:func:`export_lora`: a ``LoraConfig``, with ``use_dora`` and ``lora_magnitude_vector``
tensors for DoRA), ``ia3`` parts by ``deltatune.io.peft_ia3.export_ia3``, ``prompt`` parts by
``deltatune.io.peft_prompt.export_prompt``.  The reading side (schema, header-first validation, digests) is
:mod:`deltatune.io.peft_format`; the config schema, the dispatch on ``peft_type`` and the names both sides share
are in :mod:`deltatune.io.peft_config`; writing the folder (digests, atomically) is
:func:`deltatune.io.peft_files.write_adapter`.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from deltatune.algebra.task_heads import require_one_task
from deltatune.delta import Delta
from deltatune.errors import DeltaFormatError, NonFiniteError
from deltatune.io.peft_config import PREFIX, finite_number, lazy_peft_function, pattern_value
from deltatune.io.peft_files import check_head_names, exported_config_base, head_tensors, write_adapter
from deltatune.io.peft_ties import needs_weight_tying, tied_twins
from deltatune.parts.dora import DoRAPart
from deltatune.parts.layers import LayerKind
from deltatune.parts.lora import LoRAPart
from deltatune.provenance import require_unstacked


def _json_number(x: float) -> int | float:
    """JSON-friendly: integral floats as ints (PEFT annotates ``r``/``lora_alpha`` as int)."""
    return int(x) if float(x).is_integer() else float(x)


def _patterns(values: dict[str, Any], default: Any) -> dict[str, Any]:
    """Pattern dict giving each module in ``values`` its own value under PEFT's first-match rule."""
    differing = {m: v for m, v in values.items() if v != default}
    if not differing:
        return {}
    ordered = dict(sorted(differing.items(), key=lambda kv: (-len(kv[0]), kv[0])))
    if all(pattern_value(ordered, m, default, "export") == v for m, v in values.items()):
        return ordered
    escaped = {re.escape(m): v for m, v in ordered.items()}
    if all(pattern_value(escaped, m, default, "export") == v for m, v in values.items()):
        return escaped
    raise DeltaFormatError("cannot express the per-module ranks/scales as PEFT rank_pattern/alpha_pattern "
                           "(module names that are suffixes of one another)")


def export_lora(delta: Delta, path: str | Path, base_model_name_or_path: str | None = None,
                overwrite: bool = False, model: nn.Module | None = None) -> Path:
    """Write a LoRA or DoRA ``delta`` as a PEFT adapter directory (``PeftModel.from_pretrained`` loads it).

    ``r`` is the largest rank and ``lora_alpha`` the most common ``α`` among the modules of that rank
    (``α = s·r``, or ``s·√r`` with ``use_rslora`` when the delta's config says ``rslora``); modules
    whose rank or scale differ get full-module-name entries in ``rank_pattern`` / ``alpha_pattern``,
    so every module keeps exactly its own scale.  A delta of DoRA parts gets ``use_dora`` and each module's
    magnitude as ``<module>.lora_magnitude_vector``; PEFT's ``use_dora`` holds for every module, so a delta
    mixing LoRA and DoRA parts is refused.  Heads are written as ``modules_to_save`` tensors.
    ``task_type`` is left ``null`` (the delta does not record the model class), so load it with
    :class:`peft.PeftModel`.  A LoRA part on a tied ``embed_tokens`` embedding sets ``ensure_weight_tying`` (PEFT
    then adapts the tied ``lm_head`` too, as deltatune does); with ``model`` (the base), a part on any other tied
    weight is refused (:func:`deltatune.io.peft_ties.needs_weight_tying`).
    The safetensors metadata ``deltatune.digests`` records a SHA-256 digest of every tensor and of the
    config, which :func:`load_peft_adapter` verifies (PEFT ignores it).  Non-finite scales or values are
    refused (:class:`NonFiniteError`).  The directory is written atomically; an existing ``path`` that
    is not an earlier PEFT export is refused (:class:`OutputExists`) unless ``overwrite``.
    """
    path = Path(path)
    if not delta.parts:
        raise DeltaFormatError("the delta has no parts; a PEFT adapter needs at least one LoRA module")
    kinds = sorted({p.kind for p in delta.parts.values()})
    bad = sorted(f"{n} ({p.kind})" for n, p in delta.parts.items() if p.kind not in (LoRAPart.kind, DoRAPart.kind))
    if bad:
        raise DeltaFormatError(f"only LoRA and DoRA deltas export to a PEFT LoraConfig; parts {bad[:5]} are "
                               "neither. Extract a low-rank approximation (SVD of each ΔW) into a LoRA delta first")
    if len(kinds) > 1:
        raise DeltaFormatError(f"the delta mixes LoRA and DoRA parts ({kinds}), but PEFT's use_dora holds for every "
                               "module of an adapter; export them as two deltas")
    dora = kinds == [DoRAPart.kind]
    parts: dict[str, LoRAPart | DoRAPart] = dict(delta.parts)  # type: ignore[arg-type]
    rslora = bool(delta.config.get("rslora", False))
    ranks = {n: p.rank for n, p in parts.items()}
    alphas: dict[str, int | float] = {}
    for name, part in parts.items():
        alpha = part.scale * (math.sqrt(part.rank) if rslora else part.rank)
        if not math.isfinite(alpha):
            raise NonFiniteError(f"cannot export to {path}: part {name!r} has scale {part.scale} (lora_alpha {alpha})")
        alphas[name] = _json_number(alpha)
    r = max(ranks.values())
    lora_alpha = Counter(alphas[n] for n in sorted(parts) if ranks[n] == r).most_common(1)[0][0]
    weight_tying = needs_weight_tying(parts, model, f"export to PEFT ({path})")
    for owner, twin in tied_twins(parts, model) if weight_tying else ():
        # PEFT builds the tied lm_head from the embedding's factors but takes its r and α from the patterns
        # under the twin's own name: give it the embedding's, or its scale would be the default α / r
        ranks.setdefault(twin, ranks[owner])
        alphas.setdefault(twin, alphas[owner])
    dropouts = {p.dropout_p for p in parts.values()}
    dropout = finite_number(delta.config.get("dropout", max(dropouts)), f"cannot export to {path}: delta config "
                            "field 'dropout'")
    kinds = {p.layer for p in parts.values()}
    config = {
        **exported_config_base("LORA", base_model_name_or_path),
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
        "use_dora": dora,
        "lora_bias": False,
        "ensure_weight_tying": weight_tying,
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
        if dora:
            tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = part.magnitude.detach().to("cpu").contiguous()
    tensors.update(head_tensors(delta.heads, PREFIX))
    return write_adapter(path, config, tensors, overwrite)


#: part kind → ``writer(delta, path, base_model_name_or_path=None, overwrite=False) -> Path`` of the PEFT method
#: whose adapters hold that kind (:func:`export_lora` also takes the base ``model``, for tied weights).
PEFT_WRITERS: dict[str, Callable[..., Path]] = {
    LoRAPart.kind: export_lora,
    DoRAPart.kind: export_lora,
    "ia3": lazy_peft_function("deltatune.io.peft_ia3", "export_ia3", "IA3"),
    "prompt": lazy_peft_function("deltatune.io.peft_prompt", "export_prompt", "PROMPT_TUNING"),
}


def export_peft(delta: Delta, path: str | Path, base_model_name_or_path: str | None = None,
                overwrite: bool = False, model: nn.Module | None = None) -> Path:
    """Write ``delta`` as a PEFT adapter directory with the writer :data:`PEFT_WRITERS` has for its part kinds:
    :func:`export_lora` for ``lora``/``dora`` parts (a ``LoraConfig``), ``deltatune.io.peft_ia3.export_ia3`` for
    ``ia3`` parts, ``deltatune.io.peft_prompt.export_prompt`` for a ``prompt`` part.  A kind without a writer, or
    kinds of two PEFT methods in one delta, is a :class:`DeltaFormatError` before anything is written; so is a
    merge that kept several tasks' heads (:class:`ConfigError`: an adapter's ``modules_to_save`` holds one head per
    module, and PEFT would silently load none of the ``classifier@task`` tensors).  With ``model`` (the base), a
    part on a weight tied to another module is refused unless PEFT can tie it as deltatune does
    (:mod:`deltatune.io.peft_ties`; without it only ``ensure_weight_tying`` is set for ``embed_tokens``)."""
    if not delta.parts:
        raise DeltaFormatError("the delta has no parts; a PEFT adapter needs at least one adapted module")
    require_unstacked(delta, "export to PEFT")  # an adapter holds its own update only, run on the bare base
    require_one_task(delta, f"export to PEFT ({path})", holder="a PEFT adapter")
    needs_weight_tying(delta.parts, model, f"export to PEFT ({path})")  # any kind: refused before writing
    check_head_names(delta.heads, delta.parts, f"export to PEFT ({path})")
    bad = sorted(f"{n} ({p.kind})" for n, p in delta.parts.items() if p.kind not in PEFT_WRITERS)
    if bad:
        raise DeltaFormatError(f"parts {bad[:5]} have no PEFT writer: LoRA, DoRA, (IA)³ and prompt-tuning deltas "
                               f"export to PEFT (part kinds {sorted(PEFT_WRITERS)}). For an additive delta, extract a "
                               "low-rank approximation (SVD of each ΔW) into a LoRA delta first (`deltatune compress "
                               "--method lowrank`)")
    writers = {PEFT_WRITERS[p.kind] for p in delta.parts.values()}
    if len(writers) > 1:
        kinds = sorted({p.kind for p in delta.parts.values()})
        raise DeltaFormatError(f"the delta mixes part kinds {kinds} of different PEFT methods; one PEFT adapter "
                               "holds one method, so export them as separate deltas")
    writer = writers.pop()
    extra = {"model": model} if writer is export_lora else {}
    return writer(delta, path, base_model_name_or_path=base_model_name_or_path, overwrite=overwrite, **extra)
