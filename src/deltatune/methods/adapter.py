"""Bottleneck adapters: Houlsby, Pfeiffer and the scaled parallel adapter (PA) of He et al. (ICLR 2022).

``Δh = s · W_up(dropout(act(W_down u)))`` (see :mod:`deltatune.parts.adapter`), placed by ``placement``:

* ``houlsby`` (Houlsby et al., ICML 2019) — in series after the attention output projection and after the FFN
  output projection: ``h ← h + Δh(h)`` on each projection's output, before the residual add (and LayerNorm);
* ``pfeiffer`` (Pfeiffer et al., EACL 2021) — in series after the FFN output projection only;
* ``parallel`` (He et al., ICLR 2022) — next to the FFN: ``FFN(x) + s·Δh(x)`` with ``x`` the FFN input, before
  the residual add.  On Llama and GPT-2 the part wraps the FFN block (``mlp``) and reads its input.  BERT has no
  FFN block module: ``BertOutput`` (``encoder.layer.N.output``) is called as ``output(h, x)`` with ``x`` the FFN
  input and returns ``LN(dropout(dense(h)) + x)``; the part adds ``s·Δh(x)`` to that residual argument, so the
  layer computes ``LN(dropout(dense(h)) + s·Δh(x) + x)`` — the paper's placement, exactly.

Where this differs from the papers (documented choices):

* **Init.** The output must be unchanged at attach time, so ``W_up = 0`` always (with zero biases).  ``bert``
  init (sequential default) draws ``W_down ~ N(0, 0.02²)``; the reference ("bert" init, Houlsby's
  near-identity init) also draws ``W_up`` from it.  ``lora`` init (parallel default) is the paper's.
* **Dropout of the host model.** Houlsby applies the adapter after the sub-layer's dropout; deltatune adapts the
  projection's output, before the dropout that follows it (BERT, GPT-2).  Identical in eval.
* **Pfeiffer** is placed after the FFN output projection only; AdapterHub's Pfeiffer config additionally moves
  the adapter relative to the residual and LayerNorm (``residual_before_ln``, ``original_ln_before``); not done.
* **No LayerNorm inside the adapter, fixed scale** (the unified-view paper's best PA has neither learnable).
* **Two parallel adapters active at once on one BERT FFN** (two deltas attached and both active, not a mixed
  batch) compose in series on the residual: the inner one reads ``x + s·Δh_outer(x)``.  On Llama/GPT-2 they add.

Placement per ``model.config.model_type`` is the table :data:`SITES`; ``targets`` overrides it (with the
sequential placements the adapter reads each target's output, with ``parallel`` its input).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal, NamedTuple

import torch
from torch import nn

from deltatune.config import require, seed_option
from deltatune.errors import TargetError
from deltatune.methods.registry import Method, register_method
from deltatune.methods.targets import select_modules
from deltatune.parts.adapter import AdapterPart, module_width

#: one default width for every placement, sized for small models: He et al.'s parallel FFN adapter uses 512 on
#: BERT/RoBERTa-base and larger (more than MiniLM's 384-wide hidden state); give ``bottleneck`` for that setting
DEFAULT_BOTTLENECK = 64
PARALLEL_SCALE, SEQUENTIAL_SCALE = 4.0, 1.0


class Sites(NamedTuple):
    """Where the adapters of one architecture go: name patterns of the attention output projection, the FFN
    output projection and the FFN (parallel site), and what the parallel part reads there."""

    attention_output: str
    ffn_output: str
    ffn: str
    ffn_source: Literal["input", "residual"]


_LLAMA_LIKE = Sites("self_attn.o_proj", "mlp.down_proj", "mlp", "input")
_BERT_LIKE = Sites(r".*\.attention\.output\.dense", r".*\.layer\.\d+\.output\.dense", r".*\.layer\.\d+\.output",
                   "residual")
#: model_type → adapter sites (like PEFT's per-model target tables)
SITES: dict[str, Sites] = {
    "llama": _LLAMA_LIKE, "mistral": _LLAMA_LIKE, "qwen2": _LLAMA_LIKE,
    "gpt2": Sites("attn.c_proj", "mlp.c_proj", "mlp", "input"),
    "bert": _BERT_LIKE, "roberta": _BERT_LIKE,
}
Placement = Literal["houlsby", "pfeiffer", "parallel"]
Activation = Literal["relu", "gelu", "silu", "tanh"]


@dataclass
class AdapterConfig:
    method: ClassVar[str] = "adapter"
    placement: Placement = field(default="houlsby", metadata={
        "help": "houlsby: in series after attention and FFN; pfeiffer: in series after the FFN; parallel: "
                "scaled parallel adapter next to the FFN (He et al. 2022)"})
    bottleneck: int | None = field(default=None, metadata={
        "help": f"bottleneck width b (unset: d / reduction_factor, or {DEFAULT_BOTTLENECK})"})
    reduction_factor: int | None = field(default=None, metadata={
        "help": "b = max(1, d // reduction_factor) per module (instead of bottleneck)"})
    scale: float | None = field(default=None, metadata={
        "help": f"s in h + s·Δh (unset: {PARALLEL_SCALE} for parallel, as the paper, {SEQUENTIAL_SCALE} otherwise)"})
    act: Activation = field(default="relu", metadata={"help": "non-linearity between the projections"})
    dropout: float = field(default=0.0, metadata={"help": "dropout after the non-linearity"})
    init: Literal["bert", "lora"] | None = field(default=None, metadata={
        "help": "bert: W_down ~ N(0, 0.02²); lora: W_down kaiming-uniform; W_up = 0 in both (unset: lora for "
                "parallel, bert otherwise)"})
    bias: bool = field(default=True, metadata={"help": "biases in both projections"})
    targets: list[str] | None = field(default=None, metadata={
        "help": "module-name patterns, type:/role: targets overriding the per-architecture placement"})
    seed: int = seed_option("seed of W_down's init")

    def __post_init__(self) -> None:
        require(self.placement in ("houlsby", "pfeiffer", "parallel"),
                f"adapter config.placement must be houlsby, pfeiffer or parallel, got {self.placement!r}")
        require(self.bottleneck is None or self.reduction_factor is None,
                "adapter config: give bottleneck or reduction_factor, not both")
        require(self.bottleneck is None or self.bottleneck >= 1,
                f"adapter config.bottleneck must be ≥ 1, got {self.bottleneck}")
        require(self.reduction_factor is None or self.reduction_factor >= 1,
                f"adapter config.reduction_factor must be ≥ 1, got {self.reduction_factor}")
        require(self.scale is None or (isinstance(self.scale, int | float) and 0.0 < self.scale < float("inf")),
                f"adapter config.scale must be a finite number > 0, got {self.scale}")
        require(self.act in ("relu", "gelu", "silu", "tanh"),
                f"adapter config.act must be relu, gelu, silu or tanh, got {self.act!r}")
        require(isinstance(self.dropout, int | float) and 0.0 <= self.dropout < 1.0,
                f"adapter config.dropout must be in [0, 1), got {self.dropout}")
        require(self.init in (None, "bert", "lora"), f"adapter config.init must be bert or lora, got {self.init!r}")
        require(self.targets is None or (len(self.targets) > 0 and all(
            callable(t) or (isinstance(t, str) and t) for t in self.targets)),
            f"adapter config.targets must be unset or a non-empty list of patterns, got {self.targets!r}")

    @property
    def parallel(self) -> bool:
        return self.placement == "parallel"

    @property
    def effective_scale(self) -> float:
        return self.scale if self.scale is not None else (PARALLEL_SCALE if self.parallel else SEQUENTIAL_SCALE)

    @property
    def effective_init(self) -> str:
        return self.init or ("lora" if self.parallel else "bert")

    def width(self, d: int) -> int:
        """The bottleneck width for a module of width ``d``."""
        if self.bottleneck is not None:
            return self.bottleneck
        if self.reduction_factor is not None:
            return max(1, d // self.reduction_factor)
        return DEFAULT_BOTTLENECK


def placement_targets(model: nn.Module, config: AdapterConfig) -> list[tuple[object, str]]:
    """``[(target, source)]`` for ``config`` on ``model`` (source: what the part reads, see the part)."""
    if config.targets is not None:
        return [(t, "input" if config.parallel else "output") for t in config.targets]
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    sites = SITES.get(model_type)
    if sites is None:
        raise TargetError(f"adapter: no placement table for model_type {model_type!r} (known: {sorted(SITES)}); "
                          "give config.targets (module-name patterns, type: or role: targets)")
    if config.placement == "houlsby":
        return [(sites.attention_output, "output"), (sites.ffn_output, "output")]
    if config.placement == "pfeiffer":
        return [(sites.ffn_output, "output")]
    return [(sites.ffn, sites.ffn_source)]


@register_method
class Adapter(Method):
    name = "adapter"
    config_cls = AdapterConfig
    summary = "bottleneck adapters: Houlsby / Pfeiffer in series, or the scaled parallel adapter (not mergeable)"
    part_kinds = (AdapterPart,)
    default_lr = 1e-3
    examples: ClassVar[dict[str, dict]] = {
        "": {"bottleneck": 8},
        "pfeiffer": {"placement": "pfeiffer", "bottleneck": 8, "act": "gelu"},
        "parallel": {"placement": "parallel", "bottleneck": 8},
    }

    def create_parts(self, model: nn.Module, config: AdapterConfig, exclude: list[str]) -> dict[str, AdapterPart]:
        from deltatune.model import get_module, logical_modules

        gen = torch.Generator().manual_seed(config.seed)
        chosen: dict[str, str] = {}
        for target, source in placement_targets(model, config):
            for name in select_modules(model, [target], exclude, kinds=None):
                chosen.setdefault(name, source)
        order = {n: i for i, (n, _) in enumerate(logical_modules(model))}
        parts = {}
        for name, source in sorted(chosen.items(), key=lambda item: order[item[0]]):
            module = get_module(model, name)
            d = module_width(module, source)
            if d is None:
                raise TargetError(f"adapter target {name!r} is a {type(module).__name__}, whose {source} width "
                                  "cannot be told (target a Linear/Conv1D module, a block with Linear layers or a "
                                  "norm)")
            ref = next((p for p in module.parameters() if p.is_floating_point()), None)
            part = AdapterPart(d, config.width(d), config.effective_scale, source=source, act=config.act,
                               dropout=config.dropout, bias=config.bias, init=config.effective_init,
                               dtype=ref.dtype if ref is not None else None, generator=gen)
            parts[name] = part.to(ref.device) if ref is not None else part
        return parts
