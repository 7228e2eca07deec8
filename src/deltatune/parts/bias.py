"""Bias part: a trainable shift of a module's output channels, ``y = f(x) + Δb`` (BitFit, Ben Zaken, Ravfogel,
Goldberg, ACL 2022).

For a module with a bias (``nn.Linear``/``Conv1D`` ``y = xW + b``, LayerNorm ``y = γ n(x) + β``, a convolution, a
batch / group / instance norm) the shift is
exactly an update of that bias, ``b' = b + Δb``: merging adds ``Δb`` to it.  A module without one (Llama's
``nn.Linear`` layers, ``bias=False``) gets a bias *added* (``has_bias = False``): merging creates the bias
parameter holding ``Δb``, and reverting the last such merge removes it again, so the module is the base once more
(the module counts the merges that need the added bias in ``_deltatune_added_bias``).  The shift runs along the
module's channel axis (:func:`channel_axis`): the last for Linear, Conv1D and LayerNorm-like norms, axis 1 of the
``(N, C, …)`` layouts of convolutions and batch / group / instance norms, as their own bias does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from deltatune.errors import DeltaFormatError, ShapeMismatch
from deltatune.parts.base import Part, promote_dtypes, write_in_place
from deltatune.parts.layers import LayerKind, in_out_features, layer_kind
from deltatune.parts.meta_checks import check_keys, check_state, meta_int, short

ADDED = "_deltatune_added_bias"
#: modules whose output channels are axis 1 of an ``(N, C, …)`` output (their bias broadcasts there)
CHANNEL_FIRST = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                 nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.InstanceNorm1d,
                 nn.InstanceNorm2d, nn.InstanceNorm3d, nn.GroupNorm)


def output_features(module: nn.Module) -> int | None:
    """Output channels of a Linear/Conv1D (``out_features``), of a convolution (``out_channels``) or of a norm with a
    1-D weight; else ``None``."""
    kind = layer_kind(module)
    if kind in (LayerKind.LINEAR, LayerKind.CONV1D):
        return in_out_features(module)[1]
    if isinstance(module, CHANNEL_FIRST) and hasattr(module, "out_channels"):
        return int(module.out_channels)
    weight = getattr(module, "weight", None)
    if kind is None and isinstance(weight, Tensor) and weight.dim() == 1:
        return int(weight.shape[0])
    return None


def has_bias(module: nn.Module) -> bool:
    return isinstance(getattr(module, "bias", None), Tensor)


def channel_shift(delta: Tensor, module: nn.Module, out: Tensor) -> Tensor:
    """``Δb`` shaped to broadcast over ``out`` along ``module``'s channel axis: axis 1 of an ``(N, C, …)`` output of a
    convolution or batch / group / instance norm (:data:`CHANNEL_FIRST`), else the last axis."""
    delta = delta.to(out.dtype)
    if not isinstance(module, CHANNEL_FIRST) or out.dim() <= 1:
        return delta
    spatial = len(module.kernel_size) if hasattr(module, "kernel_size") else out.dim() - 2  # a conv may be unbatched
    axis = out.dim() - spatial - 1
    return delta.view(-1, *([1] * (out.dim() - axis - 1)))


class BiasPart(Part):
    """``bias_delta`` (trainable, zeros): ``Δb`` added to the output channels; ``has_bias`` records whether the
    base module has a bias of its own."""

    kind = "bias"
    additive, base_dependent, mixed_rows, has_aux_loss = True, False, True, False

    def __init__(self, features: int, has_bias: bool, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.features, self.has_bias = int(features), bool(has_bias)
        self.bias_delta = nn.Parameter(torch.zeros(self.features, dtype=dtype, device=device))

    def forward(self, x: Tensor, base: nn.Module) -> Tensor:
        out = base(x)
        return out + channel_shift(self.bias_delta, base, out)

    # --- algebra ---------------------------------------------------------------------------
    def updates(self, base: nn.Module | None = None) -> dict[str, Tensor]:
        """``{"bias": Δb}`` (the part's own tensor)."""
        return {"bias": self.bias_delta}

    def update_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"bias": (self.features,)}

    def values_view(self, product: bool = False) -> dict[str, Tensor]:
        """``{"": Δb}`` (the same with or without ``product``)."""
        return {"": self.bias_delta.detach()}

    def with_values(self, values: dict[str, Tensor], product: bool = False, where: str = "bias") -> Part:
        vals = values[""].reshape(-1)
        if vals.numel() != self.features:
            raise ShapeMismatch(f"{where}: {vals.numel()} bias values for {self.features} channels")
        out = BiasPart(self.features, self.has_bias, dtype=vals.dtype)
        with torch.no_grad():
            out.bias_delta.copy_(vals)
        return out

    def sum_same_class(self, parts: Sequence[Part], where: str) -> Part | None:
        """``Δb = Σ_t Δb_t`` (exact)."""
        for p in parts:
            if p.features != self.features or p.has_bias != self.has_bias:  # type: ignore[attr-defined]
                raise ShapeMismatch(f"{where}: bias parts of {self.features} and {p.features} channels "  # type: ignore
                                    "cannot be summed")
        dtype = promote_dtypes([p.bias_delta for p in parts])  # type: ignore[attr-defined]
        out = BiasPart(self.features, self.has_bias, dtype=dtype)
        with torch.no_grad():
            out.bias_delta.copy_(sum(p.bias_delta.detach().to(dtype) for p in parts))  # type: ignore[attr-defined]
        return out

    @property
    def adds_bias(self) -> bool:
        """Whether merging creates the bias (a part made for a module without one: BitFit on Llama)."""
        return not self.has_bias

    def merge_sites(self) -> dict[str, Tensor] | None:
        """Every entry of the module's bias (whole-tensor snapshots would miss an added one: ``None`` there)."""
        if not self.has_bias:
            return None
        return {"bias": torch.arange(self.features, device=self.bias_delta.device)}

    def merge_into(self, base: nn.Module) -> None:
        """``b ← b + Δb``; a module without a bias gets one holding ``Δb``."""
        with torch.no_grad():
            if not has_bias(base):
                ref = base.weight
                base.bias = nn.Parameter(torch.zeros(self.features, dtype=ref.dtype, device=ref.device),
                                         requires_grad=False)
                setattr(base, ADDED, 0)
            if not self.has_bias and hasattr(base, ADDED):  # a module's own bias is never counted (nor removed)
                setattr(base, ADDED, getattr(base, ADDED) + 1)
            b = base.bias
            write_in_place(b, b.detach().float() + self.bias_delta.float().to(b.device))

    def unmerge_from(self, base: nn.Module) -> None:
        """``b ← b − Δb``; the last revert of an added bias removes it."""
        with torch.no_grad():
            b = base.bias
            write_in_place(b, b.detach().float() - self.bias_delta.float().to(b.device))
            if not self.has_bias and hasattr(base, ADDED):
                left = getattr(base, ADDED) - 1
                setattr(base, ADDED, left)
                if left <= 0:
                    base.bias = None
                    delattr(base, ADDED)

    # --- serialisation ---------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        return {"features": self.features, "has_bias": self.has_bias}

    @classmethod
    def expected_state(cls, meta: Any) -> dict[str, tuple[int, ...]]:
        meta = check_keys(meta, {"features", "has_bias"})
        n = meta_int(meta, "features")
        if not isinstance(meta["has_bias"], bool):
            raise DeltaFormatError(f"meta field 'has_bias' must be true or false, got {short(meta['has_bias'])}")
        return {"bias_delta": (n,)}

    @classmethod
    def from_state(cls, state: dict[str, Tensor], meta: dict[str, Any]) -> BiasPart:
        check_state(state, cls.expected_state(meta), cls.kind)
        part = cls(meta["features"], meta["has_bias"], dtype=state["bias_delta"].dtype)
        part.load_tensors(state, "bias")
        return part

    def check_base(self, base: nn.Module, where: str) -> None:
        n = output_features(base)
        if n != self.features:
            raise ShapeMismatch(f"{where}: bias part of {self.features} channels, the base module "
                                f"({type(base).__name__}) has {n if n is not None else 'no'} output channels")
        if self.has_bias and not has_bias(base):
            raise ShapeMismatch(f"{where}: bias part for a module with a bias; {type(base).__name__} has none")
