"""Bottleneck adapter part: ``Δh = s · (W_up · dropout(act(W_down · u + b_down)) + b_up)``.

Houlsby et al., "Parameter-Efficient Transfer Learning for NLP" (ICML 2019); Pfeiffer et al., "AdapterFusion"
(EACL 2021); He et al., "Towards a Unified View of Parameter-Efficient Transfer Learning" (ICLR 2022), whose
``Adapter_Layer`` (jxhe/unify-parameter-efficient-tuning, ``petl/petl_factory.py``) this follows: both
projections carry a bias, dropout acts after the non-linearity, the scale ``s`` multiplies the up-projection's
output (its bias included); no LayerNorm inside the adapter.

The part wraps one module and reads ``u`` from one of three sources (``source`` in the metadata):

* ``"output"`` — sequential (Houlsby, Pfeiffer): ``y ← y + Δh(y)`` on the module's output ``y``;
* ``"input"`` — parallel (He et al.'s PA): ``y ← module(x) + Δh(x)`` on the module's input ``x``;
* ``"residual"`` — parallel on a module that adds the residual itself, as BERT's ``BertOutput(h, x)`` computes
  ``LN(dropout(dense(h)) + x)`` with ``x`` the FFN input: ``Δh(x)`` is added to that residual argument, so the
  module computes ``LN(dropout(dense(h)) + x + Δh(x))`` — exactly the paper's "added to the FFN output before
  the residual add and LayerNorm".

An adapter is non-linear, so it is not additive: the layer chains it after the additive parts and merge,
compose and compress refuse it.  Rows (and tokens) are independent, so mixed batches work.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltatune.errors import ConfigError, DeltaFormatError, ShapeMismatch, TargetError
from deltatune.layer import Call, first, replace_first
from deltatune.parts.base import Part
from deltatune.parts.layers import LayerKind, in_out_features, layer_kind
from deltatune.parts.meta_checks import check_keys, check_shape, check_state, meta_int, meta_number, short
from deltatune.routing import row_index

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu,
                                                      "tanh": torch.tanh}
SOURCES = ("output", "input", "residual")
INITS = ("bert", "lora")
#: the keyword a residual-adding module (``BertOutput``, ``BertSelfOutput``) takes its residual by
RESIDUAL_KEYWORD = "input_tensor"


def adapter_delta(u: Tensor, w_down: Tensor, b_down: Tensor | None, w_up: Tensor, b_up: Tensor | None,
                  act: str, scale: float, dropout: float = 0.0, training: bool = False) -> Tensor:
    """``Δh = s · (W_up · dropout(act(W_down u + b_down)) + b_up)`` (He et al., ICLR 2022, eq. for the
    bottleneck adapter; ``W_down ∈ R^{b×d}``, ``W_up ∈ R^{d×b}``).  Computed in ``w_down``'s dtype."""
    h = ACTIVATIONS[act](F.linear(u.to(w_down.dtype), w_down, b_down))
    if dropout > 0.0:
        h = F.dropout(h, dropout, training)
    return scale * F.linear(h, w_up, b_up)


def residual_of(call: Call | None, where: str) -> Tensor:
    """The residual argument of a ``module(h, residual)`` call (second positional, or ``input_tensor=``)."""
    if call is not None and call.rest and isinstance(call.rest[0], Tensor):
        return call.rest[0]
    if call is not None and isinstance(call.kwargs.get(RESIDUAL_KEYWORD), Tensor):
        return call.kwargs[RESIDUAL_KEYWORD]
    raise TargetError(f"{where}: a parallel adapter reading the residual needs a module called as module(h, "
                      f"residual) (like BertOutput), but this module was called without a second tensor argument")


def with_residual(call: Call, value: Tensor) -> Call:
    """The same call with its residual argument (second positional, or ``input_tensor=``) replaced by ``value``."""
    if call.rest and isinstance(call.rest[0], Tensor):
        return replace(call, rest=(value, *call.rest[1:]))
    return replace(call, kwargs={**call.kwargs, RESIDUAL_KEYWORD: value})


def _linear_like(module: nn.Module) -> Iterator[nn.Module]:
    """Linear/Conv1D modules of ``module`` in registration order, parts (and their tensors) skipped."""
    if layer_kind(module) in (LayerKind.LINEAR, LayerKind.CONV1D):
        yield module
        return
    for child in module.children():
        if not isinstance(child, Part):
            yield from _linear_like(child)


def module_width(module: nn.Module, source: str) -> int | None:
    """The width ``d`` of the tensor an adapter with ``source`` reads on ``module``, or ``None`` if unknown.

    A Linear/Conv1D: its in (``"input"``) or out features.  A block: the first inner Linear/Conv1D's in features
    (``"input"``), the last one's out features (``"output"``, ``"residual"``).  A norm: its 1-D weight's size."""
    kind = layer_kind(module)
    if kind is LayerKind.EMBEDDING:
        return None if source == "input" else in_out_features(module)[1]
    linears = list(_linear_like(module))
    if linears:
        d_in, _ = in_out_features(linears[0])
        _, d_out = in_out_features(linears[-1])
        return d_in if source == "input" else d_out
    weight = getattr(module, "weight", None)
    if isinstance(weight, Tensor) and weight.dim() == 1:
        return int(weight.numel())
    return None


class AdapterPart(Part):
    """A bottleneck adapter on one module: ``W_down ∈ R^{b×d}``, ``W_up ∈ R^{d×b}`` (biases optional).

    Init (``W_up = 0`` and zero biases in both, so the output is unchanged at attach time):

    * ``"bert"`` — ``W_down ~ N(0, 0.02²)`` (Houlsby; the reference's "bert" init also draws ``W_up`` from
      N(0, 0.02²), i.e. a near-identity adapter; deltatune zeroes it so that attaching changes nothing);
    * ``"lora"`` — ``W_down`` kaiming-uniform(a=√5), ``W_up = 0`` (He et al.'s init for the parallel adapter).
    """

    kind = "adapter"
    additive, base_dependent, mixed_rows, has_aux_loss = False, False, True, False

    def __init__(self, features: int, bottleneck: int, scale: float = 1.0, source: str = "output",
                 act: str = "relu", dropout: float = 0.0, bias: bool = True, init: str = "bert",
                 dtype: torch.dtype | None = torch.float32, device: torch.device | str | None = None,
                 generator: torch.Generator | None = None, empty: bool = False) -> None:
        """``empty``: leave the tensors uninitialised (a loader that fills them at once skips the init)."""
        super().__init__()
        if source not in SOURCES or act not in ACTIVATIONS or init not in INITS:
            raise ConfigError(f"adapter part: source {source!r} / act {act!r} / init {init!r} not in "
                              f"{SOURCES} / {sorted(ACTIVATIONS)} / {INITS}")
        self.features, self.bottleneck, self.scale = int(features), int(bottleneck), float(scale)
        self.source, self.act, self.dropout, self.bias, self.init = source, act, float(dropout), bool(bias), init
        dtype = dtype or torch.float32
        self.down_weight = nn.Parameter(torch.empty(bottleneck, features, dtype=dtype, device=device))
        self.up_weight = nn.Parameter(torch.zeros(features, bottleneck, dtype=dtype, device=device))
        self.down_bias = nn.Parameter(torch.zeros(bottleneck, dtype=dtype, device=device)) if bias else None
        self.up_bias = nn.Parameter(torch.zeros(features, dtype=dtype, device=device)) if bias else None
        if not empty:
            self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """``W_down`` per ``init``; ``W_up`` and both biases zero."""
        with torch.no_grad():
            if self.init == "lora":
                nn.init.kaiming_uniform_(self.down_weight, a=math.sqrt(5), generator=generator)
            else:
                nn.init.normal_(self.down_weight, std=0.02, generator=generator)
            nn.init.zeros_(self.up_weight)
            for b in (self.down_bias, self.up_bias):
                if b is not None:
                    nn.init.zeros_(b)

    # --- computation -------------------------------------------------------------------------------
    def adapt(self, u: Tensor) -> Tensor:
        """``Δh(u)`` in the part's dtype."""
        return adapter_delta(u, self.down_weight, self.down_bias, self.up_weight, self.up_bias, self.act,
                             self.scale, self.dropout, self.training)

    def forward(self, x: Tensor, base: Any) -> Any:
        if self.source == "residual":
            residual = residual_of(getattr(base, "call", None), f"{self.kind} part")
            shifted = residual + self.adapt(residual).to(residual.dtype)
            return base.with_call(with_residual(base.call, shifted))(x)
        out = base(x)
        y = first(out)
        u = y if self.source == "output" else x
        return replace_first(out, y + self.adapt(u).to(y.dtype))

    @classmethod
    def mixed_forward(cls, x: Tensor, base: Any, parts: Sequence[Part | None], row_ids: Tensor,
                      cache: dict[Any, Any] | None = None) -> Any:
        """The base output once for the whole batch, then each adapter on its rows (or tokens: an adapter acts
        on each position alone): ``y_i + Δh_{a_i}(u_i)``.  Only for plain calls ``module(x)``: a part reading the
        residual argument runs through the layer's per-part path (its call has other arguments)."""
        if any(p is not None and p.source == "residual" for p in parts):
            raise TargetError("a parallel adapter reading the residual argument cannot run on a plain module(x) call")
        return cls.mixed_onto(x, base(x), base, parts, row_ids, cache)

    @classmethod
    def mixed_onto(cls, x: Tensor, out: Any, base: Any, parts: Sequence[Part | None], row_ids: Tensor,
                   cache: dict[Any, Any] | None = None) -> Any:
        """``out`` (the output of everything inside the adapters, on the whole batch) with ``y_i + Δh_{a_i}(u_i)`` on
        each adapter's rows (or tokens); rows of ``None`` unchanged.  Plain calls ``module(x)`` only."""
        if any(p is not None and p.source == "residual" for p in parts):
            raise TargetError("a parallel adapter reading the residual argument cannot run on a plain module(x) call")
        y = first(out)
        lead = row_ids.dim()
        ys = y.reshape(-1, *y.shape[lead:])
        xs = x.reshape(-1, *x.shape[lead:])
        new = ys
        rows_of = row_index(row_ids, len(parts), cache if not torch.is_grad_enabled() else None)
        for pid, part in enumerate(parts):
            rows = rows_of[pid]
            if part is None or rows is None:
                continue
            y_rows = ys.index_select(0, rows)
            u = y_rows if part.source == "output" else xs.index_select(0, rows)
            new = new.index_copy(0, rows, y_rows + part.adapt(u).to(y_rows.dtype))
        return replace_first(out, new.reshape(y.shape))

    # --- serialisation -------------------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        return {"features": self.features, "bottleneck": self.bottleneck, "scale": self.scale,
                "source": self.source, "act": self.act, "dropout": self.dropout, "bias": self.bias}

    @classmethod
    def expected_state(cls, meta: Any) -> dict[str, tuple[int, ...]]:
        meta = check_keys(meta, {"features", "bottleneck", "scale", "source", "act"}, {"dropout", "bias"})
        d, b = meta_int(meta, "features"), meta_int(meta, "bottleneck")
        meta_number(meta, "scale")
        for key, known in (("source", SOURCES), ("act", tuple(ACTIVATIONS))):
            if meta[key] not in known:
                raise DeltaFormatError(f"meta field {key!r} is {short(meta[key])}; known: {list(known)}")
        if "dropout" in meta:
            meta_number(meta, "dropout", 0.0, 0.999)
        if not isinstance(meta.get("bias", True), bool):
            raise DeltaFormatError(f"meta field 'bias' must be true or false, got {short(meta['bias'])}")
        check_shape([b, d], "down_weight")
        shapes = {"down_weight": (b, d), "up_weight": (d, b)}
        if meta.get("bias", True):
            shapes.update(down_bias=(b,), up_bias=(d,))
        return shapes

    @classmethod
    def from_state(cls, state: dict[str, Tensor], meta: dict[str, Any]) -> AdapterPart:
        check_state(state, cls.expected_state(meta), cls.kind)
        part = cls(meta["features"], meta["bottleneck"], float(meta["scale"]), source=meta["source"],
                   act=meta["act"], dropout=float(meta.get("dropout", 0.0)), bias=meta.get("bias", True),
                   dtype=state["down_weight"].dtype, empty=True)
        part.load_tensors(state, "adapter")
        return part

    def check_base(self, base: nn.Module, where: str) -> None:
        width = module_width(base, self.source)
        if width is None:
            raise ShapeMismatch(f"{where}: cannot tell the width of the {self.source} of a {type(base).__name__} "
                                f"module, which an adapter of width {self.features} needs")
        if width != self.features:
            raise ShapeMismatch(f"{where}: adapter of width {self.features} reading the {self.source}, but the "
                                f"{type(base).__name__} module's {self.source} has width {width}")
