"""The inputs of ``deltatune inspect`` as task vectors, read one tensor at a time.

Deltas (deltatune folders, PEFT LoRA folders or :class:`~deltatune.delta.Delta` objects) become
:class:`~deltatune.algebra.inputs.DeltaInput` (``τ`` = the part's ``updates(base)``, so any additive kind works);
full fine-tuned checkpoints become :class:`~deltatune.algebra.inputs.CheckpointInput` against ``--base``
(``τ = θ_ft − θ₀`` read lazily, never the whole checkpoint).  Base tensors come from the base checkpoint through
the merge engine's lookup (a delta's module path is matched to the checkpoint's key names).  At any time the
process holds the base tensor, one ``τ`` per input and a few SVD factors of that one tensor.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from deltatune.algebra.checkpoint import CheckpointReader, is_checkpoint
from deltatune.algebra.engine import BaseLookup, added_bias_keys, base_lookup, plan_keys
from deltatune.algebra.inputs import CheckpointInput, DeltaInput
from deltatune.algebra.options import check_input_count
from deltatune.algebra.sum_deltas import check_same_bases
from deltatune.delta import Delta
from deltatune.errors import ConfigError
from deltatune.inspect.options import InspectOptions
from deltatune.parts.capabilities import require_capability


@dataclass
class Sources:
    """Opened inputs: ``sources[i]`` labelled ``labels[i]``; ``shapes`` the union of their tensors, one key per
    base tensor (``members`` lists the input keys each stands for: tied names share one tensor); ``base_of`` reads a
    base tensor (fp32) when ``base`` is set; ``head_dim`` from the base's config (for head placement)."""

    sources: list[Any]
    labels: list[str]
    kinds: list[str]
    shapes: dict[str, tuple[int, ...]]
    base: CheckpointReader | None
    base_of: Callable[..., Tensor]
    head_dim: int | None
    notes: list[str]
    described: list[dict[str, Any]]
    conv1d: bool | None = None  # whether c_attn/c_proj/c_fc are GPT-2 Conv1D (by model type); None: unknown
    members: dict[str, list[str]] | None = None  # report key → the input keys it sums; None: each key alone

    def base_tensor(self, key: str) -> Tensor | None:
        return self.base_of(key) if self.base is not None else None

    def _same_dtype_base(self, source: CheckpointInput, key: str, base_value: Tensor | None) -> Tensor | None:
        """The base tensor as the fine-tune stores it: rounded to the fine-tune's dtype when that is narrower (an fp32
        base, a bf16 fine-tune), so that the rounding of the save is not counted as an update — update sparsity is
        measured on both checkpoints "in the same dtype" (Mukherjee et al., 2025).  Noted once per dtype pair."""
        if base_value is None or self.base is None:
            return base_value
        mine, theirs = source.reader.dtype(key), self.base.dtype(key)
        if not (mine.is_floating_point and theirs.is_floating_point) or torch.finfo(mine).bits >= \
                torch.finfo(theirs).bits:
            return base_value
        note = (f"the base stores {theirs} and {source.label} {mine}: its delta is taken against the base rounded "
                f"to {mine}, so the save's rounding does not count as an update")
        if note not in self.notes:
            self.notes.append(note)
        return base_value.to(mine).float()

    def taus(self, key: str, base_value: Tensor | None) -> list[Tensor | None]:
        """``τ_i`` of ``key`` for every input (``None`` where input ``i`` leaves the tensor alone); a delta's
        updates of the names tied to ``key`` are summed (they all land on the one tensor)."""
        out: list[Tensor | None] = []
        for s in self.sources:
            if isinstance(s, CheckpointInput):
                out.append(s.tau(key, self._same_dtype_base(s, key, base_value)))
            else:
                out.append(self._delta_tau(s, key))
        return out

    def _delta_tau(self, source: DeltaInput, key: str) -> Tensor | None:
        """The sum of ``source``'s updates of the input keys ``key`` stands for (``None`` when it has none)."""
        base_of = self.base_of if self.base is not None else None
        found = [source.tau(k, base_of) for k in (self.members or {}).get(key, [key]) if k in source.keys_set]
        if not found:
            return None
        return found[0] if len(found) == 1 else torch.stack(found).sum(0)


def default_labels(items: Sequence[Delta | str | Path]) -> list[str]:
    """A short name per input: the folder's name (its parent's for a run's ``delta``/``best``), ``delta i`` for an
    object; the full paths when the short names collide."""
    def short(i: int, x: Delta | str | Path) -> str:
        if isinstance(x, Delta):
            return f"delta {i}"
        p = Path(x)
        return f"{p.parent.name}/{p.name}" if p.name in ("delta", "best") and p.parent.name else p.name or str(p)

    names = [short(i, x) for i, x in enumerate(items)]
    if len(set(names)) == len(names):
        return names
    return [str(x) if not isinstance(x, Delta) else f"delta {i}" for i, x in enumerate(items)]


def _is_full_checkpoint(item: Any) -> bool:
    return not isinstance(item, Delta) and is_checkpoint(item) and not (Path(item) / "manifest.json").is_file()


#: model types whose ``c_attn``/``c_proj``/``c_fc`` are GPT-2 ``Conv1D`` modules (weights stored ``(in, out)``);
#: GPTBigCode and Qwen-1 use the same names on ``nn.Linear``
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})


def _config(base: CheckpointReader | None) -> dict[str, Any]:
    """The base folder's ``config.json`` (``{}`` when there is none or it cannot be read)."""
    if base is None or not (base.path / "config.json").is_file():
        return {}
    try:
        config = json.loads((base.path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def _head_dim(base: CheckpointReader | None) -> int | None:
    """``hidden / heads`` (or ``head_dim``) from the base folder's ``config.json``; ``None`` when unknown."""
    config = _config(base)
    if not config:
        return None
    if isinstance(config.get("head_dim"), int) and config["head_dim"] > 0:
        return config["head_dim"]
    hidden = config.get("hidden_size", config.get("n_embd"))
    heads = config.get("num_attention_heads", config.get("n_head"))
    if isinstance(hidden, int) and isinstance(heads, int) and heads > 0 and hidden % heads == 0:
        return hidden // heads
    return None


def _check_same_base(deltas: list[Delta], labels: list[str], force: bool) -> None:
    """:class:`FingerprintMismatch` when two deltas were trained on different bases (unless ``force``), by the rule
    every operation on several deltas uses (:func:`~deltatune.algebra.sum_deltas.check_same_bases`: deltas that
    carry different task heads compare on what their fingerprints share)."""
    if not force:
        check_same_bases(deltas, labels, hint="; inspect compares their deltas only on one base: inspect them "
                                              "separately, or pass --force")


def open_sources(items: Sequence[Delta | str | Path], opts: InspectOptions) -> Sources:
    """Open ``items`` (see the module docstring); typed errors before any tensor is read:
    :class:`ConfigError` (no input, a mix of checkpoints and deltas, a checkpoint without ``base``, label count),
    :class:`FingerprintMismatch` (deltas of different bases), :class:`NotMergeable` (a non-additive part),
    :class:`~deltatune.errors.ShapeMismatch` (one tensor with two shapes)."""
    from deltatune.api import as_delta, base_model_path

    if not items:
        raise ConfigError("inspect: no inputs (give one or more delta folders or checkpoints)")
    check_input_count(len(items), "inspect")
    labels = list(opts.labels) if opts.labels else default_labels(items)
    if len(labels) != len(items):
        raise ConfigError(f"inspect: {len(labels)} labels for {len(items)} inputs")
    full = [_is_full_checkpoint(x) for x in items]
    notes: list[str] = []
    if any(full) and not all(full):
        raise ConfigError("inspect: the inputs mix full checkpoints and deltas; inspect them separately (or write "
                          "the delta as a checkpoint with `deltatune apply`)")
    if all(full):
        if opts.base is None:
            raise ConfigError(f"inspect: {items[0]} is a full checkpoint; its delta is θ_ft − θ₀, so --base (the "
                              "checkpoint it was fine-tuned from) is required")
        base = CheckpointReader(opts.base)
        sources: list[Any] = [CheckpointInput(x, base) for x in items]
        kinds = ["checkpoint"] * len(items)
        described = [{"label": lab, "path": str(x), "kind": "checkpoint"} for lab, x in zip(labels, items, strict=True)]
    else:
        deltas = [as_delta(x, verify=opts.verify) for x in items]
        for d, label in zip(deltas, labels, strict=True):
            require_capability(d, "additive", f"inspect ({label})")
        _check_same_base(deltas, labels, opts.force)
        base_path = opts.base or base_model_path(deltas[0], None)
        if opts.base is None and not is_checkpoint(base_path):
            notes.append(f"base {base_path!r} (recorded by the delta) is not a local checkpoint: the numbers "
                         "relative to W (relative norm, intruders, alignment) are left out; pass --base")
            base = None
        else:
            base = CheckpointReader(base_path)
        sources = [DeltaInput(d, label) for d, label in zip(deltas, labels, strict=True)]
        dependent = [(lab, m) for s, lab in zip(sources, labels, strict=True) for m in s.base_dependent]
        if dependent and base is None:
            raise ConfigError(f"inspect ({dependent[0][0]}): module {dependent[0][1]!r} holds a part whose update "
                              "depends on the base weights; pass --base")
        heads = sorted({h for d in deltas for h in d.heads})
        if heads:
            notes.append(f"task heads {heads} are new modules, not updates of base weights: not inspected")
        kinds = ["delta"] * len(items)
        described = [{"label": lab, "path": None if isinstance(x, Delta) else str(x), "kind": "delta",
                      "method": d.method, "part_kinds": d.part_kinds(), "trainable": d.trainable_count}
                     for lab, x, d in zip(labels, items, deltas, strict=True)]
    shapes = plan_keys(sources)
    base_of = base_lookup(base, shapes, {}, added_bias_keys(sources))
    members = _tied_members(shapes, base_of) if base is not None and kinds[0] == "delta" else None
    if members is not None:
        shapes = {key: shapes[key] for key in members}
    model_type = _config(base).get("model_type") if base is not None else None
    if model_type is None and kinds[0] == "delta":
        model_type = (deltas[0].fingerprint or {}).get("model_type")
    return Sources(sources, labels, kinds, shapes, base, base_of, _head_dim(base), notes, described,
                   conv1d=None if model_type is None else model_type in CONV1D_MODEL_TYPES, members=members)


def _tied_members(shapes: dict[str, tuple[int, ...]], base_of: BaseLookup) -> dict[str, list[str]]:
    """``report key → input keys`` grouping the deltas' keys by the base tensor they update: a tied ``lm_head.weight``
    and the input embedding are one tensor, so their updates are one ``τ`` (reported under the key of the name the
    checkpoint stores, else the first).  An added bias (no stored tensor) stays alone; a key the base lacks raises
    :class:`~deltatune.errors.ShapeMismatch` here, before any tensor is read."""
    groups: dict[str, list[str]] = {}
    for key in shapes:
        stored = base_of.stored_name(key)
        groups.setdefault(key if stored is None else stored, []).append(key)
    members: dict[str, list[str]] = {}
    for stored, keys in groups.items():
        direct = [k for k in keys if k == stored or k.endswith(f".{stored}")]
        members[(direct or keys)[0]] = keys
    return members
