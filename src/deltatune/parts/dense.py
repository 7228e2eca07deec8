"""Dense part: a full-size update for every direct parameter of a module (full fine-tuning).

``θ' = θ + Δθ`` for each of the module's own parameters (weight, bias, LayerNorm scale …); the
forward runs the module with ``θ + Δθ`` through ``torch.func.functional_call``, so it works for any
module type and the base tensors stay untouched.  A full fine-tuned checkpoint is this part on
every module (``checkpoint − base``).

An ``nn.Embedding`` (without ``max_norm``) looks its ids up in ``W`` and in ``ΔW`` and adds the rows, never
forming the ``vocab × dim`` sum.  On ``nn.Linear`` and GPT-2 ``Conv1D`` the weight goes through
:class:`_DenseLinearFunction`, which forms ``W + ΔW`` transiently in the forward and again in the backward
instead of keeping the sum alive for the backward (autograd through ``W + ΔW`` would save that copy for every
module until its backward runs); a weight above :data:`DENSE_BLOCK` entries (an LM head) forms it in blocks of
output features, one at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from deltatune.errors import DeltaFormatError, ShapeMismatch
from deltatune.parts.base import Part, write_in_place
from deltatune.parts.layers import LayerKind, functional_forward, input_grad, layer_kind, scaled_lookup, weight_grad
from deltatune.parts.meta_checks import check_keys, check_shape, check_state, short
from deltatune.parts.spill import TensorSpill


def _key(name: str) -> str:
    return name.replace(".", "__")


#: a Linear/Conv1D weight of more entries than this (a large LM head: vocab × hidden) forms ``W + ΔW`` in blocks
#: of output features of about this many entries, so the transient sum is never a whole copy of the weight.
#: 2²⁴ entries (64 MiB in fp32): on CPU, blocks under glibc's 32 MiB mmap ceiling would raise its dynamic mmap
#: threshold and keep freed activations in the heap (measured: +45 to +100 MB peak RSS on the ~50M Llama with
#: 2²² blocks), so smaller heads (that one's 32000 × 512) keep the one transient sum
DENSE_BLOCK = 1 << 24


def _out_dim(weight: Tensor, kind: LayerKind) -> int:
    return weight.shape[0] if kind is LayerKind.LINEAR else weight.shape[1]


def _in_blocks(x: Tensor, weight: Tensor) -> bool:
    """Whether to go block by block (a large weight, outside autocast, the input in the weight's dtype)."""
    return weight.numel() > DENSE_BLOCK and x.dtype == weight.dtype and not torch.is_autocast_enabled(x.device.type)


def _weight_blocks(weight: Tensor, delta: Tensor, kind: LayerKind) -> Iterator[tuple[slice, Tensor]]:
    """``(output features, (W + ΔW) restricted to them)`` block by block, in the native layout: rows of a Linear
    weight ``(out, in)``, columns of a Conv1D weight ``(in, out)``."""
    n_out = _out_dim(weight, kind)
    step = max(1, DENSE_BLOCK // (weight.numel() // n_out))
    for start in range(0, n_out, step):
        cols = slice(start, min(start + step, n_out))
        if kind is LayerKind.LINEAR:
            yield cols, weight[cols] + delta[cols].to(weight.dtype)
        else:
            yield cols, weight[:, cols] + delta[:, cols].to(weight.dtype)


class _DenseLinearFunction(torch.autograd.Function):
    """``y = x·(W + ΔW)ᵀ + b`` (Linear; ``x·(W + ΔW) + b`` for Conv1D) saving ``x``, ``W`` and ``ΔW`` by reference.

    Backward: ``∂L/∂x = g·(W + ΔW)`` (the sum rebuilt, transient), ``∂L/∂ΔW = ∂L/∂W = gᵀx`` (Linear; ``xᵀg``
    for Conv1D), ``∂L/∂b = Σ_tokens g``.  The same gradients as autograd through the sum; only the copy that
    autograd would save per module is gone.  Gradients are computed in the weight's dtype (as under autocast
    the output gradient may be lower precision) and returned in each input's dtype."""

    @staticmethod
    def forward(ctx, x: Tensor, delta: Tensor, weight: Tensor, bias: Tensor | None, kind: LayerKind) -> Tensor:
        ctx.save_for_backward(x, delta, weight)
        ctx.kind, ctx.bias_dtype = kind, None if bias is None else bias.dtype
        if _in_blocks(x, weight):
            x2 = x.reshape(-1, x.shape[-1])
            out = torch.empty(x2.shape[0], _out_dim(weight, kind), dtype=weight.dtype, device=x.device)
            for cols, block in _weight_blocks(weight, delta, kind):
                torch.mm(x2, block.t() if kind is LayerKind.LINEAR else block, out=out[:, cols])
            if bias is not None:
                out.add_(bias)
            return out.reshape(*x.shape[:-1], out.shape[-1])
        w = weight + delta.to(weight.dtype)
        if kind is LayerKind.LINEAR:
            return torch.nn.functional.linear(x, w, bias)
        out = x.reshape(-1, x.shape[-1]) @ w
        out = out if bias is None else out + bias
        return out.reshape(*x.shape[:-1], w.shape[1])

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, delta, weight = ctx.saved_tensors
        g = grad_out.to(weight.dtype)
        grad_x = grad_delta = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0] and _in_blocks(x, weight):
            g2 = g.reshape(-1, g.shape[-1])
            grad_x = torch.zeros(g2.shape[0], x.shape[-1], dtype=weight.dtype, device=g.device)
            for cols, block in _weight_blocks(weight, delta, ctx.kind):
                grad_x.addmm_(g2[:, cols], block if ctx.kind is LayerKind.LINEAR else block.t())
            grad_x = grad_x.reshape(*x.shape[:-1], x.shape[-1]).to(x.dtype)
        elif ctx.needs_input_grad[0]:
            grad_x = input_grad(ctx.kind, g, weight + delta.to(weight.dtype)).to(x.dtype)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            grad_w = weight_grad(ctx.kind, x, g, weight.shape)
            grad_delta = grad_w.to(delta.dtype) if ctx.needs_input_grad[1] else None
            grad_weight = grad_w if ctx.needs_input_grad[2] else None
        if ctx.needs_input_grad[3]:
            grad_bias = g.reshape(-1, g.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_x, grad_delta, grad_weight, grad_bias, None


class DensePart(Part):
    """One trainable zero-initialised tensor per direct parameter of the wrapped module."""

    kind = "dense"
    additive, base_dependent, mixed_rows, has_aux_loss = True, False, True, False

    def __init__(self, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self._spill: TensorSpill | None = None  # θ₀ on disk while θ trains in the base's storage (bind)
        self._handles: dict[str, int] = {}  # parameter → its θ₀ in the spill
        self._bound_to: list[nn.Module] = []  # a list keeps the base module out of this module's children
        self.shapes = {k: tuple(int(s) for s in v) for k, v in shapes.items()}
        self.deltas = nn.ParameterDict(
            {_key(k): nn.Parameter(torch.zeros(v, dtype=dtype, device=device)) for k, v in self.shapes.items()}
        )

    @classmethod
    def for_module(cls, module: nn.Module, dtype: torch.dtype | None = None,
                   names: list[str] | None = None) -> DensePart:
        params = {k: p for k, p in module.named_parameters(recurse=False) if names is None or k in names}
        ref = next(iter(params.values()))
        return cls({k: tuple(p.shape) for k, p in params.items()}, dtype=dtype or ref.dtype, device=ref.device)

    def _tensor(self, name: str) -> nn.Parameter:
        """The trained tensor of parameter ``name``: ``Δθ``, or ``θ`` itself while bound."""
        return self.deltas[_key(name)]

    def delta_for(self, name: str) -> Tensor:
        """``Δθ_name``: the trained tensor, or while bound ``θ − θ₀`` (a fresh, detached tensor)."""
        if self._spill is None:
            return self._tensor(name)
        return self._tensor(name).detach() - self._spill.get(self._handles[name])

    # --- θ trained in the base's own storage -------------------------------------------------
    @property
    def bound(self) -> bool:
        return self._spill is not None

    def bind(self, base: nn.Module, spill: TensorSpill) -> bool:
        """Train ``θ = θ₀ + Δθ`` in ``base``'s own parameter storage instead of in a tensor of its own.

        ``θ₀`` goes to ``spill`` (a temporary file, :class:`TensorSpill`, closed by the caller after unbinding), so a
        dense delta trains with no second copy of the module (full fine-tuning's memory and time); ``Δθ = θ − θ₀`` is
        computed whenever it is read (``state``, ``updates``), and :meth:`unbind` gives the base its ``θ₀`` back with
        ``Δθ`` in the part's own storage.
        While bound, ``base`` computes with ``θ``: it is no longer the base for anything else (training only).
        Refused (``False``) when the part is bound already, the base is an embedding with ``max_norm`` (its lookup
        would renormalise ``θ``'s rows in place), its dtype or device differs from the base's, or the base is in half
        precision: an update below a bf16/fp16 ``θ``'s rounding step would be lost in place, while a
        separate ``Δθ`` (small, so finely resolved) keeps it."""
        own = dict(base.named_parameters(recurse=False))
        if getattr(base, "max_norm", None) is not None:  # an embedding lookup that renormalises θ's rows in place
            return False
        if self.bound or any(k not in own or own[k].dtype != self._tensor(k).dtype
                             or own[k].dtype not in (torch.float32, torch.float64)
                             or own[k].device != self._tensor(k).device for k in self.shapes):
            return False
        with torch.no_grad():
            for k in self.shapes:
                self._handles[k] = spill.put(own[k])
                own[k].add_(self._tensor(k))  # θ = θ₀ + Δθ (Δθ is zero on a fresh part)
                self._tensor(k).data = own[k].data
        self._spill, self._bound_to = spill, [base]
        return True

    def unbind(self) -> None:
        """Give the base module its ``θ₀`` back (from the spill) and keep ``Δθ = θ − θ₀`` in the part's storage."""
        if self._spill is None:
            return
        own = dict(self._bound_to[0].named_parameters(recurse=False))
        with torch.no_grad():
            for k in self.shapes:
                theta0 = self._spill.get(self._handles[k])
                self._tensor(k).data.sub_(theta0)  # the storage the base shared now holds Δθ
                own[k].data = theta0
        self._spill, self._handles, self._bound_to = None, {}, []

    def trained_from(self, tensor: Tensor, trained: Tensor, base: nn.Module, bound_then: bool) -> Tensor:
        """A checkpoint's tensor of ``trained`` as the part holds it now: ``θ₀ + Δθ`` when bound now and a ``Δθ``
        then (a checkpoint written before in-place training, or by a launch that could not bind), ``θ − θ₀`` (``θ₀``
        the base module's own parameter) when not bound now and ``θ`` then."""
        if self.bound == bound_then:
            return tensor
        key = next(k for k in self.shapes if self._tensor(k) is trained)
        if self.bound:
            return self._spill.get(self._handles[key]) + tensor  # type: ignore[union-attr]
        return tensor - dict(base.named_parameters(recurse=False))[key].detach()

    def forward_shared(self, base: nn.Module, kind: LayerKind, x: Tensor) -> Tensor:
        if self._spill is None:
            return super().forward_shared(base, kind, x)
        return functional_forward(base, kind, x, self._tensor("weight"))

    def forward(self, x: Tensor, base: nn.Module) -> Tensor:
        if self._spill is not None:
            return self.forward_args(base, x)
        kind = layer_kind(base)
        if kind in (LayerKind.LINEAR, LayerKind.CONV1D) and "weight" in self.shapes and set(self.shapes) <= {
                "weight", "bias"}:
            bias = base.bias
            if bias is not None and "bias" in self.shapes:
                bias = bias + self.delta_for("bias").to(bias.dtype)
            return _DenseLinearFunction.apply(x, self.delta_for("weight"), base.weight, bias, kind)
        if kind is LayerKind.EMBEDDING and set(self.shapes) == {"weight"} and base.max_norm is None:
            # (W + ΔW)[ids] = W[ids] + ΔW[ids] element for element (one rounding either way), without forming
            # the vocab × dim sum; the gradient reaches ΔW through its own lookup, as it did through the sum
            w = base.weight
            args = (base.padding_idx, None, base.norm_type, base.scale_grad_by_freq, base.sparse)
            return scaled_lookup(F.embedding(x, w, *args) + F.embedding(x, self.delta_for("weight").to(w.dtype), *args),
                                 base)
        return self.forward_args(base, x)

    def forward_args(self, base: nn.Module, *args: object, **kwargs: object) -> Tensor:
        """The module's own forward (any signature) with ``θ + Δθ`` (while bound: with the trained ``θ``)."""
        if self._spill is not None:
            return functional_call(base, {k: self._tensor(k) for k in self.shapes}, args, kwargs)
        own = dict(base.named_parameters(recurse=False))
        replaced = {k: own[k] + self.delta_for(k).to(own[k].dtype) for k in self.shapes}
        return functional_call(base, replaced, args, kwargs)

    def delta_weight(self) -> Tensor:
        return self.delta_for("weight").float()

    # --- algebra ---------------------------------------------------------------------------
    def updates(self, base: nn.Module | None = None) -> dict[str, Tensor]:
        """``{parameter: Δθ}`` for every parameter the part holds: the part's own tensors (not copies)."""
        return {k: self.delta_for(k) for k in self.shapes}

    def forward_updates(self, base: nn.Module) -> dict[str, Tensor]:
        """While bound, ``θ − θ.detach()``: ``base``'s parameters hold the trained ``θ`` already (in the same storage),
        so the term adds zero and carries only ``θ``'s gradient."""
        if self._spill is None:
            return self.updates(base)
        return {k: self._tensor(k) - self._tensor(k).detach() for k in self.shapes}

    def update(self, name: str, base: nn.Module | None = None) -> Tensor:
        return self.delta_for(name)

    def update_shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self.shapes)

    def values_view(self, product: bool = False) -> dict[str, Tensor]:
        """``{parameter: Δθ}`` (detached; the same with or without ``product``)."""
        return {p: self.delta_for(p).detach() for p in self.shapes}

    def with_values(self, values: dict[str, Tensor], product: bool = False, where: str = "dense") -> Part:
        """A dense part holding ``values`` (their common dtype, fp32 when they differ)."""
        dtypes = {values[p].dtype for p in self.shapes}
        with torch.no_grad():
            out = DensePart(self.shapes, dtype=dtypes.pop() if len(dtypes) == 1 else torch.float32)
            out.load_tensors({p: values[p] for p in self.shapes}, where)
        return out

    def merge_into(self, base: nn.Module) -> None:
        self._add(base, 1.0)

    def unmerge_from(self, base: nn.Module) -> None:
        self._add(base, -1.0)

    def _add(self, base: nn.Module, sign: float) -> None:
        self.unbind()  # a bound base holds θ: give it θ₀ back first
        own = dict(base.named_parameters(recurse=False))
        with torch.no_grad():
            for k in self.shapes:
                p = own[k]
                write_in_place(p, p.detach().float() + sign * self.delta_for(k).float().to(p.device))

    def state(self) -> dict[str, Tensor]:
        return {k: self.delta_for(k).detach() for k in self.shapes}

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self.shapes)

    def load_tensors(self, state: dict[str, Tensor], where: str) -> None:
        if set(state) != set(self.shapes):
            raise ShapeMismatch(f"{where}: tensors {sorted(state)} but the dense part has {sorted(self.shapes)}")
        with torch.no_grad():
            for k, shape in self.shapes.items():
                if tuple(state[k].shape) != shape:
                    raise ShapeMismatch(f"{where}.{k}: shape {tuple(state[k].shape)}, expected {shape}")
                if self._spill is None:
                    self._tensor(k).copy_(state[k])
                else:  # θ = θ₀ + Δθ
                    self._tensor(k).copy_(self._spill.get(self._handles[k]) + state[k].to(self._tensor(k).dtype))

    def meta(self) -> dict[str, Any]:
        return {"shapes": {k: list(v) for k, v in self.shapes.items()}}

    @classmethod
    def expected_state(cls, meta: Any) -> dict[str, tuple[int, ...]]:
        shapes = check_keys(meta, {"shapes"})["shapes"]
        if not isinstance(shapes, dict) or not shapes:
            raise DeltaFormatError(f"meta field 'shapes' must be a non-empty object, got {short(shapes)}")
        for k in shapes:
            if not k.isidentifier():
                raise DeltaFormatError(f"meta field 'shapes' names {short(k)}, not a parameter name")
        return {k: check_shape(v, f"meta field 'shapes.{k}'") for k, v in shapes.items()}

    @classmethod
    def from_state(cls, state: dict[str, Tensor], meta: dict[str, Any]) -> DensePart:
        shapes = cls.expected_state(meta)
        check_state(state, shapes, cls.kind)
        dtypes = {t.dtype for t in state.values()}
        if len(dtypes) > 1:
            raise ShapeMismatch(f"dense tensors mix dtypes {sorted(map(str, dtypes))}")
        part = cls(shapes, dtype=dtypes.pop())
        part.load_tensors(state, "dense")
        return part

    def check_base(self, base: nn.Module, where: str) -> None:
        own = dict(base.named_parameters(recurse=False))
        for k, shape in self.shapes.items():
            if k not in own or tuple(own[k].shape) != shape:
                got = tuple(own[k].shape) if k in own else "missing"
                raise ShapeMismatch(f"{where}.{k}: dense delta of shape {shape}, base parameter is {got}")
