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

from torch import Tensor, nn
from torch.func import functional_call

from deltatune.errors import ConfigError
from deltatune.parts.base import Part, blend_rows, per_row_outputs, route_rows
from deltatune.parts.layers import LayerKind, layer_kind
from deltatune.parts.update_onto import update_onto
from deltatune.routing import Routing, current_routing, running_on

INPUT_KEYWORDS = ("hidden_states", "input", "x", "input_ids")

#: A delta with parts on two modules that share a weight (tied embeddings) also sees, on each, the other's update:
#: under ``<name>@tied:<other module>`` (see :func:`deltatune.model.attach_parts`).
TIED_SUFFIX = "@tied:"


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
    """``{name: θ + Σ_p Δθ_p}`` for every direct parameter some part updates (``Δθ`` given the base module; a part
    bound for in-place training adds only what carries its gradient: :meth:`Part.forward_updates`).  A parameter
    the module does not have (BitFit's bias on a bias-free Llama Linear, ``bias=None``) is ``θ = 0``: ``Σ_p Δθ_p``
    alone, in the weight's dtype."""
    own = dict(module.named_parameters(recurse=False))
    total: dict[str, Tensor] = {}
    for part in parts:
        for name, delta in part.forward_updates(module).items():
            total[name] = total.get(name, 0) + delta
    ref = own.get("weight", next(iter(own.values()), None))  # a missing parameter takes the weight's dtype
    return {k: own[k] + v.to(own[k].dtype) if k in own else v.to(v.dtype if ref is None else ref.dtype)
            for k, v in total.items()}


def _bound_error(module: nn.Module) -> ConfigError:
    """A part bound for in-place training (:meth:`Part.bind`) keeps ``θ₀ + Δθ`` in ``module``'s own weight, so the
    module is no longer the base: rows routed to other deltas (or to none) would get its ``Δθ`` too."""
    return ConfigError(f"{type(module).__name__}: a part bound for in-place training holds θ₀ + Δθ in the module's "
                       "own weight, so rows cannot be routed to other deltas here — unbind it first (the training "
                       "loop does when it ends)")


class PartHolder(nn.Module):
    """Named parts and the names a plain forward uses (``active``); parts take the holder's train/eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.parts = nn.ModuleDict()
        self.active: list[str] = []
        self._version = 0  # bumped when parts come or go (routing plans are rebuilt)

    def add(self, name: str, part: Part, activate: bool = True) -> None:
        part.train(self.training)  # a part joins in the holder's mode: no dropout in an eval model
        self._replace_parts({**self.parts._modules, name: part})
        self._version += 1
        if activate and name not in self.active:
            self.active.append(name)

    def remove(self, name: str) -> Part:
        part = self.parts[name]
        self._replace_parts({k: v for k, v in self.parts._modules.items() if k != name})
        self._version += 1
        if name in self.active:
            self.active.remove(name)
        return part

    def _replace_parts(self, parts: dict[str, nn.Module | None]) -> None:
        """Swap in a new dict of parts instead of changing the one in use (copy-on-write): the serving store attaches
        a delta into existing wrappers while the engine's step may be iterating their parts
        (:meth:`~deltatune.serve.store.DeltaStore.add`), and a dict changed during iteration raises there."""
        for name, part in parts.items():
            if name not in self.parts._modules:
                nn.ModuleDict().add_module(name, part)  # nn.Module's checks of a new name and part, on a bare dict
        object.__setattr__(self.parts, "_modules", parts)


class DeltaLayer(PartHolder):
    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.train(base.training)

    @property
    def weight(self) -> Tensor:
        """The wrapped module's ``weight``: model code reads it through the attribute it wrapped (T5's feed-forward
        casts to ``self.wo.weight.dtype`` in its forward; ``get_input_embeddings().weight``)."""
        return self.base.weight

    @property
    def bias(self) -> Tensor | None:
        """The wrapped module's ``bias`` (``None`` where it has none)."""
        return getattr(self.base, "bias", None)

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
    def _plan(self, routing: Routing) -> _Plan:
        """What this layer does under ``routing`` — its parts per id, grouped by kind — worked out once per routing
        context (a decode step calls every layer with the same routing) and again only when parts change."""
        plan = routing.plans.get(id(self))
        if plan is None or plan.version != self._version:
            if plan is not None:  # parts came or went: what the kinds prepared for the old parts is stale
                for cls, _, _ in plan.kinds:
                    routing.cache.pop((id(self), cls.kind), None)
            if any(p.bound for p in self.parts.values()):
                raise _bound_error(self.base)
            plan = routing.plans[id(self)] = _Plan.of(self, routing)
        return plan

    def _routed(self, routing: Routing, args: tuple, kwargs: dict[str, Any]) -> Any:
        plan = self._plan(routing)
        if not plan.kinds:
            return self.base(*args, **kwargs)
        parts = plan.parts
        call = Call.of(args, kwargs)
        one = plan.shared
        if one is not None:  # every row runs the same parts here: the plain forward, whatever the call's shapes
            return self.stack(one, call)(call.x) if one else self.base(*args, **kwargs)
        batch = routing.ids.shape[0]
        if call.x.dim() and call.x.shape[0] == 1 and batch > 1:  # broadcast over the batch (position ids)
            call = replace(call, x=call.x.expand(batch, *call.x.shape[1:]))
        try:
            ids = plan.ids_for(routing, call.x)
        except ConfigError:  # an input without the batch's rows (T5's relative attention bias: a (q, k) grid)
            return self._batch_wide(routing, call)
        rows_apart = call.plain and not plan.nests  # rows may be run apart: nothing inside routes them again
        batched = rows_apart and not plan.stacked  # one part per delta: the kinds' batched passes may run it
        if batched and len(plan.kinds) == 1 and plan.own_mixed_forward:
            cls, _, _ = plan.kinds[0]
            cache = routing.cache.setdefault((id(self), cls.kind), {})
            base = self.base if cls.additive else Inner(self.base, _bare(self.base), call)
            return cls.mixed_forward(call.x, base, parts, ids, cache)
        if batched and all(onto is not None for _, _, onto in plan.kinds):
            # the base once for the whole batch — on the input as kinds acting before the module (``mixed_before``)
            # change their own rows of it; then each kind changes only its own rows of the output (rows are disjoint)
            inp = call.x
            for cls, own, _ in plan.kinds:
                before = getattr(cls, "mixed_before", None)
                if before is not None:
                    inp = before(inp, own, ids, routing.cache.setdefault((id(self), cls.kind), {}))
            out = self.base(inp)
            for cls, own, onto in plan.kinds:
                out = onto(call.x, out, self.base, own, ids, routing.cache.setdefault((id(self), cls.kind), {}))
            return out
        # extra arguments, a kind that cannot start from the shared output, or a delta with several parts here: each
        # delta's parts on its rows (on the whole batch when the other arguments cannot be split by rows), then the
        # rows kept
        a, k = call.arguments(call.x)
        out = self.base(*a, **k)
        if not any(per_row_outputs(out, ids)):  # one output for every row (BART's learned positions)
            return self._batch_wide(routing, call)
        runs = [self.stack(group, call) if group else None for group in plan.groups]
        if rows_apart:
            return route_rows(call.x, out, ids, runs)
        for pid, run in enumerate(runs):
            rows = ids == pid
            if run is None or not bool(rows.any()):
                continue
            with running_on(rows):
                y = run(call.x)
            out = blend_rows(out, y, rows, ids)
        return out

    def _batch_wide(self, routing: Routing, call: Call) -> Any:
        """A call made once for the whole batch — its input has no row of the routed batch (T5's relative attention
        bias takes a ``(q, k)`` grid of buckets) or its output none (BART's learned positions: one ``(T, d)`` for
        every row) — cannot give rows different deltas, and here they have different parts (:attr:`_Plan.shared`
        ran the call where they share them): a :class:`ConfigError` naming the module and the deltas."""
        names = [routing.names[k] for k in routing.present_ids()]
        raise ConfigError(
            f"{type(self.base).__name__}: its input of shape {tuple(call.x.shape)} or its output has no entry per row "
            f"of the {routing.ids.shape[0]} routed rows — the batch does not match the routing, or the module "
            f"computes once for the whole batch — so rows of different deltas cannot differ in it, and the batch's "
            f"deltas {names} change it differently; give one delta name per row, or run each delta's rows in a "
            "batch of their own")


def _one_group(groups: list[list[Part]], routing: Routing) -> list[Part] | None:
    """The parts every routed row runs on this layer (of ``groups``, indexed by delta id) when they are the same for
    all rows (one delta for the whole batch, or deltas without a part here: ``[]``), else ``None``."""
    present = [groups[k] for k in routing.present_ids()]
    first = present[0]
    return first if all(len(g) == len(first) and all(a is b for a, b in zip(g, first, strict=True))
                         for g in present[1:]) else None


Onto = Callable[[Tensor, Any, nn.Module, list, Tensor, dict], Any]


@dataclass
class _Plan:
    """A layer's parts under one routing: ``groups[k]``, every part delta ``k`` runs here (its own and its tied
    aliases, as a plain forward runs them), ``parts[k]`` the first of them; ``stacked``: some delta has several
    (they run stacked, each delta on its rows); ``kinds``: per part family, the parts of that family (``None``
    elsewhere) and how it applies them onto the shared base output (``None``: it cannot)."""

    groups: list[list[Part]]
    parts: list[Part | None]
    stacked: bool
    kinds: list[tuple[type[Part], list[Part | None], Onto | None]]
    nests: bool
    own_mixed_forward: bool
    version: int
    #: the parts every row runs here when all rows share them (:func:`_one_group`), else ``None``
    shared: list[Part] | None
    ids: dict[Any, Tensor] = field(default_factory=dict)

    @classmethod
    def of(cls, layer: DeltaLayer, routing: Routing) -> _Plan:
        groups = [[] if n is None else _delta_parts(layer, n) for n in routing.names]
        parts = [group[0] if group else None for group in groups]
        classes = list(dict.fromkeys(_family(type(p)) for p in parts if p is not None))
        kinds = [(c, [p if p is not None and _family(type(p)) is c else None for p in parts], _onto(c, layer.base))
                 for c in classes]
        own = len(classes) == 1 and getattr(classes[0].mixed_forward, "__func__", None) is not _GENERIC_MIXED
        stacked = any(len(group) > 1 for group in groups)
        return cls(groups, parts, stacked, kinds, layer.nests() if classes else False, own, layer._version,
                   _one_group(groups, routing))

    def ids_for(self, routing: Routing, x: Tensor) -> Tensor:
        """The routing's ids on ``x``'s device, checked against ``x``'s leading dimensions (kept per device)."""
        ids = self.ids.get(x.device)
        if ids is None:
            ids = self.ids[x.device] = routing.ids.to(x.device)
        if tuple(x.shape[: ids.dim()]) != tuple(ids.shape):
            return routing.ids_for(x)  # flattened inputs (a mixture-of-experts block), or the routing's own error
        if ids.dim() == 1 and x.dim() >= 3:
            routing.tokens = int(x.shape[1])  # what a flattened input later in this forward is made of
        return ids


_GENERIC_MIXED = Part.mixed_forward.__func__  # type: ignore[attr-defined]


def _delta_parts(layer: PartHolder, name: str) -> list[Part]:
    """The parts of delta ``name`` on ``layer``, in attach order: its own and, on a module whose weight is tied to
    another it also has a part on, that part's alias (``<name>@tied:…``) — a routed row runs them all, as a plain
    forward of the delta does."""
    tied = f"{name}{TIED_SUFFIX}"
    return [part for key, part in layer.parts.items() if key == name or key.startswith(tied)]


def _family(cls: type[Part]) -> type[Part]:
    """The class whose batched pass runs parts of ``cls`` (:attr:`~deltatune.parts.base.Part.mixed_family`)."""
    return cls.mixed_family or cls


def _onto(cls: type[Part], base: nn.Module) -> Onto | None:
    """How parts of ``cls`` apply onto the base output of a whole batch (computed on the input as every kind's
    optional ``mixed_before(x, parts, ids, cache)`` left it: input-side kinds scale their own rows there): the
    kind's own ``mixed_onto``, or for an
    additive kind (not an alias: a tied alias keeps its own exact forward) on a Linear/Conv1D module,
    :func:`~deltatune.parts.update_onto.update_onto`; ``None`` otherwise."""
    own = getattr(cls, "mixed_onto", None)
    if own is not None:
        return own
    if cls.additive and not cls.is_alias and layer_kind(base) in (LayerKind.LINEAR, LayerKind.CONV1D):
        return update_onto
    return None


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


def unwrap(module: nn.Module) -> nn.Module:
    """The model's own module: the base a :class:`DeltaLayer` wraps, else ``module`` itself."""
    return module.base if isinstance(module, DeltaLayer) else module
