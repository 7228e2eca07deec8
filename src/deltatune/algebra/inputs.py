"""Merge inputs as task vectors ``τ = θ_ft − θ₀``, keyed by parameter name and densified one tensor at a time.

* :class:`DeltaInput` — a deltatune delta (or a PEFT adapter loaded as one): ``τ`` of
  ``<module>.weight`` is the part's ``ΔW`` in the module's native layout (``B·A·s`` for LoRA, the
  scattered values for a sparse part); dense parts give one key per parameter.
* :class:`CheckpointInput` — a full fine-tuned checkpoint read lazily next to its base checkpoint
  (mergekit's inputs): ``τ = θ_ft − θ₀`` in fp32 for every floating tensor both hold.

Vocabulary mismatches (a fine-tune that added tokens) are an error unless ``vocab`` says how to
align the rows of embedding-like tensors: ``truncate`` keeps the base's rows (new tokens dropped),
``extend`` keeps every row, giving missing rows a zero delta and the base the mean of its rows.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from deltatune.algebra.checkpoint import CheckpointReader
from deltatune.algebra.workspace import NARROW_FLOATS, Workspace
from deltatune.delta import Delta
from deltatune.errors import NonFiniteError, ShapeMismatch
from deltatune.parts.capabilities import require_capability

VocabRule = Literal["error", "truncate", "extend"]


def _finite(tau: Tensor, where: str) -> Tensor:
    """``tau`` unchanged, or :class:`NonFiniteError` if it holds NaN/Inf (one reduction: a non-finite
    entry makes the sum non-finite; finite task vectors never sum past fp32's range)."""
    if not torch.isfinite(tau.sum()):
        bad = int((~torch.isfinite(tau)).sum())
        raise NonFiniteError(f"{where}: {bad} NaN/Inf value(s) in the task vector")
    return tau


class DeltaInput:
    """A :class:`Delta` seen as ``{parameter name: τ}``: ``τ`` of ``<module>.<p>`` is ``part.update(p)``.

    Every part must be additive (:class:`~deltatune.errors.NotMergeable` otherwise, before any tensor is read).
    """

    def __init__(self, delta: Delta, label: str) -> None:
        require_capability(delta, "additive", f"merge ({label})")
        self.delta, self.label = delta, label
        self._keys: dict[str, list[tuple[str, str]]] = {}  # key → the (module, parameter) updates summed into it
        self._stored: dict[str, frozenset[int]] = {}  # per module: storages its part owns (see tau)
        for module, part in delta.parts.items():
            if part.is_alias:
                continue
            for p in part.touched_parameters():
                self._keys[f"{module}.{p}"] = [(module, p)]
            self._stored[module] = frozenset(t.untyped_storage().data_ptr()
                                             for t in (*part.parameters(), *part.buffers()))
        self.keys_set = set(self._keys)

    @property
    def fingerprint(self) -> dict[str, Any] | None:
        return self.delta.fingerprint

    def names(self) -> list[str]:
        return list(self._keys)

    def fold_ties(self, owner_of: Callable[[str], str | None]) -> None:
        """Key every update of a tied tensor by its owner's name (``owner_of(key)``: the name of the tensor ``key``
        is, e.g. a tied ``lm_head.weight`` → ``model.embed_tokens.weight``; ``None``: not tied): a delta with parts
        on both names updates that one tensor by their sum, which a trimming or voting merge must see as one task
        vector, not as two it trims apart."""
        for key in list(self._keys):
            owner = owner_of(key)
            if owner is not None and owner != key:
                self._keys.setdefault(owner, []).extend(self._keys.pop(key))
        self.keys_set = set(self._keys)


    def shape(self, key: str) -> tuple[int, ...]:
        """The native shape of ``τ`` for ``key``, from the part's metadata (never densified: planning a merge
        of many LoRA inputs once computed every ``B·A`` just for its shape)."""
        module, p = self._keys[key][0]
        return self.delta.parts[module].update_shapes()[p]

    @property
    def base_dependent(self) -> list[str]:
        """Modules whose part's update depends on the base weights (DoRA, (IA)³, SSF)."""
        return [m for m, p in self.delta.parts.items() if p.base_dependent and not p.is_alias]

    def tau(self, key: str, base_of: Callable[[str], Tensor] | None = None) -> Tensor:
        """``τ`` for ``key`` in fp32, contiguous and owned by the caller (kernels work in place on flat views): a copy
        only when the part returned its own storage (a dense part's tensor) or a transposed view (a Conv1D or
        Embedding LoRA's ``(B·A)ᵀ``); a Linear LoRA's fresh ``B·A`` is not copied again.  A
        base-dependent part computes its update from the base tensors ``base_of("<module>.<p>")``.  A key that
        names a tied tensor (:meth:`fold_ties`) is the sum of its names' updates."""
        total: Tensor | None = None
        for module, p in self._keys[key]:
            part = self.delta.parts[module]
            base = BaseTensors(module, base_of) if part.base_dependent and base_of is not None else None
            with torch.no_grad():
                value = part.update(p, base).detach().float()
            if not value.is_contiguous():  # a Conv1D/Embedding LoRA's transposed B·A: the kernels work on flat views
                value = value.contiguous()
            elif value.untyped_storage().data_ptr() in self._stored[module]:
                value = value.clone()
            total = value if total is None else total.add_(value)
        assert total is not None
        return _finite(total, f"{self.label}:{key}")


class BaseTensors:
    """A base module seen through its tensors only (``.weight``, ``.bias`` …, fp32, read on demand from a merge's
    base checkpoint): what a base-dependent part's ``updates(base)`` reads.  A tensor the base lacks reads as
    ``None`` (a Linear without bias)."""

    def __init__(self, module: str, base_of: Callable[[str], Tensor]) -> None:
        self._module, self._base_of = module, base_of

    def __getattr__(self, name: str) -> Tensor | None:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self._base_of(f"{self._module}.{name}")
        except ShapeMismatch:
            return None


def _is_vocab_axis(key: str) -> bool:
    return any(s in key for s in ("embed", "lm_head", "wte", "word_embeddings", "output.weight"))


def has_vocab_axis(key: str, shape: tuple[int, ...]) -> bool:
    """Whether tensor ``key`` of ``shape`` has rows indexed by the vocabulary (embeddings, LM heads), the only
    rows ``vocab: truncate | extend`` aligns; a 0-d tensor (CLIP's ``logit_scale``) has no axis at all."""
    return len(shape) >= 1 and _is_vocab_axis(key)


class CheckpointInput:
    """A fine-tuned checkpoint and its base, both read lazily: ``τ = θ_ft − θ₀`` per floating tensor.

    The fine-tune's tensors are matched to the base's names by the merge engine's rule for a delta's
    (:class:`~deltatune.algebra.engine.BaseLookup`: the name itself, else the name without leading module
    names), so a classifier saved by transformers (``bert.encoder…``) reads against its bare base
    (``encoder…``); :attr:`reader` holds them under the base's names.  A floating base tensor the fine-tune
    lacks is a :class:`ShapeMismatch`.  The fine-tune's tensors that match no base tensor stay in :attr:`reader`
    under their own names.  A merge of task vectors leaves them out with a warning; a caller that keeps task heads
    (a single-input rebase copies them) passes ``keep_heads=True``: :attr:`heads` then lists the floating ones the
    base does not tie to a tensor it stores, and the warning names only the others.
    """

    def __init__(self, finetuned: str | Path, base: CheckpointReader, vocab: VocabRule = "error",
                 keep_heads: bool = False) -> None:
        from deltatune.algebra.engine import BaseLookup  # the engine imports this module

        self.label = str(finetuned)
        stored = CheckpointReader(finetuned)
        self.base, self.vocab = base, vocab
        lookup = BaseLookup(base, {}, {})
        matched = {k: k for k in stored.names() if k in base}  # base name → the fine-tune's
        unmatched: list[str] = []
        for name in stored.names():
            if name in matched:
                continue
            found = lookup._direct(name)  # the engine's one matching rule, reused
            if found is None or matched.get(found) == found:  # no base name, or the fine-tune stores it as is
                unmatched.append(name)
            elif found in matched:
                raise ShapeMismatch(f"{self.label}: tensors {matched[found]!r} and {name!r} both stand for the "
                                    f"base's {found!r} (the same name under other leading module names)")
            else:
                matched[found] = name
        missing = [k for k in base.names() if base.is_floating(k) and k not in matched]
        if missing:
            raise ShapeMismatch(f"{self.label} lacks {len(missing)} tensor(s) of the base, e.g. {missing[:3]}")
        self.heads: list[str] = []
        if keep_heads:  # a weight the base ties to one it stores is no head (its ties: a meta model, built once)
            self.heads = [k for k in unmatched if stored.is_floating(k) and lookup._twin(k) is None]
        self.reader = stored.view({**{k: (stored, v) for k, v in matched.items()},
                                   **{k: (stored, k) for k in unmatched}})
        left_out = [k for k in unmatched if k not in self.heads] if keep_heads else unmatched
        if left_out:  # a tensor the base lacks has no θ₀, so no task vector: say so rather than drop it unseen
            what = ("the base lacks that are no task head (a weight the base ties to another, a buffer)" if keep_heads
                    else "the base lacks (e.g. a task head)")
            warnings.warn(f"{self.label} has {len(left_out)} tensor(s) {what}, which a merge of task vectors "
                          f"cannot include and leaves out: {left_out[:6]}{' …' if len(left_out) > 6 else ''}",
                          stacklevel=3)
        for k in self.names():
            self._check_shape(k)

    fingerprint = None

    def names(self) -> list[str]:
        return [k for k in self.base.names() if self.base.is_floating(k)]

    def shape(self, key: str) -> tuple[int, ...]:
        return self.base.shape(key)

    def _check_shape(self, key: str) -> None:
        mine, base = self.reader.shape(key), self.base.shape(key)
        if mine == base:
            return
        if self.vocab != "error" and _is_vocab_axis(key) and mine[1:] == base[1:]:
            return
        hint = " (a vocabulary mismatch: pass vocab='truncate' or 'extend' to align rows)" if (
            _is_vocab_axis(key) and mine[1:] == base[1:]) else ""
        raise ShapeMismatch(f"{self.label}: tensor {key!r} has shape {mine}, the base has {base}{hint}")

    def rows(self, key: str) -> int:
        return self.reader.shape(key)[0]

    def tau(self, key: str, base_value: Tensor | None = None, workspace: Workspace | None = None,
            slot: int = 0) -> Tensor:
        """``θ_ft − θ₀`` in fp32 against ``base_value`` (the base tensor in fp32, already row-aligned by the
        engine).

        With a ``workspace`` the fine-tune is read into its ``"raw"`` buffer and ``τ`` lands in
        ``("tau", slot)``: ``fp32(θ_ft) − fp32(θ₀)``, the same values as a fresh subtraction.  Rows the
        fine-tune lacks get a zero delta; rows beyond ``base_value`` are dropped.
        """
        b = base_value if base_value is not None else self.base.get_float(key)
        shape = self.reader.shape(key)
        if workspace is not None and shape == tuple(b.shape) and self.reader.dtype(key) in NARROW_FLOATS:
            tau = workspace.read_fp32(self.reader, key, ("tau", slot)).sub_(b)
            return _finite(tau, f"{self.label}:{key}")
        ft, b = self.reader.get(key), b.float()
        if ft.shape == b.shape:  # one pass: bf16/fp16 − fp32 promotes to fp32
            return _finite(torch.sub(ft, b), f"{self.label}:{key}")
        ft = ft.float()
        m = min(ft.shape[0], b.shape[0])
        tau = torch.zeros_like(b)
        tau[:m] = ft[:m] - b[:m]
        return _finite(tau, f"{self.label}:{key}")
