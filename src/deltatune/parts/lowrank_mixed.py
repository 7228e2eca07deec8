"""One batched pass for the low-rank family (LoRA, DoRA) over a batch whose rows use different parts.

Every member of the family is, on one row, *a gain on the base output plus a low-rank term* (its
:meth:`~deltatune.parts.lora.LowRankFactors.row_factors` and :meth:`~deltatune.parts.lora.LowRankFactors.output_gain`):

    y_i = g_a ⊙ (out_i − b) + b + (x_i A_aᵀ) B'_aᵀ        for row i on part a

— LoRA: ``g = 1``, ``B' = s·B`` (Hu et al., 2022); DoRA: ``g = m / ‖W + s·BA‖_c`` and ``B' = s·(g ⊙ B)`` (Liu et al.,
2024, Eq. 5 without forming ``W'``).  So LoRAs of any rank and DoRAs share one pass: the gains are one row-wise
multiply, and the low-rank terms are two GEMMs over the concatenated ranks (Punica/S-LoRA's segmented products
written as one masked product), or, for many distinct parts or long rows, the per-row
gather of BGMV (:func:`rows_of`).  Everything the pass prepares (the concatenated factors, the gain stack, each
row's mask and gain) is kept in the routing context's ``cache`` while no gradient flows, and each part's own
factors are kept on the part (:meth:`~deltatune.parts.base.Part.prepared`) across routing contexts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltatune.parts.base import Part, route_rows
from deltatune.parts.layers import LayerKind, scaled_lookup

if TYPE_CHECKING:
    from deltatune.parts.lora import LowRankFactors

#: Per-row weights are kept for the routing context while they hold at most this many elements beyond the stack
#: itself (per layer); a batch of many rows over few LoRAs gathers them again at every call instead.
ROW_CACHE_EXTRA = 1 << 20


def low_rank_onto(x: Tensor, out: Tensor, base: nn.Module, parts: Sequence[Part | None], row_ids: Tensor,
                  cache: dict[Any, Any] | None = None) -> Tensor:
    """``out`` (the base module's output on the whole batch) with row ``i`` (or token) made
    ``g_a ⊙ (out_i − b) + b + (x_i A_aᵀ) B'_aᵀ`` for its part ``a = parts[row_ids[i]]``; rows of ``None`` unchanged.

    Linear/Conv1D layers, when :func:`concat_pays` (a few distinct parts; one token per row allows more), run the
    concatenated product ``((x A_catᵀ) ⊙ member[ids]) B'_catᵀ``: every part of the batch concatenated along the
    rank, two GEMMs and a row mask — no per-row weight copies, no padding to the largest rank.  Many distinct small
    parts and embeddings gather ``Aᵀ``/``B'ᵀ`` per row (:func:`rows_of`; ranks zero-padded to ``r_max``)
    and run two batched products.  A part that cannot join
    (:meth:`~deltatune.parts.lora.LowRankFactors.batches_in_family`: DoRA on an embedding or under dropout) sends
    every part of the pass to its own forward on its rows."""
    members = [p for p in parts if p is not None]
    if not members:
        return out
    if not all(p.batches_in_family() for p in members):  # type: ignore[attr-defined]
        return route_rows(x, out, row_ids, [None if p is None else (lambda sub, p=p: p(sub, base)) for p in parts])
    dtype = out.dtype if out.is_floating_point() else None
    reuse = cache is not None and not (torch.is_grad_enabled() and any(
        t.requires_grad for p in members for t in p.parameters()))
    keep = cache if reuse else None

    def kept(key: Any, build: Callable[[], Any]) -> Any:
        if keep is None:
            return build()
        if key not in keep:
            keep[key] = build()
        return keep[key]

    gains = kept(("gains", dtype), lambda: gain_stack(parts, base, kept=reuse))
    out = gained(out, base, gains, row_ids, keep)
    embedding = members[0].layer is LayerKind.EMBEDDING  # type: ignore[attr-defined]
    if not embedding and concat_pays(members, decode_shaped(x, row_ids)):
        a_t, b_t, member = kept(("concat", dtype), lambda: concat_lora_weights(parts, base, dtype, kept=reuse))
        h = x.reshape(-1, x.shape[-1]).to(a_t.dtype) @ a_t  # (tokens, Σr)
        if len(parts) > 1:  # else every row is on the one part: no row mask to apply
            mask = kept(("concat_mask", dtype, tuple(x.shape[:-1])), lambda: token_mask(member, row_ids, x))
            h = h.mul_(mask) if keep is not None else h * mask
        flat = out.reshape(-1, out.shape[-1]).to(b_t.dtype)
        return torch.addmm(flat, h, b_t).reshape(out.shape).to(out.dtype)  # out + h B'_catᵀ in one product
    a_stack, b_stack = kept(("stack", dtype), lambda: stack_lora_weights(parts, base, dtype, kept=reuse))
    if embedding:
        xs, ids = x, row_ids
        if row_ids.dim() == 2:  # per token: every token is a row of one
            xs, ids = x.reshape(-1, 1), row_ids.reshape(-1)
        a_rows, b_rows = a_stack.index_select(0, ids), b_stack.index_select(0, ids)  # (rows, in, r), (rows, r, out)
        h = torch.gather(a_rows, 1, xs.unsqueeze(-1).expand(-1, -1, a_rows.shape[2]))  # (rows, tokens, r)
        return out + scaled_lookup(torch.bmm(h, b_rows).reshape(out.shape), base).to(out.dtype)
    a_rows, b_rows = rows_of(a_stack, b_stack, row_ids, keep, dtype)
    xs = x.reshape(a_rows.shape[0], -1, x.shape[-1]).to(a_rows.dtype)  # (rows, tokens, in)
    flat = out.reshape(a_rows.shape[0], -1, out.shape[-1])
    return torch.baddbmm(flat.to(b_rows.dtype), torch.bmm(xs, a_rows), b_rows).reshape(out.shape).to(out.dtype)


def _kept_on_part(part: Part, key: Any, build: Callable[[], tuple[Tensor, ...]], base: nn.Module) -> tuple[Tensor, ...]:
    """``build()`` detached, kept on ``part`` (:meth:`~deltatune.parts.base.Part.prepared`) while neither the part nor,
    for a base-dependent kind, the base module's own tensors change."""
    depends = tuple(base.parameters(recurse=False)) if part.base_dependent else ()
    return part.prepared((*key, id(base)), lambda: tuple(t.detach() for t in build()), *depends)


def gain_stack(parts: Sequence[Part | None], base: nn.Module, kept: bool = False) -> Tensor | None:
    """``G (n, out)``: row ``k`` is ``parts[k]``'s gain on the base output (ones for ``None`` and gainless parts);
    ``None`` when no part has a gain."""
    def gain(p: Part | None) -> Tensor | None:
        if p is None or not _member(p).has_gain:
            return None
        if kept:
            return _kept_on_part(p, ("gain",), lambda: (_member(p).output_gain(base),), base)[0]
        return _member(p).output_gain(base)

    gains = [gain(p) for p in parts]
    present = [g for g in gains if g is not None]
    if not present:
        return None
    ones = torch.ones(present[0].shape[-1], dtype=present[0].dtype, device=present[0].device)
    return torch.stack([ones if g is None else g for g in gains])


def gained(out: Tensor, base: nn.Module, gains: Tensor | None, row_ids: Tensor,
           cache: dict[Any, Any] | None) -> Tensor:
    """``g_i ⊙ (out_i − b) + b`` per row (token) ``i`` with ``g_i = gains[row_ids[i]]`` — one ``addcmul`` with each
    row's gain and ``(1 − g_i) ⊙ b`` kept for the routing context; ``out`` itself when no part has a gain."""
    if gains is None:
        return out
    key = ("gain_rows", out.dim(), out.dtype)
    if cache is not None and key in cache:
        g, shift = cache[key]
    else:
        g = gains.index_select(0, row_ids.reshape(-1))
        g = g.reshape(*row_ids.shape, *([1] * (out.dim() - row_ids.dim() - 1)), g.shape[-1])
        bias = getattr(base, "bias", None)
        shift = None if bias is None else (1 - g) * bias.to(g.dtype)
        if cache is not None:
            cache[key] = (g, shift)
    scaled = out.to(g.dtype) * g if shift is None else torch.addcmul(shift, out.to(g.dtype), g)
    return scaled.to(out.dtype)


def token_mask(member: Tensor, row_ids: Tensor, x: Tensor) -> Tensor:
    """``member[id]`` for every token of ``x`` flattened to ``(tokens, in)``: per-row ids repeated over each row's
    tokens, per-token ids as they are — ``(tokens, Σr)``."""
    tokens = x.reshape(-1, x.shape[-1]).shape[0]
    mask = member.index_select(0, row_ids.reshape(-1))
    return mask.repeat_interleave(tokens // mask.shape[0], dim=0) if mask.shape[0] != tokens else mask


def stack_lora_weights(parts: Sequence[Part | None], base: nn.Module, dtype: torch.dtype | None,
                       kept: bool = False) -> tuple[Tensor, Tensor]:
    """Stack ``Aᵀ`` as ``(n, in, r_max)`` and ``B'ᵀ`` as ``(n, r_max, out)`` (the layouts ``bmm`` takes, so a row's
    term is ``x Aᵀ B'ᵀ``); ``None`` and ranks below ``r_max`` → zeros.  ``kept`` (no gradient flows): each part's
    transposed pair is kept on the part, so a new routing context (rows joining or leaving) only stacks them."""
    members: list[LowRankFactors] = [_member(p) for p in parts if p is not None]
    ref = members[0]
    r_max = max(p.rank for p in members)
    dt = dtype or ref.lora_A.dtype

    def transposed(p: LowRankFactors) -> tuple[Tensor, Tensor]:
        a, b = p.row_factors(base)
        a, b = a.t().to(dt), b.t().to(dt)
        if p.rank < r_max:  # zero rank columns: exact zeros added
            a, b = F.pad(a, (0, r_max - p.rank)), F.pad(b, (0, 0, 0, r_max - p.rank))
        return a.contiguous(), b.contiguous()

    zeros = None if len(members) == len(parts) else (ref.lora_A.new_zeros(ref.in_features, r_max, dtype=dt),
                                                      ref.lora_A.new_zeros(r_max, ref.out_features, dtype=dt))
    pairs = [zeros if p is None else _kept_on_part(p, ("lora_t", dt, r_max), lambda p=p: transposed(p), base)
             if kept else transposed(_member(p)) for p in parts]
    return torch.stack([a for a, _ in pairs]), torch.stack([b for _, b in pairs])


def rows_of(a_stack: Tensor, b_stack: Tensor, row_ids: Tensor, cache: dict[Any, Any] | None,
            dtype: torch.dtype | None) -> tuple[Tensor, Tensor]:
    """Each row's (per-token ids: each token's) ``Aᵀ`` and ``B'ᵀ`` — ``(rows, in, r_max)``, ``(rows, r_max, out)``,
    BGMV-style — gathered with ``index_select`` and kept in ``cache`` (the routing context's: its ids never
    change, so decode steps reuse them) when that costs at most the stack's size or :data:`ROW_CACHE_EXTRA`."""
    ids = row_ids.reshape(-1)
    key = ("rows", dtype, tuple(row_ids.shape))
    if cache is not None and key in cache:
        return cache[key]
    rows = a_stack.index_select(0, ids), b_stack.index_select(0, ids)
    per_row = a_stack[0].numel() + b_stack[0].numel()
    if cache is not None and ids.numel() * per_row <= max(a_stack.shape[0] * per_row, ROW_CACHE_EXTRA):
        cache[key] = rows
    return rows


def decode_shaped(x: Tensor, row_ids: Tensor) -> bool:
    """Whether each id covers one token: per-token ids, or per-row ids over ``(rows, in)`` / ``(rows, 1, in)``."""
    return row_ids.dim() == 2 or x.dim() == 2 or (x.dim() == 3 and x.shape[1] == 1)


def concat_pays(parts: Sequence[Any], decode: bool = True) -> bool:
    """Whether the concatenated product beats the per-row gather: every token multiplies against all ``Σr`` rank
    columns there, against ``r_max`` (each row's factors copied out and padded) here.  With one token per row
    (decode) the copies dominate: concatenate when ``Σr ≤ 4 r_max`` (a few distinct parts, or one large rank beside
    small ones); with longer rows (prefill) the products do: when ``Σr ≤ 2 r_max``."""
    ranks = [p.rank for p in parts]
    return sum(ranks) <= (4 if decode else 2) * max(ranks)


def concat_lora_weights(parts: Sequence[Part | None], base: nn.Module, dtype: torch.dtype | None,
                        kept: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """``(A_catᵀ (in, Σr), B'_catᵀ (Σr, out), member (n, Σr))``: every part's ``A`` stacked along the rank, its
    ``B'`` beside the others (both transposed and contiguous, as ``mm``/``addmm`` take them), and ``member[k, j] = 1``
    when rank column ``j`` belongs to ``parts[k]`` (``None``: a row of zeros).  ``kept`` (no gradient flows): each
    part's ``(A, B')`` in ``dtype`` is kept on the part, so a new routing context only concatenates them."""
    members = [_member(p) for p in parts if p is not None]
    dt = dtype or members[0].lora_A.dtype

    def factors(p: LowRankFactors) -> tuple[Tensor, Tensor]:
        a, b = p.row_factors(base)
        return a.to(dt), b.to(dt)

    pairs = [_kept_on_part(p, ("lora_cat", dt), lambda p=p: factors(p), base) if kept else factors(p)
             for p in members]
    a_t = torch.cat([a for a, _ in pairs], dim=0).t().contiguous()
    b_t = torch.cat([b for _, b in pairs], dim=1).t().contiguous()
    owners = torch.repeat_interleave(torch.tensor([k for k, p in enumerate(parts) if p is not None]),
                                     torch.tensor([p.rank for p in members])).to(a_t.device)
    member = (torch.arange(len(parts), device=a_t.device)[:, None] == owners[None, :]).to(dt)
    return a_t, b_t, member


def _member(part: Part) -> LowRankFactors:
    """``part``, checked to be of the low-rank family (it has ``row_factors``)."""
    if not callable(getattr(part, "row_factors", None)):
        raise TypeError(f"mixed low-rank batch got a {type(part).__name__}")
    return part  # type: ignore[return-value]
