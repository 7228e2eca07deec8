"""Co-serving: train a new delta inside the serving process, between decode steps, inference first.

After each engine step, a :class:`CoTrainJob` gets the tokens the step left of its budget: the engine step's
budget is ``step_tokens`` tokens; the step's inference work (one token per decoding row plus the prompt tokens it
prefilled) comes off first, and a training micro-batch runs only when what is left holds it.  This is FlexLLM's
per-iteration token budget (Oliaro et al., 2024, "FlexLLM: A System for Co-Serving Large Language Model Inference
and Parameter-Efficient Finetuning"), scheduled per sequence rather than per token chunk.

The job's parts are attached to the served model *inactive*, under their own key: only the job's routed training
forwards use them, so no served row sees a half-trained delta and unrouted (all-base) batches stay exact.  When the
job has run its steps it saves the delta (``out``), detaches its training copy and registers the saved folder in the
store under ``name``: it can be served from the next request on.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from deltatune.config import require
from deltatune.delta import Delta
from deltatune.model import attach_parts
from deltatune.routing import Routing, routed


@dataclass
class CoTrainConfig:
    """What a co-served fine-tuning job does."""

    name: str = field(metadata={"help": "the delta's name once served"})
    out: str = field(metadata={"help": "folder the trained delta is saved to"})
    steps: int = field(default=100, metadata={"help": "optimizer steps (one micro-batch each)"})
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate"})
    step_tokens: int = field(default=256, metadata={"help": "tokens per engine step, inference first"})

    def __post_init__(self) -> None:
        require(self.steps >= 1, f"CoTrainConfig.steps must be ≥ 1, got {self.steps}")
        require(self.lr > 0, f"CoTrainConfig.lr must be > 0, got {self.lr}")
        require(self.step_tokens >= 1, f"CoTrainConfig.step_tokens must be ≥ 1, got {self.step_tokens}")


class CoTrainJob:
    """Causal-LM fine-tuning of a new delta of ``method_config`` on ``batches`` (token-id lists, cycled)."""

    def __init__(self, engine: Any, method_config: Any, batches: Iterable[list[int]], config: CoTrainConfig) -> None:
        from deltatune.methods.registry import get_method

        self.engine, self.config = engine, config
        model = engine.model
        method = get_method(method_config.method)
        self.key = f"{config.name}@train"
        with engine.lock:  # between two steps: the base is restored and the parts attached before the next one
            if engine.store.restore_base is not None:
                engine.store.restore_base()  # a hot delta merged into the base would be trained on (and fingerprinted)
            fp = engine.store.base_fingerprint()
            parts = method.create_parts(model, method_config, exclude=[])
            attach_parts(model, parts, self.key, activate=False)
        self.delta = Delta(method=method_config.method, config=method.config_dict(method_config), parts=parts,
                           fingerprint=fp)
        params = [p for part in parts.values() for p in part.parameters()]
        for p in model.parameters():  # the base and the served deltas stay frozen: no gradient is kept for them
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        self.optimizer = torch.optim.AdamW(params, lr=config.lr)
        self._batches: Iterator[list[int]] = itertools.cycle(list(batches))
        self._next = next(self._batches)
        self.losses: list[float] = []
        self.done = False
        self.error: str | None = None
        self.saved: Path | None = None

    def step(self, free_tokens: int) -> int:
        """Run one micro-batch if ``free_tokens`` hold it (called by the engine with its lock held); returns the
        tokens it used."""
        if self.done or len(self._next) > free_tokens:
            return 0
        ids = torch.tensor([self._next], device=next(self.engine.model.parameters()).device)
        with torch.enable_grad(), routed(Routing.per_row([self.key])), self._parts_training():
            loss = self._loss(ids)
            loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.losses.append(float(loss.detach()))
        used = len(self._next)
        self._next = next(self._batches)
        if len(self.losses) >= self.config.steps:
            self._finish()
        return used

    def _loss(self, ids: Tensor) -> Tensor:
        """The causal-LM loss of the micro-batch ``ids`` plus the delta's auxiliary losses of that forward (e.g.
        MixLoRA's load balancing, coefficients applied), as the training loop adds them."""
        loss = self.engine.model(input_ids=ids, labels=ids).loss
        aux = self.delta.aux_loss()
        return loss if aux is None else loss + aux.to(loss.dtype)

    @contextmanager
    def _parts_training(self) -> Iterator[None]:
        """The job's parts in training mode for its step (dropout acts, a mixture computes its load-balancing
        loss), back in eval mode after it: the engine keeps the served model in eval, and the parts were attached
        in its mode."""
        parts = list(self.delta.parts.values())
        for part in parts:
            part.train(True)
        try:
            yield
        finally:
            for part in parts:
                part.train(False)

    def _finish(self) -> None:
        self.done = True
        for part in self.delta.parts.values():
            part.requires_grad_(False)
        self.delta.metrics["coserve_losses"] = [round(x, 6) for x in self.losses]
        self.saved = self.delta.save(self.config.out, overwrite=True)
        self.engine.store.detach_key(self.key)
        self.engine.store.add(self.config.name, self.saved)


def train_budget(step_tokens: int, used: int) -> int:
    """What a step leaves for training (never negative): inference comes first."""
    return max(0, step_tokens - used)


def token_batches(rows: Iterable[list[int]], max_len: int) -> list[list[int]]:
    """Training sequences cut to ``max_len`` tokens (each at least 2 tokens: one prediction)."""
    out = [list(r)[:max_len] for r in rows if len(r) >= 2]
    require(bool(out), "co-training needs at least one sequence of 2 or more tokens")
    return out
