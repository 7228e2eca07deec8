"""Delta merges written as a checkpoint, streamed: ``θ₀ + τ_m`` tensor by tensor, no model in memory.

A merge of deltas with ``output="checkpoint"`` used to collect the merged delta, load the whole base model,
merge into it and save its state dict.  :func:`streamable_base` decides whether the merged tensors can
instead go straight through :func:`deltatune.algebra.output.write_checkpoint` (the shard writer of
checkpoint merges): the base's architecture is built on the ``meta`` device (no weights) only to learn its
parameter names, tied weights and fingerprint, and the fingerprint's few sampled tensors are read from the
checkpoint.  It streams when the output would be the same tensors: no task heads to load, no ``out_dtype``
cast of untouched tensors, an fp32 base, every merged tensor a stored tensor, and the model's state-dict
names equal to the checkpoint's.  Otherwise the caller falls back to :func:`deltatune.api.apply_to_checkpoint`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from deltatune.algebra.checkpoint import CheckpointReader
from deltatune.fingerprint import SAMPLED_TENSORS, base_parameters, check_fingerprint


def _meta_model(path: str | Path) -> nn.Module | None:
    """The architecture :func:`deltatune.api.load_base_for` would load for a head-less delta, on ``meta``."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError):
        return None
    archs = getattr(config, "architectures", None) or []
    causal = any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs)
    with torch.device("meta"):
        return (AutoModelForCausalLM if causal else AutoModel).from_config(config)


def _stored_names(model: nn.Module) -> list[str]:
    """State-dict names with each tied tensor once (the first name, as the model path writes them)."""
    seen: set[int] = set()
    names = []
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            names.append(name)
    return names


def _check_fingerprint(model: nn.Module, reader: CheckpointReader, expected: dict[str, Any], where: str) -> bool:
    """:func:`check_fingerprint` of the base in ``reader``: the sampled parameters are read into the meta model
    (swapped in place, so ties hold).  False when a sampled parameter is not stored under its name."""
    params = sorted(base_parameters(model), key=lambda item: item[0])
    step = max(1, len(params) // SAMPLED_TENSORS)
    sampled = params[::step][:SAMPLED_TENSORS]
    if any(name not in reader for name, _ in sampled):
        return False
    for name, p in sampled:
        torch.utils.swap_tensors(p, nn.Parameter(reader.get(name).to(p.dtype), requires_grad=False))
    check_fingerprint(expected, model, (), where)
    return True


def streamable_base(reader: CheckpointReader | None, keys: list[str], heads: dict[str, Any],
                    out_dtype: torch.dtype | None, expected: dict[str, Any] | None, force: bool,
                    where: str) -> CheckpointReader | None:
    """The base checkpoint's ``reader`` (already open) when a delta merge into a checkpoint can stream (see the
    module docstring), else ``None``.  Checks the inputs' base fingerprint as applying the delta would (unless
    ``force``): :class:`~deltatune.errors.FingerprintMismatch` before anything is written."""
    if reader is None or heads or out_dtype is not None:
        return None
    base = reader.path
    stored = set(reader.names())
    if any(k not in stored for k in keys):
        return None
    if any(reader.dtype(k).is_floating_point and reader.dtype(k) != torch.float32 for k in stored):
        return None  # the model path computes in the dtype transformers loads: stream only where both are fp32
    model = _meta_model(base)
    if model is None or set(_stored_names(model)) != stored:
        return None
    if not force and expected and not _check_fingerprint(model, reader, expected, where):
        return None
    return reader
