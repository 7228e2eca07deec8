"""The Part protocol: the delta of one module.

A Part is a small ``nn.Module`` that owns its trainable tensors and knows how to

* compute the wrapped module's output with the delta applied (``forward(x, base)``),
* give its dense update in the base module's native layout (``delta_weight()``) where it is linear,
* fold itself into the base module and out again (``merge_into`` / ``unmerge_from``),
* serialise to flat tensors plus JSON metadata (``state`` / ``meta`` / ``from_state``),
* apply *different* parts to different rows of one batch in one pass (``mixed_forward``),
* carry its own algebra, so nothing outside ``parts/`` asks which class a part is: class-level
  capabilities (``additive``, ``base_dependent``, ``mixed_rows``, ``has_aux_loss``, ``is_alias``), its
  update ``{parameter: Δ}`` (``updates`` / ``update`` / ``update_shapes`` / ``touched_parameters``), a
  values view and rebuild for compression (``values_view`` / ``value_names`` / ``with_values``), a sum
  with parts of its kind (``sum_with``), the base entries it covers (``covered_entries``), what a merge
  writes (``merge_sites``), the layer kind it knows (``layer_kind``), an optional factored form
  (``factors``) and its indexed storage (``index_layout``).

Math lives in pure tensor functions next to each Part; the Part only holds parameters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from deltatune.errors import ShapeMismatch
from deltatune.parts.layers import LayerKind, functional_forward, layer_kind

PART_KINDS: dict[str, type[Part]] = {}
#: The part name of a model-level part (the model root's module path).
MODEL_LEVEL = ""


class Part(nn.Module):
    """Base class of every delta kind; subclasses register themselves by ``kind``.

    Capabilities (class level, checked up front by the operations that need them, see
    :func:`deltatune.parts.capabilities.require_capability`):

    * ``additive`` — mergeable as ``θ ← θ + Δθ`` (merge, compose, compress, rebase, apply with merging);
    * ``base_dependent`` — ``Δθ`` depends on the base module's tensors (``updates`` needs ``base``);
    * ``mixed_rows`` — rows of one batch may use different parts of this kind (``mixed_forward``);
    * ``has_aux_loss`` — the part contributes an auxiliary training loss;
    * ``is_alias`` — the part owns no tensors and stands for another one (tied weights, routed task heads):
      never saved or merged on its own;
    * ``model_level`` — the part acts on the whole model's inputs and outputs (virtual tokens) through forward
      hooks, not on one module; it is stored under the module name ``""`` (:data:`MODEL_LEVEL`) and every
      operation that needs per-module deltas refuses it (it is not additive).

    How a layer uses its active parts (:class:`deltatune.layer.DeltaLayer`): additive parts are *summed*
    (``θ + Σ Δθ`` through :meth:`updates`; one part alone runs its own :meth:`forward`); non-additive parts
    (adapters, mixtures, routed heads) are *chained* after them, in attach order: each one's ``forward(x,
    base)`` gets as ``base`` a callable computing everything inside it, which also exposes the wrapped
    module's attributes (``base.weight``, ``base.gate_proj`` …).
    """

    kind: ClassVar[str] = ""
    additive: ClassVar[bool] = False
    base_dependent: ClassVar[bool] = False
    mixed_rows: ClassVar[bool] = False
    has_aux_loss: ClassVar[bool] = False
    is_alias: ClassVar[bool] = False
    model_level: ClassVar[bool] = False
    #: Parts of classes with the same family are batched together by the family class's ``mixed_forward`` /
    #: ``mixed_onto`` (``None``: the class is its own family) — e.g. DoRA rows join the LoRA rows' concatenated-rank
    #: pass as a gain on the base output plus a low-rank term, instead of a second pass of their own.
    mixed_family: ClassVar[type[Part] | None] = None
    #: The class whose exact sum (:meth:`sum_same_class`) covers this kind too: a subclass whose stored state is its
    #: parent's (SaRA's sparse part sums with sparse parts); ``None``: its own class only.
    sum_family: ClassVar[type[Part] | None] = None
    #: Whether :meth:`bind` makes the base's own tensor the trained parameter (dense parts: ``θ`` trains, so weight
    #: decay would pull ``θ`` rather than ``Δθ`` to zero and binding is refused with decay), rather than keeping the
    #: part's own parameters (sparse parts: ``W + scatter(values)`` is only mirrored into the weight).
    bound_trains_base: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.kind:
            PART_KINDS[cls.kind] = cls

    # --- computation -------------------------------------------------------------------
    def forward(self, x: Tensor, base: nn.Module) -> Tensor:  # pragma: no cover - abstract
        """The wrapped module's output with this part applied; ``base(x)`` computes the output without it."""
        raise NotImplementedError

    def forward_shared(self, base: nn.Module, kind: LayerKind, x: Tensor) -> Tensor:
        """The output of ``base`` — a module sharing this part's weight (a tied alias, :class:`TiedAlias`) — with
        this part's weight update: ``base`` computing with ``W + ΔW``."""
        return forward_with_delta(base, kind, x, self.update("weight", base))

    def init_from_base(self, base: nn.Module) -> None:
        """Set the values a fresh part derives from its ``base`` module (none here; DoRA's magnitude ``‖W‖_c``).
        Called when the part is created and again after a fresh part's precision changed
        (:func:`~deltatune.model.in_trainable_precision`), so they are computed in the precision the part trains
        in, not rounded to the base's first."""

    def aux_loss(self) -> Tensor | None:
        """The auxiliary loss of the last training forward, already weighted by its coefficient (kinds with
        ``has_aux_loss``; e.g. a mixture's load-balancing loss), or ``None``.  The training loop adds it."""
        return None

    @classmethod
    def combined_aux_loss(cls, parts: Sequence[Part]) -> Tensor | None:
        """The auxiliary loss of a delta's parts of this class together (:meth:`Delta.aux_loss`): by default the sum
        of their :meth:`aux_loss`; a kind whose loss is defined over all layers at once (a mixture's load balancing
        on the concatenated router logits) computes it from the parts' statistics instead."""
        losses = [loss for p in parts if (loss := p.aux_loss()) is not None]
        return torch.stack([loss.float() for loss in losses]).sum() if losses else None

    def delta_weight(self) -> Tensor:
        """Dense update of the base weight, native layout (``W' = W + ΔW``)."""
        raise NotImplementedError(f"{self.kind} parts have no dense weight update")

    # --- algebra ---------------------------------------------------------------------------
    def updates(self, base: nn.Module | None = None) -> dict[str, Tensor]:
        """The update ``{parameter name: Δθ}`` of the base module's direct parameters, native layout:
        ``θ' = θ + Δθ`` for each entry.  ``base`` is needed only by base-dependent kinds.  An entry may share
        storage with the part's own tensors (callers that write in place copy it first)."""
        raise NotImplementedError(f"{self.kind} parts have no additive parameter update")

    def forward_updates(self, base: nn.Module) -> dict[str, Tensor]:
        """What a combined forward (:func:`deltatune.layer.sum_updates`) adds to ``base``'s parameters *as they are*:
        :meth:`updates`; a bound kind (:meth:`bind`), whose ``Δθ`` is in them already, overrides this with only what
        still carries its gradient."""
        return self.updates(base)

    def update(self, name: str, base: nn.Module | None = None) -> Tensor:
        """One entry ``Δθ_name`` of :meth:`updates` (kinds with several entries compute only this one)."""
        return self.updates(base)[name]

    def update_shapes(self) -> dict[str, tuple[int, ...]]:
        """``{parameter name: shape of Δθ}`` from the part's metadata, without computing any update."""
        return {k: tuple(v.shape) for k, v in self.updates(None).items()}

    def touched_parameters(self) -> tuple[str, ...]:
        """Names of the base module's parameters this part updates."""
        return tuple(self.update_shapes())

    def covered_entries(self) -> int:
        """Entries of the base tensors this part updates, ``Σ_θ numel(θ)`` (the denominator of its density;
        0 for a kind without a parameter update)."""
        try:
            return sum(math.prod(s) for s in self.update_shapes().values())
        except NotImplementedError:
            return 0

    def layer_kind(self) -> LayerKind | None:
        """The base layer kind the part was built for, where it records one (``None``: unknown)."""
        return None

    def factors(self) -> tuple[Tensor, Tensor, float] | None:
        """``(A, B, s)`` with ``ΔW = s · B A`` in the ``(out, in)`` convention where the kind is factored."""
        return None

    def merge_sites(self) -> dict[str, Tensor] | None:
        """``{parameter: flat indices}`` of the only entries :meth:`merge_into` writes, or ``None`` when it may
        write whole tensors (an exact revert must then copy every direct parameter of the module)."""
        return None

    def index_layout(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Stored tensors that hold values at flat indices: ``{values name: (indices name, domain shape)}``."""
        return {}

    def values_view(self, product: bool = False) -> dict[str, Tensor]:
        """The tensors compression may sparsify or quantize, keyed by a suffix of the module name (``""``: the
        module name itself).  With ``product``, a factored kind gives its update ``ΔW`` instead of factors.
        Views, not copies: callers do not write into them."""
        raise NotImplementedError(f"{self.kind} parts have no values view")

    def value_names(self, product: bool = False) -> tuple[str, ...]:
        """The keys of :meth:`values_view` without computing it."""
        return tuple(self.values_view(product))

    def values_domain(self, product: bool = False) -> dict[str, int]:
        """``{values_view key: entries of the update it stands for}`` where that is more than it stores (values at
        indices into a weight: the other entries are zeros); a key left out stands for itself.  Compression counts
        those zeros (ComPEFT's ``σ`` and ``k = ⌊ρ·n⌋`` are over the whole update)."""
        return {}

    def with_values(self, values: dict[str, Tensor], product: bool = False, where: str = "part") -> Part:
        """A new part rebuilt from (compressed) ``values`` shaped like :meth:`values_view` (same ``product``)."""
        raise NotImplementedError(f"{self.kind} parts cannot be rebuilt from values")

    def sum_with(self, others: Sequence[Part], where: str) -> Part | None:
        """``Δ = Δ_self + Σ Δ_other`` as one part of this kind when that is exact, else ``None`` (the caller
        then sums the :meth:`updates` densely).  Only parts of one sum family are summed as one — by default exactly
        one class (a subclass may carry state, e.g. a magnitude, that the parent's sum would drop); a subclass whose
        stored state is its parent's names the parent in :attr:`sum_family` — with that class's
        :meth:`sum_same_class`."""
        parts = [self, *others]
        families = {p.sum_family or type(p) for p in parts}
        if len(families) != 1:
            return None
        return families.pop().sum_same_class(self, parts, where)

    def sum_same_class(self, parts: Sequence[Part], where: str) -> Part | None:
        """The exact sum of ``parts`` (all of this class), or ``None`` when the kind has none."""
        return None

    # --- merging -------------------------------------------------------------------------
    def bind(self, base: nn.Module, spill: Any) -> bool:
        """Train in ``base``'s own storage where the kind can (dense parts: ``θ`` in place, ``θ₀`` written to
        ``spill``, a :class:`deltatune.parts.spill.TensorSpill`), so training holds no second copy of the module;
        ``False`` (the default) where it does not.  A bound part's ``state``/``updates`` are still its ``Δθ``;
        :meth:`unbind` gives the base back."""
        return False

    @property
    def adds_bias(self) -> bool:
        """Whether merging creates a bias the base module lacks (BitFit's on Llama): only a part of this kind can
        carry it, so it is never summed densely with another kind on its module."""
        return False

    @property
    def bound(self) -> bool:
        """Whether :meth:`bind` holds this part's ``θ₀ + Δθ`` in the base's own tensor now (then the base module is
        no longer ``θ₀`` for anything else)."""
        return False

    def unbind(self) -> None:
        """Undo :meth:`bind` (nothing for a part that is not bound)."""

    def trained_from(self, tensor: Tensor, trained: Tensor, base: nn.Module, bound_then: bool) -> Tensor:
        """A checkpoint's ``tensor`` for this part's parameter ``trained``, written while the part was bound
        (``bound_then``) or not, as ``trained`` holds it now.  The same here: only a part whose bound parameter is
        ``θ`` itself (:attr:`bound_trains_base`) reads it otherwise when bound then and not now, or the reverse."""
        return tensor

    def merge_into(self, base: nn.Module) -> None:
        """``W ← W + ΔW`` in place, computed in fp32 and cast back."""
        _add_to_weight(base, self.delta_weight(), sign=1.0)

    def unmerge_from(self, base: nn.Module) -> None:
        """``W ← W − ΔW`` in place (exact inverse of :meth:`merge_into` up to rounding)."""
        _add_to_weight(base, self.delta_weight(), sign=-1.0)

    @classmethod
    def mixed_forward(
        cls, x: Tensor, base: nn.Module, parts: Sequence[Part | None], row_ids: Tensor,
        cache: dict[Any, Any] | None = None,
    ) -> Tensor:
        """Output where row ``i`` of the batch uses ``parts[row_ids[i]]`` (``None``: the base).

        Generic path: the base output, and for each distinct part its own output on its rows.  Kinds with a
        fused one-pass kernel (LoRA) override this; ``cache`` is the routing context's store for weights they
        prepare once per batch (see :class:`deltatune.routing.Routing`).
        """
        runs = [None if p is None else (lambda sub, p=p: p(sub, base)) for p in parts]
        return route_rows(x, base(x), row_ids, runs)

    def prepared(self, key: Any, build: Any, *depends: Tensor) -> Any:
        """``build()``, kept on the part under ``key`` for as long as neither its own tensors nor ``depends`` (e.g.
        the base weight a base-dependent update reads) change — their version counters, bumped by every in-place
        write (an optimiser step, ``load_state_dict``, a merge), decide.  Serving prepares a part's batched form
        (a CSR update, DoRA's column scales) once for all routing contexts instead of once per batch change.
        Inference-mode tensors keep no version counter: then nothing is kept."""
        try:
            versions = tuple((id(t), t._version) for t in (*self.parameters(), *self.buffers(), *depends))
        except RuntimeError:  # an inference tensor
            return build()
        kept = self.__dict__.setdefault("_prepared", _Kept())
        entry = kept.get(key)
        if entry is not None and entry[0] == versions:
            return entry[1]
        value = build()
        kept[key] = (versions, value)
        return value

    # --- serialisation -------------------------------------------------------------------
    def state(self) -> dict[str, Tensor]:
        """Flat tensors to save (parameters and index buffers)."""
        return {k: v.detach() for k, v in self.state_dict().items()}

    def meta(self) -> dict[str, Any]:
        """JSON metadata needed to rebuild the part (shapes, rank, scale, layer kind …)."""
        raise NotImplementedError

    @classmethod
    def expected_state(cls, meta: Any) -> dict[str, tuple[int, ...]]:
        """Validate ``meta`` (types, ranges, finiteness) and return the tensor shapes it implies.

        Loaders compare these with a file's header before reading any tensor; raises a typed
        :class:`~deltatune.errors.DeltaFormatError` naming the field."""
        raise NotImplementedError

    @classmethod
    def from_state(cls, state: dict[str, Tensor], meta: dict[str, Any]) -> Part:
        """Rebuild a part from its tensors and metadata (both validated first)."""
        raise NotImplementedError

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.state_dict().items()}

    def load_tensors(self, state: dict[str, Tensor], where: str) -> None:
        """Copy ``state`` into this part, checking names and shapes (``where`` names the source)."""
        expected = self.expected_shapes()
        if set(state) != set(expected):
            raise ShapeMismatch(f"{where}: tensors {sorted(state)} but a {self.kind} part needs {sorted(expected)}")
        for name, shape in expected.items():
            if tuple(state[name].shape) != shape:
                raise ShapeMismatch(f"{where}.{name}: shape {tuple(state[name].shape)}, expected {shape}")
        own = self.state_dict()
        with torch.no_grad():
            for name, tensor in state.items():
                if tensor.dtype.is_floating_point != own[name].dtype.is_floating_point:
                    raise ShapeMismatch(f"{where}.{name}: dtype {tensor.dtype}, expected {own[name].dtype}")
                own[name].copy_(tensor)

    # --- accounting -----------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state().values())

    @property
    def trainable_count(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def cached_prefix(self) -> int | None:
        """For a model-level part: how many positions it puts before the caller's tokens, which a forward on a KV
        cache that already holds them continues from (the serving engine prefills them once per request);
        ``None``: it cannot continue from a cache (it needs the whole sequence in every forward)."""
        return None

    def check_base(self, base: nn.Module, where: str) -> None:
        """Raise :class:`ShapeMismatch` if this part cannot attach to ``base``."""


class _Kept(dict):
    """What :meth:`Part.prepared` keeps: a cache, so a copy or a pickle of the part starts without it (CSR tensors
    cannot be deep-copied, and a copy's tensors are new ones anyway)."""

    def __deepcopy__(self, memo: dict[int, Any]) -> _Kept:
        return _Kept()

    def __reduce__(self) -> tuple[type, tuple]:
        return _Kept, ()


def per_row_outputs(out: Any, ids: Tensor) -> list[bool]:
    """For each element of a module's output (a tensor, or a tuple: a router's logits, weights and choices), whether
    it is a tensor with one entry per routed row or token (leading dims ``ids.shape``): those are routed."""
    items = out if isinstance(out, tuple) else (out,)
    return [isinstance(o, Tensor) and tuple(o.shape[: ids.dim()]) == tuple(ids.shape) for o in items]


def blend_rows(out: Any, y: Any, rows: Tensor, ids: Tensor) -> Any:
    """``out`` with ``y``'s values on ``rows`` (a mask of ``ids``' shape), in every per-row tensor of the output
    (:func:`per_row_outputs`: all of a router's tuple, whose choices the delta changes too)."""
    items = list(out) if isinstance(out, tuple) else [out]
    news = list(y) if isinstance(out, tuple) else [y[0] if isinstance(y, tuple) else y]
    blended = [torch.where(rows.reshape(*ids.shape, *([1] * (o.dim() - ids.dim()))), n.to(o.dtype), o) if r else o
               for o, n, r in zip(items, news, per_row_outputs(out, ids), strict=False)]
    return tuple(blended) if isinstance(out, tuple) else blended[0]


def route_rows(x: Tensor, out: Any, ids: Tensor, runs: Sequence[Any]) -> Any:
    """``out`` with the rows (``ids`` of shape ``(batch,)``) or tokens (``(batch, seq)``) of id ``k`` replaced by
    ``runs[k](x on those rows)`` (``None``: keep ``out``).  Rows are gathered along the flattened leading dims; of a
    tuple output, every per-row tensor (:func:`per_row_outputs`) is routed."""
    lead = ids.dim()
    flat_ids = ids.reshape(-1)
    xs = x.reshape(-1, *x.shape[lead:])
    items = list(out) if isinstance(out, tuple) else [out]
    routed = per_row_outputs(out, ids)
    flats = [o.reshape(-1, *o.shape[lead:]) if r else o for o, r in zip(items, routed, strict=True)]
    for pid, run in enumerate(runs):
        if run is None:
            continue
        rows = (flat_ids == pid).nonzero(as_tuple=True)[0]
        if rows.numel():
            ys = run(xs.index_select(0, rows))
            ys = list(ys) if isinstance(ys, tuple) else [ys]
            flats = [f.index_copy(0, rows, y.to(f.dtype)) if r else f
                     for f, y, r in zip(flats, ys, routed, strict=True)]
    back = [f.reshape(o.shape) if r else f for f, o, r in zip(flats, items, routed, strict=True)]
    return tuple(back) if isinstance(out, tuple) else back[0]


def writable(tensor: Tensor) -> Tensor:
    """The tensor a merge or revert writes ``tensor``'s values through: ``tensor`` itself, so the write bumps its
    version counter, which :meth:`Part.prepared` keys its kept batched forms on (a ``.data`` write leaves it as it
    was, and a form read from the old base would be served again); an inference tensor, which has no counter and
    refuses in-place writes outside inference mode, through ``.data``.  Write under ``torch.no_grad()``."""
    return tensor.data if tensor.is_inference() else tensor


def write_in_place(target: Tensor, value: Tensor) -> None:
    """``target ← value`` (cast to its dtype and device) in place, as a write its version counter records (see
    :func:`writable`): every merge and revert of a base tensor goes through here."""
    with torch.no_grad():
        writable(target).copy_(value.to(device=target.device, dtype=target.dtype))


def _add_to_weight(base: nn.Module, delta_native: Tensor, sign: float) -> None:
    weight = base.weight
    if tuple(weight.shape) != tuple(delta_native.shape):
        raise ShapeMismatch(f"delta of shape {tuple(delta_native.shape)} for weight {tuple(weight.shape)}")
    with torch.no_grad():
        merged = weight.detach().float() + sign * delta_native.to(device=weight.device, dtype=torch.float32)
    write_in_place(weight, merged)


def promote_dtypes(tensors: Sequence[Tensor]) -> torch.dtype:
    """The dtype every tensor of ``tensors`` promotes to (``torch.promote_types`` folded left)."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def exact_sum_dtype(tensors: Sequence[Tensor], overlapping: bool) -> torch.dtype:
    """The dtype a sum of ``tensors`` is stored in: their promoted dtype (:func:`promote_dtypes`), or fp32 where that
    is bf16/fp16 and entries of different tensors add up (``overlapping``).  A half-precision sum of two values is
    rounded to 8 (bf16) or 11 (fp16) significant bits; in fp32 it is exact unless the two values' exponents lie
    more than 24 bits apart (then rounded once, at fp32's precision)."""
    dtype = promote_dtypes(tensors)
    return torch.float32 if overlapping and dtype in (torch.float16, torch.bfloat16) else dtype


def base_layer_kind(base: nn.Module, where: str) -> LayerKind:
    kind = layer_kind(base)
    if kind is None:
        raise ShapeMismatch(f"{where}: {type(base).__name__} is not a Linear, Conv1D or Embedding module")
    return kind


def forward_with_delta(base: nn.Module, kind: LayerKind, x: Tensor, delta_native: Tensor) -> Tensor:
    """Base computation with ``W + ΔW`` (used when several parts are active at once)."""
    return functional_forward(base, kind, x, base.weight + delta_native.to(base.weight.dtype))
