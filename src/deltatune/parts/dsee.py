"""DSEE part: a low-rank update and a sparse one on the same weight, ``ΔW = s · (B A + S)`` with ``S`` non-zero only
on a fixed support ``Ω`` (Chen et al., "DSEE: Dually Sparsity-embedded Efficient Tuning of Pre-trained Language
Models", ACL 2023; arXiv 2111.00160).

``A ∈ R^{r×d_in}``, ``B ∈ R^{d_out×r}`` as in LoRA (PEFT's initialisation, ``B = 0``), ``S`` as trainable ``values``
at sorted flat ``indices`` of the native weight (zeros at start), so ``ΔW = 0`` at init.  The forward runs the
sparse part's autograd function (``W + S`` built transiently, the gradient of ``S`` gathered at ``Ω`` only) and adds
the low-rank branch ``s · (x Aᵀ) Bᵀ``; no dense ``ΔW`` is kept.  Both terms carry ``s = α/r``, as in the
reference's forward and merge (``W += s·(BA + S₂⊙M)``), so ``S`` learns at the same effective rate as ``BA``.  A file
written before ``sparse_scale`` was recorded holds ``ΔW = s · B A + S``: it loads with ``sparse_scale = 1``, unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltatune.errors import DeltaFormatError, ShapeMismatch
from deltatune.parts.base import Part, base_layer_kind
from deltatune.parts.layers import LayerKind, functional_forward, in_out_features, to_native
from deltatune.parts.lora import LowRankFactors, lora_delta, lora_hidden, sum_lora
from deltatune.parts.meta_checks import check_keys, check_shape, check_state, meta_int, meta_layer, meta_number
from deltatune.parts.sparse import (
    SparseDeltaFunction,
    SparsePart,
    check_indices,
    effective_weight,
    index_dtype,
    scatter_delta,
    sparse_from_dense,
    sum_sparse,
)


class DSEEPart(LowRankFactors):
    """``lora_A``, ``lora_B`` (low rank, scale ``s``) and ``values`` at ``indices`` (sparse ``S`` on ``Ω``, scaled by
    ``sparse_scale``, by default ``s``)."""

    kind = "dsee"
    additive, base_dependent, mixed_rows, has_aux_loss = True, False, True, False

    def __init__(self, in_features: int, out_features: int, rank: int, scale: float, weight_shape: tuple[int, ...],
                 indices: Tensor, layer: LayerKind = LayerKind.LINEAR, dropout: float = 0.0, init: str = "kaiming",
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 sparse_scale: float | None = None) -> None:
        super().__init__(in_features, out_features, rank, scale, layer, dropout, init, dtype, device)
        self.sparse_scale = float(scale if sparse_scale is None else sparse_scale)
        self.weight_shape = tuple(int(s) for s in weight_shape)
        if math.prod(self.weight_shape) != in_features * out_features:
            raise ShapeMismatch(f"dsee part: weight {self.weight_shape} is not {out_features}×{in_features}")
        indices = indices.sort().values
        check_indices(indices, math.prod(self.weight_shape), "dsee indices", require_sorted=True)
        self.register_buffer("indices", indices.to(device=self.lora_A.device,
                                                  dtype=index_dtype(math.prod(self.weight_shape))))
        self.values = nn.Parameter(torch.zeros(indices.numel(), dtype=dtype, device=self.lora_A.device))

    def _sparse(self) -> Tensor:
        """The sparse term's entries, ``sparse_scale · values``."""
        return self.values if self.sparse_scale == 1.0 else self.values * self.sparse_scale

    def forward(self, x: Tensor, base: nn.Module) -> Tensor:
        if torch.is_grad_enabled() and self.values.requires_grad:
            out = SparseDeltaFunction.apply(x, self._sparse(), self.indices, base.weight, base, self.layer, None,
                                              False)
        else:
            out = functional_forward(base, self.layer, x, effective_weight(base.weight, self.indices, self._sparse()))
        inp = x if self.layer is LayerKind.EMBEDDING else self.dropout(x)
        h = lora_hidden(inp, self.lora_A, self.layer, base)
        return out + (F.linear(h, self.lora_B) * self.scale).to(out.dtype)

    def delta_weight(self) -> Tensor:
        """``s · B A + sparse_scale · S`` in the native layout, fp32."""
        low = to_native(lora_delta(self.lora_A, self.lora_B, self.scale), self.layer)
        return low + scatter_delta(self.weight_shape, self.indices, self._sparse()).to(low.device)

    # --- algebra ---------------------------------------------------------------------------
    def updates(self, base: nn.Module | None = None) -> dict[str, Tensor]:
        return {"weight": self.delta_weight()}

    def update_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"weight": self.weight_shape}

    def layer_kind(self) -> LayerKind | None:
        return self.layer

    def index_layout(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        return {"values": ("indices", self.weight_shape)}

    def values_view(self, product: bool = False) -> dict[str, Tensor]:
        """``{"lora_A", "lora_B", "values"}``, or with ``product`` ``{"": ΔW}`` (native layout, fp32)."""
        if product:
            return {"": self.delta_weight().detach()}
        return {"lora_A": self.lora_A.detach(), "lora_B": self.lora_B.detach(), "values": self.values.detach()}

    def value_names(self, product: bool = False) -> tuple[str, ...]:
        return ("",) if product else ("lora_A", "lora_B", "values")

    def sum_same_class(self, parts: Sequence[Part], where: str) -> Part | None:
        """``Σ_t (s_t B_t A_t + c_t S_t)`` as one DSEE part, exactly: the low-rank terms with their ranks
        concatenated (:func:`~deltatune.parts.lora.sum_lora`), the sparse terms with their index sets united
        (:func:`~deltatune.parts.sparse.sum_sparse`, each ``c_t`` folded into its values where they differ)."""
        dsee = [p for p in parts if isinstance(p, DSEEPart)]  # all of them: one sum family
        for p in dsee:
            if (p.weight_shape, p.layer) != (self.weight_shape, self.layer):
                raise ShapeMismatch(f"{where}: dsee parts for weights {self.weight_shape} ({self.layer}) and "
                                    f"{p.weight_shape} ({p.layer}) cannot be summed")
        low = sum_lora(dsee, where)
        same = all(p.sparse_scale == self.sparse_scale for p in dsee)
        terms = []
        for p in dsee:
            term = SparsePart(self.weight_shape, p.indices.cpu(), self.layer, dtype=p.values.dtype).to(p.values.device)
            with torch.no_grad():
                term.values.copy_(p.values if same else p.values.float() * p.sparse_scale)
            terms.append(term)
        sparse = sum_sparse(terms, where)
        dtype = low.lora_A.dtype
        out = DSEEPart(self.in_features, self.out_features, low.rank, low.scale, self.weight_shape,
                       sparse.indices.cpu(), self.layer, low.dropout_p, dtype=dtype, device=low.lora_A.device,
                       sparse_scale=self.sparse_scale if same else 1.0)
        with torch.no_grad():
            out.lora_A.copy_(low.lora_A)
            out.lora_B.copy_(low.lora_B)
            out.values.copy_(sparse.values.to(dtype))
        return out

    def values_domain(self, product: bool = False) -> dict[str, int]:
        """The sparse values stand for every entry of the weight (as a sparse part's do); the factors and the
        product for themselves."""
        return {} if product else {"values": math.prod(self.weight_shape)}

    def with_values(self, values: dict[str, Tensor], product: bool = False, where: str = "dsee") -> Part:
        """Same geometry with new tensors; sparse entries that became exactly 0 are dropped from the support (as a
        sparse part drops them, so a sparsifying compression shrinks what is stored); with ``product``, a sparse
        part of the non-zero entries of the (compressed) ``ΔW``."""
        if product:
            return sparse_from_dense(values[""], self.layer)
        a = values["lora_A"]
        sparse = values["values"].reshape(-1)
        keep = (sparse != 0).cpu()
        indices = self.indices.cpu()[keep]
        with torch.no_grad():
            out = DSEEPart(self.in_features, self.out_features, self.rank, self.scale, self.weight_shape,
                           indices, self.layer, self.dropout_p, dtype=a.dtype, sparse_scale=self.sparse_scale)
            out.load_tensors({"lora_A": a, "lora_B": values["lora_B"].to(a.dtype), "indices": indices,
                              "values": sparse[keep.to(sparse.device)].to(a.dtype)}, where)
        return out

    # --- serialisation ---------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "rank": self.rank,
                "scale": self.scale, "layer": str(self.layer), "dropout": self.dropout_p,
                "weight_shape": list(self.weight_shape), "k": int(self.indices.numel()),
                "sparse_scale": self.sparse_scale}

    @classmethod
    def expected_state(cls, meta: Any) -> dict[str, tuple[int, ...]]:
        meta = check_keys(meta, {"in_features", "out_features", "rank", "scale", "layer", "weight_shape", "k"},
                          {"dropout", "sparse_scale"})
        d_in, d_out, rank = meta_int(meta, "in_features"), meta_int(meta, "out_features"), meta_int(meta, "rank")
        meta_number(meta, "scale")
        meta_layer(meta)
        if "dropout" in meta:
            meta_number(meta, "dropout", 0.0, 0.999)
        if "sparse_scale" in meta:
            meta_number(meta, "sparse_scale")
        shape = check_shape(meta["weight_shape"], "meta field 'weight_shape'", min_dim=1)
        if math.prod(shape) != d_in * d_out:
            raise DeltaFormatError(f"meta field 'weight_shape' {list(shape)} does not hold {d_out}×{d_in} entries")
        k = meta_int(meta, "k", minimum=0)
        if k > math.prod(shape):
            raise DeltaFormatError(f"meta field 'k' is {k}, more than the {math.prod(shape)} entries of the weight")
        check_shape([rank, d_in], "lora_A"), check_shape([d_out, rank], "lora_B")
        return {"lora_A": (rank, d_in), "lora_B": (d_out, rank), "indices": (k,), "values": (k,)}

    @classmethod
    def from_state(cls, state: dict[str, Tensor], meta: dict[str, Any]) -> DSEEPart:
        check_state(state, cls.expected_state(meta), cls.kind, int_tensors=frozenset({"indices"}))
        idx = state["indices"]
        check_indices(idx, math.prod(meta["weight_shape"]), "dsee indices", require_sorted=True)
        part = cls(meta["in_features"], meta["out_features"], meta["rank"], meta["scale"], tuple(meta["weight_shape"]),
                   idx, LayerKind(meta["layer"]), float(meta.get("dropout", 0.0)), dtype=state["lora_A"].dtype,
                   sparse_scale=float(meta.get("sparse_scale", 1.0)))  # absent: written before it was recorded
        part.load_tensors({**state, "indices": idx.to(part.indices.dtype)}, "dsee")  # int64 files load as int32
        return part

    def check_base(self, base: nn.Module, where: str) -> None:
        kind = base_layer_kind(base, where)
        if kind is not self.layer or tuple(base.weight.shape) != self.weight_shape \
                or in_out_features(base) != (self.in_features, self.out_features):
            raise ShapeMismatch(f"{where}: dsee part for a {self.layer} weight {self.weight_shape}, the base module is "
                                f"a {kind} with weight {tuple(base.weight.shape)}")
