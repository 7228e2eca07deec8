"""Weight-decomposed low-rank part (DoRA, Liu et al., ICML 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation").

The adapted weight keeps a learned *magnitude* ``m ∈ R^{d_out}`` and a low-rank *direction* (Eq. 5):

    W' = m ⊙ (W + s·B A) / ‖W + s·B A‖_c

in the ``(out, in)`` convention of :mod:`deltatune.parts.layers`, where ``‖·‖_c`` is the L2 norm of each output
channel (row), ``A ∈ R^{r×d_in}``, ``B ∈ R^{d_out×r}`` and ``s`` the LoRA scale.  ``m`` starts at ``‖W + s·BA‖_c``
(``= ‖W‖_c``, since ``B A = 0`` at initialisation), so ``W' = W`` at start.  As the paper's §4.3 (and PEFT) do,
the norm is a constant for the gradient (detached).  The update is base-dependent:
``ΔW = W' − W = (m/n − 1) ⊙ W + (m/n) ⊙ s·BA`` with ``n = ‖W + s·BA‖_c``.

Layouts follow PEFT 0.21 (``peft/tuners/lora/dora.py``): Linear weights are ``(out, in)``; GPT-2 ``Conv1D``
(``fan_in_fan_out``) and ``nn.Embedding`` store ``(in, out)`` and are transposed first, so for an embedding the
norm runs over the vocabulary for each embedding dimension and ``m`` has ``embedding_dim`` entries.

The forward never forms ``W'`` (PEFT's formulation): with ``g = m / n``,

* Linear / Conv1D: ``y = base(x) + (g − 1) ⊙ (x Wᵀ) + g ⊙ s·(x Aᵀ) Bᵀ`` — the base output *without its bias* is
  rescaled, the bias is not; under active dropout ``x Wᵀ`` is recomputed on the dropped-out input;
* Embedding: ``y = g ⊙ W[ids] + g ⊙ s·A[:, ids]ᵀ Bᵀ``.

A DoRA part is never a plain LoRA: it has no factored form (:meth:`DoRAPart.factors` is ``None``), no exact sum
with other DoRA parts (the algebra sums the dense updates, given the base), and its update needs the base weight.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltatune.errors import ConfigError, NotMergeable, ShapeMismatch
from deltatune.parts.base import Part, write_in_place
from deltatune.parts.layers import LayerKind, is_transposed, to_native
from deltatune.parts.lora import LoRAPart, LowRankFactors, lora_delta, lora_hidden
from deltatune.parts.meta_checks import meta_int


# --------------------------------------------------------------------------------------------------
# pure math
# --------------------------------------------------------------------------------------------------
def out_in_weight(weight: Tensor, layer: LayerKind) -> Tensor:
    """The base weight in the ``(out, in)`` convention (a view: Conv1D/Embedding weights are transposed)."""
    return weight.t() if is_transposed(layer) else weight


def dora_norm(weight_out_in: Tensor, a: Tensor, b: Tensor, scale: float) -> Tensor:
    """``n = ‖W + s·B A‖_c``: the L2 norm of each output channel (row) of the adapted direction, fp32, detached
    (DoRA §4.3 treats it as a constant; PEFT's ``get_weight_norm``)."""
    with torch.no_grad():
        v = weight_out_in.detach().float() + lora_delta(a.detach(), b.detach(), scale)
        return torch.linalg.vector_norm(v, ord=2, dim=1)


def dora_weight(weight_out_in: Tensor, a: Tensor, b: Tensor, scale: float, magnitude: Tensor) -> Tensor:
    """``W' = m ⊙ (W + s·B A) / ‖W + s·B A‖_c`` (DoRA Eq. 5), ``(out, in)``, fp32."""
    v = weight_out_in.float() + lora_delta(a, b, scale)
    return (magnitude.float() / dora_norm(weight_out_in, a, b, scale)).unsqueeze(1) * v


def dora_update(weight_out_in: Tensor, a: Tensor, b: Tensor, scale: float, magnitude: Tensor) -> Tensor:
    """``ΔW = W' − W = (g − 1) ⊙ W + g ⊙ s·B A`` with ``g = m / ‖W + s·B A‖_c`` (``(out, in)``, fp32); written
    this way so that a part at its initial state (``g = 1``, ``BA = 0``) gives exactly zero."""
    g = (magnitude.float() / dora_norm(weight_out_in, a, b, scale)).unsqueeze(1)
    return (g - 1.0) * weight_out_in.float() + g * lora_delta(a, b, scale)


def unmerge_dora(merged_out_in: Tensor, a: Tensor, b: Tensor, scale: float, magnitude: Tensor,
                 norm: Tensor) -> Tensor:
    """``W = W' / g − s·B A`` with ``g = m / n`` and ``n`` the norm recorded when ``W'`` was merged (the norm of
    the *unmerged* weight, which ``W'`` alone does not determine: ``‖W'‖_c = |m|`` whatever ``n`` was)."""
    g = (magnitude.float() / norm.float()).unsqueeze(1)
    return merged_out_in.float() / g - lora_delta(a, b, scale)


# --------------------------------------------------------------------------------------------------
# the part
# --------------------------------------------------------------------------------------------------
def column_scale(part: DoRAPart, weight_out_in: Tensor) -> Tensor:
    """DoRA's per-output-column factor ``g = m / ‖W + s·BA‖_c`` (so the layer computes ``g ⊙ (W + s·BA) x``)."""
    return part.magnitude / dora_norm(weight_out_in, part.lora_A, part.lora_B, part.scale).to(part.magnitude.dtype)


class DoRAPart(LowRankFactors):
    """Trainable ``A`` (kaiming-uniform or gaussian), ``B`` (zeros) and magnitude ``m`` (``‖W‖_c`` from the base,
    :meth:`init_from_base`); embeddings use ``A = 0, B ~ N(0, 1)`` as in PEFT."""

    kind, label = "dora", "DoRA"
    additive, base_dependent, mixed_rows, has_aux_loss = True, True, True, False
    mixed_family, has_gain = LoRAPart, True  # DoRA rows join the LoRA rows' batched pass (a gain + a term)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        scale: float,
        layer: LayerKind = LayerKind.LINEAR,
        dropout: float = 0.0,
        init: str = "kaiming",
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        empty: bool = False,
    ) -> None:
        super().__init__(in_features, out_features, rank, scale, layer, dropout, init, dtype, device, empty)
        self.magnitude = nn.Parameter(torch.ones(out_features, dtype=dtype, device=device))
        # norms recorded by merge_into, per base module (a stack: merges of one part may be stacked)
        self._merged_norms: weakref.WeakKeyDictionary[nn.Module, list[Tensor]] = weakref.WeakKeyDictionary()

    def __getstate__(self) -> dict[str, Any]:
        """Pickle / deepcopy without the merge records (weak references to modules of this process)."""
        state = self.__dict__.copy()
        state.pop("_merged_norms", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._merged_norms = weakref.WeakKeyDictionary()

    def init_from_base(self, base: nn.Module) -> None:
        """``m ← ‖W + s·B A‖_c`` (PEFT's ``DoraLinearLayer.update_layer``), so that ``W' = W``."""
        with torch.no_grad():
            self.magnitude.copy_(dora_norm(self._weight(base), self.lora_A, self.lora_B, self.scale))

    def _weight(self, base: Any) -> Tensor:
        """The base weight, ``(out, in)``; ``base`` is the module (anything with a ``weight``)."""
        weight = getattr(base, "weight", None)
        if not isinstance(weight, Tensor):
            raise NotMergeable(
                f"a dora part's update ΔW = m ⊙ (W + s·BA)/‖W + s·BA‖_c − W depends on the base weight W, and no "
                f"base module was given (got {type(base).__name__}); pass the base module, or merge the delta into "
                "its base model", kind=self.kind)
        expected = tuple(self.update_shapes()["weight"])
        if tuple(weight.shape) != expected:
            raise ShapeMismatch(f"dora part for a {self.layer} {self.in_features}→{self.out_features} (weight "
                                f"{list(expected)}) but the base weight has shape {list(weight.shape)}")
        return out_in_weight(weight, self.layer)

    # --- computation -------------------------------------------------------------------
    def forward(self, x: Tensor, base: nn.Module) -> Tensor:
        out = base(x)
        w = self._weight(base)
        g = column_scale(self, w)
        if self.layer is LayerKind.EMBEDDING:
            lora = F.linear(lora_hidden(x, self.lora_A, self.layer, base), self.lora_B) * self.scale
            return (g * out + g * lora).to(out.dtype)
        dropped = self.training and not isinstance(self.dropout, nn.Identity)
        inp = self.dropout(x) if dropped else x
        lora = F.linear(lora_hidden(inp, self.lora_A, self.layer), self.lora_B) * self.scale
        if dropped:  # the rescaled base term sees the same dropped-out input as the LoRA term (PEFT)
            plain = F.linear(inp.to(w.dtype), w)
        else:
            bias = getattr(base, "bias", None)
            plain = out - bias if bias is not None else out
        return out + ((g - 1) * plain + g * lora).to(out.dtype)

    def delta_weight(self) -> Tensor:
        """None without the base: ``NotImplementedError`` (the protocol's "no base-free dense update")."""
        raise NotImplementedError(f"a {self.kind} part's ΔW depends on the base weight W: use updates(base)")

    # --- the low-rank family's batched pass (deltatune.parts.lowrank_mixed) ------------------
    def row_factors(self, base: nn.Module) -> tuple[Tensor, Tensor]:
        """``(A, s·(g ⊙ B))``: DoRA's term ``g ⊙ s·(x Aᵀ) Bᵀ`` with the gain folded into ``B``'s rows."""
        return self.lora_A, (self.lora_B * self.scale) * column_scale(self, self._weight(base)).unsqueeze(1)

    def output_gain(self, base: nn.Module) -> Tensor:
        """``g = m / ‖W + s·BA‖_c`` on the base output without its bias."""
        return column_scale(self, self._weight(base))

    def batches_in_family(self) -> bool:
        """Not on an embedding (the gain scales ``W[ids]``, there is no bias-free output to rescale apart) nor
        under active dropout (the rescaled base term must see the dropped-out input): there :meth:`forward` runs."""
        return self.layer is not LayerKind.EMBEDDING and super().batches_in_family()

    # --- algebra ---------------------------------------------------------------------------
    def updates(self, base: nn.Module | None = None) -> dict[str, Tensor]:
        """``{"weight": W' − W}`` in the native layout, fp32 (:func:`dora_update`); ``base`` is required
        (:class:`NotMergeable` without it)."""
        w = self._weight(base)
        return {"weight": to_native(dora_update(w, self.lora_A, self.lora_B, self.scale, self.magnitude), self.layer)}

    def update_shapes(self) -> dict[str, tuple[int, ...]]:
        out_in = (self.out_features, self.in_features)
        return {"weight": out_in[::-1] if is_transposed(self.layer) else out_in}

    def layer_kind(self) -> LayerKind | None:
        return self.layer

    def values_view(self, product: bool = False) -> dict[str, Tensor]:
        """``{"lora_A": A, "lora_B": B}``: compression acts on the direction's factors.  ``m`` is an absolute
        per-channel scale (``≈ ‖W‖_c``), not a difference, so dropping or rescaling its entries would wipe out
        whole channels: it is kept exactly.  ``product`` (a dense ``ΔW``) needs the base weight:
        :class:`ConfigError`."""
        self._refuse_product(product)
        return {"lora_A": self.lora_A.detach(), "lora_B": self.lora_B.detach()}

    def value_names(self, product: bool = False) -> tuple[str, ...]:
        self._refuse_product(product)
        return ("lora_A", "lora_B")

    def _refuse_product(self, product: bool) -> None:
        if product:
            raise ConfigError(f"a {self.kind} part's dense update ΔW = m ⊙ (W + s·BA)/‖W + s·BA‖_c − W depends on "
                              "the base weight W, which compression does not have: compress its factors "
                              "(target 'factors' or 'auto'), or merge the delta into its base first")

    def with_values(self, values: dict[str, Tensor], product: bool = False, where: str = "dora") -> Part:
        """Same geometry with new (compressed) factors, in their dtype, and this part's magnitude kept exactly, in
        its own dtype (:meth:`keep_magnitude`: it is not compressed, see :meth:`values_view`)."""
        self._refuse_product(product)
        a, b = values["lora_A"], values["lora_B"]
        with torch.no_grad():
            out = DoRAPart(self.in_features, self.out_features, self.rank, self.scale, layer=self.layer,
                           dropout=self.dropout_p, dtype=a.dtype, device=a.device)
            out.load_tensors({"lora_A": a, "lora_B": b.to(a.dtype), "magnitude": self.magnitude.detach()}, where)
        out.keep_magnitude(self.magnitude)
        return out

    def keep_magnitude(self, magnitude: Tensor) -> None:
        """Hold ``m`` exactly as given, in its own dtype, which may differ from the factors' (compressing the
        factors to bf16 must not round ``m ≈ ‖W‖_c``: a relative error there scales whole output channels)."""
        self.magnitude = nn.Parameter(magnitude.detach().clone().to(self.lora_A.device),
                                      requires_grad=self.magnitude.requires_grad)

    def sum_same_class(self, parts: Sequence[Part], where: str) -> Part | None:
        """``None``: a sum of DoRA updates is not a DoRA update (each renormalises ``W`` on its own)."""
        return None

    # --- merging -------------------------------------------------------------------------
    def merge_into(self, base: nn.Module) -> None:
        """``W ← W' = m ⊙ (W + s·BA)/‖W + s·BA‖_c`` in fp32, cast back; records ``‖W + s·BA‖_c`` for
        :meth:`unmerge_from` (PEFT caches it too: the merged weight alone does not determine it)."""
        weight = base.weight
        with torch.no_grad():
            w = self._weight(base)
            norm = dora_norm(w, self.lora_A, self.lora_B, self.scale)
            merged = w.float() + dora_update(w, self.lora_A, self.lora_B, self.scale, self.magnitude)
            self._merged_norms.setdefault(base, []).append(norm)
            write_in_place(weight, to_native(merged, self.layer))

    def unmerge_from(self, base: nn.Module) -> None:
        """``W ← W'/g − s·BA`` with the norm recorded by :meth:`merge_into` on this very module."""
        stack = self._merged_norms.get(base)
        if not stack:
            raise NotMergeable(f"cannot unmerge a {self.kind} part from a {type(base).__name__} it was not merged "
                               "into (in this process): the unmerge needs the weight norm recorded at merge time",
                               kind=self.kind)
        weight = base.weight
        with torch.no_grad():
            norm = stack[-1]
            if bool((self.magnitude == 0).any()):
                raise NotMergeable(f"cannot unmerge a {self.kind} part whose magnitude has zero entries: the merge "
                                   "zeroed those output channels", kind=self.kind)
            w = self._weight(base)
            restored = unmerge_dora(w, self.lora_A, self.lora_B, self.scale, self.magnitude, norm)
            write_in_place(weight, to_native(restored, self.layer))
            stack.pop()

    # --- serialisation -------------------------------------------------------------------
    @classmethod
    def expected_state(cls, meta: Any) -> dict[str, tuple[int, ...]]:
        """The factors' shapes (:meth:`LowRankFactors.expected_state`) and the magnitude's ``(out,)``."""
        return {**super().expected_state(meta), "magnitude": (meta_int(meta, "out_features"),)}

    @classmethod
    def from_state(cls, state: dict[str, Tensor], meta: dict[str, Any]) -> DoRAPart:
        """As :meth:`LowRankFactors.from_state`, with ``m`` kept in its stored dtype (:meth:`keep_magnitude`)."""
        part = super().from_state(state, meta)
        part.keep_magnitude(state["magnitude"])
        return part
