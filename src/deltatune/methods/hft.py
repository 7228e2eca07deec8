"""HFT: Half Fine-Tuning (Hui et al., "HFT: Half Fine-Tuning for Large Language Models", 2024; ACL 2025), and
the Half-Reset of an existing fine-tune.

HFT trains a dense delta on every module (as full fine-tuning does, :class:`~deltatune.parts.dense.DensePart`, θ in
the base's own storage: :mod:`deltatune.methods.in_place`), but in each **stage** only about half of them learn;
the other half keeps its previous-stage values.  The selection is at the matrix (module) level, per transformer
block and per category:

* groups: in every block its attention modules, its FFN modules and its norms; the modules outside the blocks
  (embeddings, final norm, pooler, an untied LM head) form one more group (``embeddings=True``) — the paper
  handles them "with the same 50% principle";
* in each group ``k_g`` modules train, drawn uniformly; the ``k_g`` are a systematic rounding of
  ``fraction · n_g`` with a random offset ``u ~ U[0, 1)`` per stage, ``k_g = ⌊C_g + u⌋ − ⌊C_{g−1} + u⌋`` with
  ``C_g = fraction · Σ_{h≤g} n_h``, so the global count is ``fraction`` of all modules up to one and a group of
  odd size alternates between ⌊·⌋ and ⌈·⌉ across stages (GPT-2's attention is ``c_attn`` + ``c_proj``: one of
  the two; a Llama block trains 2 of q/k/v/o, 1 or 2 of gate/up/down and 1 of its 2 norms);
* the draw uses ``torch.Generator().manual_seed(seed · 1000003 + stage)``: a stage's half is reproducible.

This is the masked update ``θ_{t+1} = θ_t − η · M_s ⊙ ∇L`` with ``M_s`` a random half-mask at matrix
granularity, re-drawn every ``stage_steps`` optimiser steps (the paper: each epoch in SFT, each task in
continual learning).

Training: :class:`HalfSchedule` (a :class:`TrainHook`) makes the frozen half ``requires_grad=False`` for the
duration of each optimiser step (``before_step`` … ``after_step``), so no gradient is computed or stored for it
and AdamW neither moves nor decays it (a parameter without gradient is skipped); between steps every part is
trainable again, so the delta's trainable set is stable for checkpoints and accounting.  Optimiser state: at a
stage change the state of every parameter that is frozen in the new stage is deleted (freed: the optimiser
holds moments only for the trained half) and a parameter that trains again starts from fresh moments and
step count — the paper's reset; ``reset_state="all"`` also restarts the moments of the parameters that keep
training (a fresh optimiser per stage).  A loop that does not run the method's hooks trains every part (full
fine-tuning): use :func:`deltatune.train.integration.prepare` or the Trainer callback.  Under DDP the frozen half
gets no gradient in a step, so the model needs ``find_unused_parameters=True``.

Half-Reset (:func:`half_reset`): resetting 50% of a fine-tuned model's parameters to the base restores base
knowledge while keeping most of the new ability (the paper's motivation, Llama-2-Chat-7B vs Llama-2-7B).  It
takes any delta of per-module parts (a full fine-tune or a checkpoint made into a dense delta) and drops the
parts of half of each block's attention, FFN and norm modules (same grouping and seeded draw as a stage).
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from deltatune.config import require, seed_option
from deltatune.delta import Delta
from deltatune.errors import ConfigError
from deltatune.methods.full import Full, FullConfig
from deltatune.methods.in_place import InPlaceTraining
from deltatune.methods.registry import Method, TrainHook, register_method
from deltatune.parts.base import Part
from deltatune.parts.dense import DensePart

_BLOCK = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")
#: sub-module names (lower-cased) of attention: decoder-only and BERT/GPT-2 names, BART's cross-attention
#: (``encoder_attn``), T5's ``SelfAttention`` / ``EncDecAttention``
_ATTENTION = {"self_attn", "attn", "attention", "self_attention", "crossattention", "cross_attn", "encoder_attn",
              "selfattention", "encdecattention"}
OTHER = "other"


def module_role(name: str) -> str:
    """``"norm"`` (a LayerNorm/RMSNorm module: last name component holds ``norm`` or starts with ``ln``),
    ``"attention"`` (inside an attention sub-module) or ``"ffn"`` (anything else in a block)."""
    last = name.rsplit(".", 1)[-1].lower()
    if "norm" in last or last.startswith("ln"):
        return "norm"
    return "attention" if _ATTENTION & {part.lower() for part in name.split(".")} else "ffn"


def half_groups(names: Sequence[str], norms: bool = True, outside: bool = True) -> dict[str, list[str]]:
    """``{group: sorted module names}``: ``"<block>/attention"``, ``"<block>/ffn"``, ``"<block>/norm"`` for the
    modules of each transformer block (found by ``layers.N`` / ``layer.N`` / ``h.N`` / ``block.N`` in the name;
    ``<block>`` is the path up to it with ``N`` zero-padded, so an encoder's and a decoder's block ``N`` differ) and
    ``"other"`` for the modules outside the blocks; norms and outside modules are left out unless asked."""
    groups: dict[str, list[str]] = {}
    for name in sorted(names):
        match = _BLOCK.search(name)
        if match is None:
            if outside:
                groups.setdefault(OTHER, []).append(name)
            continue
        role = module_role(name)
        if role == "norm" and not norms:
            continue
        groups.setdefault(f"{name[:match.start(1)]}{int(match.group(1)):06d}/{role}", []).append(name)
    return dict(sorted(groups.items(), key=lambda item: (item[0] == OTHER, item[0])))  # blocks in order, then other


def draw_half(groups: dict[str, list[str]], fraction: float, seed: int, stage: int) -> set[str]:
    """The modules that train in ``stage``: ``k_g`` of group ``g`` (systematic rounding of ``fraction · n_g``
    with a random offset, see the module docstring), drawn uniformly from a seeded generator."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + stage)
    offset = float(torch.rand((), generator=gen))
    chosen: set[str] = set()
    cumulative = 0.0
    for members in groups.values():
        before = math.floor(cumulative + offset)
        cumulative += fraction * len(members)
        k = math.floor(cumulative + offset) - before
        order = torch.randperm(len(members), generator=gen)[:k].tolist()
        chosen.update(members[i] for i in order)
    return chosen


@dataclass
class HFTConfig:
    method: ClassVar[str] = "hft"
    stage_steps: int = field(default=100, metadata={"help": "optimiser steps per stage; the trained half is "
                                                           "re-drawn at each stage (the paper: one epoch)"})
    fraction: float = field(default=0.5, metadata={"help": "share of each group's modules that trains in a stage"})
    norms: bool = field(default=True, metadata={"help": "norm modules get a delta (half of them train per stage)"})
    embeddings: bool = field(default=True, metadata={"help": "modules outside the blocks (embeddings, final norm, "
                                                            "untied LM head) get a delta, half training per stage"})
    reset_state: Literal["frozen", "all"] = field(
        default="frozen", metadata={"help": "at a stage change drop the optimiser state of the frozen half (frozen) "
                                            "or of every parameter (all)"})
    seed: int = seed_option("seed of the per-stage draws")
    in_place: bool = field(default=True, metadata={"help": "train θ in the base's own storage, θ₀ in a temporary "
                                                           "file (see full); false: a separate Δθ per part"})

    def __post_init__(self) -> None:
        require(self.stage_steps >= 1, f"hft config.stage_steps must be ≥ 1, got {self.stage_steps}")
        require(0.0 < self.fraction <= 1.0, f"hft config.fraction must be in (0, 1], got {self.fraction}")
        require(self.reset_state in ("frozen", "all"),
                f"hft config.reset_state must be frozen or all, got {self.reset_state!r}")


class HalfSchedule(TrainHook):
    """Per stage: which parts train; frozen ones have ``requires_grad=False`` from ``before_step`` to
    ``after_step``; at a stage change the optimiser state is reset as ``reset_state`` says.  ``in_place`` (when
    given) trains the parts in the base's own storage for the run and is closed with this hook."""

    def __init__(self, parts: dict[str, Part], optimizer: torch.optim.Optimizer, config: HFTConfig,
                 in_place: InPlaceTraining | None = None) -> None:
        self.parts, self.optimizer, self.config, self.in_place = parts, optimizer, config, in_place
        self.groups = half_groups(list(parts), norms=True, outside=True)
        self.stage = -1
        self.training: set[str] = set(parts)

    def stage_of(self, step: int) -> int:
        return step // self.config.stage_steps

    def before_step(self, step: int) -> None:
        stage = self.stage_of(step)
        if stage != self.stage:
            self.switch(stage)
        for name, part in self.parts.items():
            on = name in self.training
            for p in part.parameters():
                p.requires_grad_(on)
                if not on:
                    p.grad = None

    def after_step(self, step: int) -> None:
        self._all_trainable()

    def _all_trainable(self) -> None:
        """Every part's parameters trainable again, as between steps (only one step freezes a half)."""
        for part in self.parts.values():
            for p in part.parameters():
                p.requires_grad_(True)

    def switch(self, stage: int) -> None:
        """Draw ``stage``'s half and reset the optimiser state of what no longer trains (or of everything)."""
        self.stage = stage
        self.training = draw_half(self.groups, self.config.fraction, self.config.seed, stage)
        for name, part in self.parts.items():
            if self.config.reset_state == "all" or name not in self.training:
                for p in part.parameters():
                    self.optimizer.state.pop(p, None)

    def close(self) -> None:
        """The frozen half trainable again (a run that stopped inside a step leaves it frozen), and the base's tensors
        given back."""
        self._all_trainable()
        if self.in_place is not None:
            self.in_place.close()

    def state_dict(self) -> dict[str, Any]:
        return {"stage": self.stage}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        stage = int(state["stage"])
        self.stage = stage
        self.training = draw_half(self.groups, self.config.fraction, self.config.seed, stage) if stage >= 0 \
            else set(self.parts)


@register_method
class HFT(Method):
    name = "hft"
    config_cls = HFTConfig
    summary = "Half Fine-Tuning: dense deltas everywhere, half of each block's attention/FFN/norms trains per stage"
    part_kinds = (DensePart,)
    examples = {"": {"stage_steps": 2}, "no-norms": {"stage_steps": 1, "norms": False, "embeddings": False}}
    default_lr = 5e-5

    def create_parts(self, model: nn.Module, config: HFTConfig, exclude: list[str]) -> dict[str, Part]:
        parts = Full().create_parts(model, FullConfig(), exclude)
        keep = {n for members in half_groups(list(parts), config.norms, config.embeddings).values() for n in members}
        if not keep:
            raise ConfigError("hft found no module to train in this model (no transformer blocks matched)")
        if config.fraction * len(keep) < 1 - 1e-9:  # the systematic rounding then draws none in some stages
            raise ConfigError(f"hft config.fraction {config.fraction} of {len(keep)} modules trains none in some "
                              f"stages; give fraction ≥ {math.ceil(1000 / len(keep)) / 1000:g}")
        return {n: p for n, p in parts.items() if n in keep}

    def hooks(self, model, delta, config: HFTConfig, optimizer, total_steps, grad_accum) -> list[TrainHook]:
        return [HalfSchedule(delta.parts, optimizer, config, InPlaceTraining(model, delta, optimizer, config.in_place))]


def half_reset(delta: Delta, seed: int = 0, fraction: float = 0.5, norms: bool = True,
               outside: bool = False) -> Delta:
    """Half-Reset (Hui et al., 2024): a new delta in which ``fraction`` of each block's attention, FFN and
    (``norms``) norm modules are reset to the base — their parts dropped, ``θ = θ_base`` — and the rest keep
    their fine-tuned update; ``outside`` also resets that share of the modules outside the blocks (embeddings,
    final norm), which are kept whole by default.  The draw is :func:`draw_half` with ``seed`` (stage 0).

    Works on any delta of per-module parts (``full``, ``hft``, or a checkpoint turned into a dense delta);
    task heads are kept.  The result records ``metrics["half_reset"] = {"seed", "fraction", "reset"}``."""
    require(0.0 < fraction <= 1.0, f"half_reset fraction must be in (0, 1], got {fraction}")
    names = [n for n, p in delta.parts.items() if not p.model_level]
    groups = half_groups(names, norms=norms, outside=outside)
    if not groups:
        raise ConfigError(f"half_reset: the {delta.method} delta has no part inside a transformer block "
                          f"(parts: {sorted(delta.parts)[:5]})")
    reset = draw_half(groups, fraction, seed, 0)
    parts = {n: copy.deepcopy(p) for n, p in delta.parts.items() if n not in reset}
    out = Delta(method=delta.method, config=copy.deepcopy(delta.config), parts=parts,
                heads={h: {k: v.clone() for k, v in t.items()} for h, t in delta.heads.items()},
                fingerprint=copy.deepcopy(delta.fingerprint),
                provenance=delta.provenance.derived("half_reset", [delta]))
    out.metrics["half_reset"] = {"seed": seed, "fraction": fraction, "reset": sorted(reset)}
    return out
