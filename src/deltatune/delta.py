"""``Delta``: module name → Part, plus method, config, base fingerprint, task heads and metrics.

A delta is what a fine-tuning *is*: ``θ' = θ_base ⊕ Δ``.  Where it came from (base, task, training config,
parents of a merge or composition) is its typed :class:`~deltatune.provenance.Provenance`.
Part names are the base model's own module paths (``bert.encoder.layer.0.attention.self.query``).  Task heads
(e.g. a classifier created for the task) have no base value to be a delta of, so they are stored whole in
``heads``.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from deltatune.parts.base import Part
from deltatune.provenance import Provenance


def _head_tensors(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class LiveHeads(MutableMapping[str, dict[str, Tensor]]):
    """``{head: {tensor name: tensor}}`` read from live head modules at each access (copies, so a caller never
    writes into the model).  Assigning a head replaces its live view by the given tensors."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.modules = dict(modules)
        self.fixed: dict[str, dict[str, Tensor]] = {}

    def __getitem__(self, name: str) -> dict[str, Tensor]:
        if name in self.fixed:
            return self.fixed[name]
        return _head_tensors(self.modules[name])

    def __setitem__(self, name: str, tensors: dict[str, Tensor]) -> None:
        self.fixed[name] = tensors
        self.modules.setdefault(name, nn.Identity())

    def __delitem__(self, name: str) -> None:
        del self.modules[name]
        self.fixed.pop(name, None)

    def __iter__(self) -> Iterator[str]:
        return iter(self.modules)

    def __len__(self) -> int:
        return len(self.modules)


@dataclass
class Delta:
    method: str
    config: dict[str, Any]
    parts: dict[str, Part]
    heads: MutableMapping[str, dict[str, Tensor]] = field(default_factory=dict)
    fingerprint: dict[str, Any] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    provenance: Provenance = field(default_factory=Provenance)

    @property
    def trainable_count(self) -> int:
        """Scalars the method trains (parts), excluding task heads."""
        return sum(p.trainable_count for p in self.parts.values())

    @property
    def head_count(self) -> int:
        return sum(t.numel() for h in self.heads.values() for t in h.values())

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts.values()) + sum(
            t.numel() * t.element_size() for h in self.heads.values() for t in h.values()
        )

    @property
    def has_aux_loss(self) -> bool:
        return any(p.has_aux_loss for p in self.parts.values())

    def aux_loss(self) -> Tensor | None:
        """The auxiliary losses of the parts' last forward, already weighted by their coefficients (e.g. a mixture's
        load-balancing loss): per part class, :meth:`Part.combined_aux_loss` of its parts, summed; ``None`` when no
        part has one."""
        by_class: dict[type, list[Any]] = {}
        for p in self.parts.values():
            if p.has_aux_loss:
                by_class.setdefault(type(p), []).append(p)
        losses = [loss for cls, parts in by_class.items() if (loss := cls.combined_aux_loss(parts)) is not None]
        return torch.stack([loss.float() for loss in losses]).sum() if losses else None

    def part_kinds(self) -> dict[str, int]:
        kinds: dict[str, int] = {}
        for p in self.parts.values():
            kinds[p.kind] = kinds.get(p.kind, 0) + 1
        return kinds

    def layer_rows(self) -> list[dict[str, Any]]:
        """Per-part accounting for ``deltatune info``: kind, trainable, bytes, density, norm."""
        rows = []
        for name, part in self.parts.items():
            numel = part.covered_entries()
            rows.append({
                "module": name, "kind": part.kind, "trainable": part.trainable_count, "bytes": part.nbytes,
                "density": part.trainable_count / numel if numel else float("nan"), "delta_norm": _update_norm(part),
            })
        return rows

    def snapshot_heads(self, model: torch.nn.Module) -> None:
        """Freeze ``heads`` to the current tensors of ``model``'s head modules (a plain dict from now on)."""
        from deltatune.model import get_module

        self.heads = {name: _head_tensors(get_module(model, name)) for name in self.heads}

    def bind_heads(self, modules: dict[str, nn.Module]) -> None:
        """Make ``heads`` read the live head modules: every read (and so every save or export) sees the tensors
        as they are now, so a delta saved from any training loop carries its trained heads."""
        self.heads = LiveHeads(modules)

    def save(self, path: str | Path, metrics: dict[str, Any] | None = None, overwrite: bool = False) -> Path:
        """Write this delta with :func:`~deltatune.io.delta_format.save_delta` (``overwrite`` replaces a
        directory that is not an earlier delta)."""
        from deltatune.io.delta_format import save_delta

        return save_delta(self, path, metrics=metrics, overwrite=overwrite)

    @staticmethod
    def load(path: str | Path, verify: bool = True) -> Delta:
        """Read a delta directory; ``verify`` checks every stored SHA-256 digest."""
        from deltatune.io.delta_format import load_delta

        return load_delta(path, verify=verify)


def _update_norm(part: Part) -> float | None:
    """``‖Δθ‖₂`` over every entry the part adds to its module's parameters; ``None`` where the file alone cannot
    tell: base-dependent kinds (DoRA, (IA)³: Δθ depends on θ) and kinds that are not a parameter update
    (adapters, prompts, mixtures)."""
    if not part.additive or part.base_dependent:
        return None
    with torch.no_grad():
        return float(sum(u.float().pow(2).sum() for u in part.updates().values()) ** 0.5)
