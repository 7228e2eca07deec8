"""MixLoRA part: ``N`` LoRA experts on a frozen FFN, a top-k router and the load-balancing loss.

Li et al., "MixLoRA: Enhancing Large Language Models Fine-Tuning with LoRA-based Mixture of Experts" (2024);
reference TUDB-Labs/MixLoRA @ d59d09b ``mixlora/model.py``.  Expert ``e`` is the frozen FFN with its own LoRA on
every projection:

* gated (Llama): ``FFN_e(x) = (W_down + ΔW_down,e)(act((W_gate + ΔW_gate,e) x) ⊙ (W_up + ΔW_up,e) x)``;
* ungated (GPT-2, BERT): ``FFN_e(x) = (W_out + ΔW_out,e) act((W_in + ΔW_in,e) x)`` (biases of the base kept),

with ``ΔW_p,e = s · B_p,e A_p,e``.  The router ``g = Linear(d → N, no bias)`` (fp32) gives ``p = softmax(g(x))``;
each token goes to its ``k`` most probable experts with weights renormalised to sum to 1, and the block returns
``Σ_{e ∈ topk(x)} w_e FFN_e(x)``.  As in the paper, ``W_gate x`` and ``W_up x`` (``W_in x``) are computed once for
all tokens, and each expert adds only its LoRA terms on the (token, slot) pairs routed to it; the base output
projection runs once on all ``k`` slots of every token.

The part computes the block from its submodules, read through ``base`` (the layer's :class:`~deltatune.layer.Inner`),
so a part nested on a submodule (a LoRA on ``mlp.gate_proj``) acts inside every expert.  It replaces the block:
a non-additive part chained *before* it on the same module is not seen (one chained after it sees its output).

**BERT** has no FFN block module: ``BertIntermediate`` computes ``act(W_in a)`` and ``BertOutput(h, a)``
computes ``LN(dropout(W_out h) + a)`` with ``a`` the FFN input.  The mixture part sits on ``encoder.layer.N.output``
(its residual argument is ``a``), and recomputes ``W_in a`` with the sibling ``intermediate`` module, which a
tensor-less :class:`MixLoRALinkPart` on the enclosing ``encoder.layer.N`` lends it for the duration of each layer
call (a context variable: nothing persistent, thread-safe).  Exact; costs one extra ``W_in`` product per layer.

**Load balancing** (Switch/Mixtral style, the MixLoRA spec): ``L_aux = N · Σ_e f_e · P_e`` with ``f_e`` the fraction
of (token, slot) assignments routed to ``e`` and ``P_e`` the mean router probability of ``e``; the part keeps
``aux_loss_coef · L_aux`` of its last training forward (:meth:`MixLoRAPart.aux_loss`).  A delta's loss is one
``L_aux`` over every layer's routed tokens together (:meth:`MixLoRAPart.combined_aux_loss`, what the reference computes
on the layers' concatenated router logits), not the sum of the per-layer losses, which would weigh the coefficient by
the number of layers.  The reference code averages the one-hot assignments per slot and sums over slots, which is
``k`` times this ``f_e``.  Padding: the FFN block
sees hidden states only: the caller gives the attention mask with :func:`token_mask` (the training loop does, through
the method's hook); without one every token counts.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar, Token
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltatune.errors import DeltaFormatError, ShapeMismatch, TargetError
from deltatune.layer import unwrap
from deltatune.parts.base import Part
from deltatune.parts.layers import LayerKind, in_out_features, layer_kind
from deltatune.parts.meta_checks import check_keys, check_shape, check_state, meta_int, meta_number, short
from deltatune.routing import current_routing, own_rows


@dataclass(frozen=True)
class Layout:
    """One FFN geometry: the expert projections fed by the FFN input (``inputs``), the output projection, and the
    base attributes they map to (on the block; for ``bert`` the inputs live on the sibling ``intermediate``)."""

    name: str
    inputs: tuple[str, ...]
    output: str
    modules: dict[str, str]
    act: str

    @property
    def gated(self) -> bool:
        return len(self.inputs) == 2

    @property
    def projections(self) -> tuple[str, ...]:
        return (*self.inputs, self.output)


LAYOUTS: dict[str, Layout] = {
    "gated": Layout("gated", ("gate", "up"), "down", {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
                    "act_fn"),
    "gpt2": Layout("gpt2", ("in",), "out", {"in": "c_fc", "out": "c_proj"}, "act"),
    "bert": Layout("bert", ("in",), "out", {"in": "dense", "out": "dense"}, "intermediate_act_fn"),
}
RESIDUAL_KEYWORD = "input_tensor"

_TOKEN_MASK: ContextVar[Tensor | None] = ContextVar("deltatune_mixlora_token_mask", default=None)
_LAYERS: ContextVar[dict[int, nn.Module] | None] = ContextVar("deltatune_mixlora_layers", default=None)


# --- math ---------------------------------------------------------------------------------------------------
def route(logits: Tensor, top_k: int) -> tuple[Tensor, Tensor, Tensor]:
    """MixLoRA's router (Li et al., 2024, §3.2): ``p = softmax(g(x))`` over the experts (fp32), the ``k`` most
    probable experts ``E(x)``, weights ``w_e = p_e / Σ_{e' ∈ E(x)} p_e'``.  Returns ``(w, E, p)`` of shapes
    ``(T, k)``, ``(T, k)``, ``(T, N)``."""
    probs = torch.softmax(logits.float(), dim=-1)
    top, experts = torch.topk(probs, top_k, dim=-1)
    return top / top.sum(-1, keepdim=True), experts, probs


def routing_stats(probs: Tensor, experts: Tensor, num_experts: int, mask: Tensor | None = None
                  ) -> tuple[Tensor, Tensor, int, int]:
    """``(assignments per expert, Σ router probabilities per expert, tokens, assignments)`` over the tokens where
    ``mask`` (``(T,)`` bool) is true: what :func:`balance_loss` needs, summable across layers."""
    if mask is not None:
        probs, experts = probs[mask], experts[mask]
    counts = torch.bincount(experts.reshape(-1), minlength=num_experts).to(probs.dtype)
    return counts, probs.sum(0), int(probs.shape[0]), int(experts.numel())


def balance_loss(counts: Tensor, prob_sum: Tensor, tokens: int, assignments: int) -> Tensor:
    """``N · Σ_e (counts_e / assignments) · (prob_sum_e / tokens)``; 0 (with the graph) when no token counted."""
    if tokens == 0:
        return prob_sum.sum() * 0.0
    return counts.numel() * ((counts / assignments) * (prob_sum / tokens)).sum()


def load_balancing_loss(probs: Tensor, experts: Tensor, num_experts: int, mask: Tensor | None = None) -> Tensor:
    """``L_aux = N · Σ_e f_e · P_e`` (Fedus et al., Switch Transformers, JMLR 2022, eq. 4, with top-k
    assignments as in Mixtral/MixLoRA): ``f_e`` = (token, slot) assignments to ``e`` / (tokens · k), ``P_e`` = mean
    router probability of ``e``, both over the tokens where ``mask`` (``(T,)`` bool) is true.  1 when balanced."""
    return balance_loss(*routing_stats(probs, experts, num_experts, mask))


def dispatch(experts: Tensor, num_experts: int) -> tuple[Tensor, Tensor, list[int]]:
    """Group the (token, slot) pairs by expert: ``order`` (positions ``t·k + j`` sorted by expert, stable), the
    token of each sorted position, and how many pairs each expert got."""
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    return order, order // experts.shape[-1], counts


def experts_lora(x_sorted: Tensor, a: Tensor, b: Tensor, counts: Sequence[int], scale: float) -> Tensor:
    """``s · B_e A_e x`` for rows grouped by expert (``counts[e]`` rows each); ``A: (N, r, in)``, ``B: (N, out, r)``."""
    chunks = x_sorted.to(a.dtype).split(list(counts))
    return torch.cat([F.linear(F.linear(c, a[e]), b[e]) for e, c in enumerate(chunks)]) * scale


# --- padding mask and the BERT link ------------------------------------------------------------------------
def set_token_mask(mask: Tensor | None) -> Token:
    """Make ``mask`` the current token mask (see :func:`token_mask`); returns the token that restores the last."""
    return _TOKEN_MASK.set(mask)


def reset_token_mask(token: Token) -> None:
    _TOKEN_MASK.reset(token)


@contextmanager
def token_mask(mask: Tensor | None) -> Iterator[None]:
    """Within the block, the load-balancing loss counts only the tokens where ``mask`` (the batch's attention
    mask, ``(batch, seq)``) is non-zero.  A layer whose input does not have the mask's leading shape counts every
    token.  The training loop sets it through the method's hook (:class:`deltatune.methods.mixlora.PaddingMask`)."""
    token = set_token_mask(mask)
    try:
        yield
    finally:
        reset_token_mask(token)


#: BertOutput module → (a weak reference to) its layer, remembered from the link's calls: a recomputation outside
#: the link's call (gradient checkpointing re-runs the layer during backward) still finds the sibling
_PARENTS: weakref.WeakKeyDictionary[nn.Module, weakref.ref] = weakref.WeakKeyDictionary()


def parent_layer(output: nn.Module) -> nn.Module | None:
    """The layer whose ``output`` is ``output``: from the enclosing link's call, else as last seen by it."""
    layer = (_LAYERS.get() or {}).get(id(output))
    if layer is None and output in _PARENTS:
        layer = _PARENTS[output]()
    return layer


@contextmanager
def ffn_parent(layer: nn.Module) -> Iterator[None]:
    """Within the block, the mixture part on ``layer.output`` finds its sibling ``layer.intermediate``."""
    _PARENTS[unwrap(layer.output)] = weakref.ref(layer)
    known = _LAYERS.get() or {}
    handle = _LAYERS.set({**known, id(unwrap(layer.output)): layer})
    try:
        yield
    finally:
        _LAYERS.reset(handle)


def residual_of(call: Any) -> Tensor | None:
    """The residual argument of a ``module(h, residual)`` call (second positional, or ``input_tensor=``)."""
    if call is None:
        return None
    if call.rest and isinstance(call.rest[0], Tensor):
        return call.rest[0]
    value = call.kwargs.get(RESIDUAL_KEYWORD)
    return value if isinstance(value, Tensor) else None


def _features(module: nn.Module, where: str) -> tuple[int, int]:
    module = unwrap(module)
    if layer_kind(module) not in (LayerKind.LINEAR, LayerKind.CONV1D):
        raise ShapeMismatch(f"{where}: expected a Linear or Conv1D projection, found a {type(module).__name__}")
    return in_out_features(module)


def ffn_geometry(block: nn.Module, layout: Layout, where: str) -> tuple[int, int]:
    """``(d_model, d_ff)`` of an FFN ``block`` of ``layout`` (for ``bert``, the ``BertLayer``), checking that every
    projection and the activation are where the layout says."""
    if layout.name == "bert":
        inter, out = getattr(block, "intermediate", None), getattr(block, "output", None)
        if inter is None or out is None:
            raise ShapeMismatch(f"{where}: a BERT-style layer needs .intermediate and .output modules")
        inter, out = unwrap(inter), unwrap(out)
        owners = {"in": inter, "out": out}
        act_owner: nn.Module = inter
        for attr in ("LayerNorm", "dropout"):
            if not hasattr(out, attr):
                raise ShapeMismatch(f"{where}: a BERT-style FFN output module needs .{attr}")
    else:
        owners = {p: block for p in layout.projections}
        act_owner = block
    shapes = {}
    for p in layout.projections:
        module = getattr(owners[p], layout.modules[p], None)
        if module is None:
            raise ShapeMismatch(f"{where}: a {layout.name} FFN needs .{layout.modules[p]}, which "
                                f"{type(owners[p]).__name__} lacks")
        shapes[p] = _features(module, f"{where}.{layout.modules[p]}")
    if not callable(getattr(act_owner, layout.act, None)):
        raise ShapeMismatch(f"{where}: a {layout.name} FFN needs the activation .{layout.act}")
    d, f = shapes[layout.inputs[0]]
    bad = [p for p in layout.inputs if shapes[p] != (d, f)] + ([layout.output] if shapes[layout.output] != (f, d)
                                                             else [])
    if bad:
        raise ShapeMismatch(f"{where}: FFN projections {short(shapes)} are not d→f inputs and an f→d output")
    return d, f


# --- parts --------------------------------------------------------------------------------------------------
class MixLoRAPart(Part):
    """Router ``(N, d)`` (fp32, N(0, ``router_init_range``²)) and, per projection ``p``, stacked expert factors
    ``p_A: (N, r, in)`` (kaiming-uniform) and ``p_B: (N, out, r)`` (zeros): at attach time every expert is the
    base FFN, so the block's output is unchanged (up to the rounding of ``Σ w_e = 1``)."""

    kind = "mixlora"
    additive, base_dependent, mixed_rows, has_aux_loss = False, False, True, True

    def __init__(self, layout: str, d_model: int, d_ff: int, num_experts: int, top_k: int, rank: int, scale: float,
                 dropout: float = 0.0, aux_loss_coef: float = 0.01, jitter_noise: float = 0.0,
                 router_init_range: float = 0.02, dtype: torch.dtype | None = torch.float32,
                 device: torch.device | str | None = None, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if layout not in LAYOUTS or not 1 <= top_k <= num_experts:
            raise ValueError(f"mixlora part: layout {layout!r} (known {sorted(LAYOUTS)}), top_k {top_k} of "
                             f"{num_experts} experts")
        self.layout = LAYOUTS[layout]
        self.d_model, self.d_ff, self.num_experts, self.top_k = int(d_model), int(d_ff), int(num_experts), int(top_k)
        self.rank, self.scale, self.dropout_p = int(rank), float(scale), float(dropout)
        self.aux_loss_coef, self.jitter_noise = float(aux_loss_coef), float(jitter_noise)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._aux: Tensor | None = None
        self._stats: tuple[Tensor, Tensor, int, int] | None = None  # routing_stats of the last training forward
        dtype = dtype or torch.float32
        self.router = nn.Parameter(torch.empty(num_experts, d_model, dtype=torch.float32, device=device))
        for p, (d_in, d_out) in self.projection_shapes().items():
            self.register_parameter(f"{p}_A", nn.Parameter(torch.empty(num_experts, rank, d_in, dtype=dtype,
                                                                       device=device)))
            self.register_parameter(f"{p}_B", nn.Parameter(torch.zeros(num_experts, d_out, rank, dtype=dtype,
                                                                       device=device)))
        self.reset_parameters(router_init_range, generator)

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """``{projection: (in, out)}`` of the expert LoRAs."""
        d, f = self.d_model, self.d_ff
        return {**{p: (d, f) for p in self.layout.inputs}, self.layout.output: (f, d)}

    def reset_parameters(self, router_init_range: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Router ~ N(0, range²) (MixLoRA's ``router_init_range``); every expert's ``A`` kaiming-uniform(a=√5) as
        PEFT's LoRA, ``B = 0``."""
        with torch.no_grad():
            nn.init.normal_(self.router, std=router_init_range, generator=generator)
            for p in self.projection_shapes():
                for e in range(self.num_experts):
                    nn.init.kaiming_uniform_(getattr(self, f"{p}_A")[e], a=math.sqrt(5), generator=generator)
                nn.init.zeros_(getattr(self, f"{p}_B"))

    def factors(self, projection: str) -> tuple[Tensor, Tensor]:
        return getattr(self, f"{projection}_A"), getattr(self, f"{projection}_B")

    # --- computation -------------------------------------------------------------------------------
    def aux_loss(self) -> Tensor | None:
        """``aux_loss_coef · L_aux`` of this layer's last forward in training mode (``None`` before the first)."""
        return self._aux

    @classmethod
    def combined_aux_loss(cls, parts: Sequence[Part]) -> Tensor | None:
        """``aux_loss_coef · L_aux`` over every layer's last routed tokens together (the reference's loss on the
        concatenated router logits); parts of different expert counts or coefficients form separate sums."""
        groups: dict[tuple[int, float], list[tuple[Tensor, Tensor, int, int]]] = {}
        for p in parts:
            stats = getattr(p, "_stats", None)
            if stats is not None:
                groups.setdefault((p.num_experts, p.aux_loss_coef), []).append(stats)  # type: ignore[attr-defined]
        losses = [coef * balance_loss(sum(s[0] for s in group), sum(s[1] for s in group), sum(s[2] for s in group),
                                      sum(s[3] for s in group)) for (_, coef), group in groups.items()]
        return torch.stack(losses).sum() if losses else None

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles leave out the last aux loss (a transient graph node, which cannot be deep-copied)."""
        return {**self.__dict__, "_aux": None, "_stats": None}

    def forward(self, x: Tensor, base: Any) -> Tensor:
        return self.mix(x, base)

    def _block(self, x: Tensor, base: Any) -> tuple[Tensor, dict[str, Callable], Callable, Callable]:
        """``(FFN input, {projection: base callable}, activation, finish)`` for this layout: ``finish`` maps the
        mixed FFN output to the wrapped module's output."""
        names = self.layout.modules
        if self.layout.name != "bert":
            procs = {p: getattr(base, names[p]) for p in self.layout.projections}
            finish = base.dropout if self.layout.name == "gpt2" else (lambda y: y)
            return x, procs, getattr(base, self.layout.act), finish
        a = residual_of(getattr(base, "call", None))
        if a is None:
            raise TargetError("a BERT mixlora part acts on a module called as output(h, ffn_input) (BertOutput), "
                              "but this call had no second tensor argument")
        layer = parent_layer(base.module)
        if layer is None:
            raise TargetError("a BERT mixlora part on a BertOutput module ran without the mixlora_link part of its "
                              "enclosing layer (which lends it the layer's intermediate module): attach the whole "
                              "delta, and run the layer through its wrapper (gradient checkpointing re-runs "
                              "the layer outside it)")
        inter = unwrap(layer.intermediate)
        procs = {"in": inter.dense, "out": base.dense}
        return a, procs, getattr(inter, self.layout.act), lambda y: base.LayerNorm(base.dropout(y) + a)

    def mix(self, x: Tensor, base: Any, rows: Tensor | None = None) -> Tensor:
        """The block's output with the mixture; ``rows`` (bool, the input's leading shape; default: the rows a routed
        layer keeps of this run, :func:`~deltatune.routing.own_rows`) limits the tokens the load-balancing loss
        counts (a mixed batch)."""
        if self.layout.name == "bert" and current_routing() is not None and \
                id(base.module) not in (_LAYERS.get() or {}):
            return base(x)  # the routed base pass of the enclosing layer: its rows are recomputed with the link
        h, procs, act, finish = self._block(x, base)
        if self.training and self.jitter_noise > 0:
            h = h * torch.empty_like(h).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        lead, k = h.shape[:-1], self.top_k
        flat = h.reshape(-1, h.shape[-1])
        weights, experts, probs = route(F.linear(flat.float(), self.router), k)
        if self.training:
            mask = self._mask(lead, own_rows() if rows is None else rows)
            self._stats = routing_stats(probs, experts, self.num_experts, mask)
            self._aux = self.aux_loss_coef * balance_loss(*self._stats)
        order, tokens, counts = dispatch(experts, self.num_experts)
        inv = torch.empty_like(order)
        inv[order] = torch.arange(order.numel(), device=order.device)
        xs = self.dropout(flat.index_select(0, tokens))
        pre = []
        for p in self.layout.inputs:
            shared = procs[p](h)  # W_p x once for all tokens (a nested part on the projection acts here)
            a, b = self.factors(p)
            own = experts_lora(xs, a, b, counts, self.scale)
            pre.append(shared.reshape(-1, shared.shape[-1]).index_select(0, tokens) + own.to(shared.dtype))
        hid = act(pre[0]) * pre[1] if self.layout.gated else act(pre[0])  # (T·k, f), sorted by expert
        out = procs[self.layout.output](hid.index_select(0, inv).reshape(*lead, k, -1))
        a, b = self.factors(self.layout.output)
        own = experts_lora(self.dropout(hid), a, b, counts, self.scale).index_select(0, inv)
        y = out + own.reshape(out.shape).to(out.dtype)
        return finish((y * weights.reshape(*lead, k, 1).to(y.dtype)).sum(-2))

    @staticmethod
    def _mask(lead: torch.Size, rows: Tensor | None) -> Tensor | None:
        mask = None
        given = _TOKEN_MASK.get()
        if given is not None and tuple(given.shape) == tuple(lead):
            mask = given.to(dtype=torch.bool)
        if rows is not None:
            sel = rows.reshape(*rows.shape, *([1] * (len(lead) - rows.dim()))).expand(lead)
            mask = sel if mask is None else mask & sel.to(mask.device)
        return None if mask is None else mask.reshape(-1)

    @classmethod
    def mixed_forward(cls, x: Tensor, base: Any, parts: Sequence[Part | None], row_ids: Tensor,
                      cache: dict[Any, Any] | None = None) -> Tensor:
        """The base output for the batch, then each mixture on the *whole* batch, kept on its rows (tokens).

        The whole batch, because the mixture calls the block's submodules, which may be wrapped and routed
        themselves: they must see the batch the routing describes (a slice of rows would not match its ids)."""
        return full_batch_mixed(x, base, parts, row_ids, lambda part, rows: part.mix(x, base, rows))

    # --- serialisation -------------------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        return {"layout": self.layout.name, "d_model": self.d_model, "d_ff": self.d_ff,
                "num_experts": self.num_experts, "top_k": self.top_k, "rank": self.rank, "scale": self.scale,
                "dropout": self.dropout_p, "aux_loss_coef": self.aux_loss_coef, "jitter_noise": self.jitter_noise}

    @classmethod
    def expected_state(cls, meta: Any) -> dict[str, tuple[int, ...]]:
        meta = check_keys(meta, {"layout", "d_model", "d_ff", "num_experts", "top_k", "rank", "scale"},
                          {"dropout", "aux_loss_coef", "jitter_noise"})
        if not isinstance(meta["layout"], str) or meta["layout"] not in LAYOUTS:
            raise DeltaFormatError(f"meta field 'layout' is {short(meta['layout'])}; known: {sorted(LAYOUTS)}")
        d, f = meta_int(meta, "d_model"), meta_int(meta, "d_ff")
        n, k, r = meta_int(meta, "num_experts"), meta_int(meta, "top_k"), meta_int(meta, "rank")
        if k > n:
            raise DeltaFormatError(f"meta field 'top_k' is {k}, larger than num_experts = {n}")
        meta_number(meta, "scale")
        for key, high in (("dropout", 0.999), ("jitter_noise", 0.999), ("aux_loss_coef", math.inf)):
            if key in meta:
                meta_number(meta, key, 0.0, high)
        layout = LAYOUTS[meta["layout"]]
        shapes: dict[str, tuple[int, ...]] = {"router": check_shape([n, d], "router")}
        for p in layout.projections:
            d_in, d_out = (f, d) if p == layout.output else (d, f)
            shapes[f"{p}_A"] = check_shape([n, r, d_in], f"{p}_A")
            shapes[f"{p}_B"] = check_shape([n, d_out, r], f"{p}_B")
        return shapes

    @classmethod
    def from_state(cls, state: dict[str, Tensor], meta: dict[str, Any]) -> MixLoRAPart:
        check_state(state, cls.expected_state(meta), cls.kind)
        layout = LAYOUTS[meta["layout"]]
        part = cls(meta["layout"], meta["d_model"], meta["d_ff"], meta["num_experts"], meta["top_k"], meta["rank"],
                   float(meta["scale"]), dropout=float(meta.get("dropout", 0.0)),
                   aux_loss_coef=float(meta.get("aux_loss_coef", 0.01)),
                   jitter_noise=float(meta.get("jitter_noise", 0.0)), dtype=state[f"{layout.output}_A"].dtype)
        part.load_tensors(state, "mixlora")
        return part

    def check_base(self, base: nn.Module, where: str) -> None:
        if self.layout.name == "bert":
            if not (hasattr(base, "dense") and hasattr(base, "LayerNorm") and hasattr(base, "dropout")):
                raise ShapeMismatch(f"{where}: a BERT mixlora part goes on a BertOutput-like module (dense, "
                                    f"dropout, LayerNorm), not a {type(base).__name__}")
            got = _features(base.dense, f"{where}.dense")
            if got != (self.d_ff, self.d_model):
                raise ShapeMismatch(f"{where}: mixlora part for an FFN {self.d_model}→{self.d_ff}→{self.d_model}, "
                                    f"but the output projection is {got[0]}→{got[1]}")
            return
        got = ffn_geometry(base, self.layout, where)
        if got != (self.d_model, self.d_ff):
            raise ShapeMismatch(f"{where}: mixlora part for an FFN of width {self.d_model}→{self.d_ff}, but the "
                                f"{type(base).__name__} block is {got[0]}→{got[1]}")


class MixLoRALinkPart(Part):
    """No tensors: on a BERT-style layer (``encoder.layer.N``), lends ``intermediate`` to the mixture part on its
    ``output`` for the duration of each call (see the module docstring).  Saved with the delta so that loading
    re-creates it; never merged (not additive)."""

    kind = "mixlora_link"
    additive, base_dependent, mixed_rows, has_aux_loss = False, False, True, False

    def forward(self, x: Tensor, base: Any) -> Any:
        with ffn_parent(base.module):
            return base(x)

    @classmethod
    def mixed_forward(cls, x: Tensor, base: Any, parts: Sequence[Part | None], row_ids: Tensor,
                      cache: dict[Any, Any] | None = None) -> Tensor:
        """The whole batch through the layer (its inner modules are routed), kept on the link's rows."""
        return full_batch_mixed(x, base, parts, row_ids, lambda part, rows: part(x, base))

    def meta(self) -> dict[str, Any]:
        return {}

    @classmethod
    def expected_state(cls, meta: Any) -> dict[str, tuple[int, ...]]:
        check_keys(meta, set())
        return {}

    @classmethod
    def from_state(cls, state: dict[str, Tensor], meta: dict[str, Any]) -> MixLoRALinkPart:
        check_state(state, cls.expected_state(meta), cls.kind)
        return cls()

    def check_base(self, base: nn.Module, where: str) -> None:
        ffn_geometry(base, LAYOUTS["bert"], where)


def full_batch_mixed(x: Tensor, base: Any, parts: Sequence[Part | None], row_ids: Tensor,
                     run: Callable[[Part, Tensor], Tensor]) -> Tensor:
    """``base(x)``, with the rows (tokens) routed to ``parts[i]`` replaced by ``run(parts[i], rows_i)`` computed
    on the whole batch."""
    out = base(x)
    for pid, part in enumerate(parts):
        if part is None:
            continue
        rows = row_ids == pid
        if not bool(rows.any()):
            continue
        y = run(part, rows)
        keep = rows.reshape(*rows.shape, *([1] * (out.dim() - rows.dim())))
        out = torch.where(keep, y.to(out.dtype), out)
    return out
