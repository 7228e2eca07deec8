"""SSF part: scale and shift a module's output channels, ``y = γ ⊙ out + β`` (Lian et al., "Scaling & Shifting
Your Features: A New Baseline for Efficient Model Tuning", NeurIPS 2022).

It attaches to three sites, each of which folds ``γ, β`` exactly into its own parameters (re-parameterisation):

* ``"linear"`` (``nn.Linear``, ``y = x Wᵀ + b``): ``W' = diag(γ) W`` (rows), ``b' = γ ⊙ b + β``;
* ``"conv1d"`` (GPT-2 ``Conv1D``, ``y = x W + b``, ``W`` stored ``(in, out)``): ``W' = W diag(γ)`` (columns),
  ``b' = γ ⊙ b + β``;
* ``"norm"`` (LayerNorm / RMSNorm computing ``w ⊙ n(x) (+ b)``): ``w' = γ ⊙ w``, ``b' = γ ⊙ b + β``.

As a weight update (``θ' = θ + Δθ``): ``ΔW = (γ − 1) ⊙_out W`` and ``Δb = (γ − 1) ⊙ b + β``; it depends on the
base tensors (``base_dependent``).  A module **without a bias** (Llama's Linear layers, RMSNorm) has nowhere to
fold a shift: the part holds **only the scale** there (``shift = False``), so merging stays exact.  ``γ = 1``,
``β = 0`` at init (the output is unchanged); the paper's ``γ ~ N(1, σ²)``, ``β ~ N(0, σ²)`` is
:meth:`SSFPart.reset_parameters` with ``init_std = σ`` (0.02 in the paper).

For the algebra the part offers ``(γ − 1, β)`` as its values view (the update is linear in them) and sums exactly
with parts of the same module: ``γ = 1 + Σ_t (γ_t − 1)``, ``β = Σ_t β_t``.  Its dense update needs the base
module; without one it raises :class:`~deltatune.errors.NotMergeable`.  Merging is taken against the module as
it is, so a base-dependent delta merges before, not after, other deltas on the same module.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from deltatune.errors import ConfigError, DeltaFormatError, NotMergeable, ShapeMismatch
from deltatune.parts.base import Part, promote_dtypes, write_in_place
from deltatune.parts.ia3 import needs_base, one_plus
from deltatune.parts.layers import LayerKind, in_out_features, layer_kind
from deltatune.parts.meta_checks import check_keys, check_state, meta_int, short

Site = Literal["linear", "conv1d", "norm"]
SITES: tuple[str, ...] = ("linear", "conv1d", "norm")
NORM_SUFFIXES = ("LayerNorm", "RMSNorm")


# --------------------------------------------------------------------------------------------------
# math (pure functions)
# --------------------------------------------------------------------------------------------------
def ssf(out: Tensor, scale: Tensor, shift: Tensor | None) -> Tensor:
    """``y = γ ⊙ out + β`` over the last axis, in ``out``'s dtype (Lian et al., 2022, eq. 2)."""
    y = out * scale
    return (y if shift is None else y + shift).to(out.dtype)


def ssf_weight_update(weight: Tensor, scale: Tensor, site: str) -> Tensor:
    """``ΔW = (γ − 1) ⊙_out W`` in fp32, native layout: rows of a Linear ``(out, in)`` weight, columns of a
    ``Conv1D`` ``(in, out)`` weight, the vector itself for a norm's ``w``; ``W + ΔW = γ ⊙_out W``."""
    g = scale.float() - 1.0
    if site == "linear":
        g = g.reshape(-1, 1)
    elif site == "conv1d":
        g = g.reshape(1, -1)
    return weight.float() * g


def ssf_bias_update(bias: Tensor, scale: Tensor, shift: Tensor | None) -> Tensor:
    """``Δb = (γ − 1) ⊙ b + β`` in fp32: ``b + Δb = γ ⊙ b + β``."""
    out = bias.float() * (scale.float() - 1.0)
    return out if shift is None else out + shift.float()


def norm_features(module: nn.Module) -> int | None:
    """``n`` for a LayerNorm/RMSNorm-like module (class named ``*LayerNorm`` / ``*RMSNorm``) with an affine
    weight of shape ``(n,)`` (and a bias, if any, of the same shape); else ``None``."""
    if not any(type(module).__name__.endswith(s) for s in NORM_SUFFIXES):
        return None
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    if not isinstance(weight, Tensor) or weight.dim() != 1:
        return None
    if bias is not None and (not isinstance(bias, Tensor) or tuple(bias.shape) != tuple(weight.shape)):
        return None
    return weight.shape[0]


def norm_is_affine_in_weight(module: nn.Module) -> bool:
    """Whether the norm computes ``w ⊙ n(x) + b`` (so ``γ`` folds into ``w``): scaling ``w`` by 2 must scale
    ``y − b`` by 2 on a probe input (false for, e.g., Gemma's ``(1 + w) ⊙ n(x)``)."""
    from torch.func import functional_call

    n = norm_features(module)
    if n is None:
        return False
    w = module.weight
    probe = torch.linspace(-1.0, 1.0, 2 * n, dtype=w.dtype, device=w.device).reshape(2, n)
    b = module.bias if getattr(module, "bias", None) is not None else torch.zeros_like(w)
    with torch.no_grad():
        y1 = functional_call(module, {"weight": w}, (probe,)).float() - b.float()
        y2 = functional_call(module, {"weight": 2 * w}, (probe,)).float() - b.float()
    return bool(torch.allclose(y2, 2 * y1, rtol=1e-2, atol=1e-3 * float(y1.abs().max()) + 1e-6))


def site_of(module: nn.Module) -> tuple[str, int, int | None] | None:
    """``(site, features, in_features)`` for a module SSF attaches to, else ``None``."""
    kind = layer_kind(module)
    if kind is LayerKind.LINEAR or kind is LayerKind.CONV1D:
        d_in, d_out = in_out_features(module)
        return str(kind), d_out, d_in
    n = norm_features(module)
    return ("norm", n, None) if n is not None else None


# --------------------------------------------------------------------------------------------------
# the part
# --------------------------------------------------------------------------------------------------
class SSFPart(Part):
    """Trainable ``ssf_scale`` γ (n,) and, where the module has a bias, ``ssf_shift`` β (n,)."""

    kind = "ssf"
    additive, base_dependent, mixed_rows, has_aux_loss = True, True, True, False

    def __init__(
        self,
        features: int,
        site: Site = "linear",
        in_features: int | None = None,
        bias: bool = True,
        shift: bool = True,
        init_std: float = 0.0,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if site not in SITES:
            raise ConfigError(f"ssf site must be one of {SITES}, got {site!r}")
        if (site == "norm") != (in_features is None):
            raise ConfigError("ssf in_features is the Linear/Conv1D input size, and None for a norm")
        if shift and not bias:
            raise ConfigError("an ssf shift folds into the module's bias; a module without one holds only the scale")
        self.features, self.site, self.in_features, self.bias, self.shift = features, site, in_features, bias, shift
        dtype = dtype or torch.float32
        self.ssf_scale = nn.Parameter(torch.ones(features, dtype=dtype, device=device))
        self.ssf_shift = nn.Parameter(torch.zeros(features, dtype=dtype, device=device)) if shift else None
        self.reset_parameters(init_std)

    def reset_parameters(self, init_std: float = 0.0, generator: torch.Generator | None = None) -> None:
        """``γ = 1, β = 0`` (output unchanged), or with ``init_std = σ > 0`` the paper's ``γ ~ N(1, σ²)``,
        ``β ~ N(0, σ²)``."""
        with torch.no_grad():
            self.ssf_scale.fill_(1.0)
            if self.ssf_shift is not None:
                self.ssf_shift.zero_()
            if init_std > 0:
                self.ssf_scale.add_(torch.randn(self.features, generator=generator).to(self.ssf_scale) * init_std)
                if self.ssf_shift is not None:
                    self.ssf_shift.add_(torch.randn(self.features, generator=generator).to(self.ssf_shift) * init_std)

    def forward(self, x: Tensor, base: nn.Module) -> Tensor:
        return ssf(base(x), self.ssf_scale, self.ssf_shift)

    # --- algebra ---------------------------------------------------------------------------
    def updates(self, base: nn.Module | None = None) -> dict[str, Tensor]:
        """``{"weight": (γ − 1) ⊙_out W, "bias": (γ − 1) ⊙ b + β}`` (no ``"bias"`` for a module without one), fp32,
        native layout, from ``base``'s own tensors."""
        if base is None:
            raise needs_base(self.kind, "ΔW = (γ − 1) ⊙ W, Δb = (γ − 1) ⊙ b + β")
        out = {"weight": ssf_weight_update(base.weight, self.ssf_scale, self.site)}
        if getattr(base, "bias", None) is not None:
            out["bias"] = ssf_bias_update(base.bias, self.ssf_scale, self.ssf_shift)
        return out

    def update_shapes(self) -> dict[str, tuple[int, ...]]:
        n = self.features
        weight = {"linear": (n, self.in_features), "conv1d": (self.in_features, n), "norm": (n,)}[self.site]
        return {"weight": weight, "bias": (n,)} if self.bias else {"weight": weight}

    def layer_kind(self) -> LayerKind | None:
        return None if self.site == "norm" else LayerKind(self.site)

    def values_view(self, product: bool = False) -> dict[str, Tensor]:
        """``{"ssf_scale": γ − 1, "ssf_shift": β}``: the deviation from the identity, which the update is linear
        in.  The same with or without ``product`` (the product ``ΔW`` depends on the base)."""
        out = {"ssf_scale": self.ssf_scale.detach() - 1.0}
        if self.ssf_shift is not None:
            out["ssf_shift"] = self.ssf_shift.detach()
        return out

    def value_names(self, product: bool = False) -> tuple[str, ...]:
        return ("ssf_scale", "ssf_shift") if self.shift else ("ssf_scale",)

    def with_values(self, values: dict[str, Tensor], product: bool = False, where: str = "ssf") -> Part:
        """The same geometry and dtype with ``γ = 1 + v_scale`` (:func:`~deltatune.parts.ia3.one_plus`: the
        compression rounded ``γ − 1``, not ``γ``) and ``β = v_shift``."""
        v = values["ssf_scale"]
        out = self._like(self.ssf_scale.dtype, self.shift, v.device)
        state = {"ssf_scale": one_plus(v, out.ssf_scale.dtype)}
        if self.shift:
            state["ssf_shift"] = values["ssf_shift"].to(out.ssf_scale.dtype)
        with torch.no_grad():
            out.load_tensors(state, where)
        return out

    def sum_same_class(self, parts: Sequence[Part], where: str) -> Part | None:
        """``γ = 1 + Σ_t (γ_t − 1)``, ``β = Σ_t β_t``: exact, the update is linear in ``(γ − 1, β)``."""
        return sum_ssf(parts, where)  # type: ignore[arg-type]

    def _like(self, dtype: torch.dtype, shift: bool, device: torch.device | str | None = None) -> SSFPart:
        return SSFPart(self.features, self.site, self.in_features, self.bias, shift, dtype=dtype, device=device)

    # --- merging -------------------------------------------------------------------------
    def merge_into(self, base: nn.Module) -> None:
        """``W ← γ ⊙_out W``, ``b ← γ ⊙ b + β`` in fp32, cast back.  The update is taken against the module as
        it is: merge a base-dependent delta before (not after) other deltas on the same module."""
        g = self.ssf_scale.detach().float().to(base.weight.device)
        with torch.no_grad():
            write_in_place(base.weight, _scaled(base.weight.detach(), g, self.site))
            if getattr(base, "bias", None) is not None:
                b = base.bias.detach().float() * g
                if self.ssf_shift is not None:
                    b = b + self.ssf_shift.detach().float().to(b.device)
                write_in_place(base.bias, b)

    def unmerge_from(self, base: nn.Module) -> None:
        """``b ← (b − β) ⊘ γ``, ``W ← W ⊘_out γ``; refused while ``γ`` holds a zero."""
        zeros = int((self.ssf_scale == 0).sum())
        if zeros:
            raise NotMergeable(f"cannot revert an ssf merge: ssf_scale holds {zeros} zero(s), so those output "
                               "channels of the weight were zeroed and cannot be recovered", kind=self.kind)
        g = self.ssf_scale.detach().float().to(base.weight.device)
        with torch.no_grad():
            write_in_place(base.weight, _scaled(base.weight.detach(), 1.0 / g, self.site))
            if getattr(base, "bias", None) is not None:
                b = base.bias.detach().float()
                if self.ssf_shift is not None:
                    b = b - self.ssf_shift.detach().float().to(b.device)
                write_in_place(base.bias, b / g)

    @classmethod
    def mixed_forward(
        cls, x: Tensor, base: nn.Module, parts: Sequence[Part | None], row_ids: Tensor,
        cache: dict[Any, Any] | None = None,
    ) -> Tensor:
        """One pass: row ``i`` gets ``γ_{a_i} ⊙ out + β_{a_i}`` (``γ = 1, β = 0`` for the base and for parts
        without a shift)."""
        ssfs = [p for p in parts if p is not None]
        out = base(x)
        if not ssfs:
            return out
        dtype = promote_dtypes([p.ssf_scale for p in ssfs])  # type: ignore[attr-defined]
        n = ssfs[0].features  # type: ignore[attr-defined]
        scales = torch.ones(len(parts), n, dtype=dtype, device=out.device)
        shifts = torch.zeros(len(parts), n, dtype=dtype, device=out.device)
        for i, p in enumerate(parts):
            if p is not None:
                scales[i] = p.ssf_scale.to(dtype)  # type: ignore[attr-defined]
                if p.ssf_shift is not None:  # type: ignore[attr-defined]
                    shifts[i] = p.ssf_shift.to(dtype)  # type: ignore[attr-defined]
        ids = row_ids.to(out.device)
        g, b = scales[ids], shifts[ids]
        while g.dim() < out.dim():
            g, b = g.unsqueeze(ids.dim()), b.unsqueeze(ids.dim())
        return ssf(out, g, b)

    # --- serialisation -------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        return {"features": self.features, "site": self.site, "in_features": self.in_features, "bias": self.bias,
                "shift": self.shift}

    @classmethod
    def expected_state(cls, meta: Any) -> dict[str, tuple[int, ...]]:
        meta = check_keys(meta, {"features", "site", "in_features", "bias", "shift"})
        n = meta_int(meta, "features")
        site = meta["site"]
        if site not in SITES:
            raise DeltaFormatError(f"meta field 'site' is {short(site)}; known: {list(SITES)}")
        if site == "norm":
            if meta["in_features"] is not None:
                raise DeltaFormatError(f"meta field 'in_features' must be null for a norm site, got "
                                       f"{short(meta['in_features'])}")
        else:
            meta_int(meta, "in_features")
        for key in ("bias", "shift"):
            if not isinstance(meta[key], bool):
                raise DeltaFormatError(f"meta field {key!r} must be true or false, got {short(meta[key])}")
        if meta["shift"] and not meta["bias"]:
            raise DeltaFormatError("meta fields 'shift' true and 'bias' false: a shift folds into the module's bias")
        return {"ssf_scale": (n,), "ssf_shift": (n,)} if meta["shift"] else {"ssf_scale": (n,)}

    @classmethod
    def from_state(cls, state: dict[str, Tensor], meta: dict[str, Any]) -> SSFPart:
        check_state(state, cls.expected_state(meta), cls.kind)
        part = cls(meta["features"], meta["site"], meta["in_features"], meta["bias"], meta["shift"],
                   dtype=state["ssf_scale"].dtype)
        part.load_tensors(state, "ssf")
        return part

    def check_base(self, base: nn.Module, where: str) -> None:
        found = site_of(base)
        if found is None:
            raise ShapeMismatch(f"{where}: an ssf part attaches to a Linear, Conv1D, LayerNorm or RMSNorm module, "
                                f"not a {type(base).__name__}")
        site, n, d_in = found
        if (site, n, d_in) != (self.site, self.features, self.in_features):
            raise ShapeMismatch(f"{where}: ssf part for a {self.site} site with {self.features} features (input "
                                f"{self.in_features}) but the base module is a {site} site with {n} (input {d_in})")
        has_bias = getattr(base, "bias", None) is not None
        if has_bias != self.bias:
            raise ShapeMismatch(f"{where}: ssf part made for a module {'with' if self.bias else 'without'} a bias, "
                                f"but the base module has {'one' if has_bias else 'none'}")


def _scaled(weight: Tensor, g: Tensor, site: str) -> Tensor:
    """``γ ⊙_out W`` in fp32, cast back to ``W``'s dtype."""
    if site == "linear":
        g = g.reshape(-1, 1)
    elif site == "conv1d":
        g = g.reshape(1, -1)
    return (weight.float() * g).to(weight.dtype)


def sum_ssf(parts: Sequence[SSFPart], where: str) -> SSFPart:
    """``γ = 1 + Σ_t (γ_t − 1)``, ``β = Σ_t β_t`` in fp32 (a part without a shift adds ``β = 0``)."""
    ref = parts[0]
    geometry = (ref.site, ref.features, ref.in_features, ref.bias)
    for p in parts[1:]:
        if (p.site, p.features, p.in_features, p.bias) != geometry:
            raise ShapeMismatch(f"{where}: ssf parts for a {ref.site} site ({ref.features} features, input "
                                f"{ref.in_features}, bias {ref.bias}) and a {p.site} site ({p.features}, "
                                f"{p.in_features}, {p.bias}) cannot be summed")
    shift = any(p.shift for p in parts)
    dtype = promote_dtypes([t for p in parts for t in p.parameters()])
    device = ref.ssf_scale.device
    out = SSFPart(ref.features, ref.site, ref.in_features, ref.bias, shift, dtype=dtype, device=device)
    scale = torch.ones(ref.features, dtype=torch.float32, device=device)
    beta = torch.zeros(ref.features, dtype=torch.float32, device=device)
    for p in parts:
        scale += p.ssf_scale.detach().float().to(device) - 1.0
        if p.ssf_shift is not None:
            beta += p.ssf_shift.detach().float().to(device)
    with torch.no_grad():
        out.ssf_scale.copy_(scale.to(dtype))
        if out.ssf_shift is not None:
            out.ssf_shift.copy_(beta.to(dtype))
    return out
