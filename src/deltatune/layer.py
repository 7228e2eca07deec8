"""``DeltaLayer``: wraps one base module and routes its forward through attached parts.

The original module stays as ``.base`` (no class swapping, no patched ``forward``).  Several named parts can
be attached; ``active`` decides which ones a plain forward uses:

* additive parts are **summed**: one alone runs its own ``forward``; several run the module once with
  ``θ + Σ_p Δθ_p`` (each part's :meth:`~deltatune.parts.base.Part.updates` given the base module);
* non-additive parts (adapters, mixtures, routed task heads) are **chained** after them in attach order:
  each gets as ``base`` a :class:`Inner` — a callable computing everything inside it, which also reads
  through to the module's attributes.

The module may be called with extra positional or keyword arguments (attention blocks, ``BertOutput``): the
first positional argument (or ``hidden_states``/``input``/``x`` by keyword) is the input ``x`` the parts see,
and the rest is passed through.

Inside a :func:`deltatune.routing.routed` block the layer reads the caller's routing context instead: row (or
token) ``i`` uses only the part named ``names[ids[i]]`` (``None``: the base).  Merging is never implicit: see
:func:`deltatune.model.merge_delta`.  :class:`ModelParts` holds model-level parts (virtual tokens), which act
through forward hooks on the whole model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from deltatune.errors import ConfigError
from deltatune.parts.base import Part, route_rows
from deltatune.routing import Routing, current_routing

INPUT_KEYWORDS = ("hidden_states", "input", "x", "input_ids")


@dataclass
class Call:
    """One call of the wrapped module: the input ``x`` the parts see, the other positional arguments, the
    keyword arguments, and the keyword ``x`` came by (``None``: first positional)."""

    x: Tensor
    rest: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    key: str | None = None

    @classmethod
    def of(cls, args: tuple, kwargs: dict[str, Any]) -> Call:
        if args:
            return cls(args[0], tuple(args[1:]), kwargs)
        for key in INPUT_KEYWORDS:
            if key in kwargs:
                return cls(kwargs[key], (), {k: v for k, v in kwargs.items() if k != key}, key)
        raise TypeError(f"called without an input tensor (positional, or one of {INPUT_KEYWORDS} by keyword)")

    @property
    def plain(self) -> bool:
        """Called as ``module(x)`` alone."""
        return not self.rest and not self.kwargs and self.key is None

    def arguments(self, x: Tensor) -> tuple[tuple, dict[str, Any]]:
        """``(args, kwargs)`` of the same call with input ``x``."""
        if self.key is None:
            return (x, *self.rest), self.kwargs
        return self.rest, {**self.kwargs, self.key: x}


class Inner:
    """What a chained part sees as ``base``: ``inner(x)`` is the output of everything inside the part (the
    module and the parts before it); ``call`` holds the call's other arguments; attributes read through to
    the wrapped ``module``."""

    def __init__(self, module: nn.Module, fn: Callable[[Tensor, Call], Any], call: Call) -> None:
        self.module, self.fn, self.call = module, fn, call

    def __call__(self, x: Tensor) -> Any:
        return self.fn(x, self.call)

    def with_call(self, call: Call) -> Inner:
        """The same inner computation run with ``call``'s other arguments (e.g. a parallel adapter's shifted
        residual); parts inside see ``call`` too."""
        return Inner(self.module, self.fn, call)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["module"], name)


def first(out: Any) -> Tensor:
    """The main tensor of a module output (a tensor, or the first element of a tuple)."""
    return out[0] if isinstance(out, tuple) else out


def replace_first(out: Any, value: Tensor) -> Any:
    return (value, *out[1:]) if isinstance(out, tuple) else value


def sum_updates(module: nn.Module, parts: Sequence[Part]) -> dict[str, Tensor]:
    """``{name: θ + Σ_p Δθ_p}`` for every direct parameter some part updates (``Δθ`` given the base module)."""
    own = dict(module.named_parameters(recurse=False))
    total: dict[str, Tensor] = {}
    for part in parts:
        for name, delta in part.updates(module).items():
            total[name] = total.get(name, 0) + delta
    return {k: own[k] + v.to(own[k].dtype) for k, v in total.items()}


class PartHolder(nn.Module):
    """Named parts and the names a plain forward uses (``active``); parts take the holder's train/eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.parts = nn.ModuleDict()
        self.active: list[str] = []

    def add(self, name: str, part: Part, activate: bool = True) -> None:
        part.train(self.training)  # a part joins in the holder's mode: no dropout in an eval model
        self.parts[name] = part
        if activate and name not in self.active:
            self.active.append(name)

    def remove(self, name: str) -> Part:
        part = self.parts[name]
        del self.parts[name]
        if name in self.active:
            self.active.remove(name)
        return part


class DeltaLayer(PartHolder):
    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.train(base.training)

    def nests(self) -> bool:
        """Whether wrapped modules sit inside this one (their routing needs the whole batch)."""
        return any(isinstance(m, DeltaLayer) for m in self.base.modules())

    # --- a plain forward: the active parts ----------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        routing = current_routing()
        if routing is not None:
            return self._routed(routing, args, kwargs)
        if not self.active:
            return self.base(*args, **kwargs)
        call = Call.of(args, kwargs)
        return self.stack([self.parts[n] for n in self.active], call)(call.x)

    def stack(self, parts: Sequence[Part], call: Call) -> Callable[[Tensor], Any]:
        """``f(x)``: the module called like ``call`` with ``parts`` — additive ones summed, then the others
        chained in order."""
        module = self.base
        additive = [p for p in parts if p.additive]

        def summed(x: Tensor, c: Call) -> Any:
            if len(additive) == 1 and c.plain:
                return additive[0](x, module)  # a part alone runs its own (fast) forward
            a, k = c.arguments(x)
            return functional_call(module, sum_updates(module, additive), a, k)

        stage: Callable[[Tensor, Call], Any] = summed if additive else _bare(module)
        for part in parts:
            if not part.additive:
                stage = _chained(part, module, stage)
        return lambda x: stage(x, call)

    # --- a routed forward: each row (token) its own delta --------------------------------------------
    def _routed(self, routing: Routing, args: tuple, kwargs: dict[str, Any]) -> Any:
        parts = [self.parts[n] if n is not None and n in self.parts else None for n in routing.names]
        if all(p is None for p in parts):
            return self.base(*args, **kwargs)
        call = Call.of(args, kwargs)
        batch = routing.ids.shape[0]
        if call.x.dim() and call.x.shape[0] == 1 and batch > 1:  # broadcast over the batch (position ids)
            call = replace(call, x=call.x.expand(batch, *call.x.shape[1:]))
        ids = routing.ids_for(call.x)
        kinds = {type(p) for p in parts if p is not None}
        rows_apart = call.plain and not self.nests()  # rows may be run apart: nothing inside routes them again
        if len(kinds) == 1 and rows_apart:
            cls = kinds.pop()
            cache = routing.cache.setdefault((id(self), cls.kind), {})
            base = self.base if cls.additive else Inner(self.base, _bare(self.base), call)
            return cls.mixed_forward(call.x, base, parts, ids, cache)
        # several kinds, or extra arguments: each part on its rows (on the whole batch when the other
        # arguments cannot be split by rows), then the rows kept
        a, k = call.arguments(call.x)
        out = self.base(*a, **k)
        runs = [None if p is None else self.stack([p], call) for p in parts]
        if rows_apart:
            return route_rows(call.x, out, ids, runs)
        for pid, run in enumerate(runs):
            if run is None or not bool((ids == pid).any()):
                continue
            mask = (ids == pid).reshape(*ids.shape, *([1] * (first(out).dim() - ids.dim())))
            out = replace_first(out, torch.where(mask, first(run(call.x)).to(first(out).dtype), first(out)))
        return out


def _bare(module: nn.Module) -> Callable[[Tensor, Call], Any]:
    def run(x: Tensor, c: Call) -> Any:
        a, k = c.arguments(x)
        return module(*a, **k)
    return run


def _chained(part: Part, module: nn.Module, inner: Callable[[Tensor, Call], Any]) -> Callable[[Tensor, Call], Any]:
    return lambda x, c: part(x, Inner(module, inner, c))


class ModelParts(PartHolder):
    """Model-level parts (virtual tokens) of a model, run by forward hooks on the model itself.

    Registered on the model as ``deltatune_model_parts`` so that its tensors train and move with the model;
    :func:`deltatune.fingerprint.base_parameters` and the module walks of :mod:`deltatune.model` skip it.
    Before a forward, the active part (or, in a routed batch, each row's part) rewrites the model's keyword
    arguments with its kind's ``model_pre_forward``; after it, ``model_post_forward`` restores the outputs'
    alignment with the caller's inputs."""

    ATTRIBUTE = "deltatune_model_parts"

    def __init__(self) -> None:
        super().__init__()
        self._handles: list[Any] = []
        self._pending: list[tuple[type[Part], Any]] = []

    def hook(self, model: nn.Module) -> None:
        self.train(model.training)
        self._handles = [model.register_forward_pre_hook(self._pre, with_kwargs=True),
                         model.register_forward_hook(self._post, with_kwargs=True)]

    def unhook(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _chosen(self) -> tuple[list[Part | None], Tensor | None]:
        routing = current_routing()
        if routing is not None:
            if routing.per_token_ids and any(n in self.parts for n in routing.names if n is not None):
                raise ConfigError("model-level parts (virtual tokens) cannot be routed per token; route per row")
            return [self.parts[n] if n is not None and n in self.parts else None for n in routing.names], routing.ids
        active = [self.parts[n] for n in self.active]
        if len(active) > 1:
            raise ConfigError(f"{len(active)} model-level parts are active at once ({self.active}); activate one, "
                              "or route the rows of a batch to different ones")
        return active, None

    def _pre(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict] | None:
        parts, ids = self._chosen()
        used = {type(p) for p in parts if p is not None}
        if not used:
            self._pending.append((Part, None))
            return None
        if len(used) > 1:
            raise ConfigError(f"one batch routes rows to model-level parts of different kinds "
                              f"{sorted(c.kind for c in used)}; deltatune runs one kind per batch")
        cls = used.pop()
        args, kwargs, state = cls.model_pre_forward(model, args, kwargs, parts, ids)
        self._pending.append((cls, state))
        return args, kwargs

    def _post(self, model: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        cls, state = self._pending.pop()
        return output if state is None else cls.model_post_forward(model, output, state)
