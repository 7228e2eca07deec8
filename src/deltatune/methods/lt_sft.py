"""LT-SFT: Lottery-Ticket Sparse Fine-Tuning (Ansell, Ponti, Korhonen, Vulić, "Composable Sparse Fine-Tuning for
Cross-Lingual Transfer", ACL 2022, arXiv 2110.07560), in one training run of three phases:

1. **full fine-tuning** of the target weights for ``full_steps`` optimiser steps: a dense part per target, trained
   as full fine-tuning trains (``θ`` in the base's own storage, ``θ₀`` in a temporary file:
   :mod:`deltatune.methods.in_place`; with the L1 pull, a separate ``Δ = θ − θ₀`` beside the frozen ``θ₀``);
2. **selection and rewind**: the ``K`` entries with the largest ``|θ − θ₀| = |Δ|`` over all targets at once
   (:func:`top_k_positions`, exact, ties broken by module order then flat position) become the support; every
   value is rewound to ``θ₀`` (``Δ = 0``), the dense parts are replaced by sparse parts on that support, and the
   optimiser starts afresh (the reference builds a new optimiser for each phase);
3. **masked fine-tuning** of those ``K`` entries only (a sparse part: values at sorted flat indices, optimiser
   state only for them, so AdamW's weight decay never moves an entry outside the support), with ``W + ΔW`` kept in
   the base weight (:meth:`deltatune.parts.sparse.SparsePart.bind`).

``K`` is ``num_tunable`` or ``⌊density · Σ numel(target weights)⌋``.  The reference's "maskable" set is every
base-model parameter (``ft_params_proportion`` of all of them, embeddings, biases and norms included); here it is the
targets, by default every linear weight (``targets`` widens it, e.g. ``type:Embedding``), so the same density gives a
smaller ``K`` where embeddings are large — give ``num_tunable`` to match a reference budget.  Optional L1 pull toward
``θ₀`` (reference ``full_l1_reg`` / ``sparse_l1_reg``): ``L = λ · Σ |θ − θ₀| / N`` with ``N`` the number of the base
model's parameters (the reference's ``_num_params``, so its λ carry over), added once per optimiser step as its
subgradient ``λ · sign(Δ) / N`` (:class:`LTSFTAdamW`; the reference adds the loss on one micro-batch scaled by the
accumulation steps, the same once-per-step pull).  Task heads train densely in both phases and are not rewound (the
reference copies *every* parameter back, a fresh head to its random init; here the masked phase starts from the
phase-1 head instead, so a short run does not spend its masked steps relearning the head — not compared against the
reference's choice).
The saved delta holds only sparse parts (exactly ``K`` entries).

**Learning rate of the masked phase** (``phase_schedule``).  The reference builds a fresh optimiser *and a fresh
learning-rate scheduler* for each phase (``src/sft/lt_sft.py``, ``train``: ``self.optimizer = None; self.lr_scheduler =
None`` and ``set_training_len`` before each phase's ``Trainer.train``), so the masked phase starts again from warm-up to
the peak LR and decays over its own steps.  The default ``"restart"`` does that within the run's one scheduler: masked
step ``j`` of ``L₂`` runs at the LR the run's own schedule had at step ``⌊j · T / L₂⌋`` (:func:`replay_step`; ``T`` the
run's steps), i.e. the run's schedule (warm-up, decay shape) replayed over the masked phase, for every parameter group
(task heads too).  That step is never later than the current one, so its LR factor was already observed
(:class:`LTSFTPhases` records ``lr / initial_lr`` per group each step): any scheduler works, none needed.  The override
needs the method's own optimiser (:class:`LTSFTAdamW`; with another one the masked phase continues on the run's
schedule, and ``integration.schedule_for`` warns about the optimiser); the loop's logged ``lr`` stays the run
scheduler's value.  ``"continue"`` (the behaviour before) leaves the masked phase on the tail of the run's one decay:
with the default linear decay and ``full_fraction`` 0.5 it starts near half the peak LR and ends at 0, a quarter of the
run's LR mass for the phase that makes the saved delta.  Phase 1 cannot be restarted the same way (its compressed
schedule would need LR factors of steps not yet seen); it runs on the first ``full_steps`` of the run's schedule.

**Phase split** (``full_fraction``, default 0.25).  The reference's task scripts give the masked phase as many or
more epochs than full fine-tuning (NLI 5 + 5, POS 3 + 10, i.e. a phase-1 share of 0.5 to 0.23).  At our step budgets
(hundreds of steps) the masked phase is the slow one — sparse training of K entries moves the loss later than full
fine-tuning — and phase 1 only has to rank the entries, so the default takes the low end of the reference's range.

Measured (SST-2, MiniLM, ``loop.train``, 120 steps of 16, max length 64, K = 337,920, dev accuracy on the first
400 rows, 1 thread): LR 2e-4, share 0.5: ``"continue"`` 0.52 (the head-only level), ``"restart"`` 0.55; LR 5e-4,
share 0.5: ``"continue"`` 0.52, ``"restart"`` 0.6675; LR 5e-4, share 0.25, ``"restart"`` 0.7475 (full FT after its
30 steps: 0.605; SpIEL at the same K, LR and steps: 0.7875).  A constant LR 2e-4 (share 0.5) reached 0.72: the
masked phase needs the LR mass the one-schedule tail did not give it.  With benchmarks/composability.py's settings
(300 steps, whole dev split): ``"continue"``, LR 2e-4, share 0.5 0.5241; ``"restart"`` at the same LR and share
0.7305; LR 5e-4 0.7752; LR 5e-4, share 0.25 0.8039.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from deltatune.algebra.quantile import RadixSelect
from deltatune.config import require
from deltatune.errors import ConfigError, DeltaFormatError, NonFiniteError, TrainingDiverged
from deltatune.fingerprint import base_parameters
from deltatune.methods.in_place import InPlaceTraining
from deltatune.methods.registry import Method, TrainHook, fused_adamw_ok, param_list, register_method
from deltatune.methods.targets import one_per_weight, select_modules
from deltatune.model import attach_parts, delta_layers, detach, get_module
from deltatune.parts.dense import DensePart
from deltatune.parts.layers import layer_kind
from deltatune.parts.sparse import SparsePart


@dataclass
class LTSFTConfig:
    method: ClassVar[str] = "lt-sft"
    density: float = field(default=0.01, metadata={"help": "K as a fraction of the target weights' entries"})
    num_tunable: int | None = field(default=None, metadata={"help": "K as an exact count (overrides density)"})
    targets: list[str] = field(default_factory=lambda: ["all-linear"],
                               metadata={"help": "module-name patterns (all-linear, type:Embedding, …)"})
    full_steps: int | None = field(default=None, metadata={"help": "phase-1 (full fine-tuning) optimiser steps "
                                                                   "(default: full_fraction of the run)"})
    full_fraction: float = field(default=0.25, metadata={"help": "phase-1 share of the run's steps, in (0, 1)"})
    l1_full: float = field(default=0.0, metadata={"help": "L1 pull toward the base in phase 1 (λ)"})
    l1_sparse: float = field(default=0.0, metadata={"help": "L1 pull toward the base in phase 3 (λ)"})
    phase_schedule: Literal["restart", "continue"] = field(
        default="restart", metadata={"help": "LR of the masked phase: 'restart' replays the run's schedule over it "
                                             "(the reference's fresh scheduler per phase); 'continue' keeps the "
                                             "tail of the run's one schedule"})
    in_place: bool = field(default=True, metadata={"help": "phase 1 trains θ in the base's own storage, θ₀ in a "
                                                           "temporary file (as full; not with l1_full); phase 3 "
                                                           "keeps W + ΔW in the base weight"})

    def __post_init__(self) -> None:
        require(isinstance(self.density, float | int) and 0.0 < self.density <= 1.0,
                f"lt-sft config.density must be in (0, 1], got {self.density}")
        require(self.num_tunable is None or self.num_tunable > 0,
                f"lt-sft config.num_tunable must be > 0, got {self.num_tunable}")
        require(self.full_steps is None or self.full_steps >= 1,
                f"lt-sft config.full_steps must be ≥ 1, got {self.full_steps}")
        require(0.0 < self.full_fraction < 1.0, f"lt-sft config.full_fraction must be in (0, 1), got "
                                                f"{self.full_fraction}")
        require(self.l1_full >= 0 and self.l1_sparse >= 0,
                f"lt-sft config.l1_full and l1_sparse must be ≥ 0, got {self.l1_full} and {self.l1_sparse}")
        require(len(self.targets) > 0, "lt-sft config.targets is empty")
        require(self.phase_schedule in ("restart", "continue"),
                f"lt-sft config.phase_schedule must be 'restart' or 'continue', got {self.phase_schedule!r}")


def budget(config: Any, entries: int, what: str = "lt-sft") -> int:
    """``K``: ``num_tunable``, else ``⌊density · entries⌋`` (at least 1); :class:`ConfigError` when it exceeds
    ``entries``, the number of target entries."""
    k = config.num_tunable if config.num_tunable is not None else max(1, int(config.density * entries))
    if k > entries:
        raise ConfigError(f"{what} config asks for K = {k} trainable entries but the targets hold only {entries}")
    return k


def phase_one_steps(config: LTSFTConfig, total_steps: int) -> int:
    """Optimiser steps of full fine-tuning; at least one masked step must follow (:class:`ConfigError`)."""
    steps = config.full_steps if config.full_steps is not None else max(1, round(config.full_fraction * total_steps))
    if steps >= total_steps:
        raise ConfigError(f"lt-sft config: phase 1 takes {steps} of the run's {total_steps} optimiser steps, leaving "
                          "none for the masked phase; lower full_steps/full_fraction or train longer")
    return steps


def replay_step(local: int, phase_steps: int, total_steps: int) -> int:
    """The run's schedule step whose LR masked step ``local`` (0-based, of ``phase_steps``) replays:
    ``⌊local · T / L₂⌋`` with ``T = total_steps``, ``L₂ = phase_steps`` — the run's schedule compressed into the
    masked phase (the reference restarts its scheduler per phase).  With ``S = T − L₂`` phase-1 steps it is at most
    ``S + local``, the current step, because ``local · (T − L₂) / L₂ ≤ S`` ⟺ ``local ≤ L₂``: its LR was already
    seen."""
    if not 0 <= local < phase_steps <= total_steps:
        raise ConfigError(f"lt-sft schedule replay: masked step {local} of {phase_steps} in a run of {total_steps}")
    return local * total_steps // phase_steps


@torch.no_grad()
def top_k_positions(tensors: dict[str, Tensor], k: int) -> dict[str, Tensor]:
    """Sorted flat positions (int64) of exactly ``k`` entries with the largest ``|x|`` over all ``tensors`` at once.

    The threshold ``t`` (the ``k``-th largest ``|x|``) comes from an exact two-pass radix selection over the
    stream of tensors (:class:`~deltatune.algebra.quantile.RadixSelect`: no concatenated copy); every entry with
    ``|x| > t`` is kept, and entries equal to ``t`` fill the rest in ``tensors`` order, then flat order.  ``±inf``
    ranks above every finite value; a NaN has no rank (it would fail every comparison and leave the selection short
    of ``k``): :class:`NonFiniteError` naming the tensors that hold one."""
    total = sum(t.numel() for t in tensors.values())
    if not 0 < k <= total:
        raise ConfigError(f"top-k selection of {k} entries out of {total}")
    sel = RadixSelect(nonnegative=True)
    for t in tensors.values():  # the selector counts on the CPU: one tensor's |x| moves there at a time
        sel.feed(t.detach().abs().cpu())
    sel.resolve([total - k])  # ascending rank of the k-th largest
    for t in tensors.values():
        sel.feed(t.detach().abs().cpu())
    threshold = sel.values()[0]
    ties_left = k - sum(int(torch.count_nonzero(t.detach().float().abs() > threshold)) for t in tensors.values())
    out = {}
    for n, t in tensors.items():  # one tensor's |x| at a time
        m = t.detach().reshape(-1).float().abs()
        idx = (m > threshold).nonzero().reshape(-1)
        if ties_left > 0:
            ties = (m == threshold).nonzero().reshape(-1)[:ties_left]
            ties_left -= ties.numel()
            idx = torch.cat([idx, ties]).sort().values
        out[n] = idx
    if sum(idx.numel() for idx in out.values()) != k:  # only a NaN leaves the count short
        nan = [n for n, t in tensors.items() if bool(torch.isnan(t).any())]
        raise NonFiniteError(f"top-k selection of {k} entries: {', '.join(nan) or 'the tensors'} hold(s) NaN, "
                             "which has no rank by |x|")
    return out


class LTSFTAdamW(torch.optim.AdamW):
    """AdamW with LT-SFT's L1 pull toward the base: before each step, ``grad += λ/N · sign(Δ)`` for the delta
    tensors in :attr:`l1_params` (the subgradient of ``λ Σ |θ − θ₀| / N``, once per optimiser step).  The phase
    hook sets :attr:`l1_weight` (``λ/N``) and :attr:`l1_params`, and, in a restarted masked phase,
    :attr:`lr_override`: one LR per parameter group used for this step only (each group's ``lr`` is put back after
    it, so the run's scheduler keeps its own values).  Fused where torch's kernel can run, like every method's default
    optimiser (:func:`deltatune.methods.registry.adamw`)."""

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.0) -> None:
        params = param_list(params)
        super().__init__(params, lr=lr, weight_decay=weight_decay, fused=fused_adamw_ok(params) or None)
        self.l1_weight = 0.0
        self.l1_params: set[int] = set()
        self.lr_override: list[float] | None = None

    def step_lrs(self) -> list[float]:
        """The LR each group's next step uses: the override when one is set (the loop logs these)."""
        return list(self.lr_override) if self.lr_override is not None else [g["lr"] for g in self.param_groups]

    @torch.no_grad()
    def step(self, closure=None):
        if self.l1_weight:
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None and id(p) in self.l1_params:
                        p.grad.add_(torch.sign(p).to(p.grad.dtype), alpha=self.l1_weight)
        if self.lr_override is None:
            return super().step(closure)
        if len(self.lr_override) != len(self.param_groups):
            raise ConfigError(f"lt-sft optimiser: {len(self.lr_override)} phase LR(s) for "
                              f"{len(self.param_groups)} parameter group(s)")
        kept = [group["lr"] for group in self.param_groups]
        for group, lr in zip(self.param_groups, self.lr_override, strict=True):
            group["lr"] = lr
        try:
            return super().step(closure)
        finally:
            for group, lr in zip(self.param_groups, kept, strict=True):
                group["lr"] = lr


def _attached_name(model: nn.Module, parts: dict[str, nn.Module]) -> str:
    """The part name the delta's parts are attached under (``attach`` uses ``default``)."""
    wanted = {id(p) for p in parts.values()}
    for _, layer in delta_layers(model):
        for name, part in layer.parts.items():
            if id(part) in wanted:
                return name
    raise ConfigError("lt-sft: the delta's parts are not attached to the model being trained")


class LTSFTPhases(TrainHook):
    """The phase switch: after ``switch_at`` completed steps, select the top-``K`` of ``|Δ|``, rewind, and continue
    on sparse parts (the model's layers, ``delta.parts`` and the optimiser's parameter list are updated in place)."""

    def __init__(self, model: nn.Module, delta: Any, config: LTSFTConfig, optimizer: torch.optim.Optimizer,
                 total_steps: int) -> None:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise ConfigError("lt-sft swaps its trainable tensors at the phase switch, which DistributedDataParallel "
                              "cannot follow; train lt-sft on one process")
        self.model, self.delta, self.config, self.optimizer = model, delta, config, optimizer
        self.switch_at = phase_one_steps(config, total_steps)
        self.entries = sum(p.delta_for("weight").numel() for p in delta.parts.values())
        self.l1_denominator = sum(t.numel() for t in {id(t): t for _, t in base_parameters(model)}.values())
        self.k = budget(config, self.entries)
        self.total_steps = total_steps
        self.phase = 1
        self.events: list[dict[str, Any]] = []
        self.lr_factors: list[list[float] | None] = []  # per completed-or-current step: each group's lr / initial_lr
        self._set_l1(config.l1_full)
        # phase 1 trains θ in the base's storage, as full fine-tuning does (the L1 pull needs sign(θ − θ₀): not then)
        self.in_place = InPlaceTraining(model, delta, optimizer, enabled=config.in_place and config.l1_full == 0)

    def _set_l1(self, lam: float) -> None:
        if isinstance(self.optimizer, LTSFTAdamW):
            self.optimizer.l1_weight = lam / self.l1_denominator
            self.optimizer.l1_params = {id(p) for part in self.delta.parts.values() for p in part.parameters()}

    def before_step(self, step: int) -> None:
        """Record this step's LR factor per group (``lr / initial_lr``; 1 without a scheduler) and, in a restarted
        masked phase, hand the optimiser the LRs of the replayed step (:func:`replay_step`)."""
        groups = self.optimizer.param_groups
        del self.lr_factors[step:]  # a step seen again (resume) replaces its record
        self.lr_factors += [None] * (step - len(self.lr_factors))  # steps whose before_step never ran
        self.lr_factors.append([g["lr"] / g["initial_lr"] if g.get("initial_lr") else 1.0 for g in groups])
        if self.phase != 2 or self.config.phase_schedule != "restart" or not isinstance(self.optimizer, LTSFTAdamW):
            return
        local = min(step - self.switch_at, self.total_steps - self.switch_at - 1)
        at = replay_step(max(0, local), self.total_steps - self.switch_at, self.total_steps)
        factors = self.lr_factors[at]
        if factors is None:
            raise ConfigError(f"lt-sft: the LR of step {at} was never recorded (before_step must run every optimiser "
                              "step; a checkpoint without the record cannot restart the masked phase's schedule: "
                              "set phase_schedule='continue')")
        self.optimizer.lr_override = [g.get("initial_lr", g["lr"]) * f for g, f in zip(groups, factors, strict=True)]

    def after_step(self, step: int) -> None:
        if self.phase == 1 and step >= self.switch_at:
            # phase 1's moments go first, then the rewind: each module gets θ₀ back and each part's own storage (θ's
            # until now) holds Δθ, so the selection reads the parts' tensors and no second dense Δ is made
            self.optimizer.state.clear()
            self.in_place.close()
            deltas = {n: p.delta_for("weight") for n, p in self.delta.parts.items()}
            # a step that diverged last in phase 1 is not seen by the loop's loss check (the rewind comes before the
            # next forward): a NaN |Δ| would fail every comparison and leave the selection short of K, silently
            bad = [n for n, t in deltas.items() if not bool(torch.isfinite(t).all())]
            if bad:
                shown = ", ".join(bad[:5]) + (f", … ({len(bad) - 5} more)" if len(bad) > 5 else "")
                raise TrainingDiverged(step, float("nan"), None,
                                       tensor=f"lt-sft phase-1 Δ of {shown} (the top-K selection needs finite |Δ|)")
            chosen = top_k_positions(deltas, self.k)
            self.events.append({"step": step, "k": self.k, "entries": self.entries})
            self.switch(chosen)

    @torch.no_grad()
    def switch(self, chosen: dict[str, Tensor]) -> None:
        """Replace the dense parts by sparse parts at ``chosen`` flat positions, values 0 (rewound to ``θ₀``)."""
        self.in_place.close()  # the rewind: each module gets its θ₀ back
        old = dict(self.delta.parts)
        name = _attached_name(self.model, old)
        new: dict[str, SparsePart] = {}
        for module_name in old:
            idx = chosen.get(module_name)
            if idx is not None and idx.numel():
                module = get_module(self.model, module_name)
                part = SparsePart(tuple(module.weight.shape), idx.to(module.weight.device), layer_kind(module),
                                  dtype=old[module_name].delta_for("weight").dtype)
                new[module_name] = part
        detach(self.model, name)
        attach_parts(self.model, new, name)
        self.delta.parts.clear()
        self.delta.parts.update(new)
        self._swap_optimizer_params(old, new)
        self.phase = 2
        self._set_l1(self.config.l1_sparse)
        # the masked phase keeps W + ΔW in the base weight too (sparse parts bind with an L1 pull or decay)
        self.in_place = InPlaceTraining(self.model, self.delta, self.optimizer, enabled=self.config.in_place)

    def _swap_optimizer_params(self, old: dict[str, Any], new: dict[str, SparsePart]) -> None:
        gone = {id(p) for part in old.values() for p in part.parameters()}
        fresh = [part.values for _, part in sorted(new.items())]
        placed = False
        for group in self.optimizer.param_groups:
            kept = [p for p in group["params"] if id(p) not in gone]
            if len(kept) != len(group["params"]) and not placed:
                kept, placed = kept + fresh, True
            group["params"] = kept
        if not placed:
            self.optimizer.param_groups[0]["params"].extend(fresh)
        self.optimizer.state.clear()  # a fresh optimiser for the new phase (reference: one per phase)

    def close(self) -> None:
        self.in_place.close()

    def delta_is_final(self) -> bool:
        """Only the masked phase's sparse parts may be kept as ``best``: a phase-1 evaluation scores the dense full
        fine-tune, neither the delta this run saves nor comparable with it."""
        return self.phase == 2

    def state_dict(self) -> dict[str, Any]:
        indices = None if self.phase == 1 else {n: p.indices.detach().cpu() for n, p in self.delta.parts.items()}
        return {"phase": self.phase, "events": list(self.events), "indices": indices,
                "lr_factors": [None if f is None else list(f) for f in self.lr_factors]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.events = list(state["events"])
        self.lr_factors = [None if f is None else list(f) for f in state.get("lr_factors", [])]
        if state["phase"] == 2 and self.phase == 1:
            indices = state["indices"]
            if not isinstance(indices, dict) or set(indices) - set(self.delta.parts):
                raise DeltaFormatError("lt-sft hook state: the phase-2 support names modules this run has no part for")
            self.switch({n: t.to(torch.int64) for n, t in indices.items()})


@register_method
class LTSFT(Method):
    name = "lt-sft"
    config_cls = LTSFTConfig
    summary = "Lottery-Ticket Sparse FT: full FT, keep the top-K of |θ−θ₀| and rewind, then masked FT of those K"
    part_kinds = (DensePart, SparsePart)
    examples = {"": {"num_tunable": 777, "full_steps": 1},
                "l1": {"density": 0.05, "full_steps": 1, "l1_full": 0.1, "l1_sparse": 0.1}}
    default_lr = 5e-4

    def create_parts(self, model: nn.Module, config: LTSFTConfig, exclude: list[str]) -> dict[str, DensePart]:
        parts = {}
        for name in one_per_weight(model, select_modules(model, config.targets, exclude)):  # tied: one part
            parts[name] = DensePart.for_module(get_module(model, name), names=["weight"])
        budget(config, sum(math.prod(p.shapes["weight"]) for p in parts.values()))
        return parts

    def optimizer(self, params, lr, weight_decay, config):
        return LTSFTAdamW(params, lr=lr, weight_decay=weight_decay)

    def hooks(self, model, delta, config: LTSFTConfig, optimizer, total_steps, grad_accum) -> list[TrainHook]:
        return [LTSFTPhases(model, delta, config, optimizer, total_steps)]
