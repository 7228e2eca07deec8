"""Co-permutation of attention heads and FFN channels (S2FT, Yang et al., NeurIPS 2024), and the block geometry
it needs.

A transformer block's output does not change when (a) its attention heads are reordered consistently — the
rows of ``q``, ``k``, ``v`` per head and the matching columns of the output projection ``o`` — because heads
are computed independently and ``o`` sums over them; (b) its FFN channels are reordered consistently — the rows
(and bias) of ``up`` and ``gate`` and the columns of ``down`` — because the activation is elementwise.  S2FT
uses this to make a selection of heads/channels a contiguous block.

Grouped-query attention: query head ``h`` reads key/value head ``h // (heads / kv_heads)``, so heads can only
move with their KV group.  The unit of the attention permutation (and of S2FT's head selection) is therefore a
**KV group**: one key/value head and the ``heads / kv_heads`` query heads that read it (one head when there is
no GQA).  GPT-2's fused ``c_attn`` (``[q | k | v]`` output columns of a Conv1D) is permuted per third.

:func:`block_layouts` names each block's modules and head geometry for ``llama``, ``gpt2`` and ``bert``;
:func:`selection_order` builds S2FT's order (only-first, both, only-second, rest) from two selections;
:func:`co_permute` applies per-block permutations to a model in place; :func:`permute_slice_part` maps a slice
part of the original layout to the permuted one.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from deltatune.errors import ConfigError, TargetError
from deltatune.model import get_module, logical_modules
from deltatune.parts.base import write_in_place
from deltatune.parts.layers import is_transposed, layer_kind
from deltatune.parts.slice import SlicePart

#: ``model_type`` → (regex of a block's name, attention names, FFN names) relative to the block
ARCHS: dict[str, tuple[str, dict[str, str], dict[str, str]]] = {
    "llama": (r"(?:.*\.)?layers\.(\d+)$",
              {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj"},
              {"gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}),
    "gpt2": (r"(?:.*\.)?h\.(\d+)$", {"qkv": "attn.c_attn", "o": "attn.c_proj"},
             {"up": "mlp.c_fc", "down": "mlp.c_proj"}),
    "bert": (r"(?:.*\.)?layer\.(\d+)$",
             {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
              "o": "attention.output.dense"},
             {"up": "intermediate.dense", "down": "output.dense"}),
}


@dataclass(frozen=True)
class BlockLayout:
    """One transformer block: its index, module names (``None`` where the architecture has none) and geometry."""

    index: int
    q: str | None
    k: str | None
    v: str | None
    qkv: str | None  # GPT-2's fused [q | k | v] Conv1D
    o: str
    gate: str | None
    up: str
    down: str
    heads: int
    kv_heads: int
    head_dim: int
    attn_width: int  # heads · head_dim: the query projection's output width (a fused qkv's q section)
    model_dim: int  # the residual stream's width (hidden_size): the other side of v's rows, o's columns, FFN channels
    intermediate: int

    @property
    def group(self) -> int:
        """Query heads per KV group."""
        return self.heads // self.kv_heads

    @property
    def units(self) -> int:
        """Attention units (KV groups) of the block."""
        return self.kv_heads

    def v_module(self) -> str:
        return self.v if self.v is not None else self.qkv  # type: ignore[return-value]

    def v_rows(self, units: Sequence[int]) -> list[int]:
        """Output channels of the value projection that belong to the KV groups ``units``."""
        offset = 2 * self.attn_width if self.qkv is not None else 0
        return [offset + u * self.head_dim + d for u in sorted(units) for d in range(self.head_dim)]

    def o_cols(self, units: Sequence[int]) -> list[int]:
        """Input channels of the output projection (the query heads of the KV groups ``units``)."""
        width = self.group * self.head_dim
        return [u * width + d for u in sorted(units) for d in range(width)]


def block_layouts(model: nn.Module) -> list[BlockLayout]:
    """The blocks of a llama / gpt2 / bert model in order; :class:`TargetError` for another architecture."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHS:
        raise TargetError(f"S2FT knows the block layout of {sorted(ARCHS)}, not model_type {model_type!r}")
    pattern, attn, ffn = ARCHS[model_type]
    hidden = config.hidden_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    names = {int(m.group(1)): n for n, _ in logical_modules(model) if (m := re.fullmatch(pattern, n))}
    if not names:
        raise TargetError(f"no transformer block matching {pattern!r} in this {model_type} model")
    layouts = []
    for index in sorted(names):
        full = {k: f"{names[index]}.{v}" for k, v in {**attn, **ffn}.items()}
        up = get_module(model, full["up"])
        inter = up.weight.shape[1] if is_transposed(layer_kind(up)) else up.weight.shape[0]
        layouts.append(BlockLayout(index, full.get("q"), full.get("k"), full.get("v"), full.get("qkv"), full["o"],
                                   full.get("gate"), full["up"], full["down"], heads, kv_heads, head_dim,
                                   heads * head_dim, hidden, int(inter)))
    return layouts


def selection_order(first: Sequence[int], second: Sequence[int], total: int) -> list[int]:
    """S2FT's order of ``total`` units: only in ``first``, in both, only in ``second``, then the rest (each
    ascending).  Afterwards ``first`` occupies positions ``[0, |first|)`` and ``second`` the contiguous range
    ``[|first∖second|, |first ∪ second|)``."""
    a, b = set(first), set(second)
    for unit in a | b:
        if not 0 <= unit < total:
            raise ConfigError(f"unit {unit} is outside 0..{total - 1}")
    return (sorted(a - b) + sorted(a & b) + sorted(b - a) + sorted(set(range(total)) - a - b))


def expand(order: Sequence[int], width: int) -> Tensor:
    """A channel permutation from a unit permutation: unit ``u`` spans channels ``[u·width, (u+1)·width)``."""
    units = torch.as_tensor(list(order), dtype=torch.int64)
    return (units[:, None] * width + torch.arange(width)[None, :]).reshape(-1)


def check_permutation(perm: Tensor, size: int, what: str) -> None:
    if perm.numel() != size or not torch.equal(perm.sort().values, torch.arange(size)):
        raise ConfigError(f"{what}: not a permutation of 0..{size - 1}")


def _permute(module: nn.Module, perm: Tensor, axis: str) -> None:
    """Reorder the output (``axis="out"``: weight rows in the (out, in) convention, and the bias) or input
    channels of a Linear/Conv1D in place: new channel ``j`` is old channel ``perm[j]``."""
    kind = layer_kind(module)
    out_dim = 1 if is_transposed(kind) else 0
    dim = out_dim if axis == "out" else 1 - out_dim
    w = module.weight  # through write_in_place: batched forms kept from the unpermuted weights are renewed
    write_in_place(w, w.detach().index_select(dim, perm.to(w.device)))
    if axis == "out" and getattr(module, "bias", None) is not None:
        b = module.bias
        write_in_place(b, b.detach().index_select(0, perm.to(b.device)))


def co_permute(model: nn.Module, unit_orders: dict[int, Sequence[int]] | None = None,
               channel_orders: dict[int, Sequence[int]] | None = None) -> None:
    """Permute ``model``'s attention KV groups and FFN channels in place, block by block; outputs are unchanged.

    ``unit_orders[b]`` is the new order of block ``b``'s KV groups (new position ``j`` holds old group
    ``order[j]``): it moves the rows (and biases) of ``q``, ``k``, ``v`` (whole KV groups: the key/value head
    and its query heads) and the matching columns of ``o``.  ``channel_orders[b]`` is the new order of the FFN
    channels: rows (and biases) of ``up`` and ``gate`` together, columns of ``down``."""
    layouts = {b.index: b for b in block_layouts(model)}
    for index, order in (unit_orders or {}).items():
        block = layouts.get(index)
        if block is None:
            raise TargetError(f"block {index} does not exist; the model has blocks 0..{len(layouts) - 1}")
        check_permutation(torch.as_tensor(list(order)), block.units, f"block {index} KV-group order")
        q_perm = expand(order, block.group * block.head_dim)
        kv_perm = expand(order, block.head_dim)
        if block.qkv is not None:
            h = block.attn_width
            _permute(get_module(model, block.qkv), torch.cat([q_perm, h + kv_perm, 2 * h + kv_perm]), "out")
        else:
            _permute(get_module(model, block.q), q_perm, "out")  # type: ignore[arg-type]
            _permute(get_module(model, block.k), kv_perm, "out")  # type: ignore[arg-type]
            _permute(get_module(model, block.v), kv_perm, "out")  # type: ignore[arg-type]
        _permute(get_module(model, block.o), q_perm, "in")
    for index, order in (channel_orders or {}).items():
        block = layouts.get(index)
        if block is None:
            raise TargetError(f"block {index} does not exist; the model has blocks 0..{len(layouts) - 1}")
        perm = torch.as_tensor(list(order), dtype=torch.int64)
        check_permutation(perm, block.intermediate, f"block {index} FFN channel order")
        for name in (block.up, block.gate):
            if name is not None:
                _permute(get_module(model, name), perm, "out")
        _permute(get_module(model, block.down), perm, "in")


def permute_slice_part(part: SlicePart, perm: Tensor) -> SlicePart:
    """The slice part for the permuted layout: channel ``perm[j]`` of the original is channel ``j`` now, so
    index ``i`` becomes ``perm⁻¹[i]`` and the block's rows/columns follow.  Applied to the co-permuted module it
    gives the same output as ``part`` on the original module."""
    span = part.d_out if part.axis == "out" else part.d_in
    perm = perm.to(torch.int64)
    check_permutation(perm, span, f"slice {part.axis} permutation")
    device = part.block.device  # the permuted part lives where the part does (a co-permuted model on a GPU)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(span)
    new = inverse.to(device)[part.indices.to(device=device, dtype=torch.int64)]
    order = new.argsort()
    out = SlicePart(part.d_in, part.d_out, part.axis, new[order], part.layer, dtype=part.block.dtype, device=device)
    dim = 0 if part.axis == "out" else 1
    with torch.no_grad():
        out.block.copy_(part.block.detach().index_select(dim, order))
    return out


def qkv_perm(block: BlockLayout, order: Sequence[int]) -> Tensor:
    """The output-channel permutation of a fused ``[q | k | v]`` projection (or of ``v`` alone when unfused)."""
    kv_perm = expand(order, block.head_dim)
    if block.qkv is None:
        return kv_perm
    h = block.attn_width
    return torch.cat([expand(order, block.group * block.head_dim), h + kv_perm, 2 * h + kv_perm])
