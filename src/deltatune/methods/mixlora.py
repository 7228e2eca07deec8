"""MixLoRA (Li et al., 2024): LoRA experts on every frozen FFN with a top-k router and the load-balancing loss,
plus ordinary (shared) LoRA on the attention projections.

One :class:`~deltatune.parts.mixlora.MixLoRAPart` per FFN (see that module for the math, the router and the
auxiliary loss), one :class:`~deltatune.parts.lora.LoRAPart` per attention target.  Where each architecture's FFN
is, per ``model.config.model_type`` (:data:`FFN_SITES`):

* Llama-like: the ``mlp`` block (``gate_proj``/``up_proj``/``down_proj``/``act_fn``), gated experts — also any
  model type not in the table whose feed-forward blocks have those children (Gemma, Qwen3 …);
* GPT-2: the ``mlp`` block (``c_fc``/``act``/``c_proj``, Conv1D), ungated experts, the block's dropout after;
* BERT-like: ``encoder.layer.N.output`` (``BertOutput``, called as ``output(h, a)`` with ``a`` the FFN input) holds
  the mixture, and a tensor-less link part on ``encoder.layer.N`` lends it the sibling ``intermediate`` module —
  the mixture recomputes ``W_in a`` exactly (the base's ``act(W_in a)`` cannot be inverted).

Defaults follow the MixLoRA README (8 experts, top-2, α 16, dropout 0.05, router N(0, 0.02²), aux coefficient
0.01 — the reference code's default is 0.001 — and no jitter).  Not mergeable: the routing depends on the input,
so merge, compose and compress refuse the delta (``NotMergeable``); inference keeps the routing.  In the training
loop the method's hook (:class:`PaddingMask`) hands each batch's attention mask to the load-balancing loss.
"""

from __future__ import annotations

import math
from contextvars import Token
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from deltatune.config import require, seed_option
from deltatune.errors import TargetError
from deltatune.methods.registry import Method, TrainHook, register_method
from deltatune.methods.targets import select_modules
from deltatune.parts.base import Part
from deltatune.parts.layers import LayerKind, in_out_features, layer_kind
from deltatune.parts.lora import LoRAPart
from deltatune.parts.mixlora import (
    LAYOUTS,
    MixLoRALinkPart,
    MixLoRAPart,
    ffn_geometry,
    reset_token_mask,
    set_token_mask,
)


class FFNSite(NamedTuple):
    """Where an architecture's FFN mixtures go: a target for the module holding the mixture, the expert layout,
    and the default attention LoRA targets."""

    target: str
    layout: str
    attention: tuple[str, ...]


_LLAMA_LIKE = FFNSite("role:mlp", "gated", ("q_proj", "k_proj", "v_proj", "o_proj"))
_BERT_LIKE = FFNSite(r".*\.layer\.\d+\.output", "bert", ("query", "key", "value", "attention.output.dense"))
#: model_type → FFN site (the per-architecture table, like PEFT's target mappings)
FFN_SITES: dict[str, FFNSite] = {
    "llama": _LLAMA_LIKE, "mistral": _LLAMA_LIKE, "qwen2": _LLAMA_LIKE,
    "gpt2": FFNSite("role:mlp", "gpt2", ("attn.c_attn", "attn.c_proj")),
    "bert": _BERT_LIKE, "roberta": _BERT_LIKE,
}


@dataclass
class MixLoRAConfig:
    method: ClassVar[str] = "mixlora"
    num_experts: int = field(default=8, metadata={"help": "LoRA experts N per FFN"})
    top_k: int = field(default=2, metadata={"help": "experts per token (1 ≤ top_k ≤ num_experts)"})
    r: int = field(default=8, metadata={"help": "rank of every expert's and attention LoRA's B·A"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA scale s = alpha / r"})
    dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA inputs (experts and attention)"})
    aux_loss_coef: float = field(default=0.01, metadata={
        "help": "coefficient of the load-balancing loss N·Σ f_e·P_e added to the training loss"})
    router_init_range: float = field(default=0.02, metadata={"help": "router weight init std"})
    jitter_noise: float = field(default=0.0, metadata={
        "help": "multiplicative U(1-ε, 1+ε) noise on the FFN input in training (0: off)"})
    attention_targets: list[str] | None = field(default=None, metadata={
        "help": "modules with a shared LoRA (unset: q, k, v, o per architecture; empty: none)"})
    seed: int = seed_option("seed of the router and LoRA A initialisation")

    def __post_init__(self) -> None:
        require(self.num_experts >= 1, f"mixlora config.num_experts must be ≥ 1, got {self.num_experts}")
        require(self.top_k >= 1, f"mixlora config.top_k must be ≥ 1, got {self.top_k}")
        require(self.top_k <= self.num_experts,
                f"mixlora config.top_k = {self.top_k} is larger than num_experts = {self.num_experts}: a router "
                "cannot pick more experts than there are")
        require(self.r >= 1, f"mixlora config.r must be ≥ 1, got {self.r}")
        require(self.alpha > 0, f"mixlora config.alpha must be > 0, got {self.alpha}")
        require(0.0 <= self.dropout < 1.0, f"mixlora config.dropout must be in [0, 1), got {self.dropout}")
        require(self.aux_loss_coef >= 0, f"mixlora config.aux_loss_coef must be ≥ 0, got {self.aux_loss_coef}")
        require(self.router_init_range > 0,
                f"mixlora config.router_init_range must be > 0, got {self.router_init_range}")
        require(0.0 <= self.jitter_noise < 1.0, f"mixlora config.jitter_noise must be in [0, 1), got "
                                                f"{self.jitter_noise}")
        require(self.attention_targets is None or all(
            callable(t) or (isinstance(t, str) and t) for t in self.attention_targets),
            f"mixlora config.attention_targets must be unset or a list of patterns, got {self.attention_targets!r}")

    @property
    def scale(self) -> float:
        return self.alpha / self.r


#: the children of a Llama-like gated FFN (``down(act(gate(x)) · up(x))``): Gemma, Qwen3, OLMo, Granite … have it
GATED_FFN_CHILDREN = ("gate_proj", "up_proj", "down_proj", "act_fn")


def _computes_gated(block: nn.Module) -> bool:
    """Whether ``block(x) = down(act(gate(x)) · up(x))`` on a probe input: the children alone do not say it (Gemma 3n's
    MLP sparsifies the activation between them, which the mixture would leave out)."""
    weight = block.gate_proj.weight
    probe = torch.randn(1, 3, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(weight)
    try:
        with torch.no_grad():
            want = block.down_proj(block.act_fn(block.gate_proj(probe)) * block.up_proj(probe))
            got = block(probe)
    except (RuntimeError, TypeError, ValueError):
        return False
    return isinstance(got, Tensor) and got.shape == want.shape and bool(torch.allclose(got, want, rtol=1e-3,
                                                                                         atol=1e-5))


def ffn_site(model: nn.Module) -> FFNSite:
    """The FFN site of ``model``: from :data:`FFN_SITES` by ``model_type``, else the Llama-like site where every
    feed-forward block (``role:mlp``) has :data:`GATED_FFN_CHILDREN`; a :class:`TargetError` otherwise."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    site = FFN_SITES.get(model_type)
    if site is not None:
        return site
    from deltatune.model import get_module

    try:
        blocks = [get_module(model, n) for n in select_modules(model, [_LLAMA_LIKE.target], kinds=None)]
    except TargetError:
        blocks = []
    if blocks and all(all(hasattr(b, c) for c in GATED_FFN_CHILDREN) for b in blocks) and _computes_gated(blocks[0]):
        return _LLAMA_LIKE
    raise TargetError(f"mixlora: no FFN layout for model_type {model_type!r} (known: {sorted(FFN_SITES)}, and any "
                      f"model whose feed-forward blocks have {', '.join(GATED_FFN_CHILDREN)} and compute "
                      "down(act(gate(x)) · up(x)))")


class PaddingMask(TrainHook):
    """Gives each forward of the trained model its ``attention_mask`` as the mixtures' token mask, so that the
    load-balancing loss skips padding (MixLoRA masks padding too).  A forward pre-hook on the model reads the
    keyword argument (after any model-level part's hook, registered earlier, has extended it for virtual
    tokens); a forward hook restores the previous mask, also when the forward raises, and runs before the forward
    hooks registered earlier, so that several of these nest."""

    def __init__(self, model: nn.Module) -> None:
        self._tokens: list[Token] = []
        self.handles = [model.register_forward_pre_hook(self._pre, with_kwargs=True),
                        model.register_forward_hook(self._post, with_kwargs=True, prepend=True, always_call=True)]

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask")
        self._tokens.append(set_token_mask(mask if isinstance(mask, Tensor) else None))

    def _post(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        if self._tokens:
            reset_token_mask(self._tokens.pop())

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


@register_method
class MixLoRA(Method):
    name = "mixlora"
    config_cls = MixLoRAConfig
    summary = "LoRA experts on the frozen FFN with a top-k router and load-balancing loss, LoRA on attention " \
              "(MixLoRA; not mergeable)"
    part_kinds = (MixLoRAPart, LoRAPart, MixLoRALinkPart)
    default_lr = 5e-4
    examples: ClassVar[dict[str, dict]] = {
        "": {"num_experts": 4, "r": 2, "dropout": 0.0},
        "top1": {"num_experts": 3, "top_k": 1, "r": 2, "alpha": 4.0, "dropout": 0.0, "attention_targets": []},
    }

    def hooks(self, model: nn.Module, delta: Any, config: Any, optimizer: torch.optim.Optimizer,
              total_steps: int, grad_accum: int) -> list[TrainHook]:
        """:class:`PaddingMask` on the trained model (the loop's own model, discarded with it)."""
        return [PaddingMask(model)]

    def create_parts(self, model: nn.Module, config: MixLoRAConfig, exclude: list[str]) -> dict[str, Part]:
        from deltatune.model import get_module, logical_modules

        site = ffn_site(model)
        gen = torch.Generator().manual_seed(config.seed)
        parts: dict[str, Part] = {}
        attention = list(site.attention) if config.attention_targets is None else config.attention_targets
        if attention:
            for name in select_modules(model, attention, exclude):
                parts[name] = self._lora(get_module(model, name), config, gen)
        for name in select_modules(model, [site.target], exclude, kinds=None):
            module = get_module(model, name)
            block = module
            if site.layout == "bert":
                layer = name.rsplit(".", 1)[0]
                block = get_module(model, layer)
                parts[layer] = MixLoRALinkPart()
            d, f = ffn_geometry(block, LAYOUTS[site.layout], name)
            ref = next(p for p in module.parameters() if p.is_floating_point())
            parts[name] = MixLoRAPart(site.layout, d, f, config.num_experts, config.top_k, config.r, config.scale,
                                      dropout=config.dropout, aux_loss_coef=config.aux_loss_coef,
                                      jitter_noise=config.jitter_noise, router_init_range=config.router_init_range,
                                      dtype=ref.dtype, generator=gen).to(ref.device)
        order = {n: i for i, (n, _) in enumerate(logical_modules(model))}
        return dict(sorted(parts.items(), key=lambda item: order[item[0]]))

    @staticmethod
    def _lora(module: nn.Module, config: MixLoRAConfig, gen: torch.Generator) -> LoRAPart:
        d_in, d_out = in_out_features(module)
        ref = module.weight
        part = LoRAPart(d_in, d_out, config.r, config.scale, layer=layer_kind(module), dropout=config.dropout,
                        dtype=ref.dtype, device=ref.device)
        if part.layer is LayerKind.EMBEDDING:
            return part  # A = 0, B ~ N(0, 1): nothing to re-draw that keeps ΔW = 0
        with torch.no_grad():  # re-drawn from the config's seed (LoRAPart draws from the global generator)
            a = torch.empty(part.lora_A.shape, dtype=torch.float32)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)
            part.lora_A.copy_(a)
        return part
