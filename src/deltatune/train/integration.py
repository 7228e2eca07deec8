"""deltatune inside a training loop of your own: a plain PyTorch loop, HF ``Trainer`` or TRL's ``SFTTrainer``.

A method may need more than ``loss.backward(); optimizer.step()``: its own optimizer (SpIEL's
:class:`~deltatune.methods.sparse_optim.SparseAdamW`, whose per-element ages restart when a coordinate regrows)
and schedule hooks around each optimiser step (SpIEL's drop and regrow), and its parts may add an auxiliary loss
(MixLoRA's load balancing).  Missing them costs quality silently, so both routes get them from one place:

* a plain loop — :func:`prepare` gives the method's optimizer and a :class:`Schedule`; wrap each optimiser step in
  ``with schedule.step(step):`` and add ``delta.aux_loss()`` to the loss when it is not ``None``::

      optimizer, schedule = deltatune.train.integration.prepare(model, delta, lr=5e-4, total_steps=300)
      for step, batch in enumerate(batches):
          with schedule.step(step):
              loss = model(**batch).loss
              aux = delta.aux_loss()
              (loss if aux is None else loss + aux).backward()
              optimizer.step()
              optimizer.zero_grad()

* ``Trainer`` / ``SFTTrainer`` — pass ``optimizers=(optimizer, None)`` from :func:`prepare` (or let the callback
  warn that the trainer's own optimizer is not the method's) and ``callbacks=[DeltaTuneCallback(delta, …)]``: it
  runs the hooks at ``on_step_begin`` / ``on_step_end`` (the same points: before the micro-batches of a step,
  after ``optimizer.step``), adds the auxiliary loss through :func:`add_aux_loss`, and saves the delta in
  deltatune's format with every trainer checkpoint and at the end.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deltatune.delta import Delta
from deltatune.errors import ConfigError
from deltatune.methods.registry import TrainHook, get_method, unwrap_optimizer


def method_config(delta: Delta) -> Any:
    """The delta's typed method config (rebuilt from ``delta.config``)."""
    return get_method(delta.method).parse(dict(delta.config))


#: Default learning rate of a task head as a multiple of the delta's: a fresh classifier starts from random
#: weights and must move much further than the delta (measured on CLINC150: see :func:`default_head_lr`).
HEAD_LR_FACTOR = 10.0
#: The cap of the default (the best head LR measured on CLINC150): a method whose own LR is already high (IA³
#: 3e-3, SSF 5e-3) does not get a head LR of 3e-2 or more; one above it (prompt tuning, 3e-2) keeps its own.
HEAD_LR_CAP = 2e-2


def default_head_lr(lr: float) -> float:
    """The learning rate of fresh task heads when none is given: ``max(lr, min(10·lr, 2e-2))``.

    A new head (e.g. a 151-way classifier over a frozen encoder) starts at random and receives small gradients
    through a softmax over many classes; at the delta's learning rate it undertrains.  CLINC150 (MiniLM, LoRA r=8,
    lr 5e-4, 200 steps of 16; test accuracy on 1,500 rows): head at 5e-4 (= lr) 0.062, at 5e-3 (10×) 0.456, at 2e-2
    (40×) 0.661.  Ten times the delta's LR, capped at 2e-2, stays below what any method's default LR times 40
    would give (IA³ 0.12, prompt tuning 1.2) and never below the delta's own LR."""
    return max(lr, min(HEAD_LR_FACTOR * lr, HEAD_LR_CAP))


def head_parameters(model: nn.Module, delta: Delta) -> list[nn.Parameter]:
    """The trainable parameters of ``delta``'s task-head modules in ``model`` (each once)."""
    from deltatune.model import get_module

    seen: set[int] = set()
    params = []
    for head in delta.heads:
        for p in get_module(model, head).parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


def part_parameters(delta: Delta, exclude: set[int]) -> list[nn.Parameter]:
    """The trainable parameters of ``delta``'s own parts (each once, none of ``exclude``'s ids): not those of
    another delta attached to the same model, which training this one must leave alone."""
    seen = set(exclude)
    params = []
    for part in delta.parts.values():
        for p in part.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


def param_groups(model: nn.Module, delta: Delta, lr: float, head_lr: float | None = None) -> list[dict[str, Any]]:
    """Optimizer parameter groups: ``{"params": delta parameters, "lr": lr, "name": "delta"}`` (its own parts'
    trainable parameters, :func:`part_parameters`) and, when the delta has trainable task heads,
    ``{"params": head parameters, "lr": head_lr, "name": "heads"}`` (``head_lr`` default: :func:`default_head_lr`)."""
    heads = head_parameters(model, delta)
    rest = part_parameters(delta, {id(p) for p in heads})
    groups: list[dict[str, Any]] = [{"params": rest, "lr": lr, "name": "delta"}]
    if heads:
        groups.append({"params": heads, "lr": default_head_lr(lr) if head_lr is None else head_lr, "name": "heads"})
    return groups


def make_optimizer(model: nn.Module, delta: Delta, lr: float | None = None, weight_decay: float = 0.0,
                   config: Any = None, head_lr: float | None = None) -> torch.optim.Optimizer:
    """The method's own optimizer over ``model``'s trainable parameters, in two groups (:func:`param_groups`): the
    delta's parts at ``lr`` (default: the method's) and the task heads at ``head_lr`` (default:
    :func:`default_head_lr`, 10 × ``lr`` capped at 2e-2)."""
    method = get_method(delta.method)
    config = config or method_config(delta)
    lr = lr if lr is not None else method.default_lr
    return method.optimizer(param_groups(model, delta, lr, head_lr), lr, weight_decay, config)


class Schedule:
    """The method's schedule hooks for one run; ``with schedule.step(step):`` around optimiser step ``step``
    (0-based, the number of steps completed before it)."""

    def __init__(self, hooks: list[TrainHook]) -> None:
        self.hooks = hooks
        self.calls = 0

    @contextmanager
    def step(self, step: int) -> Iterator[None]:
        for hook in self.hooks:
            hook.before_step(step)
        yield
        for hook in self.hooks:
            hook.after_step(step + 1)
        self.calls += 1

    def state_dict(self) -> list[dict[str, Any]]:
        return [h.state_dict() for h in self.hooks]

    def load_state_dict(self, states: list[dict[str, Any]]) -> None:
        for hook, state in zip(self.hooks, states, strict=True):
            hook.load_state_dict(state)

    def close(self) -> None:
        """Call once training is over: each hook gives back what it took (:meth:`TrainHook.close`; nothing here for
        the built-in methods, whose in-place training is off in a loop of your own)."""
        for hook in self.hooks:
            hook.close()


def schedule_for(model: nn.Module, delta: Delta, optimizer: torch.optim.Optimizer, total_steps: int,
                 grad_accum: int = 1, config: Any = None) -> Schedule:
    """The method's hooks for ``optimizer`` over ``total_steps`` steps, warning when ``optimizer`` is not the
    method's own (e.g. a trainer's AdamW where SpIEL expects SparseAdamW).

    A loop of the user's own keeps deltas out of the base's tensors (``in_place`` off, where the method has it): its
    checkpoints and resumes handle the model's tensors, which in-place training would change."""
    method = get_method(delta.method)
    config = config or method_config(delta)
    if getattr(config, "in_place", False):
        config = dataclasses.replace(config, in_place=False)
    expected = type(method.optimizer([nn.Parameter(torch.zeros(1))], 1e-3, 0.0, config))
    if not isinstance(optimizer, expected):
        warnings.warn(f"the {delta.method} method trains with {expected.__name__}, but the loop's optimizer is "
                      f"{type(optimizer).__name__}; pass deltatune.train.integration.make_optimizer(model, delta) "
                      "(Trainer: optimizers=(optimizer, None)) to train as deltatune does", stacklevel=3)
    return Schedule(method.hooks(model, delta, config, optimizer, total_steps, grad_accum))


def prepare(model: nn.Module, delta: Delta, lr: float | None = None, total_steps: int = 1, grad_accum: int = 1,
            weight_decay: float = 0.0, head_lr: float | None = None) -> tuple[torch.optim.Optimizer, Schedule]:
    """The method's optimizer (task heads in their own group at ``head_lr``, see :func:`make_optimizer`) and its
    schedule for a loop of ``total_steps`` optimiser steps (one call)."""
    config = method_config(delta)
    optimizer = make_optimizer(model, delta, lr, weight_decay, config, head_lr)
    return optimizer, schedule_for(model, delta, optimizer, total_steps, grad_accum, config)


def add_aux_loss(model: nn.Module, delta: Delta, window_scale: float = 1.0) -> Any:
    """Make ``model``'s returned loss include the delta's auxiliary losses (a forward hook; returns its handle).
    For trainers, which call ``model(**inputs).loss`` themselves.

    A forward given ``num_items_in_batch`` (HF ``Trainer``, for models that take loss kwargs: causal LMs) returns
    its micro-batch's summed token loss divided by the whole accumulation window's token count, which the Trainer
    does not divide by the accumulation steps again; there the auxiliary loss is added × ``window_scale``
    (:class:`DeltaTuneCallback` passes ``1 / (accumulation steps × processes)``), so that over a window it weighs
    the mean of its micro-batches' auxiliary losses, as in deltatune's loop (``aux / accumulation`` per micro-batch,
    beside the loss weighted by its labelled items: :mod:`deltatune.train.accumulate`) and as
    the Trainer weighs it for models without loss kwargs.  Without ``num_items_in_batch`` it is added as it is."""
    def hook(module: nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> Any:
        aux = delta.aux_loss() if module.training else None
        if aux is not None and getattr(output, "loss", None) is not None:
            scale = window_scale if kwargs.get("num_items_in_batch") is not None else 1.0
            output.loss = output.loss + (aux * scale).to(output.loss.dtype)
        return output

    return model.register_forward_hook(hook, with_kwargs=True)


def trainer_window_scale(args: Any) -> float:
    """``1 / (gradient_accumulation_steps × world size)`` for a ``Trainer``'s ``args``: the Trainer multiplies a
    loss normalised by ``num_items_in_batch`` by the number of processes when it averages tokens across devices
    (``average_tokens_across_devices``), and DDP then averages the processes' gradients.  (An epoch's last window
    may hold fewer micro-batches; its auxiliary loss then weighs that fraction less.)"""
    processes = int(getattr(args, "world_size", 1) or 1) if getattr(args, "average_tokens_across_devices", False) else 1
    return 1.0 / (max(1, int(args.gradient_accumulation_steps)) * processes)


def _callback_base() -> type:
    from transformers import TrainerCallback

    return TrainerCallback


class DeltaTuneCallback(_callback_base()):  # type: ignore[misc]
    """HF ``Trainer`` (and TRL ``SFTTrainer``) callback: the method's hooks around every optimiser step, the parts'
    auxiliary losses in the loss, and the delta saved in deltatune's format — into ``<checkpoint>/delta`` with every
    trainer checkpoint and into ``save_to`` (default ``<output_dir>/delta``) at the end.  ``resume_from_checkpoint``
    works for methods whose schedule holds no state (LoRA, DoRA, (IA)³, BitFit, S2FT, full…); for the others (SpIEL,
    LISA, HFT, LT-SFT, LIFT, SaRA) it is a :class:`ConfigError`, not a silently different run."""

    def __init__(self, delta: Delta, save_to: str | Path | None = None) -> None:
        self.delta, self.save_to = delta, save_to
        self.schedule: Schedule | None = None
        self._aux = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        optimizer = unwrap_optimizer(optimizer)  # under accelerate's wrapper
        self.schedule = schedule_for(model, self.delta, optimizer, state.max_steps,
                                     args.gradient_accumulation_steps)
        if state.global_step > 0 and any(self.schedule.state_dict()):
            raise ConfigError(f"resuming a Trainer run of the {self.delta.method} method at step {state.global_step}: "
                              "its schedule holds state (which entries or layers train, parts made during training) "
                              "that a Trainer checkpoint does not carry, so the run would continue as another one; "
                              "train it with `deltatune train` (its --resume is exact) or start afresh")
        if self.delta.has_aux_loss and self._aux is None:
            self._aux = add_aux_loss(model, self.delta, trainer_window_scale(args))

    def on_step_begin(self, args, state, control, **kwargs):
        for hook in self.schedule.hooks:
            hook.before_step(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        for hook in self.schedule.hooks:
            hook.after_step(state.global_step)
        self.schedule.calls += 1

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.delta.save(Path(args.output_dir) / f"checkpoint-{state.global_step}" / "delta", overwrite=True)

    def on_train_end(self, args, state, control, **kwargs):
        self.schedule.close()
        if self._aux is not None:
            self._aux.remove()
            self._aux = None
        if state.is_world_process_zero:
            self.delta.save(self.save_to or Path(args.output_dir) / "delta", overwrite=True)
