"""Tied weights between deltatune and PEFT 0.21 (GPT-2's ``lm_head`` *is* ``wte``; Llama's ``lm_head`` can be
``embed_tokens``).

deltatune updates a tied weight once, so a part on one tied module changes every module sharing the weight
(:class:`~deltatune.parts.tied.TiedAlias`).  PEFT adapts only the targeted module (the other keeps the base
weight) unless ``ensure_weight_tying`` is set *and* the pair is one its ``_check_tied_modules`` recognises: a
target whose last name component is in ``EMBEDDING_LAYER_NAMES`` (``embed_tokens``, ``lm_head``), tied by the
model's ``_tied_weights_keys``.  Then PEFT adapts the input embedding and gives the tied ``lm_head`` the same
factors, transposed (``A_head = B_embᵀ``, ``B_head = A_embᵀ``): the same ``ΔW`` on both, as deltatune computes.

So a LoRA part on a tied ``*.embed_tokens`` embedding whose twins are ``*.lm_head`` modules exports with
``"ensure_weight_tying": true``; every other part on a tied weight (GPT-2's ``wte``, a part on the ``lm_head``
side, a DoRA or (IA)³ part, whose tied twins PEFT would renormalise or scale on their own) is refused on export
and on import (:class:`DeltaFormatError` naming the module), since PEFT would compute something else.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from deltatune.errors import DeltaFormatError
from deltatune.parts.base import Part
from deltatune.parts.layers import LayerKind
from deltatune.parts.lora import LoRAPart

EMBEDDING = "embed_tokens"  # PEFT's EMBEDDING_LAYER_NAMES: the only names ensure_weight_tying ties
OUTPUT = "lm_head"


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def tied_modules(model: nn.Module, names: list[str]) -> dict[str, list[str]]:
    """``module → the other modules sharing its weight``, for each of ``names`` whose weight is tied."""
    from deltatune.model import tied_aliases

    ties = {n: tied_aliases(model, n) for n in names if n}
    return {n: aliases for n, aliases in ties.items() if aliases}


def peft_ties(part: Part, module: str, aliases: list[str]) -> bool:
    """Whether PEFT's ``ensure_weight_tying`` applies ``part``'s update to ``module`` and all its ``aliases`` as
    deltatune does: a plain LoRA part on an ``embed_tokens`` embedding whose twins are ``lm_head`` modules."""
    return (part.kind == LoRAPart.kind and part.layer_kind() is LayerKind.EMBEDDING and _leaf(module) == EMBEDDING
            and all(_leaf(a) == OUTPUT for a in aliases))


def _untieable(module: str, aliases: list[str], part: Part, where: str, hint: str) -> DeltaFormatError:
    return DeltaFormatError(
        f"{where}: module {module!r} shares its weight with {aliases} (tied embeddings); deltatune applies the "
        f"{part.kind} update to the shared weight, i.e. to every tied module, but PEFT applies it to {module!r} only "
        f"(its ensure_weight_tying ties only a LoRA on an '{EMBEDDING}' embedding to '{OUTPUT}'), so the results "
        f"would differ. {hint}")


def needs_weight_tying(parts: Mapping[str, Part], model: nn.Module | None, where: str) -> bool:
    """Whether an export must set ``ensure_weight_tying``; :class:`DeltaFormatError` for a part on a tied weight
    that PEFT cannot tie (:func:`peft_ties`).  Without ``model`` the ties are unknown: a LoRA part on an
    ``embed_tokens`` embedding sets it anyway (PEFT only warns when the base turns out untied)."""
    if model is None:
        return any(peft_ties(p, n, []) for n, p in parts.items())
    ties = tied_modules(model, list(parts))
    for module, aliases in ties.items():
        if not peft_ties(parts[module], module, aliases):
            raise _untieable(module, aliases, parts[module], where,
                             "Target a module whose weight is not tied, or load the base untied "
                             "(tie_word_embeddings=False) and train there")
    return bool(ties)


def tied_twins(parts: Mapping[str, Part], model: nn.Module | None) -> list[tuple[str, str]]:
    """``(embedding, twin)`` for each LoRA part PEFT's ``ensure_weight_tying`` ties (:func:`peft_ties`): the
    embedding's ``lm_head`` aliases in ``model``, or, without ``model``, ``lm_head`` (the name PEFT's causal-LM
    classes give it)."""
    if model is None:
        return [(n, OUTPUT) for n, p in parts.items() if peft_ties(p, n, [])]
    return [(n, twin) for n, aliases in tied_modules(model, list(parts)).items() if peft_ties(parts[n], n, aliases)
            for twin in aliases]


def drop_tied_twins(parts: dict[str, Part], model: nn.Module, weight_tying: bool, file: Path) -> dict[str, Part]:
    """The adapter's parts as deltatune must hold them on ``model``: with ``ensure_weight_tying`` the ``lm_head``
    twin of a tied ``embed_tokens`` LoRA (PEFT saves both; deltatune updates the shared weight once, so keeping
    both would apply ``ΔW`` twice) is dropped once its update is checked to be the embedding's; any other part on
    a tied weight is refused (:class:`DeltaFormatError`): PEFT applies it to its own module only."""
    ties = tied_modules(model, list(parts))
    owners = {n for n, aliases in ties.items() if weight_tying and peft_ties(parts[n], n, aliases)}
    out = dict(parts)
    for module, aliases in ties.items():
        if module in owners:
            continue
        owner = next((a for a in aliases if a in owners), None)
        if owner is None:
            raise _untieable(module, aliases, parts[module], str(file),
                             "Load the base untied (tie_word_embeddings=False) to use this adapter as PEFT does")
        _check_twin(parts[module], parts[owner], module, owner, file)
        del out[module]
    return out


def _check_twin(twin: Part, owner: Part, module: str, owner_name: str, file: Path) -> None:
    """``twin`` (on ``lm_head``) must carry ``owner``'s (the embedding's) update: PEFT computes the tied head with
    the embedding's factors, whatever ``twin`` stores."""
    with torch.no_grad():
        a, b = twin.delta_weight().float(), owner.delta_weight().float()
    if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-4, atol=1e-6 * float(b.abs().max().clamp_min(1.0))):
        raise DeltaFormatError(f"{file}: with ensure_weight_tying, {module!r} must carry the update of the tied "
                               f"embedding {owner_name!r} (its factors transposed), but its ΔW differs")
