"""(IA)³ part: a learned vector ``l`` that rescales a module's output or its input (Liu et al., "Few-Shot
Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning", NeurIPS 2022).

Two positions, as in PEFT 0.21.2 (``src/peft/tuners/ia3/layer.py``):

* ``"output"`` (keys, values): ``y = l ⊙ (x Wᵀ + b)`` — the bias is scaled too;
* ``"input"`` (PEFT's *feedforward* modules, the FFN down-projection): ``y = (x ⊙ l) Wᵀ + b`` — the bias is not.

``l`` starts at 1, so the output is unchanged at attach time.  As a weight update (``θ' = θ + Δθ``):

* output: ``ΔW = diag(l − 1) W`` (rows of a Linear ``(out, in)`` weight, columns of a GPT-2 ``Conv1D``
  ``(in, out)`` weight) and ``Δb = (l − 1) ⊙ b``;
* input: ``ΔW = W diag(l − 1)`` (columns of a Linear weight, rows of a ``Conv1D`` weight), no bias change.

The update depends on the base weights (``base_dependent``).  Merging multiplies (``W ← W ⊙ l``); reverting
divides, so it is refused while ``l`` holds a zero.  PEFT stores ``l`` as ``(out, 1)`` (output) or ``(1, in)``
(input); this part stores it flat, ``(n,)``, and :mod:`deltatune.io.peft_ia3` converts.

A part read from a PEFT adapter without the base model knows only ``n`` (and the layer kind from
``fan_in_fan_out``): the other weight dimension and whether the module has a bias are ``None`` until then.
It attaches, runs and merges (those use the module itself), composes and compresses (on its vector), but what
needs the dense update's shapes without a module (merge methods, ``lowrank``) refuses it
(:class:`~deltatune.errors.NotMergeable`, saying to load it with ``model=``).

For the algebra the part offers ``l − 1`` as its values view (compression sparsifies the deviation from the
identity, which the update is linear in) and sums exactly with parts at the same position:
``l = 1 + Σ_t (l_t − 1)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from deltatune.errors import ConfigError, DeltaFormatError, NotMergeable, ShapeMismatch
from deltatune.parts.base import Part, promote_dtypes, write_in_place
from deltatune.parts.layers import LayerKind, in_out_features, is_transposed, layer_kind
from deltatune.parts.meta_checks import check_keys, check_state, meta_int, meta_layer, short

Position = Literal["output", "input"]
POSITIONS: tuple[str, ...] = ("output", "input")
LAYERS = (LayerKind.LINEAR, LayerKind.CONV1D)


# --------------------------------------------------------------------------------------------------
# math (pure functions)
# --------------------------------------------------------------------------------------------------
def scaled_axis(position: str, layer: LayerKind) -> int:
    """The axis of the *native* weight that ``l`` scales: output channels are rows of a Linear ``(out, in)``
    weight and columns of a ``Conv1D`` ``(in, out)`` weight; input channels the other axis."""
    out_axis = 1 if is_transposed(layer) else 0
    return out_axis if position == "output" else 1 - out_axis


def along(v: Tensor, axis: int) -> Tensor:
    """``v`` (n,) shaped to broadcast along ``axis`` of a 2-D tensor: ``(n, 1)`` for axis 0, ``(1, n)`` for 1."""
    return v.reshape(-1, 1) if axis == 0 else v.reshape(1, -1)


def ia3_weight_update(weight: Tensor, scale: Tensor, axis: int) -> Tensor:
    """``ΔW = (l − 1) ⊙_axis W`` in fp32 (native layout): ``W + ΔW = l ⊙_axis W`` (Liu et al., 2022)."""
    return weight.float() * along(scale.float() - 1.0, axis)


def ia3_bias_update(bias: Tensor, scale: Tensor) -> Tensor:
    """``Δb = (l − 1) ⊙ b`` in fp32 (output position): ``b + Δb = l ⊙ b``."""
    return bias.float() * (scale.float() - 1.0)


def ia3_output(out: Tensor, scale: Tensor) -> Tensor:
    """``y = l ⊙ out`` over the last axis, in ``out``'s dtype (PEFT: ``(result * l).to(result.dtype)``)."""
    return (out * scale).to(out.dtype)


def ia3_input(x: Tensor, scale: Tensor) -> Tensor:
    """``x ⊙ l`` over the last axis, back in ``x``'s dtype (PEFT: ``(x.to(l.dtype) * l).to(x.dtype)``)."""
    return (x.to(scale.dtype) * scale).to(x.dtype)


def row_scales(vectors: Sequence[Tensor | None], row_ids: Tensor, n: int, ndim: int, dtype: torch.dtype,
               device: torch.device) -> Tensor:
    """Per-row scale ``L[row_ids]`` broadcastable against a ``ndim``-D activation: ``L`` stacks ``vectors``
    (``None`` → ones, i.e. the base), ``row_ids`` indexes rows (or rows × tokens)."""
    stack = torch.ones(len(vectors), n, dtype=dtype, device=device)
    for i, v in enumerate(vectors):
        if v is not None:
            stack[i] = v.to(dtype)
    rows = stack[row_ids.to(device)]
    while rows.dim() < ndim:
        rows = rows.unsqueeze(row_ids.dim())
    return rows


def one_plus(v: Tensor, dtype: torch.dtype) -> Tensor:
    """``1 + v`` computed in fp32 and stored in ``dtype`` (the part's own dtype, not ``v``'s).

    Compression rounds the deviation ``v = l − 1`` (which the update is linear in), e.g. to bf16; storing
    ``1 + v`` in that dtype would round ``l`` instead, whose spacing near 1 (2⁻⁷ in bf16) erases every
    ``|v| < 2⁻⁸``.  So the rounded ``v`` is added to 1 in fp32 and kept in the part's dtype."""
    return (v.float() + 1.0).to(dtype)


def _multiply(t: Tensor, scale: Tensor, axis: int | None) -> Tensor:
    """``t ⊙_axis l`` in fp32, cast back (``axis=None``: ``t`` is a vector like ``l``)."""
    s = scale.float() if axis is None else along(scale.float(), axis)
    return (t.float() * s).to(t.dtype)


def _divide(t: Tensor, scale: Tensor, axis: int | None) -> Tensor:
    """``t ⊘_axis l`` in fp32, cast back (the inverse of :func:`_multiply`)."""
    s = scale.float() if axis is None else along(scale.float(), axis)
    return (t.float() / s).to(t.dtype)


# --------------------------------------------------------------------------------------------------
# the part
# --------------------------------------------------------------------------------------------------
def needs_base(kind: str, formula: str = "ΔW = (l − 1) ⊙ W") -> NotMergeable:
    """The error for a base-dependent update (``formula``) asked for without its base module."""
    return NotMergeable(f"a {kind!r} part's update depends on the base module's weights ({formula}), and none was "
                        "given: pass the base module (updates(base)); to add such deltas without a base, compose them "
                        "(parts of one kind on one module sum exactly)", kind=kind)


class IA3Part(Part):
    """A trainable vector ``ia3_l`` (n,), initialised to ones: ``n = out_features`` at the ``"output"`` position,
    ``in_features`` at ``"input"``.  ``bias`` records whether the base module has one (only the output position
    scales it); ``None`` for the dimension not scaled or for ``bias`` means unknown (a model-less PEFT load)."""

    kind = "ia3"
    additive, base_dependent, mixed_rows, has_aux_loss = True, True, True, False

    def __init__(
        self,
        in_features: int | None,
        out_features: int | None,
        position: Position = "output",
        layer: LayerKind = LayerKind.LINEAR,
        bias: bool | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if position not in POSITIONS:
            raise ConfigError(f"ia3 position must be one of {POSITIONS}, got {position!r}")
        if LayerKind(layer) not in LAYERS:
            raise ConfigError(f"ia3 attaches to Linear and Conv1D modules, not {layer}")
        self.in_features, self.out_features = in_features, out_features
        self.position, self.layer, self.bias = position, LayerKind(layer), bias
        n = out_features if position == "output" else in_features
        if n is None:
            raise ConfigError(f"ia3 part at the {position} position needs its {position} feature count")
        self.ia3_l = nn.Parameter(torch.ones(n, dtype=dtype or torch.float32, device=device))

    @property
    def features(self) -> int:
        return self.ia3_l.shape[0]

    @property
    def axis(self) -> int:
        return scaled_axis(self.position, self.layer)

    def forward(self, x: Tensor, base: nn.Module) -> Tensor:
        if self.position == "input":
            return base(ia3_input(x, self.ia3_l))
        return ia3_output(base(x), self.ia3_l)

    # --- algebra ---------------------------------------------------------------------------
    def updates(self, base: nn.Module | None = None) -> dict[str, Tensor]:
        """``{"weight": ΔW}`` (plus ``{"bias": Δb}`` at the output position of a module with a bias), fp32,
        native layout, computed from ``base``'s own tensors."""
        if base is None:
            raise needs_base(self.kind)
        out = {"weight": ia3_weight_update(base.weight, self.ia3_l, self.axis)}
        if self.position == "output" and getattr(base, "bias", None) is not None:
            out["bias"] = ia3_bias_update(base.bias, self.ia3_l)
        return out

    def update_shapes(self) -> dict[str, tuple[int, ...]]:
        if self.in_features is None or self.out_features is None or (self.position == "output" and self.bias is None):
            raise NotMergeable(f"an ia3 part scaling {self.features} {self.position} features was read without its "
                               "base model, so the shape of its update is unknown; load the adapter with model= "
                               "(the base) for what needs its dense update (merge methods, lowrank)", kind=self.kind)
        out_in = (self.out_features, self.in_features)
        shapes = {"weight": out_in[::-1] if is_transposed(self.layer) else out_in}
        if self.position == "output" and self.bias:
            shapes["bias"] = (self.out_features,)
        return shapes

    def covered_entries(self) -> int:
        try:
            return super().covered_entries()
        except NotMergeable:
            return 0

    def layer_kind(self) -> LayerKind | None:
        return self.layer

    def values_view(self, product: bool = False) -> dict[str, Tensor]:
        """``{"ia3_l": l − 1}``: the deviation from the identity, which the update is linear in (so sparsifying
        or quantizing it acts on the delta, not on the ones).  The same with or without ``product``: the
        product ``ΔW`` depends on the base."""
        return {"ia3_l": self.ia3_l.detach() - 1.0}

    def value_names(self, product: bool = False) -> tuple[str, ...]:
        return ("ia3_l",)

    def with_values(self, values: dict[str, Tensor], product: bool = False, where: str = "ia3") -> Part:
        """The same geometry and dtype with ``l = 1 + v`` (:func:`one_plus`: ``v``, not ``l``, carries the
        compression's rounding)."""
        v = values["ia3_l"]
        out = self._like(self.ia3_l.dtype, v.device)
        with torch.no_grad():
            out.load_tensors({"ia3_l": one_plus(v, out.ia3_l.dtype)}, where)
        return out

    def sum_same_class(self, parts: Sequence[Part], where: str) -> Part | None:
        """``Σ_t (l_t − 1)·W = (l − 1)·W`` with ``l = 1 + Σ_t (l_t − 1)``: exact for parts at the same position of
        the same module; ``None`` (summed densely) when the positions differ."""
        return sum_ia3(parts, where)  # type: ignore[arg-type]

    def _like(self, dtype: torch.dtype, device: torch.device | str | None = None) -> IA3Part:
        return IA3Part(self.in_features, self.out_features, self.position, self.layer, self.bias, dtype=dtype,
                       device=device)

    # --- merging -------------------------------------------------------------------------
    def merge_into(self, base: nn.Module) -> None:
        """``W ← l ⊙_axis W`` (and ``b ← l ⊙ b`` at the output position), in fp32, cast back.

        The update is taken against the module as it is: merge a base-dependent delta before (not after)
        other deltas on the same module, or the scale applies to their updates too."""
        with torch.no_grad():
            write_in_place(base.weight, _multiply(base.weight.detach(), self.ia3_l.to(base.weight.device), self.axis))
            if self.position == "output" and getattr(base, "bias", None) is not None:
                write_in_place(base.bias, _multiply(base.bias.detach(), self.ia3_l.to(base.bias.device), None))

    def unmerge_from(self, base: nn.Module) -> None:
        """``W ← W ⊘ l`` (and ``b ← b ⊘ l``); refused while ``l`` holds a zero (the merge lost those rows)."""
        zeros = int((self.ia3_l == 0).sum())
        if zeros:
            raise NotMergeable(f"cannot revert an ia3 merge: ia3_l holds {zeros} zero(s), so the scaled "
                               f"{self.position} channels of the weight were zeroed and cannot be recovered",
                               kind=self.kind)
        with torch.no_grad():
            write_in_place(base.weight, _divide(base.weight.detach(), self.ia3_l.to(base.weight.device), self.axis))
            if self.position == "output" and getattr(base, "bias", None) is not None:
                write_in_place(base.bias, _divide(base.bias.detach(), self.ia3_l.to(base.bias.device), None))

    @classmethod
    def mixed_forward(
        cls, x: Tensor, base: nn.Module, parts: Sequence[Part | None], row_ids: Tensor,
        cache: dict[Any, Any] | None = None,
    ) -> Tensor:
        """One pass: row ``i`` is scaled by ``l_{a_i}`` (ones for the base and for parts at the other position)
        before the module (input position) and after it (output position) — rows are disjoint, so one module call
        serves parts at both positions."""
        return cls.mixed_onto(x, base(cls.mixed_before(x, parts, row_ids, cache)), base, parts, row_ids, cache)

    @classmethod
    def mixed_before(cls, x: Tensor, parts: Sequence[Part | None], row_ids: Tensor,
                     cache: dict[Any, Any] | None = None) -> Tensor:
        """The shared input of a mixed batch with the rows of each input-position part scaled, ``x_i ⊙ l_a`` (other
        rows times exact ones): the module then runs once for every row (:meth:`mixed_onto`'s ``out``)."""
        return _scaled_rows(x, parts, row_ids, cache, "input")

    @classmethod
    def mixed_onto(
        cls, x: Tensor, out: Tensor, base: nn.Module, parts: Sequence[Part | None], row_ids: Tensor,
        cache: dict[Any, Any] | None = None,
    ) -> Tensor:
        """``out`` (the base output on the whole batch, computed on :meth:`mixed_before`'s input, so input-position
        rows are already scaled) with the rows of each output-position part rescaled, ``l_a ⊙ out`` (ones
        elsewhere, so other rows are unchanged)."""
        return _scaled_rows(out, parts, row_ids, cache, "output")

    # --- serialisation -------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "position": self.position,
                "layer": str(self.layer), "bias": self.bias}

    @classmethod
    def expected_state(cls, meta: Any) -> dict[str, tuple[int, ...]]:
        meta = check_keys(meta, {"in_features", "out_features", "position", "layer", "bias"})
        position = meta["position"]
        if position not in POSITIONS:
            raise DeltaFormatError(f"meta field 'position' is {short(position)}; known: {list(POSITIONS)}")
        if meta_layer(meta) not in LAYERS:
            raise DeltaFormatError(f"meta field 'layer' is {short(meta['layer'])}; an ia3 part attaches to "
                                   f"{[str(k) for k in LAYERS]} modules")
        scaled = "out_features" if position == "output" else "in_features"
        dims = {}
        for key in ("in_features", "out_features"):
            if meta[key] is None and key != scaled:
                dims[key] = None
            else:
                dims[key] = meta_int(meta, key)
        if meta["bias"] is not None and not isinstance(meta["bias"], bool):
            raise DeltaFormatError(f"meta field 'bias' must be true, false or null, got {short(meta['bias'])}")
        return {"ia3_l": (dims[scaled],)}

    @classmethod
    def from_state(cls, state: dict[str, Tensor], meta: dict[str, Any]) -> IA3Part:
        check_state(state, cls.expected_state(meta), cls.kind)
        part = cls(meta["in_features"], meta["out_features"], meta["position"], LayerKind(meta["layer"]),
                   meta["bias"], dtype=state["ia3_l"].dtype)
        part.load_tensors(state, "ia3")
        return part

    def check_base(self, base: nn.Module, where: str) -> None:
        kind = layer_kind(base)
        if kind not in LAYERS:
            raise ShapeMismatch(f"{where}: an ia3 part attaches to a Linear or Conv1D module, not a "
                                f"{type(base).__name__}")
        d_in, d_out = in_out_features(base)
        want_in = d_in if self.in_features is None else self.in_features
        want_out = d_out if self.out_features is None else self.out_features
        if kind is not self.layer or (want_in, want_out) != (d_in, d_out):
            raise ShapeMismatch(f"{where}: ia3 part for a {self.layer} {self.in_features}→{self.out_features} "
                                f"({self.position} position) but the base module is a {kind} {d_in}→{d_out}")
        has_bias = getattr(base, "bias", None) is not None
        if self.position == "output" and self.bias is not None and self.bias != has_bias:
            raise ShapeMismatch(f"{where}: ia3 part made for a module {'with' if self.bias else 'without'} a bias, "
                                f"but the base module has {'one' if has_bias else 'none'}")


def _scaled_rows(t: Tensor, parts: Sequence[Part | None], row_ids: Tensor, cache: dict[Any, Any] | None,
                 position: str) -> Tensor:
    """``t`` with the rows of each ``position`` part scaled by its ``l`` (the per-row scales kept in ``cache``, the
    routing context's, while no gradient flows); ``t`` itself when no part is at ``position``."""
    chosen = [p if p is not None and p.position == position else None for p in parts]  # type: ignore[attr-defined]
    vectors = [None if p is None else p.ia3_l for p in chosen]  # type: ignore[attr-defined]
    present = [v for v in vectors if v is not None]
    if not present:
        return t
    dtype = promote_dtypes(present)
    key = ("ia3_rows", position, dtype, t.dim(), tuple(row_ids.shape))
    scales = None if cache is None else cache.get(key)
    if scales is None:
        scales = row_scales(vectors, row_ids, present[0].shape[0], t.dim(), dtype, t.device)
        if cache is not None and not (torch.is_grad_enabled() and any(v.requires_grad for v in present)):
            cache[key] = scales  # the routing context's ids never change: one per context
    return ia3_input(t, scales) if position == "input" else ia3_output(t, scales)


def _known(values: list[Any], what: str, where: str) -> Any:
    """The one known (non-``None``) value of ``values``, ``None`` if none is known; different ones: an error."""
    known = {v for v in values if v is not None}
    if len(known) > 1:
        raise ShapeMismatch(f"{where}: ia3 parts disagree on {what} ({sorted(known)}) and cannot be summed")
    return known.pop() if known else None


def sum_ia3(parts: Sequence[IA3Part], where: str) -> IA3Part | None:
    """``l = 1 + Σ_t (l_t − 1)`` in fp32 (exact: the update is linear in ``l − 1``); ``None`` when the parts
    scale different positions (their sum is no single (IA)³ vector)."""
    ref = parts[0]
    if any(p.position != ref.position for p in parts):
        return None
    if any((p.layer, p.features) != (ref.layer, ref.features) for p in parts):
        raise ShapeMismatch(f"{where}: ia3 parts for a {ref.layer} with {ref.features} {ref.position} features and "
                            f"{sorted({(str(p.layer), p.features) for p in parts})} cannot be summed")
    dtype = promote_dtypes([p.ia3_l for p in parts])
    out = IA3Part(_known([p.in_features for p in parts], "in_features", where),
                  _known([p.out_features for p in parts], "out_features", where), ref.position, ref.layer,
                  _known([p.bias for p in parts], "whether the module has a bias", where), dtype=dtype,
                  device=ref.ia3_l.device)
    total = torch.ones(ref.features, dtype=torch.float32, device=ref.ia3_l.device)
    for p in parts:
        total += p.ia3_l.detach().float().to(total.device) - 1.0
    with torch.no_grad():
        out.ia3_l.copy_(total.to(dtype))
    return out
