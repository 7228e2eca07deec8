"""Deltas trained in the base's own storage: full fine-tuning at native full fine-tuning's memory and time, sparse
fine-tuning without patching its values in and out of the weight at every call (:mod:`deltatune.parts.sparse_binding`).

A dense part trains ``Δθ`` beside ``θ₀``: one more copy of every trained module than native full fine-tuning, and
``θ₀ + Δθ`` formed in each forward and backward.  :class:`InPlaceTraining` binds the parts instead
(:meth:`deltatune.parts.base.Part.bind`): ``θ`` trains in the base tensor itself, ``θ₀`` waits in a temporary file,
and ``Δθ = θ − θ₀`` is computed whenever the delta is read (saves, best snapshots).  :meth:`InPlaceTraining.close`
(the loop calls it when training ends, however it ends) unbinds them: the base gets ``θ₀`` back and each part holds
its ``Δθ``.  Checkpoints hold the trained ``θ``, so a resumed run continues bit for bit.

Not bound (the parts keep their own ``Δθ``):

* with weight decay on a dense part's parameters: decoupled decay acts on the delta (``Δθ ← (1 − ηλ)Δθ``, towards
  the base), which ``θ`` in place cannot do without ``θ₀`` in memory (a sparse part keeps its values as its own
  parameter, so it binds with decay too);
* under FSDP or DeepSpeed, which shard or flatten the base's tensors;
* when ``in_place`` is false in the method's config.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from deltatune.errors import ConfigError
from deltatune.methods.registry import TrainHook, unwrap_optimizer
from deltatune.model import get_module
from deltatune.parts.base import Part
from deltatune.parts.spill import TensorSpill

#: environment flags of an ``accelerate launch`` that shards or flattens the model's tensors
SHARDING_FLAGS = ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED")


def can_bind(optimizer: torch.optim.Optimizer, parts: dict[str, Part]) -> bool:
    """Whether the parts may train in place: no sharding launch and no weight decay on the parameters of a part
    that trains ``θ`` itself when bound (:attr:`Part.bound_trains_base`)."""
    if any(os.environ.get(flag, "false").lower() == "true" for flag in SHARDING_FLAGS):
        return False
    ids = {id(p) for part in parts.values() if part.bound_trains_base for p in part.parameters()}
    groups = unwrap_optimizer(optimizer).param_groups
    return not any(g.get("weight_decay", 0.0) and any(id(p) in ids for p in g["params"]) for g in groups)


class InPlaceTraining(TrainHook):
    """Binds the delta's parts to their modules for the run (where :func:`can_bind`); :meth:`close` unbinds."""

    stateless = True  # a resume binds afresh: the parts' tensors, which the checkpoint holds, are what train

    def __init__(self, model: nn.Module, delta: Any, optimizer: torch.optim.Optimizer, enabled: bool = True) -> None:
        self.model = model
        self.enabled = enabled and can_bind(optimizer, delta.parts)
        self.bound: list[Part] = []
        self.spill: TensorSpill | None = None  # every bound part's θ₀, one temporary file
        #: ``id`` of each base tensor a bound part trains in place → that part's module name
        self.owners: dict[int, str] = {}
        self._tensors: dict[int, list[int]] = {}  # id(part) → the ids it holds in :attr:`owners`
        self.bind(delta.parts)

    def bind(self, parts: dict[str, Part]) -> None:
        """Bind ``parts`` (module name → part; also the parts a schedule creates later, e.g. LISA's).

        A base tensor is bound by one part at most: each binding keeps its own ``θ₀`` and writes the tensor, so a
        second one (two parts on a tied weight) would overwrite the first's values — :class:`ConfigError` naming
        both modules, raised before any of ``parts`` is bound (methods give a tied weight one part:
        :func:`deltatune.methods.targets.one_per_weight`)."""
        if not self.enabled:
            return
        modules = {name: get_module(self.model, name) for name in parts}
        tensors = {name: [id(t) for k in self._binds(part)
                          if isinstance(t := getattr(modules[name], k, None), torch.Tensor)]
                   for name, part in parts.items()}
        claimed = dict(self.owners)
        for name, ids in tensors.items():
            for t in ids:
                if t in claimed:
                    raise ConfigError(f"in-place training: the parts of {claimed[t]!r} and {name!r} would both train "
                                      "one base tensor in place (a tied weight), each overwriting the other's "
                                      "values; give a shared weight one part, or set in_place false")
                claimed[t] = name
        for name, part in parts.items():
            if part.bound_trains_base:  # θ₀ of a dense part goes to a temporary file; a sparse part keeps its own
                self.spill = self.spill or TensorSpill()
            if part.bind(modules[name], self.spill):
                self.bound.append(part)
                self.owners.update(dict.fromkeys(tensors[name], name))
                self._tensors[id(part)] = tensors[name]

    @staticmethod
    def _binds(part: Part) -> tuple[str, ...]:
        """Names of the base parameters ``part`` would write when bound (none for a kind that never binds)."""
        return () if type(part).bind is Part.bind else part.touched_parameters()

    def close(self) -> None:
        """Unbind every bound part (one failing does not stop the others), then close the spill (its file is
        deleted) — unless a part is still bound: its ``θ₀`` stays in the spill, and the first failure is raised."""
        failure: BaseException | None = None
        still: list[Part] = []
        for part in self.bound:
            try:
                part.unbind()
            except BaseException as exc:  # noqa: BLE001 - the other parts still give the base back
                failure = failure or exc
                still.append(part)
                continue
            for t in self._tensors.pop(id(part), []):
                self.owners.pop(t, None)
        self.bound = still
        if not still and self.spill is not None:
            self.spill.close()
            self.spill = None
        if failure is not None:
            raise failure
