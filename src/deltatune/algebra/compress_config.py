"""Typed options of each compression method, registered by name like the merge methods.

Every method has a dataclass of its options (field ``metadata["help"]`` documents each one);
:func:`parse_compress_options` builds it with :func:`deltatune.config.parse_config`, the coercer of method,
training and merge configs, so an unknown option or a bad value gets the same :class:`ConfigError` as a
YAML recipe or a training config, naming the method's valid fields.  Range checks live in
``__post_init__`` (with the messages of :mod:`deltatune.ops.compress`).  The algorithms themselves are in
:mod:`deltatune.algebra.compress`, which registers a runner for each name with :func:`register_compressor`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from deltatune.config import describe_fields, option, parse_config, require
from deltatune.errors import ConfigError
from deltatune.ops import compress as ops

DEFAULT_ALPHAS = (0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 10.0)
STEP_KEYS = ("density", "alpha", "q", "dtype", "rank", "scope", "seed", "target")
"""The options every ``config["compression"]`` step records (absent ones as ``None``, scope/target defaults)."""

Dtype = Literal["int8", "bf16", "fp16"]


_DENSITY = "fraction of entries kept, in (0, 1]"
_SEED = "seed of the random masks (dare, darex-q) and the randomized SVD"
_TARGET = "LoRA parts: factors (A and B; auto = factors) or product (B·A → a sparse part)"
_ROUND = "round the kept values to int8 (absmax), bf16 or fp16"


@dataclass
class CompeftConfig:
    """ComPEFT: ``τ̂ = α·σ·sgn(τ)·1[|τ| ≥ t_k]`` (ternary values plus one scale)."""

    density: float | None = option(_DENSITY)
    alpha: float | None = option("values become ±alpha·σ (default: the best of alphas on eval data)")
    alphas: list[float] = option("α values an eval_fn sweep tries", default_factory=lambda: list(DEFAULT_ALPHAS))
    scope: Literal["global", "tensor"] = option("σ and the top-k threshold over all entries or per tensor",
                                               "global")
    target: Literal["auto", "factors", "product"] = option(_TARGET, "auto")
    seed: int = option(_SEED, 0)

    def __post_init__(self) -> None:
        ops.check_density(self.density)
        if self.alpha is not None:
            ops.check_alpha(self.alpha)
        require(bool(self.alphas), "alphas must list at least one α")
        for a in self.alphas:
            ops.check_alpha(a)


@dataclass
class MagnitudeConfig:
    """Keep the top-ρ magnitudes (globally or per tensor), values unchanged."""

    density: float | None = option(_DENSITY)
    dtype: Dtype | None = option(_ROUND)
    scope: Literal["global", "tensor"] = option("top-k threshold over all entries or per tensor", "global")
    target: Literal["auto", "factors", "product"] = option(_TARGET, "auto")
    seed: int = option(_SEED, 0)

    def __post_init__(self) -> None:
        ops.check_density(self.density)


@dataclass
class DareConfig:
    """DARE: a Bernoulli(ρ) mask, kept values rescaled by ``1/ρ``."""

    density: float | None = option(_DENSITY)
    dtype: Dtype | None = option(_ROUND)
    scope: Literal["global", "tensor"] = option("accepted for symmetry; DARE's mask is per entry", "global")
    target: Literal["auto", "factors", "product"] = option(_TARGET, "auto")
    seed: int = option(_SEED, 0)

    def __post_init__(self) -> None:
        ops.check_density(self.density)


@dataclass
class DarexQConfig:
    """DAREx-q: DARE's mask, kept values rescaled by ``1/q`` (q calibrated when not given)."""

    density: float | None = option(_DENSITY)
    q: float | None = option("rescale 1/q, q in (0, 1] (default: the best of [density … 1] on eval data)")
    dtype: Dtype | None = option(_ROUND)
    scope: Literal["global", "tensor"] = option("accepted for symmetry; the mask is per entry", "global")
    target: Literal["auto", "factors", "product"] = option(_TARGET, "auto")
    seed: int = option(_SEED, 0)

    def __post_init__(self) -> None:
        ops.check_density(self.density)
        if self.q is not None:
            ops.check_q(self.q)


@dataclass
class QuantizeConfig:
    """Quantise the values: int8 (absmax; one scale per tensor, or per row with ``scope=row`` — of a matrix: the
    1-D values of a sparse part keep one scale per tensor), bf16, fp16."""

    dtype: Dtype | None = option("int8, bf16 or fp16 (required)")
    scope: Literal["global", "tensor", "row"] = option("int8 scales: one per tensor (global, tensor) or per matrix "
                                                      "row (row; a sparse part's 1-D values: one per tensor)",
                                                      "global")
    target: Literal["auto", "factors"] = option("LoRA parts are quantised in their factors", "auto")
    seed: int = option("unused (recorded)", 0)

    def __post_init__(self) -> None:
        require(self.dtype is not None, "quantize needs dtype: int8, bf16 or fp16")


@dataclass
class LowrankConfig:
    """Every part becomes a rank-``rank`` LoRA part with scale 1 (SVD split as ``√S`` on both factors)."""

    rank: int | None = option("rank of every LoRA part (≥ 1, required)")
    dtype: Literal["bf16", "fp16"] | None = option("store the factors in bf16 or fp16")
    scope: Literal["global", "tensor"] = option("unused (recorded)", "global")
    target: Literal["auto", "factors"] = option("unused (recorded)", "auto")
    seed: int = option("seed of the randomized SVD (matrices larger than 1024 on both sides)", 0)

    def __post_init__(self) -> None:
        ops.check_rank(self.rank)


CompressConfig = CompeftConfig | MagnitudeConfig | DareConfig | DarexQConfig | QuantizeConfig | LowrankConfig


@dataclass(frozen=True)
class CompressionMethod:
    """A registered compression method: its name, its typed options and the function that runs it."""

    name: str
    config: type
    run: Callable[..., Any]


COMPRESSORS: dict[str, CompressionMethod] = {}
CONFIGS: dict[str, type] = {"compeft": CompeftConfig, "dare": DareConfig, "darex-q": DarexQConfig,
                            "magnitude": MagnitudeConfig, "quantize": QuantizeConfig, "lowrank": LowrankConfig}


def register_compressor(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register ``fn(delta, config, context)`` as compression method ``name`` (options: ``CONFIGS``)."""
    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        COMPRESSORS[name] = CompressionMethod(name, CONFIGS[name], fn)
        return fn
    return wrap


def config_class(method: str) -> type:
    """The options dataclass of compression ``method``; :class:`ConfigError` listing the methods if unknown."""
    if method not in CONFIGS:
        raise ConfigError(f"unknown compression method {str(method)[:40]!r}; methods: {', '.join(CONFIGS)}")
    return CONFIGS[method]


def parse_compress_options(method: str, options: Mapping[str, Any]) -> Any:
    """``options`` as ``method``'s typed config (``None`` values mean "not given" and take the default)."""
    cls = config_class(method)
    given = {k: v for k, v in options.items() if v is not None}
    return parse_config(cls, given, f"compress ({method})")


def step_record(method: str, cfg: Any) -> dict[str, Any]:
    """The ``config["compression"]`` entry of one step: the method and :data:`STEP_KEYS`."""
    fallback = {"scope": "global", "target": "auto", "seed": 0}
    step: dict[str, Any] = {"method": method}
    step.update({k: getattr(cfg, k, fallback.get(k)) for k in STEP_KEYS})
    step["seed"] = int(step["seed"])
    return step


def options_help(method: str) -> str:
    """One line per option of ``method`` (name, type, default, help) for ``--help`` and error messages."""
    rows = describe_fields(config_class(method))
    return "\n".join(f"  {n}: {t} = {d}  {h}" for n, t, d, h in rows)
