"""Soft-prompt part: ``n`` trainable virtual-token embeddings prepended to the input embeddings (prompt
tuning, Lester et al., "The Power of Scale for Parameter-Efficient Prompt Tuning", EMNLP 2021).

A model-level part: it changes the whole model's inputs, not one module.  Before the forward
(:meth:`PromptPart.model_pre_forward`) each row ``i`` gets its own prompt ``P_i ∈ R^{n_i×d}`` (``n_i = 0``
for a row without one) at the start, and rows are right-padded with masked slots to ``n_max``::

    row i:  [ P_i (n_i virtual) | x_i (the caller's T tokens) | n_max − n_i masked pad slots ]

so a mixed batch whose rows use prompts of different lengths (or none) gives every row exactly what it gets
alone: its tokens keep their positions ``n_i + t``, and the trailing pads are masked (bidirectional
encoders) or after it (causal decoders).  A decoder's sequence classifier (:func:`pools_last_token`: Llama,
GPT-2, … ``ForSequenceClassification``) pools each row's last slot, so there the pads go first instead — the
caller's own right padding too (given ``inputs_embeds`` it no longer finds a row's last real token by its id, and
would pool a pad) — and the rows get explicit ``position_ids`` that skip them::

    row i:  [ the caller's r_i trailing pads | n_max − n_i masked pad slots | P_i | x_i without its r_i pads ]

The attention mask gets ones for virtual slots and zeros for
pads, ``token_type_ids`` zeros, token-level labels ``−100`` on both (sequence-level labels are untouched),
and caller ``position_ids`` are shifted to ``n_i + p`` (virtual slots ``0 … n_i − 1``).  After the forward
(:meth:`PromptPart.model_post_forward`) per-token outputs — ``logits`` of shape ``(B, n_max + T, V)``,
``last_hidden_state``, ``hidden_states``, span ``start_logits``/``end_logits`` — are gathered back to the
caller's ``T`` positions; sequence-level logits are untouched.  With one prompt this is PEFT's
``PROMPT_TUNING`` forward with the virtual positions stripped from the per-token outputs.  The model's
``cache`` / ``past_key_values`` and ``attentions`` outputs keep the virtual layout.  Encoders that pool
position 0 (BERT) read the first virtual token, as PEFT's sequence classifier does.

**Continuing from a cache** (incremental decoding, chunked prefill): the virtual tokens are prefilled once, by the
first forward (on an empty cache), as the start of each row's history; a forward whose cache already holds
positions continues that history and prepends nothing (:func:`continuation`).  Its inputs are then in the
*cache's* layout, which the part cannot infer: the caller passes an ``attention_mask`` of width
``past + T`` that covers the cached virtual columns and ``position_ids`` that count them (``n_i + t`` for the
row's ``t``-th token).  Without both the continuation is refused with a :class:`ConfigError` — e.g. a plain
``transformers`` ``generate()`` with a cache, whose mask covers only the caller's tokens: generate with
``use_cache=False`` there, or through :func:`deltatune.generate`, which translates ``generate``'s mask and
positions into this layout (:func:`from_caller_layout`).  :class:`deltatune.serve.Engine` prefills a prompted row
on its own (no padding inside the row) and decodes it from its cache this way.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from deltatune.errors import ConfigError, InputTooLarge, ShapeMismatch
from deltatune.parts.base import Part
from deltatune.parts.meta_checks import check_keys, check_shape, check_state, meta_int

VIRTUAL, ORIGINAL, PAD = 0, 1, 2
IGNORE_INDEX = -100  # the label HF losses ignore
#: The names model configs give their context length, first match wins (GPT-2 and BLOOM-likes: ``n_positions`` /
#: ``n_ctx``; MPT: ``max_seq_len``; ChatGLM, Qwen 1: ``seq_length``).
CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "seq_length",
                  "max_sequence_length")
CACHE_ARGS = ("cache", "past_key_values")
PER_TOKEN_OUTPUTS = ("logits", "last_hidden_state", "start_logits", "end_logits")


# --------------------------------------------------------------------------------------------------
# the row layout: pure functions
# --------------------------------------------------------------------------------------------------
def virtual_layout(lengths: Tensor, seq: int, lead: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(region, source)`` of shape ``(B, n_max + T)`` for prompts of ``lengths`` ``n_i`` before ``T = seq``
    tokens, after ``lead`` ``l_i`` pads (``None``: none): slot ``j`` of row ``i`` is a leading pad (``j < l_i``),
    virtual (``l_i ≤ j < l_i + n_i``), original token ``source[i, j] = j − l_i − n_i`` (up to ``l_i + n_i + T``)
    or a trailing pad (after).  A pad's ``source`` is the nearest token: ``0`` before, ``T − 1`` after."""
    width = int(lengths.max()) if lengths.numel() else 0
    j = torch.arange(width + seq, device=lengths.device)[None, :]
    first = lengths.new_zeros(lengths.shape)[:, None] if lead is None else lead[:, None]
    start = first + lengths[:, None]
    region = torch.where(j < first, PAD, torch.where(j < start, VIRTUAL, torch.where(j < start + seq, ORIGINAL,
                                                                                      PAD)))
    return region, (j - start).clamp(0, seq - 1)


def original_positions(lengths: Tensor, seq: int, lead: Tensor | None = None) -> Tensor:
    """``(B, T)``: where row ``i``'s token ``t`` sits in the prompted layout, ``l_i + n_i + t``."""
    start = lengths if lead is None else lead + lengths
    return start[:, None] + torch.arange(seq, device=lengths.device)[None, :]


def leading_pads(lengths: Tensor, left: bool) -> Tensor | None:
    """Per row, the pads placed before its prompt: ``n_max − n_i`` when ``left`` (every row then ends at the last
    slot), else ``None`` (the pads trail the row)."""
    return lengths.max() - lengths if left and lengths.numel() else None


def trailing_pads(mask: Tensor) -> Tensor | None:
    """Per row of a caller's ``(B, T)`` attention mask, the masked slots after its last attended one (right
    padding; ``0`` for a row without any attended slot); ``None`` when no row has any."""
    seq = mask.shape[1]
    attended = mask != 0
    last = torch.where(attended, torch.arange(seq, device=mask.device)[None, :], -1).amax(dim=1)
    count = torch.where(last >= 0, seq - 1 - last, 0)
    return count if bool(count.any()) else None


def rotate_rows(values: Tensor, shift: Tensor) -> Tensor:
    """``values`` ``(B, S, …)`` with row ``i`` rotated right by ``shift[i]`` slots: slot ``j`` takes slot
    ``(j − shift_i) mod S``, so a row's last ``shift_i`` slots come first."""
    size = values.shape[1]
    idx = (torch.arange(size, device=values.device)[None, :] - shift[:, None].to(values.device)) % size
    extra = values.dim() - 2
    return values.gather(1, idx.reshape(*idx.shape, *([1] * extra)).expand(*idx.shape, *values.shape[2:]))


def place(values: Tensor, region: Tensor, source: Tensor, virtual: Tensor | float, pad: Tensor | float | None
          ) -> Tensor:
    """``values`` ``(B, T, …)`` moved into the layout ``(B, n_max + T, …)``: original slots take their token,
    virtual slots ``virtual`` and pad slots ``pad`` (``None``: the row's last token again).  Both fills
    broadcast against the output; gradients flow to ``values`` and to a tensor ``virtual``."""
    extra = values.dim() - 2
    idx = source.reshape(*source.shape, *([1] * extra)).expand(*source.shape, *values.shape[2:])
    moved = values.gather(1, idx)
    r = region.reshape(*region.shape, *([1] * extra))
    rest = moved if pad is None else torch.where(r == ORIGINAL, moved, torch.as_tensor(pad, dtype=moved.dtype,
                                                                                         device=moved.device))
    fill = virtual if isinstance(virtual, Tensor) else torch.as_tensor(virtual, dtype=moved.dtype,
                                                                        device=moved.device)
    return torch.where(r == VIRTUAL, fill.to(moved.dtype), rest)


def take_original(values: Tensor, positions: Tensor) -> Tensor:
    """Inverse of :func:`place` on a per-token output ``(B, n_max + T, …)``: the caller's ``(B, T, …)``."""
    extra = values.dim() - 2
    idx = positions.reshape(*positions.shape, *([1] * extra)).expand(*positions.shape, *values.shape[2:])
    return values.gather(1, idx)


def prompted_embeddings(embeds: Tensor, prompts: Sequence[Tensor | None], rows: Tensor, width: int,
                        left: bool = False) -> Tensor:
    """``(B, width + T, d)``: row ``i`` is ``[prompts[rows[i]]; embeds[i]; zeros]`` (``None``: no prompt), or
    ``[zeros; prompts[rows[i]]; embeds[i]]`` when ``left`` (:func:`leading_pads`).

    Built per prompt by concatenation, like PEFT's ``cat((prompts, inputs_embeds))``, so the backward pass sums
    each prompt's gradient over its rows in a fixed order: bit-identical reruns (an indexed gather from stacked
    prompts accumulates its repeated rows in a thread-dependent order on CPU)."""
    batch, seq, dim = embeds.shape

    def block(k: int, count: int, tokens: Tensor) -> Tensor:
        p = prompts[k]
        n = 0 if p is None else p.shape[0]
        pieces = [] if p is None else [p.to(embeds.dtype).expand(count, -1, -1)]
        pads = [embeds.new_zeros(count, width - n, dim)]
        return torch.cat([*pads, *pieces, tokens] if left else [*pieces, tokens, *pads], 1)

    groups = rows.unique().tolist()
    if len(groups) == 1:
        return block(groups[0], batch, embeds)
    out = embeds.new_zeros(batch, width + seq, dim)
    for k in groups:
        idx = (rows == k).nonzero(as_tuple=True)[0]
        out = out.index_copy(0, idx, block(k, idx.numel(), embeds.index_select(0, idx)))
    return out


def init_token_ids(token_ids: Sequence[int], n: int) -> list[int]:
    """PEFT's ``PromptTuningInit.TEXT`` rule: the ids of the init text repeated, then cut to ``n``."""
    reps = -(-n // len(token_ids))
    return (list(token_ids) * reps)[:n]


# --------------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------------
def input_embedding(model: nn.Module, where: str = "model") -> nn.Module:
    """The model's input-embedding module, seen through a deltatune wrapper (a part on it stays active in
    the forward: :meth:`PromptPart.model_pre_forward` calls the wrapped module)."""
    getter = getattr(model, "get_input_embeddings", None)
    try:
        module = getter() if callable(getter) else None
    except (NotImplementedError, AttributeError):
        module = None
    base = getattr(module, "base", module)
    if not isinstance(getattr(base, "weight", None), Tensor) or base.weight.dim() != 2:
        raise ShapeMismatch(f"{where}: prompt tuning needs a model with an input embedding table "
                            f"(get_input_embeddings()); {type(model).__name__} has {type(module).__name__}")
    return base


def model_context(model: nn.Module) -> tuple[int, str] | None:
    """``(positions, config field)``: the model's context length, or ``None`` where its config names none."""
    return config_context(getattr(model, "config", None))


def config_context(config: Any) -> tuple[int, str] | None:
    """``(positions, field)``: the context length a model config records (:data:`CONTEXT_FIELDS`), or ``None``."""
    for name in CONTEXT_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value, name
    return None


def _keywords(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Positional arguments of the model's call as keywords (by the forward's signature)."""
    if not args:
        return dict(kwargs)
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    names = [p.name for p in inspect.signature(model.forward).parameters.values() if p.kind in kinds]
    if len(args) > len(names):
        raise TypeError(f"{type(model).__name__}.forward takes {len(names)} positional arguments, got {len(args)}")
    out = dict(kwargs)
    for name, value in zip(names, args, strict=False):
        if name in out:
            raise TypeError(f"{type(model).__name__}.forward got two values for {name!r}")
        out[name] = value
    return out


def cached_positions(kw: dict[str, Any]) -> int:
    """How many positions the forward's ``cache`` / ``past_key_values`` already holds (0: none or empty)."""
    for name in CACHE_ARGS:
        cache = kw.get(name)
        if cache is None:
            continue
        seen = cache.get_seq_length() if hasattr(cache, "get_seq_length") else len(cache)
        if int(seen):
            return int(seen)
    return 0


def continuation(kw: dict[str, Any], past: int) -> None:
    """Check a forward that continues from a cache holding ``past`` positions (see the module docstring): it
    prepends nothing, so its ``attention_mask`` must be ``(B, past + T)`` — covering the cached virtual columns —
    and its ``position_ids`` ``(B or 1, T)`` must be given (in the prompted layout: they count the virtual tokens)."""
    tokens = kw.get("input_ids") if kw.get("input_ids") is not None else kw.get("inputs_embeds")
    mask, positions = kw.get("attention_mask"), kw.get("position_ids")
    hint = ("continuing from a cache that holds the virtual tokens needs an attention_mask of width cached + new "
            "positions (it covers the virtual columns) and position_ids that count the virtual tokens; "
            "a plain generate() passes neither in that layout: generate with use_cache=False, or with "
            "deltatune.generate")
    if not isinstance(tokens, Tensor) or tokens.dim() < 2:
        raise ConfigError("prompt tuning needs input_ids (batch, seq) or inputs_embeds (batch, seq, dim)")
    batch, seq = tokens.shape[:2]
    if mask is None or positions is None:
        missing = [n for n, v in (("attention_mask", mask), ("position_ids", positions)) if v is None]
        raise ConfigError(f"prompt tuning: the cache holds {past} positions but the forward has no {missing}; {hint}")
    if tuple(mask.shape) != (batch, past + seq):
        raise ConfigError(f"prompt tuning: the cache holds {past} positions and the forward adds {seq}, so "
                          f"attention_mask must be (batch, cached + new) = {(batch, past + seq)}, got "
                          f"{tuple(mask.shape)}; {hint}")
    if positions.dim() != 2 or positions.shape[0] not in (1, batch) or positions.shape[1] != seq:
        raise ConfigError(f"prompt tuning: position_ids must be (batch, seq) = {(batch, seq)} or (1, seq) when "
                          f"continuing from a cache, got {tuple(positions.shape)}")


def from_caller_layout(lengths: Tensor, first_seq: int, past: int, seq: int, mask: Tensor | None,
                       positions: Tensor | None) -> tuple[Tensor, Tensor]:
    """The ``(attention_mask, position_ids)`` :func:`continuation` needs, from a caller that counts only its own
    tokens (``transformers``' ``generate``): a causal LM's first forward prepended prompts of ``lengths`` ``n_i``
    to ``first_seq`` tokens (row ``i``: ``[P_i | x_i | n_max − n_i pads]``, :func:`virtual_layout`), and the cache
    now holds ``past`` positions.  The caller's ``mask`` is ``(B, past − n_max + seq)`` (``None``: all ones): its
    first ``first_seq`` columns are placed as that forward placed them (virtual slots 1, pads 0) and the later
    ones follow as they are.  Its ``positions`` ``p`` (``None``: counted from the mask, ``Σ mask − 1``) become
    ``n_i + p``, as the first forward shifted them (:func:`_shift_positions`)."""
    batch, width = lengths.shape[0], int(lengths.max())
    own = past - width + seq
    if mask is None:
        mask = torch.ones(batch, own, dtype=torch.long, device=lengths.device)
    if tuple(mask.shape) != (batch, own) or own < first_seq + seq:
        raise ConfigError(f"prompt tuning: continuing a cache of {past} positions ({width} virtual) with {seq} "
                          f"tokens needs the caller's attention_mask (batch, {own}), got {tuple(mask.shape)}")
    region, source = virtual_layout(lengths, first_seq)
    full = torch.cat([place(mask[:, :first_seq], region, source, 1, 0), mask[:, first_seq:]], 1)
    if positions is None:
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq:]
    return full, positions.expand(batch, seq) + lengths[:, None]


def _refuse_unsupported(kw: dict[str, Any]) -> None:
    for name in ("start_positions", "end_positions"):
        if kw.get(name) is not None:
            raise ConfigError(f"prompt tuning: {name!r} (span labels) are not shifted past the virtual tokens; "
                              "compute the span loss from the returned start/end logits instead")
    if kw.get("return_dict") is False:
        raise ConfigError("prompt tuning realigns the outputs by name; call the model with return_dict=True")
    keep = kw.get("logits_to_keep")
    if isinstance(keep, Tensor):
        raise ConfigError("prompt tuning: a tensor logits_to_keep indexes the caller's positions, which move by "
                          "the prompt length; pass an integer")


@dataclass
class _Layout:
    """What the post-forward hook needs to realign the outputs."""

    positions: Tensor  # (B, T): each original token's slot
    batch: int
    total: int  # n_max + T
    keep: int  # logits_to_keep the caller asked for (0: all)


class PromptPart(Part):
    """``prompt_embeddings`` ``(n, d)``: the virtual tokens, trained in fp32 (cast to the embeddings' dtype in
    the forward, as PEFT does)."""

    kind = "prompt"
    additive, base_dependent, mixed_rows, has_aux_loss, model_level = False, False, True, False, True

    def __init__(self, num_virtual_tokens: int, dim: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if num_virtual_tokens < 1 or dim < 1:
            raise ConfigError(f"a prompt needs ≥ 1 virtual token of dimension ≥ 1, got {num_virtual_tokens}×{dim}")
        self.num_virtual_tokens, self.dim = int(num_virtual_tokens), int(dim)
        self.prompt_embeddings = nn.Parameter(torch.zeros(num_virtual_tokens, dim, dtype=dtype, device=device))

    def forward(self, x: Tensor, base: nn.Module) -> Tensor:
        raise TypeError("a prompt part acts on the whole model through its forward hooks "
                        "(deltatune.model.attach_parts puts it there), not on one module")

    # --- the model's forward ---------------------------------------------------------------------
    @classmethod
    def model_pre_forward(cls, model: nn.Module, args: tuple, kwargs: dict[str, Any],
                          parts: Sequence[Part | None], row_ids: Tensor | None
                          ) -> tuple[tuple, dict[str, Any], _Layout | None]:
        """The model's arguments with row ``i``'s prompt ``parts[row_ids[i]]`` (``row_ids=None``: ``parts[0]``
        for every row) prepended; see the module docstring for the layout.  A forward that continues from a
        non-empty cache is checked (:func:`continuation`) and passed on unchanged, with no layout to undo
        (``None``): its cache already holds the virtual tokens."""
        kw = _keywords(model, args, kwargs)
        past = cached_positions(kw)
        if past:
            continuation(kw, past)
            return (), kw, None
        _refuse_unsupported(kw)
        ids, embeds = kw.pop("input_ids", None), kw.pop("inputs_embeds", None)
        if (ids is None) == (embeds is None):
            raise ConfigError("prompt tuning needs exactly one of input_ids or inputs_embeds")
        if embeds is None:
            if ids.dim() != 2:
                raise ConfigError(f"prompt tuning: input_ids must be (batch, seq), got shape {tuple(ids.shape)}")
            embeds = model.get_input_embeddings()(ids)
        if embeds.dim() != 3 or embeds.shape[1] == 0:
            raise ConfigError(f"prompt tuning: inputs must be (batch, seq ≥ 1, dim), got {tuple(embeds.shape)}")
        batch, seq = embeds.shape[:2]
        device = embeds.device
        rows = torch.zeros(batch, dtype=torch.long, device=device) if row_ids is None else row_ids.to(device).long()
        if tuple(rows.shape) != (batch,):
            raise ConfigError(f"prompt tuning: routing gives {tuple(rows.shape)} row ids for a batch of {batch} rows")
        prompts = [p.prompt_embeddings if isinstance(p, PromptPart) else None for p in parts]
        lengths = torch.tensor([0 if p is None else p.shape[0] for p in prompts], device=device)[rows]
        width = int(lengths.max())
        total = width + seq
        mask, last_slot = kw.get("attention_mask"), pools_last_token(model)
        shift = trailing_pads(mask) if last_slot and mask is not None else None
        lead = leading_pads(lengths, last_slot and (width != int(lengths.min()) or shift is not None))
        region, source = virtual_layout(lengths, seq, lead)

        kw["inputs_embeds"] = prompted_embeddings(embeds, prompts, rows, width, lead is not None)
        if mask is not None or width != int(lengths.min()) or kw.get("position_ids") is not None:
            if mask is None:
                mask = torch.ones(batch, seq, dtype=torch.long, device=device)
            if tuple(mask.shape) != (batch, seq):
                raise ConfigError(f"prompt tuning: attention_mask must be (batch, seq) = {(batch, seq)}, got "
                                  f"{tuple(mask.shape)}")
            kw["attention_mask"] = place(mask, region, source, 1, 0)
        if kw.get("token_type_ids") is not None:
            kw["token_type_ids"] = place(kw["token_type_ids"].expand(batch, seq), region, source, 0, 0)
        positions = kw.get("position_ids")
        if positions is None and lead is not None:  # explicit: a row's positions must not count its leading pads
            positions = torch.arange(seq, device=device)[None, :]
        last = total
        if positions is not None:
            kw["position_ids"] = shifted = _shift_positions(positions, lengths, lead, region, source, mask)
            last = int(shifted.max()) + 1
        labels = kw.get("labels")
        if isinstance(labels, Tensor) and not labels.is_floating_point() and tuple(labels.shape) == (batch, seq):
            kw["labels"] = place(labels, region, source, IGNORE_INDEX, IGNORE_INDEX)  # token-level labels
        _check_context(model, width, seq, last)
        keep = kw.get("logits_to_keep") or 0
        if keep:
            kw["logits_to_keep"] = 0  # all logits: the last tokens of a prompted row are not the last slots
        positions = original_positions(lengths, seq, lead)
        if shift is not None:  # the caller's trailing pads go first: each row's last token in the last slot
            for name in ("inputs_embeds", "attention_mask", "token_type_ids", "position_ids", "labels"):
                value = kw.get(name)
                if isinstance(value, Tensor) and tuple(value.shape[:2]) == (batch, total):
                    kw[name] = rotate_rows(value, shift)
            positions = (positions + shift[:, None]) % total
        return (), kw, _Layout(positions, batch, total, int(keep))

    @classmethod
    def model_post_forward(cls, model: nn.Module, output: Any, state: _Layout) -> Any:
        """Per-token outputs gathered back to the caller's positions (see the module docstring)."""
        if not hasattr(output, "keys"):
            raise ConfigError(f"prompt tuning realigns outputs by name, but the model returned a "
                              f"{type(output).__name__}; use return_dict=True")

        def per_token(t: Any, min_dim: int) -> bool:
            return isinstance(t, Tensor) and t.dim() >= min_dim and tuple(t.shape[:2]) == (state.batch, state.total)

        for name in PER_TOKEN_OUTPUTS:
            value = getattr(output, name, None)
            # (B, n+T, V) logits are per token; (B, C) sequence logits are not
            if per_token(value, 3 if name in ("logits", "last_hidden_state") else 2):
                value = take_original(value, state.positions.to(value.device))
                output[name] = value[:, -state.keep:] if state.keep and name == "logits" else value
        hidden = getattr(output, "hidden_states", None)
        if isinstance(hidden, tuple) and all(per_token(h, 3) for h in hidden):
            output["hidden_states"] = tuple(take_original(h, state.positions.to(h.device)) for h in hidden)
        return output

    def cached_prefix(self) -> int:
        """The ``n`` virtual tokens: a forward whose cache already holds them continues from it
        (:meth:`model_pre_forward` passes it on)."""
        return self.num_virtual_tokens

    # --- serialisation ---------------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        return {"num_virtual_tokens": self.num_virtual_tokens, "dim": self.dim}

    @classmethod
    def expected_state(cls, meta: Any) -> dict[str, tuple[int, ...]]:
        meta = check_keys(meta, {"num_virtual_tokens", "dim"})
        shape = [meta_int(meta, "num_virtual_tokens"), meta_int(meta, "dim")]
        return {"prompt_embeddings": check_shape(shape, "prompt_embeddings")}

    @classmethod
    def from_state(cls, state: dict[str, Tensor], meta: dict[str, Any]) -> PromptPart:
        check_state(state, cls.expected_state(meta), cls.kind)
        part = cls(meta["num_virtual_tokens"], meta["dim"], dtype=state["prompt_embeddings"].dtype)
        part.load_tensors(state, "prompt")
        return part

    def check_base(self, base: nn.Module, where: str) -> None:
        """``base`` is the whole model: its input embeddings must have dimension ``d`` and its context room for
        the prompt and at least one token."""
        if getattr(getattr(base, "config", None), "is_encoder_decoder", False):
            raise ShapeMismatch(f"{where}: prompt tuning of encoder-decoder models is not supported "
                                f"({type(base).__name__})")
        dim = input_embedding(base, where).weight.shape[1]
        if dim != self.dim:
            raise ShapeMismatch(f"{where}: the prompt's virtual tokens have dimension {self.dim}, the model's input "
                                f"embeddings {dim}")
        context = model_context(base)
        if context is not None and self.num_virtual_tokens >= context[0]:
            raise ShapeMismatch(f"{where}: a prompt of {self.num_virtual_tokens} virtual tokens leaves no room for "
                                f"input in the model's context of {context[0]} positions (config.{context[1]})")


def _shift_positions(positions: Tensor, lengths: Tensor, lead: Tensor | None, region: Tensor, source: Tensor,
                     mask: Tensor | None) -> Tensor:
    """Caller ``position_ids`` ``p`` (``(B, T)`` or ``(1, T)``) in the layout: ``n_i + p`` for the tokens,
    ``0 … n_i − 1`` for the virtual slots (after ``lead`` pads), the nearest token's again for the pads."""
    batch, seq = source.shape[0], region.shape[1] - int(lengths.max())
    if positions.dim() != 2 or positions.shape[1] != seq or positions.shape[0] not in (1, batch):
        raise ConfigError(f"prompt tuning: position_ids must be (batch, seq) = {(batch, seq)} or (1, seq), got "
                          f"{tuple(positions.shape)}")
    positions = positions.expand(batch, seq)
    if mask is None and seq > 1 and bool((positions.diff(dim=1) != 1).any()):
        raise ConfigError("prompt tuning: position_ids restart inside a row without an attention_mask (packed "
                          "sequences); one prompt cannot precede several packed sequences")
    j = torch.arange(region.shape[1], device=positions.device)[None, :].expand(batch, -1)
    virtual = j if lead is None else (j - lead[:, None]).clamp(min=0)
    return place(positions + lengths[:, None], region, source, virtual, None)


def pools_last_token(model: nn.Module) -> bool:
    """Whether ``model`` is a decoder's sequence classifier (``*ForSequenceClassification`` with a ``score`` head:
    Llama, GPT-2, Mistral, Qwen, …), which, given ``inputs_embeds``, pools the *last* slot of every row: a
    trailing pad for a row with a shorter prompt in a mixed batch, so its rows take their pads first
    (:func:`leading_pads`).  Encoders pool slot 0, which the pads must not take instead."""
    return type(model).__name__.endswith("ForSequenceClassification") and isinstance(getattr(model, "score", None),
                                                                                       nn.Module)


def _check_context(model: nn.Module, width: int, seq: int, last: int) -> None:
    context = model_context(model)
    if context is None:
        return
    limit, name = context
    if width + seq > limit or last > limit:
        raise InputTooLarge(f"prompt tuning: {width} virtual + {seq} input tokens (positions up to {last - 1}) "
                            f"exceed the model's context of {limit} positions (config.{name}); shorten the input "
                            "or the prompt")
