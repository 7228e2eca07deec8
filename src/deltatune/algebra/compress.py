"""Compress a whole :class:`Delta` (lossy) into another :class:`Delta`; store it with
:func:`deltatune.io.compact_format.save_compact` (lossless) to get the bytes down.

Methods (the tensor math is in :mod:`deltatune.ops.compress`):

* ``compeft`` — ComPEFT (Yadav et al., arXiv 2311.13171): ``τ̂ = α·σ·sgn(τ)·1[|τ| ≥ t_k]``.  With
  ``scope="global"`` (the paper) ``σ`` and the top-k threshold ``t_k`` are computed over *all* the
  update's entries (exact streaming statistics, no concatenation), with ``scope="tensor"`` per tensor.
  ``α`` is swept over ``alphas`` by ``eval_fn`` (higher is better) when given and ``alpha`` is None; with
  neither, :class:`~deltatune.algebra.compress_calibration.CalibrationNeeded` (no lossy default: α = 1 can take
  a delta to chance; :func:`~deltatune.algebra.compress_calibration.calibrated_compress` sweeps on eval data).
* ``dare`` — DARE (Yu et al., ICML 2024, arXiv 2311.03099): Bernoulli(ρ) mask, rescale ``1/ρ``.
* ``darex-q`` — DAREx-q (Deng et al., ICLR 2025, arXiv 2410.09344): the same mask, rescale ``1/q``; with
  ``q=None`` the grid ``[ρ … 1]`` is scored by ``calibration_fn`` (lower is better; see
  :func:`output_change_score` for the paper's unlabelled last-layer proxy).
* ``magnitude`` — keep the top-ρ magnitudes (global or per tensor), values unchanged.
* ``quantize`` — ``dtype`` int8 (absmax; one scale per tensor, or per row with ``scope="row"`` for matrices: a
  sparse part's values are stored 1-D and keep one scale per tensor), bf16 or fp16.
* ``lowrank`` — every part becomes a rank-``rank`` :class:`LoRAPart` with scale 1 (SVD split as
  ``√S`` on both factors), exportable with ``deltatune export --format peft``.

What each part becomes: LoRA parts are compressed in their factors ``A``/``B`` (``target="factors"``,
the default, as ComPEFT) or as ``ΔW = s·B A`` (``target="product"`` → a :class:`SparsePart`); sparse
parts act on their values and drop entries that became 0; dense parts stay :class:`DensePart` holding
the sparsified tensors — a :class:`SparsePart` cannot hold a module's bias or LayerNorm deltas, and
the dense part does not record the layer kind a sparse part needs — and the compact format stores
them sparsely, so the bytes on disk are the same.  Heads are copied unchanged (they are not deltas).
Random masks use a generator seeded from ``(seed, tensor name)`` by BLAKE2b.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from deltatune.algebra.compress_calibration import CalibrationNeeded
from deltatune.algebra.compress_config import (
    COMPRESSORS,
    CONFIGS,
    DEFAULT_ALPHAS,
    CompressConfig,
    parse_compress_options,
    register_compressor,
    step_record,
)
from deltatune.algebra.quantile import RadixSelect
from deltatune.algebra.task_heads import CONFIG_KEY
from deltatune.delta import Delta
from deltatune.errors import ConfigError
from deltatune.ops import compress as ops
from deltatune.ops.sparsify import dare, keep_count
from deltatune.parts.base import Part
from deltatune.parts.capabilities import require_capability
from deltatune.parts.layers import LayerKind, is_transposed, layer_kind
from deltatune.parts.lora import LoRAPart
from deltatune.provenance import Provenance

METHODS = tuple(CONFIGS)
Q_GRID_STEPS = 10
EXACT_SVD_MAX_DIM = 1024


@dataclass
class _Slot:
    """One tensor the method acts on: ``key`` names it (seeds, errors), ``get`` reads it; ``implicit`` counts the
    zero entries it stands for beside its stored ones (a sparse part's values at indices into a larger weight):
    ComPEFT's ``σ`` and ``k = ⌊ρ·n⌋`` are over every entry of the update, zeros included."""

    key: str
    get: Callable[[], Tensor]
    implicit: int = 0


def _key(name: str, suffix: str) -> str:
    return f"{name}.{suffix}" if suffix else name


def _slots(name: str, part: Part, target: str) -> list[_Slot]:
    """One slot per tensor of the part's :meth:`~deltatune.parts.base.Part.values_view` (read lazily: a
    LoRA product ``s·B A`` is formed only when read)."""
    product = target == "product"
    try:
        suffixes = part.value_names(product)
    except NotImplementedError:
        raise ConfigError(f"part {name!r} is a {part.kind} part, which has no values to compress") from None
    domain = part.values_domain(product)
    stored = part.values_view(product) if domain else {}
    return [_Slot(_key(name, k), lambda k=k: part.values_view(product)[k],
                  domain[k] - stored[k].numel() if k in domain else 0) for k in suffixes]


def _rebuild(name: str, part: Part, target: str, new: dict[str, Tensor]) -> Part:
    """The compressed part from the compressed slot tensors (:meth:`~deltatune.parts.base.Part.with_values`)."""
    values = {k: new[_key(name, k)] for k in part.value_names(target == "product")}
    return part.with_values(values, product=target == "product", where=name)


def _finite(t: Tensor, key: str) -> Tensor:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise ConfigError(f"{key}: the delta holds NaN or Inf values; it cannot be compressed")
    return t


class _Moments:
    """Streaming count/mean/M2 in fp64 (Chan et al.'s pairwise update) for the global ``σ``."""

    def __init__(self) -> None:
        self.n, self.mean, self.m2 = 0, 0.0, 0.0

    def add(self, t: Tensor, zeros: int = 0) -> None:
        """Add ``t``'s entries and ``zeros`` more zero entries."""
        x = t.detach().double().reshape(-1)
        n_b = x.numel() + zeros
        if n_b == 0:
            return
        mean_b = float(x.sum()) / n_b
        m2_b = float(((x - mean_b) ** 2).sum()) + zeros * mean_b * mean_b
        n = self.n + n_b
        d = mean_b - self.mean
        self.mean += d * n_b / n
        self.m2 += m2_b + d * d * self.n * n_b / n
        self.n = n

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / (self.n - 1)) if self.n > 1 else 0.0


def _global_stats(slots: list[_Slot], density: float, need_sigma: bool) -> dict[str, float]:
    """Global ``σ`` (Bessel) and the k-th largest ``|τ|`` over every slot, ``k = max(1, ⌊ρ·N⌋)``, ``N`` counting
    the slots' implicit zeros (the smallest magnitudes: a ``k`` past the stored values keeps them all)."""
    moments, select = _Moments(), RadixSelect(nonnegative=True)

    def feed_all(first: bool) -> None:
        for s in slots:
            t = s.get()
            if first and need_sigma:
                moments.add(t, s.implicit)
            select.feed(t.detach().abs())

    feed_all(first=True)
    total = select.count + sum(s.implicit for s in slots)
    if select.count == 0:
        return {"sigma": 0.0, "threshold": 0.0}
    k = keep_count(total, density)
    if k >= select.count:
        return {"sigma": moments.std, "threshold": 0.0, "entries": total, "k": k}
    select.resolve([select.count - k])
    feed_all(first=False)
    return {"sigma": moments.std, "threshold": select.values()[0], "entries": total, "k": k}


def _tensor_sigma(s: _Slot) -> float:
    """``σ`` of one slot's entries, its implicit zeros included."""
    moments = _Moments()
    moments.add(s.get(), s.implicit)
    return moments.std


def _tensor_threshold(s: _Slot, density: float) -> float:
    """The k-th largest ``|τ|`` of one slot, ``k = max(1, ⌊ρ·n⌋)`` over its entries and implicit zeros (0 when ``k``
    reaches past the stored values)."""
    t = s.get()
    k = keep_count(t.numel() + s.implicit, density)
    return 0.0 if k >= t.numel() else ops.kth_largest_abs(t, k)


def _post_cast(t: Tensor, dtype: str | None, per_row: bool = False) -> Tensor:
    if dtype is None:
        return t
    if dtype == "int8":
        return ops.dequantize_int8(*ops.quantize_int8(t, per_row=per_row))
    return ops.cast_values(t, dtype)


def _density(slots_out: dict[str, Tensor], entries: int) -> dict[str, Any]:
    kept = sum(int((t != 0).sum()) for t in slots_out.values())
    return {"kept": kept, "entries": entries, "density_achieved": kept / entries if entries else 0.0}


def _assemble(delta: Delta, parts: dict[str, Part], step: dict[str, Any], result: dict[str, Any],
              method: str | None = None, config: dict[str, Any] | None = None) -> Delta:
    cfg = copy.deepcopy(delta.config) if config is None else config
    cfg["compression"] = [*copy.deepcopy(delta.config.get("compression", [])), step]
    metrics = copy.deepcopy(delta.metrics)
    metrics["compression"] = [*copy.deepcopy(delta.metrics.get("compression", [])), result]
    return Delta(method=method or delta.method, config=cfg, parts=parts,
                 heads={h: {k: v.detach().clone() for k, v in t.items()} for h, t in delta.heads.items()},
                 fingerprint=copy.deepcopy(delta.fingerprint), metrics=metrics, provenance=_provenance(delta))


def _provenance(delta: Delta) -> Provenance:
    """Compressing keeps the base, task and training record (the delta still serves that task) and records
    the uncompressed delta as its parent."""
    out = delta.provenance.derived("compress", [delta])
    out.train = copy.deepcopy(delta.provenance.train)
    return out


@dataclass
class CompressContext:
    """What a compression method may need besides its options: scoring functions and the base's layers."""

    eval_fn: Callable[[Delta], float] | None = None
    calibration_fn: Callable[[Delta], float] | None = None
    model: nn.Module | None = None
    layer_kinds: Mapping[str, LayerKind | None] | None = None


def compress_delta(
    delta: Delta,
    method: str,
    *,
    eval_fn: Callable[[Delta], float] | None = None,
    calibration_fn: Callable[[Delta], float] | None = None,
    model: nn.Module | None = None,
    layer_kinds: Mapping[str, LayerKind | None] | None = None,
    **options: Any,
) -> Delta:
    """A compressed copy of ``delta`` (the input is not modified); see the module docstring.

    ``options`` are the method's typed config (:mod:`deltatune.algebra.compress_config`: ``density``,
    ``alpha``, ``alphas``, ``q``, ``dtype``, ``rank``, ``scope``, ``target``, ``seed`` as the method takes
    them), parsed by :func:`deltatune.config.parse_config`: an option the method does not take is a
    :class:`ConfigError` listing its fields.  ``dtype`` rounds the kept values of dare/darex-q/magnitude
    (int8 with one scale per tensor) and is the target of ``quantize``; ``model`` (the base) is needed only
    by ``lowrank`` on dense parts, to know each module's layer kind (or ``layer_kinds``, module name → kind,
    when the caller knows them).  ``config["compression"]`` and ``metrics["compression"]`` get one entry per
    compression step (method, parameters, seed; density achieved, σ, threshold, sweeps).
    """
    cfg = parse_compress_options(method, options)
    require_capability(delta, "additive", f"compress ({method})")
    return COMPRESSORS[method].run(delta, cfg, CompressContext(eval_fn, calibration_fn, model, layer_kinds),
                                   step_record(method, cfg))


@register_compressor("lowrank")
def _run_lowrank(delta: Delta, cfg: CompressConfig, ctx: CompressContext, step: dict[str, Any]) -> Delta:
    return _lowrank(delta, int(cfg.rank), cfg.dtype, int(cfg.seed), ctx.model, step, ctx.layer_kinds)


@register_compressor("compeft")
@register_compressor("magnitude")
@register_compressor("dare")
@register_compressor("darex-q")
@register_compressor("quantize")
def _run_values(delta: Delta, cfg: CompressConfig, ctx: CompressContext, step: dict[str, Any]) -> Delta:
    """The methods that act on each part's values (sparsify, rescale, round)."""
    method = step["method"]
    density, dtype, scope, target, seed = (getattr(cfg, k, None) for k in ("density", "dtype", "scope", "target",
                                                                          "seed"))
    alpha, q, alphas = getattr(cfg, "alpha", None), getattr(cfg, "q", None), getattr(cfg, "alphas", DEFAULT_ALPHAS)
    eval_fn, calibration_fn = ctx.eval_fn, ctx.calibration_fn
    tgt = "product" if target == "product" else "factors"
    slots = [s for name, part in delta.parts.items() for s in _slots(name, part, tgt)]
    entries = sum(_finite(s.get(), s.key).numel() + s.implicit for s in slots)  # the update's, zeros included
    result: dict[str, Any] = {"method": method}

    def build(fn: Callable[[_Slot], Tensor]) -> tuple[dict[str, Part], dict[str, Tensor]]:
        new = {}
        for s in slots:
            try:
                new[s.key] = fn(s)
            except ConfigError as exc:  # e.g. an fp16 overflow: name the tensor
                raise ConfigError(f"{s.key}: {exc}") from None
        parts = {name: _rebuild(name, part, tgt, new) for name, part in delta.parts.items()}
        return parts, new

    if method in ("compeft", "magnitude"):
        assert density is not None
        if scope == "global":
            stats = _global_stats(slots, density, need_sigma=method == "compeft")
            result.update({k: v for k, v in stats.items() if k != "sigma" or method == "compeft"})
            sigma_of, thr_of = (lambda s: stats["sigma"]), (lambda s: stats["threshold"])
        else:
            sigma_of = _tensor_sigma
            thr_of = lambda s: _tensor_threshold(s, density)  # noqa: E731
        if method == "magnitude":
            def trim(s: _Slot) -> Tensor:
                t = s.get()
                if t.numel() == 0:
                    return t.clone()
                keep = (t.abs().float() >= thr_of(s)) & (t != 0)
                return _post_cast(torch.where(keep, t, torch.zeros((), dtype=t.dtype)), dtype)
            parts, new = build(trim)
        else:
            def ternary(a: float) -> tuple[dict[str, Part], dict[str, Tensor]]:
                return build(lambda s: ops.compeft(s.get(), density, a, sigma=sigma_of(s),
                                                   threshold=thr_of(s) if s.get().numel() else 0.0))
            if alpha is None and eval_fn is not None:
                sweep: dict[str, float] = {}
                best: tuple[float, float, tuple[dict[str, Part], dict[str, Tensor]]] | None = None
                for a in alphas:
                    built = ternary(float(a))
                    score = float(eval_fn(_assemble(delta, built[0], step, result)))
                    sweep[repr(float(a))] = score
                    if not math.isnan(score) and (best is None or score > best[0]):
                        best = (score, float(a), built)
                if best is None:
                    raise ConfigError(f"eval_fn returned NaN for every α in {list(alphas)}")
                result.update({"alpha": best[1], "alpha_sweep": sweep})
                parts, new = best[2]
            else:
                if alpha is None:
                    raise CalibrationNeeded(
                        "compress (compeft): alpha has no safe default (α = 1 can take a delta to chance); pass "
                        "alpha, or eval_fn to sweep alphas (deltatune.algebra.compress_calibration."
                        "calibrated_compress does it on the delta's recorded eval data or a data file; CLI: "
                        "--alpha A or --data FILE)")
                a = float(alpha)
                result["alpha"] = a
                parts, new = ternary(a)
            if scope == "tensor":
                result["sigma"] = {s.key: sigma_of(s) for s in slots}
    elif method == "dare":
        parts, new = build(lambda s: _post_cast(
            dare(s.get(), density, ops.generator_for(seed, s.key), rescale="inverse"), dtype))
    elif method == "darex-q":
        masked = {s.key: dare(s.get(), density, ops.generator_for(seed, s.key), rescale="none")
                  for s in slots}

        def rescaled(qv: float) -> tuple[dict[str, Part], dict[str, Tensor]]:
            return build(lambda s: _post_cast((masked[s.key].float() / qv).to(masked[s.key].dtype), dtype))

        if q is None:
            if calibration_fn is None:
                raise CalibrationNeeded("compress (darex-q): needs q, or calibration_fn to choose it (e.g. "
                                        "output_change_score; deltatune.algebra.compress_calibration."
                                        "calibrated_compress calibrates it on eval data; CLI: --q Q or --data FILE)")
            choice = ops.choose_q(ops.q_grid(density, Q_GRID_STEPS),
                                  lambda qv: calibration_fn(_assemble(delta, rescaled(qv)[0], step, result)))
            result.update({"q": choice.q, "q_sweep": {repr(k): v for k, v in choice.scores.items()}})
            qv = choice.q
        else:
            qv = float(q)
            result["q"] = qv
        parts, new = rescaled(qv)
    else:  # quantize
        def quant(s: _Slot) -> Tensor:
            t = s.get()
            return _post_cast(t, dtype, per_row=scope == "row")
        parts, new = build(quant)
    result.update(_density(new, entries))
    return _assemble(delta, parts, step, result)


# --------------------------------------------------------------------------------------------------
# low rank
# --------------------------------------------------------------------------------------------------
def _out_in(native: Tensor, kind: LayerKind) -> Tensor:
    return native.t() if is_transposed(kind) else native


def _module_of(model: nn.Module | None, name: str) -> nn.Module | None:
    """The base module ``name`` of ``model`` (what a base-dependent part's update reads), or ``None``."""
    from deltatune.model import get_module

    return None if model is None else get_module(model, name)


def _module_layer_kind(name: str, part: Part, model: nn.Module | None,
                       layer_kinds: Mapping[str, LayerKind | None] | None) -> LayerKind | None:
    """The layer kind of module ``name`` for a part that does not record one: from ``layer_kinds``, else from
    the base ``model``."""
    from deltatune.model import get_module

    if layer_kinds is not None and name in layer_kinds:
        return layer_kinds[name]
    if model is None:
        raise ConfigError(f"lowrank on {part.kind} part {name!r} needs model= (the base) to know whether the "
                          "module is a Linear, Conv1D or Embedding")
    try:
        return layer_kind(get_module(model, name))
    except AttributeError:
        raise ConfigError(f"{part.kind} part {name!r} is not a module of the model given") from None


def _lowrank(delta: Delta, rank: int, dtype: str | None, seed: int, model: nn.Module | None,
             step: dict[str, Any], layer_kinds: Mapping[str, LayerKind | None] | None = None) -> Delta:
    parts: dict[str, Part] = {}
    per_module: dict[str, dict[str, Any]] = {}
    dropped: list[str] = []
    for name, part in delta.parts.items():
        factors = part.factors()
        if factors is not None:
            fa, fb, fs = factors
            kind, total = part.layer_kind(), ops.factor_norm_sq(fa, fb, fs)
            a, b = ops.lowrank_refactor(fa, fb, fs, rank)
        else:
            params = part.update_shapes()
            kind = part.layer_kind()
            if kind is None:
                found = _module_layer_kind(name, part, model, layer_kinds)
                if found is None or "weight" not in params or len(params["weight"]) != 2:
                    dropped.extend(f"{name}.{p}" for p in params)
                    continue
                kind = found
            dropped.extend(f"{name}.{p}" for p in params if p != "weight")  # (IA)³, SSF: their Δb has no LoRA form
            native = part.update("weight", _module_of(model, name) if part.base_dependent else None).detach().float()
            w = _finite(_out_in(native, kind), name)
            total = float(w.double().pow(2).sum())
            how = "exact" if min(w.shape) <= EXACT_SVD_MAX_DIM else "randomized"
            a, b = ops.lowrank_factorize(w, rank, method=how, seed=ops.stable_seed(seed, name))
        if total == 0.0:
            dropped.append(name)
            continue
        r = a.shape[0]
        kept = ops.factor_norm_sq(a, b)
        per_module[name] = {"rank": r, "relative_error": math.sqrt(max(total - kept, 0.0) / total)}
        new = LoRAPart(a.shape[1], b.shape[0], r, 1.0, layer=kind, dtype=torch.float32)
        new.load_tensors({"lora_A": a.contiguous(), "lora_B": b.contiguous()}, name)
        if dtype is not None:
            new = new.to(ops.FLOAT_DTYPES[dtype])
        parts[name] = new
    if dropped:
        warnings.warn(f"lowrank: {len(dropped)} tensor(s) have no low-rank form in a LoRA (biases, norms, zero "
                      f"deltas) and were dropped: {dropped[:6]}{' …' if len(dropped) > 6 else ''}", stacklevel=3)
    max_rank = max((p["rank"] for p in per_module.values()), default=0)
    config = {"r": max_rank, "alpha": float(max_rank), "dropout": 0.0, "targets": sorted(parts), "rslora": False,
              "init": "kaiming", "source": {"method": delta.method, "config": copy.deepcopy(delta.config)}}
    if CONFIG_KEY in delta.config:  # a multi-task merge's kept heads stay selectable (for_task)
        config[CONFIG_KEY] = copy.deepcopy(delta.config[CONFIG_KEY])
    result = {"method": "lowrank", "modules": per_module, "dropped": dropped}
    return _assemble(delta, parts, step, result, method="lora", config=config)


# --------------------------------------------------------------------------------------------------
# DAREx-q calibration
# --------------------------------------------------------------------------------------------------
def output_change_score(model: nn.Module, reference: Delta, batch: dict[str, Tensor]) -> Callable[[Delta], float]:
    """DAREx-q's unlabelled proxy: ``score(Δ') = mean |h_L(θ₀ ⊕ Δ') − h_L(θ₀ ⊕ Δ)|`` on one batch.

    ``h_L`` is the last hidden layer's output (``hidden_states[-1]``; the logits when the model returns no
    hidden states).  ``model`` is the bare base; each candidate is attached, run and detached again, and
    the reference's task heads are loaded once (candidates share them).
    """
    from deltatune.model import attach_parts, detach, load_heads

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    load_heads(model, reference)
    model.eval()
    name = "__darex_q_calibration__"

    def last_layer(d: Delta) -> Tensor:
        attach_parts(model, d.parts, name)
        try:
            with torch.no_grad():
                out = model(**inputs, output_hidden_states=True)
        finally:
            detach(model, name)
        hidden = getattr(out, "hidden_states", None)
        return (hidden[-1] if hidden else out.logits).float()

    ref = last_layer(reference)
    return lambda candidate: float((last_layer(candidate) - ref).abs().mean())


def calibration_batch(delta: Delta, model: str | None = None, size: int = 16) -> dict[str, Tensor]:
    """The first ``size`` training examples of the task the delta was trained on, padded into one batch."""
    from deltatune.api import base_model_path, recorded_train_config
    from deltatune.train.collate import pad_collate
    from deltatune.train.config import TrainConfig
    from deltatune.train.tasks import build_task

    rec = recorded_train_config(delta)
    if not rec.get("task"):
        raise ConfigError("the delta records no training task to draw a calibration batch from; pass q")
    cfg = TrainConfig(model=base_model_path(delta, model), task=rec["task"], data=rec.get("data"),
                      eval_data=rec.get("eval_data"), train_limit=size, eval_limit=1,
                      max_length=int(rec.get("max_length", 128)))
    task = build_task(cfg)
    rows = task.train.select(range(min(size, len(task.train))))
    keys = ("input_ids", "attention_mask", "token_type_ids")
    return pad_collate([{k: r[k] for k in keys if k in r} for r in rows], task.pad_token_id)
