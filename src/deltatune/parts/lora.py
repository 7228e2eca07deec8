"""Low-rank part: ``ΔW = s · B A`` (LoRA, Hu et al., ICLR 2022; rsLoRA, Kalajdzievski 2023).

``A ∈ R^{r×d_in}``, ``B ∈ R^{d_out×r}``; the forward adds ``s · (dropout(x) Aᵀ) Bᵀ`` to the base
output, so no dense ``ΔW`` is ever formed while training.  For embeddings the input is a token id
and ``xAᵀ`` becomes the lookup ``A[:, ids]ᵀ`` (PEFT's ``lora_embedding_A/B`` convention).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar, Self

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltatune.errors import ShapeMismatch
from deltatune.parts.base import Part, base_layer_kind, promote_dtypes
from deltatune.parts.layers import LayerKind, in_out_features, is_transposed, scaled_lookup, to_native
from deltatune.parts.lowrank_mixed import low_rank_onto
from deltatune.parts.meta_checks import check_keys, check_shape, check_state, meta_int, meta_layer, meta_number
from deltatune.parts.sparse import sparse_from_dense


def lora_scale(alpha: float, rank: int, rslora: bool) -> float:
    """``s = α / r`` (LoRA) or ``s = α / √r`` (rsLoRA)."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def lora_delta(a: Tensor, b: Tensor, scale: float) -> Tensor:
    """``ΔW = s · B A`` in the ``(out, in)`` convention, computed in fp32."""
    return scale * (b.float() @ a.float())


def lora_hidden(x: Tensor, a: Tensor, kind: LayerKind, base: nn.Module | None = None) -> Tensor:
    """``h = x Aᵀ``, or for embedding ids ``A[:, ids]ᵀ`` looked up as the ``base`` embedding looks up its rows (its
    ``padding_idx`` gets no gradient, ``scale_grad_by_freq``) and times its ``embed_scale`` (:func:`scaled_lookup`:
    Gemma, BART), as PEFT's LoRA embedding does."""
    if kind is LayerKind.EMBEDDING:
        if base is None:
            return F.embedding(x, a.t())
        h = F.embedding(x, a.t(), padding_idx=base.padding_idx, scale_grad_by_freq=base.scale_grad_by_freq)
        return scaled_lookup(h, base)
    return F.linear(x.to(a.dtype), a)


def init_lora_factors(a: Tensor, b: Tensor, layer: LayerKind, init: str) -> None:
    """PEFT's LoRA initialisation, in place: ``A`` kaiming-uniform(a=√5) (or N(0, 1/r²) for ``gaussian``), ``B = 0``;
    embeddings use ``A = 0, B ~ N(0, 1)``.  ``ΔW = B A = 0`` either way."""
    with torch.no_grad():
        if layer is LayerKind.EMBEDDING:
            nn.init.zeros_(a)
            nn.init.normal_(b)
        elif init == "gaussian":
            nn.init.normal_(a, std=1.0 / a.shape[0])
            nn.init.zeros_(b)
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.zeros_(b)


class LowRankFactors(Part):
    """The factors ``A`` ``(r, in)`` and ``B`` ``(out, r)`` with scale ``s``, dropout on the branch input and PEFT's
    initialisation (:func:`init_lora_factors`): what LoRA and DoRA hold in common.  No ``kind``: each subclass is a
    kind of its own (a DoRA part is never a LoRA part)."""

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
        """``empty``: leave ``A`` and ``B`` uninitialised (a loader that fills them at once skips the init)."""
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.scale, self.layer, self.init = float(scale), LayerKind(layer), init
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.dropout_p = dropout
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.empty(out_features, rank, dtype=dtype, device=device))
        if not empty:
            init_lora_factors(self.lora_A, self.lora_B, self.layer, self.init)

    def reset_parameters(self) -> None:
        """PEFT's defaults (:func:`init_lora_factors`)."""
        init_lora_factors(self.lora_A, self.lora_B, self.layer, self.init)

    # --- one batched pass for the family (deltatune.parts.lowrank_mixed) -------------------
    #: Whether :meth:`output_gain` is not 1 (DoRA): the batched pass then rescales the base output of its rows.
    has_gain: ClassVar[bool] = False
    #: The kind's name in messages.
    label: ClassVar[str] = "low-rank"

    def row_factors(self, base: nn.Module) -> tuple[Tensor, Tensor]:
        """``(A, B')``: this part's low-rank term on a row is ``(x Aᵀ) B'ᵀ``, added after :meth:`output_gain`;
        ``B' = s·B`` here."""
        return self.lora_A, self.lora_B * self.scale

    def output_gain(self, base: nn.Module) -> Tensor | None:
        """``g`` (``(out,)``): the row's output is ``g ⊙ (base(x) − b) + b + (x Aᵀ) B'ᵀ``; ``None``: ``g = 1``."""
        return None

    def batches_in_family(self) -> bool:
        """Whether the part can join the family's batched pass (else every part of the pass runs its own forward):
        not under active dropout on its branch input (not on an embedding, which looks up ids), which the batched
        pass does not apply — a routed training row then trains as a plain forward does."""
        dropping = self.training and self.dropout_p > 0 and self.layer is not LayerKind.EMBEDDING
        return not dropping

    # --- serialisation (shared by LoRA and DoRA; DoRA adds its magnitude) ------------------
    def meta(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "rank": self.rank,
            "scale": self.scale,
            "layer": str(self.layer),
            "dropout": self.dropout_p,
        }

    @classmethod
    def expected_state(cls, meta: Any) -> dict[str, tuple[int, ...]]:
        """The factors' shapes from ``meta`` (checked: its keys, integers, scale, layer and dropout)."""
        meta = check_keys(meta, {"in_features", "out_features", "rank", "scale", "layer"}, {"dropout"})
        d_in, d_out, rank = meta_int(meta, "in_features"), meta_int(meta, "out_features"), meta_int(meta, "rank")
        meta_number(meta, "scale")
        meta_layer(meta)
        if "dropout" in meta:
            meta_number(meta, "dropout", 0.0, 0.999)
        check_shape([rank, d_in], "lora_A"), check_shape([d_out, rank], "lora_B")
        return {"lora_A": (rank, d_in), "lora_B": (d_out, rank)}

    @classmethod
    def from_state(cls, state: dict[str, Tensor], meta: dict[str, Any]) -> Self:
        check_state(state, cls.expected_state(meta), cls.kind)
        part = cls(
            meta["in_features"], meta["out_features"], meta["rank"], meta["scale"],
            layer=LayerKind(meta["layer"]), dropout=float(meta.get("dropout", 0.0)),
            dtype=state["lora_A"].dtype, empty=True,
        )
        part.load_tensors(state, cls.kind)
        return part

    def check_base(self, base: nn.Module, where: str) -> None:
        kind = base_layer_kind(base, where)
        if kind is not self.layer or in_out_features(base) != (self.in_features, self.out_features):
            raise ShapeMismatch(
                f"{where}: {self.label} part for a {self.layer} {self.in_features}→{self.out_features} but the base "
                f"module is a {kind} {in_out_features(base)[0]}→{in_out_features(base)[1]}"
            )


class LoRAPart(LowRankFactors):
    """Trainable ``A`` (kaiming-uniform or gaussian) and ``B`` (zeros), so ``ΔW = 0`` at start."""

    kind, label = "lora", "LoRA"
    additive, base_dependent, mixed_rows, has_aux_loss = True, False, True, False

    def forward(self, x: Tensor, base: nn.Module) -> Tensor:
        out = base(x)
        inp = x if self.layer is LayerKind.EMBEDDING else self.dropout(x)
        h = lora_hidden(inp, self.lora_A, self.layer, base)
        return out + (F.linear(h, self.lora_B) * self.scale).to(out.dtype)

    def delta_weight(self) -> Tensor:
        return to_native(lora_delta(self.lora_A, self.lora_B, self.scale), self.layer)

    # --- algebra ---------------------------------------------------------------------------
    def updates(self, base: nn.Module | None = None) -> dict[str, Tensor]:
        """``{"weight": s · B A}`` in the native layout, fp32 (the base is not needed)."""
        return {"weight": self.delta_weight()}

    def update_shapes(self) -> dict[str, tuple[int, ...]]:
        out_in = (self.out_features, self.in_features)
        return {"weight": out_in[::-1] if is_transposed(self.layer) else out_in}

    def layer_kind(self) -> LayerKind | None:
        return self.layer

    def factors(self) -> tuple[Tensor, Tensor, float] | None:
        """``(A, B, s)``: ``ΔW = s · B A``."""
        return self.lora_A, self.lora_B, self.scale

    def values_view(self, product: bool = False) -> dict[str, Tensor]:
        """``{"lora_A": A, "lora_B": B}``, or with ``product`` ``{"": s · B A}`` (native layout, fp32)."""
        if product:
            return {"": to_native(lora_delta(self.lora_A.detach(), self.lora_B.detach(), self.scale), self.layer)}
        return {"lora_A": self.lora_A.detach(), "lora_B": self.lora_B.detach()}

    def value_names(self, product: bool = False) -> tuple[str, ...]:
        return ("",) if product else ("lora_A", "lora_B")

    def with_values(self, values: dict[str, Tensor], product: bool = False, where: str = "lora") -> Part:
        """Same geometry with new factors; with ``product``, a :class:`SparsePart` of the non-zero entries of
        the (compressed) ``ΔW``."""
        if product:
            return sparse_from_dense(values[""], self.layer)
        a, b = values["lora_A"], values["lora_B"]
        with torch.no_grad():
            out = LoRAPart(self.in_features, self.out_features, self.rank, self.scale, layer=self.layer,
                           dropout=self.dropout_p, dtype=a.dtype)
            out.load_tensors({"lora_A": a, "lora_B": b.to(a.dtype)}, where)
        return out

    def sum_same_class(self, parts: Sequence[Part], where: str) -> Part | None:
        """Ranks concatenated (:func:`sum_lora`, exact)."""
        return sum_lora(parts, where)  # type: ignore[arg-type]

    @classmethod
    def mixed_forward(
        cls, x: Tensor, base: nn.Module, parts: Sequence[Part | None], row_ids: Tensor,
        cache: dict[Any, Any] | None = None,
    ) -> Tensor:
        """One pass over a batch whose rows (or tokens) use different LoRAs: the base output once, then
        :meth:`mixed_onto`."""
        return cls.mixed_onto(x, base(x), base, parts, row_ids, cache)

    @classmethod
    def mixed_onto(
        cls, x: Tensor, out: Tensor, base: nn.Module, parts: Sequence[Part | None], row_ids: Tensor,
        cache: dict[Any, Any] | None = None,
    ) -> Tensor:
        """``out`` (the base module's output on the whole batch) with row ``i`` (or token) given
        ``+ s_a (x_i A_aᵀ) B_aᵀ`` for its LoRA ``a = parts[row_ids[i]]`` — or, for a DoRA row (this family's other
        member), DoRA's gain and term; rows of ``None`` are returned unchanged (:func:`low_rank_onto`)."""
        return low_rank_onto(x, out, base, parts, row_ids, cache)


def sum_lora(parts: Sequence[LowRankFactors], where: str) -> LoRAPart:
    """``Σ_t s_t B_t A_t = B A`` (LoRA parts, or the low-rank terms of DSEE parts; not DoRA's, which a magnitude
    rescales) with ``A = [A_1; …; A_n]`` (ranks stacked) and ``B = [s_1 B_1 | … | s_n B_n]``,
    scale 1 — exact, rank ``Σ r_t``.  When every scale is the same ``s``, ``B = [B_1 | … | B_n]`` keeps ``s``.  With
    different scales a half-precision input sums in fp32 (``s_t B_t`` rounded back to bf16 would not be exact)."""
    ref = parts[0]
    for p in parts[1:]:
        if (p.layer, p.in_features, p.out_features) != (ref.layer, ref.in_features, ref.out_features):
            raise ShapeMismatch(f"{where}: LoRA parts for a {ref.layer} {ref.in_features}→{ref.out_features} and a "
                                f"{p.layer} {p.in_features}→{p.out_features} cannot be summed")
    dtype = promote_dtypes([t for p in parts for t in (p.lora_A, p.lora_B)])
    same_scale = all(p.scale == ref.scale for p in parts)
    if not same_scale and dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32
    a = torch.cat([p.lora_A.detach().to(dtype) for p in parts], dim=0)
    if same_scale:
        b = torch.cat([p.lora_B.detach().to(dtype) for p in parts], dim=1)
        scale = ref.scale
    else:
        b = torch.cat([(p.lora_B.detach().float() * p.scale).to(dtype) for p in parts], dim=1)
        scale = 1.0
    dropout = ref.dropout_p if all(p.dropout_p == ref.dropout_p for p in parts) else 0.0
    out = LoRAPart(ref.in_features, ref.out_features, a.shape[0], scale, layer=ref.layer, dropout=dropout,
                   dtype=dtype, device=a.device)
    with torch.no_grad():
        out.lora_A.copy_(a)
        out.lora_B.copy_(b)
    return out
