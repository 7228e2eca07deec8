"""Proxy tuning and emulated fine-tuning (EFT): steer a large base at decode time with a small tuned model.

Per decoding step, with ``s`` the next-token logits of the large base, the small tuned model (expert) and the
small base (anti-expert):

* proxy tuning (Liu et al., "Tuning Language Models by Proxy", COLM 2024, eq. 1):
  ``s̃ = s_large + α · (s_expert − s_anti)``, then softmax (temperature applied after the combination);
* EFT up-scaling (Mitchell et al., "An Emulator for Fine-Tuning Large Language Models using Small Language
  Models", ICLR 2024, eq. 4–5): ``log π = log π_large + Σ_i λ_i · (log π_ft,i − log π_ref) − log Z``, i.e. the
  same rule on log-probabilities with one or several weighted behaviour deltas (λ: behaviour interpolation or
  amplification).  Both give the same next-token distribution when α = λ = 1 (the log Z terms are constant over
  the vocabulary).  Down-scaling is the same rule with the roles of the model sizes swapped.

All models must share one tokenizer (:func:`check_vocabularies`); logits rows beyond the tokenizer (padding of
the embedding matrix) may differ in number: the behaviour delta is computed on the common width and is zero on
any extra columns of the large model (the reference implementation truncates the expert to the base's width).
Each small model keeps its own KV cache, so a step costs one incremental forward per model.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from deltatune.config import require
from deltatune.errors import ConfigError
from deltatune.layer import unwrap
from deltatune.routing import routed


class VocabularyMismatch(ConfigError):
    """The large base and the small proxy models do not share one tokenizer vocabulary."""


@dataclass
class ProxyConfig:
    tuned: list[str] = field(metadata={"help": "delta folder(s) over the small base: the small tuned model(s)"})
    scale: list[float] = field(default_factory=lambda: [1.0], metadata={
        "help": "α (proxy tuning) or λ_i (EFT), one per tuned delta or one for all"})
    base: str | None = field(default=None, metadata={"help": "small base-model folder (default: as trained)"})
    mode: Literal["logits", "logprobs"] = field(default="logits", metadata={
        "help": "logits: proxy tuning on raw logits; logprobs: EFT on log-probabilities"})

    def __post_init__(self) -> None:
        require(len(self.tuned) >= 1, "proxy tuning needs at least one tuned delta (--proxy-tuned)")
        require(len(self.scale) in (1, len(self.tuned)),
                f"proxy.scale: give one scale or one per tuned delta ({len(self.tuned)}), got {len(self.scale)}")
        require(self.mode in ("logits", "logprobs"), f"proxy.mode must be 'logits' or 'logprobs', got {self.mode!r}")

    def weights(self) -> list[float]:
        return list(self.scale) * len(self.tuned) if len(self.scale) == 1 else list(self.scale)


def proxy_logits(large: Tensor, experts: Sequence[Tensor], anti: Tensor, scales: Sequence[float],
                 mode: str = "logits") -> Tensor:
    """``large + Σ_i scales[i] · (experts[i] − anti)`` on raw logits (proxy tuning, Liu et al. 2024 eq. 1), or
    the same on log-softmaxed inputs (``mode="logprobs"``: EFT, Mitchell et al. 2024 eq. 5; normalised again by
    the caller's softmax).  Widths may differ: the delta acts on the common columns, zero beyond."""
    prep = (lambda t: torch.log_softmax(t.float(), dim=-1)) if mode == "logprobs" else (lambda t: t.float())
    out = prep(large).clone()
    a = prep(anti)
    for expert, scale in zip(experts, scales, strict=True):
        e = prep(expert)
        width = min(out.shape[-1], e.shape[-1], a.shape[-1])
        out[..., :width] += scale * (e[..., :width] - a[..., :width])
    return out


def check_vocabularies(large_tok: Any, small_tok: Any, large_where: str, small_where: str) -> None:
    """Raise :class:`VocabularyMismatch` unless both tokenizers map the same strings to the same ids."""
    a, b = large_tok.get_vocab(), small_tok.get_vocab()
    if a == b:
        return
    only_a = sorted(set(a) - set(b))[:3]
    only_b = sorted(set(b) - set(a))[:3]
    moved = sorted(t for t in set(a) & set(b) if a[t] != b[t])[:3]
    detail = (f"{len(a)} vs {len(b)} tokens; only in the large: {only_a}; only in the small: {only_b}; "
              f"different ids: {moved}")
    raise VocabularyMismatch(f"proxy tuning needs one vocabulary: {large_where} and {small_where} differ ({detail})")


def check_widths(models: dict[str, nn.Module], vocab_size: int) -> None:
    """Every model's output width covers the tokenizer (``where`` names the first that does not)."""
    for where, model in models.items():
        width = unwrap(model.get_output_embeddings()).weight.shape[0]  # a delta on the head wraps it
        if width < vocab_size:
            raise VocabularyMismatch(f"{where}: {width} output logits do not cover the tokenizer's {vocab_size} "
                                     "tokens")


class IncrementalLM:
    """Next-token logits of ``model`` for a growing batch of left-padded ids, with its own KV cache."""

    def __init__(self, model: nn.Module, attention_mask: Tensor) -> None:
        self.model, self.mask = model, attention_mask.clone()
        self.past: Any = None
        self.seen = 0
        params = inspect.signature(model.forward).parameters  # transformers ≥ 5.2x renamed past_key_values
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    @torch.no_grad()
    def __call__(self, input_ids: Tensor) -> Tensor:
        new = input_ids[:, self.seen:]
        if self.seen:  # tokens appended by generate are always attended (finished rows get pad, unread)
            self.mask = torch.cat([self.mask, self.mask.new_ones(new.shape)], dim=1)
        positions = (self.mask.long().cumsum(-1) - 1).clamp(min=0)[:, -new.shape[1]:]
        with routed(None):  # the large model's per-row routing (generate's mixed batch) is not this model's
            out = self.model(input_ids=new, attention_mask=self.mask, position_ids=positions, use_cache=True,
                             **{self._cache_arg: self.past})
        self.past, self.seen = getattr(out, self._cache_arg), input_ids.shape[1]
        return out.logits[:, -1, :]


class ProxyLogitsProcessor:
    """A ``transformers`` logits processor: replaces the large model's scores by :func:`proxy_logits`.  It runs
    before any temperature/top-p warper (``generate`` appends custom processors ahead of the warpers)."""

    def __init__(self, experts: Sequence[nn.Module], anti: nn.Module, scales: Sequence[float], mode: str,
                 attention_mask: Tensor) -> None:
        self.experts = [IncrementalLM(m, attention_mask) for m in experts]
        self.anti = IncrementalLM(anti, attention_mask)
        self.scales, self.mode = list(scales), mode

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        expert_logits = [e(input_ids) for e in self.experts]
        out = proxy_logits(scores, expert_logits, self.anti(input_ids), self.scales, self.mode)
        return out.to(scores.dtype)


@dataclass
class ProxyModels:
    experts: list[nn.Module]
    anti: nn.Module
    tokenizer: Any
    where: str


def load_proxy(cfg: ProxyConfig, verify: bool = True, large_tokenizer: Any = None,
               large_where: str = "the large model") -> ProxyModels:
    """The small base (anti-expert) and one small tuned model per delta (each its own copy with the delta); with
    ``large_tokenizer`` the vocabularies are checked before any small model is loaded."""
    from transformers import AutoTokenizer

    from deltatune.api import as_delta, base_model_path, load_base_for
    from deltatune.model import DEFAULT
    from deltatune.train.stacking import attach_for_use

    deltas = [as_delta(p, verify=verify) for p in cfg.tuned]
    small = base_model_path(deltas[0], cfg.base)
    for path, d in zip(cfg.tuned, deltas, strict=True):
        if d.heads:
            raise ConfigError(f"{path}: the proxy delta has a task head ({sorted(d.heads)}); proxy tuning needs a "
                              "causal-LM delta")
    tokenizer = AutoTokenizer.from_pretrained(small)
    if large_tokenizer is not None:
        check_vocabularies(large_tokenizer, tokenizer, large_where, small)
    anti = load_base_for(deltas[0], small).eval()
    if not (hasattr(anti, "can_generate") and anti.can_generate()):
        raise ConfigError(f"{small}: the proxy base is not a causal language model ({type(anti).__name__})")
    experts = []
    for path, d in zip(cfg.tuned, deltas, strict=True):
        net = load_base_for(d, small).eval()
        attach_for_use(net, d, DEFAULT, where=str(path))  # a stacked delta with the deltas beneath it
        experts.append(net)
    return ProxyModels(experts, anti, tokenizer, small)


def proxy_processor(cfg: ProxyConfig, large: nn.Module, large_tokenizer: Any, large_where: str,
                    attention_mask: Tensor, verify: bool = True) -> ProxyLogitsProcessor:
    """Check vocabularies (before loading the small models) and widths, then build the processor for one
    ``generate`` call."""
    proxy = load_proxy(cfg, verify, large_tokenizer, large_where)
    models = {large_where: large, proxy.where: proxy.anti, **{str(p): m for p, m in zip(cfg.tuned, proxy.experts,
                                                                                      strict=True)}}
    check_widths(models, len(large_tokenizer))
    return ProxyLogitsProcessor(proxy.experts, proxy.anti, cfg.weights(), cfg.mode, attention_mask)


def load_plain_lm(path: str | Path) -> nn.Module:
    """A causal LM base with no delta (the large model of ``generate --model M --proxy-tuned D``)."""
    from transformers import AutoModelForCausalLM

    from deltatune.train.tasks import _quiet_transformers

    _quiet_transformers()
    if not Path(path).is_dir():
        raise ConfigError(f"model {str(path)!r} is not a local folder")
    return AutoModelForCausalLM.from_pretrained(path).eval()
