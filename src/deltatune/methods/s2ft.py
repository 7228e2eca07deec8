"""S2FT: structured sparse fine-tuning (Yang et al., "S2FT: Efficient, Scalable and Generalizable LLM Fine-tuning
by Structured Sparsity", NeurIPS 2024).

Per transformer block, S2FT trains dense slices of the coupled weights of selected structures:

* attention: the value-projection **rows** (``v``) and/or the output-projection **columns** (``o``) of selected
  heads — under grouped-query attention of selected **KV groups** (one key/value head and the query heads that
  read it), because only whole groups can be permuted (see :mod:`deltatune.ops.permute`);
* FFN: the **rows** of ``up`` (``u``) and/or the **columns** of ``down`` (``d``) of selected channels.

Selection: per component ``c ∈ {v, o, u, d}`` a count ``n_c`` (``c_count``, or ``max(1, ⌊c_ratio · pool⌋)``
for a ratio > 0, where pool = units × blocks as in the reference scripts; the reference's plain ``int()`` gives
0 on small models) of units drawn from the **global pool across blocks**, so the per-block count varies:

* ``criterion="random"`` — uniformly without replacement (the reference's default), from
  ``torch.Generator().manual_seed(seed + component number)``;
* ``criterion="weight_norm"`` — the ``n_c`` units of largest Frobenius norm of their slice of the pretrained
  weight (ties by position);
* explicit per-block lists (``v_heads``, ``o_heads``, ``u_channels``, ``d_channels``) override a component's
  count; a block, head (group) or channel the model does not have raises :class:`TargetError` naming it.

Layout used for training: the **original** one.  The reference co-permutes the model so the selected
rows/columns become one contiguous block per weight; that permutation is output-preserving, so training a
:class:`~deltatune.parts.slice.SlicePart` on the index set of the original layout is the same computation (the
same sums, in another order) and leaves the base model untouched, so the delta applies to the unpermuted base
like any other.  :func:`deltatune.ops.permute.co_permute` and :func:`s2ft_permutation` give the
co-permutation (and :func:`deltatune.ops.permute.permute_slice_part` maps a trained part into it) for anyone who
wants the contiguous layout; the tests check that the permuted model's outputs equal the original's.

Partial back-propagation: the ``o``/``d`` slices (input columns) run through a custom autograd function that
saves only the input slice ``x[..., I]``; optimiser state exists only for the slices (the only parameters).
Defaults are the LLaMA-2 commonsense script's (``o_ratio=0.052``, ``d_ratio=0.02``) but the learning rate, 5e-4 as
SpIEL's rather than the script's 2e-4: at 2e-4 the slices barely move in a few hundred steps on MiniLM (SST-2 at LoRA
r=8's count, 300 steps, seed 0: 0.783 at 2e-4, 0.808 at 5e-4, 0.825 at 1e-3;
``benchmarks/results/glue_lr_probe.runs.jsonl``).  On an LLM, pass the script's rate with ``--lr``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import nn

from deltatune.config import require, seed_option
from deltatune.errors import ConfigError, TargetError
from deltatune.methods.registry import Method, register_method
from deltatune.model import get_module
from deltatune.ops.permute import BlockLayout, block_layouts, expand, qkv_perm, selection_order
from deltatune.parts.layers import in_out_features, is_transposed, layer_kind
from deltatune.parts.slice import SlicePart

#: component → (ratio field, count field, explicit field, what a unit is)
COMPONENTS: dict[str, tuple[str, str, str, str]] = {
    "v": ("v_ratio", "v_count", "v_heads", "head (KV group)"),
    "o": ("o_ratio", "o_count", "o_heads", "head (KV group)"),
    "u": ("u_ratio", "u_count", "u_channels", "FFN channel"),
    "d": ("d_ratio", "d_count", "d_channels", "FFN channel"),
}
Selection = dict[str, dict[int, list[int]]]


@dataclass
class S2FTConfig:
    method: ClassVar[str] = "s2ft"
    v_ratio: float = field(default=0.0, metadata={"help": "fraction of all heads (KV groups) whose v rows train"})
    o_ratio: float = field(default=0.052, metadata={"help": "fraction of all heads (KV groups) whose o columns "
                                                            "train"})
    u_ratio: float = field(default=0.0, metadata={"help": "fraction of all FFN channels whose up rows train"})
    d_ratio: float = field(default=0.02, metadata={"help": "fraction of all FFN channels whose down columns train"})
    v_count: int | None = field(default=None, metadata={"help": "exact number of v heads (overrides v_ratio)"})
    o_count: int | None = field(default=None, metadata={"help": "exact number of o heads (overrides o_ratio)"})
    u_count: int | None = field(default=None, metadata={"help": "exact number of up channels (overrides u_ratio)"})
    d_count: int | None = field(default=None, metadata={"help": "exact number of down channels (overrides d_ratio)"})
    v_heads: dict[int, list[int]] | None = field(
        default=None, metadata={"help": "explicit {block: [head (KV group under GQA), …]} for v (overrides v_count)"})
    o_heads: dict[int, list[int]] | None = field(
        default=None, metadata={"help": "explicit {block: [head (KV group under GQA), …]} for o (overrides o_count)"})
    u_channels: dict[int, list[int]] | None = field(
        default=None, metadata={"help": "explicit {block: [FFN channel, …]} for up (overrides u_count)"})
    d_channels: dict[int, list[int]] | None = field(
        default=None, metadata={"help": "explicit {block: [FFN channel, …]} for down (overrides d_count)"})
    criterion: Literal["random", "weight_norm"] = field(
        default="random", metadata={"help": "selection: random (global pool, seeded) or weight_norm (largest slices)"})
    seed: int = seed_option("seed of the random selection")

    def __post_init__(self) -> None:
        for ratio, count, _, _ in COMPONENTS.values():
            r, n = getattr(self, ratio), getattr(self, count)
            require(0.0 <= r <= 1.0, f"s2ft config.{ratio} must be in [0, 1], got {r}")
            require(n is None or n >= 0, f"s2ft config.{count} must be ≥ 0, got {n}")
        require(self.criterion in ("random", "weight_norm"),
                f"s2ft config.criterion must be random or weight_norm, got {self.criterion!r}")
        require(any(self.wants(c) for c in COMPONENTS),
                "s2ft config selects nothing: set a ratio, count or explicit selection for one of v, o, u, d")

    def wants(self, comp: str) -> bool:
        ratio, count, explicit, _ = COMPONENTS[comp]
        if getattr(self, explicit) is not None:
            return bool(getattr(self, explicit))
        if getattr(self, count) is not None:
            return getattr(self, count) > 0
        return getattr(self, ratio) > 0


def pool_size(comp: str, block: BlockLayout) -> int:
    """Units of ``comp`` in one block: KV groups for ``v``/``o``, FFN channels for ``u``/``d``."""
    return block.units if comp in ("v", "o") else block.intermediate


def _module(block: BlockLayout, comp: str) -> str:
    return {"v": block.v_module(), "o": block.o, "u": block.up, "d": block.down}[comp]


def channels(block: BlockLayout, comp: str, units: list[int]) -> list[int]:
    """The rows (``v``, ``u``) or columns (``o``, ``d``) of the component's weight that ``units`` cover."""
    if comp == "v":
        return block.v_rows(units)
    if comp == "o":
        return block.o_cols(units)
    return sorted(units)


def _unit_scores(model: nn.Module, block: BlockLayout, comp: str) -> torch.Tensor:
    """‖W slice‖_F of every unit of ``comp`` in ``block`` (the weight_norm criterion)."""
    module = get_module(model, _module(block, comp))
    w = module.weight.detach().float()
    w = w.t() if is_transposed(layer_kind(module)) else w  # (out, in)
    n = pool_size(comp, block)
    if comp in ("v", "u"):
        rows = torch.as_tensor(channels(block, comp, list(range(n))))
        return w.index_select(0, rows).reshape(n, -1).pow(2).sum(1).sqrt()
    cols = torch.as_tensor(channels(block, comp, list(range(n))))
    return w.index_select(1, cols).t().reshape(n, -1).pow(2).sum(1).sqrt()


def _explicit(blocks: list[BlockLayout], comp: str, given: dict[int, list[int]]) -> dict[int, list[int]]:
    field_name, what = COMPONENTS[comp][2], COMPONENTS[comp][3]
    by_index = {b.index: b for b in blocks}
    out: dict[int, list[int]] = {}
    for index, units in given.items():
        if index not in by_index:
            raise TargetError(f"s2ft config.{field_name}: block {index} does not exist; the model has blocks "
                              f"{min(by_index)}..{max(by_index)}")
        n = pool_size(comp, by_index[index])
        bad = [u for u in units if not 0 <= u < n]
        if bad:
            raise TargetError(f"s2ft config.{field_name}: {what} {bad[0]} of block {index} does not exist; block "
                              f"{index} has {what}s 0..{n - 1}")
        if len(set(units)) != len(units):
            raise TargetError(f"s2ft config.{field_name}: block {index} lists a {what} twice: {sorted(units)}")
        if units:
            out[index] = sorted(units)
    return out


def select(model: nn.Module, config: S2FTConfig, blocks: list[BlockLayout] | None = None) -> Selection:
    """``{component: {block: sorted units}}`` by the config's explicit lists, counts/ratios and criterion."""
    blocks = block_layouts(model) if blocks is None else blocks
    chosen: Selection = {}
    for number, (comp, (ratio, count, explicit, what)) in enumerate(COMPONENTS.items()):
        if getattr(config, explicit) is not None:
            chosen[comp] = _explicit(blocks, comp, getattr(config, explicit))
            continue
        pool = [(b.index, u) for b in blocks for u in range(pool_size(comp, b))]
        n = getattr(config, count)
        if n is None:
            r = getattr(config, ratio)
            n = max(1, int(r * len(pool))) if r > 0 else 0
        if n > len(pool):
            raise ConfigError(f"s2ft config.{count} is {n}, but the model has only {len(pool)} {what}s")
        if n == 0:
            chosen[comp] = {}
            continue
        if config.criterion == "random":
            gen = torch.Generator().manual_seed(config.seed + number)
            picked = torch.randperm(len(pool), generator=gen)[:n].tolist()
        else:
            scores = torch.cat([_unit_scores(model, b, comp) for b in blocks])
            picked = torch.argsort(-scores, stable=True)[:n].tolist()
        per_block: dict[int, list[int]] = {}
        for i in picked:
            index, unit = pool[i]
            per_block.setdefault(index, []).append(unit)
        chosen[comp] = {k: sorted(v) for k, v in sorted(per_block.items())}
    return chosen


def unit_size(block: BlockLayout, comp: str) -> int:
    """Trainable scalars one unit of ``comp`` adds: a KV group's ``v`` rows (``head_dim × hidden``) or its query
    heads' ``o`` columns (``hidden × group·head_dim``); an FFN channel's ``up`` row or ``down`` column
    (``hidden``), with ``hidden`` the residual width (``hidden_size``, which need not be ``heads · head_dim``)."""
    if comp == "v":
        return block.head_dim * block.model_dim
    if comp == "o":
        return block.model_dim * block.group * block.head_dim
    return block.model_dim


def budget_config(model: nn.Module, trainable: int, shares: dict[str, float] | None = None,
                  seed: int = 0) -> S2FTConfig:
    """An :class:`S2FTConfig` with counts that spend about ``trainable`` scalars (e.g. a LoRA's count, for a
    matched-budget comparison), split over components by ``shares`` (default ``{"o": 0.5, "d": 0.5}``, the
    components of the reference's LLaMA scripts): ``n_c = round(trainable · share_c / unit_size_c)``, at least
    one and at most the pool."""
    shares = {"o": 0.5, "d": 0.5} if shares is None else shares
    unknown = sorted(set(shares) - set(COMPONENTS))
    if unknown or not shares or any(v <= 0 for v in shares.values()):
        raise ConfigError(f"s2ft budget shares must be positive numbers for some of {list(COMPONENTS)}, got {shares}")
    if trainable < 1:
        raise ConfigError(f"s2ft budget must be ≥ 1 trainable scalar, got {trainable}")
    blocks = block_layouts(model)
    total = sum(shares.values())
    counts: dict[str, int] = {}
    for comp, share in shares.items():
        pool = sum(pool_size(comp, b) for b in blocks)
        counts[COMPONENTS[comp][1]] = min(pool, max(1, round(trainable * share / total / unit_size(blocks[0], comp))))
    zero = {COMPONENTS[c][0]: 0.0 for c in COMPONENTS}
    return S2FTConfig(**zero, **counts, seed=seed)


def s2ft_permutation(model: nn.Module, selection: Selection) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
    """``(unit_orders, channel_orders)`` for :func:`deltatune.ops.permute.co_permute` that make each block's
    selected ``v`` rows and ``o`` columns (KV groups ordered only-v, both, only-o, rest) and ``up`` rows and
    ``down`` columns (only-u, both, only-d, rest) contiguous, as in the reference implementation."""
    units, chans = {}, {}
    for block in block_layouts(model):
        v, o = selection.get("v", {}).get(block.index, []), selection.get("o", {}).get(block.index, [])
        u, d = selection.get("u", {}).get(block.index, []), selection.get("d", {}).get(block.index, [])
        units[block.index] = selection_order(v, o, block.units)
        chans[block.index] = selection_order(u, d, block.intermediate)
    return units, chans


def component_perm(block: BlockLayout, comp: str, unit_order: list[int], channel_order: list[int]) -> torch.Tensor:
    """The channel permutation the co-permutation applies along the axis a component's slice indexes."""
    if comp == "v":
        return qkv_perm(block, unit_order)
    if comp == "o":
        return expand(unit_order, block.group * block.head_dim)
    return torch.as_tensor(channel_order, dtype=torch.int64)


@register_method
class S2FT(Method):
    name = "s2ft"
    config_cls = S2FTConfig
    summary = "S2FT structured sparse FT: dense slices (v/up rows, o/down columns) of selected heads and channels"
    part_kinds = (SlicePart,)
    examples = {"": {"v_ratio": 0.5, "o_ratio": 0.5, "u_ratio": 0.05, "d_ratio": 0.05},
                "down-norm": {"o_ratio": 0.0, "d_count": 9, "criterion": "weight_norm"},
                "explicit": {"o_ratio": 0.0, "d_ratio": 0.0, "v_heads": {0: [1]}, "o_heads": {1: [0, 1]},
                             "u_channels": {0: [3, 60]}}}
    default_lr = 5e-4  # not the LLaMA script's 2e-4: see the module docstring

    def create_parts(self, model: nn.Module, config: S2FTConfig, exclude: list[str]) -> dict[str, SlicePart]:
        blocks = block_layouts(model)
        selection = select(model, config, blocks)
        parts: dict[str, SlicePart] = {}
        for block in blocks:
            for comp in COMPONENTS:
                units = selection[comp].get(block.index)
                name = _module(block, comp)
                if not units or name in exclude:
                    continue
                module = get_module(model, name)
                d_in, d_out = in_out_features(module)
                axis = "out" if comp in ("v", "u") else "in"
                idx = torch.as_tensor(channels(block, comp, units), dtype=torch.int64, device=module.weight.device)
                parts[name] = SlicePart(d_in, d_out, axis, idx, layer_kind(module), dtype=module.weight.dtype,
                                        device=module.weight.device)
        if not parts:
            raise ConfigError("s2ft config selected no head or channel of this model")
        return parts
