"""The fuzzed loaders: one :class:`Target` per loader (and per ``verify=False`` variant).

A *strict* target reads a digest-protected format: a mutant must raise a typed error or load to exactly
the original (any other load is a silent difference).  A *lenient* target reads a file a person edits
(a recipe, a training config) or a format with its digest check switched off: a mutant may load to
other values, but they must be valid (:func:`fuzz.snapshot.invariant_violation`).
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Target:
    name: str
    load: Callable[[Path], Any]
    strict: bool
    originals: str  # which builder in fuzz.originals makes its original folders
    weights: dict[str, float] = field(default_factory=dict)  # file name → how often it is mutated
    verify: bool | None = None  # None: the loader's default; False: the ``verify=False`` variant

    @property
    def max_edits(self) -> int:
        """Edits per mutant: one for digest-protected inputs (a second could drop the digest, and a file
        without one is legitimately unverifiable, e.g. a PEFT adapter PEFT wrote), up to three elsewhere."""
        return 1 if self.strict else 3

    def supported(self) -> bool:
        """``False`` for a ``verify=False`` variant of a loader that has no ``verify`` parameter (yet)."""
        return self.verify is None or "verify" in inspect.signature(_loader_fn(self.name)).parameters


def _kw(verify: bool | None) -> dict[str, Any]:
    return {} if verify is None else {"verify": verify}


def _loader_fn(name: str) -> Callable[..., Any]:
    base = name.removesuffix("-noverify")
    if base == "delta":
        from deltatune.io.delta_format import load_delta

        return load_delta
    if base == "compact":
        from deltatune.io.compact_format import load_compact

        return load_compact
    if base == "peft":
        from deltatune.io.peft_format import load_peft_adapter

        return load_peft_adapter
    if base == "checkpoint":
        from deltatune.train.checkpoint import load_checkpoint

        return load_checkpoint
    raise KeyError(name)


def _folder_loader(name: str, verify: bool | None) -> Callable[[Path], Any]:
    def load(path: Path) -> Any:
        return _loader_fn(name)(path, **_kw(verify))

    return load


_MODELS: dict[str, Any] = {}


def load_peft_with_model(path: Path) -> Any:
    """``load_peft_adapter(path, model=the tiny base it was made on)``: shapes, layer kinds and saved base
    weights are checked against the model."""
    from conftest import tiny_bert, tiny_gpt2

    from deltatune.io.peft_format import load_peft_adapter

    arch = "bert" if "bert" in path.name else "gpt2"
    if arch not in _MODELS:
        _MODELS[arch] = tiny_bert() if arch == "bert" else tiny_gpt2()
    return load_peft_adapter(path, model=_MODELS[arch])


def load_recipe(path: Path) -> Any:
    from deltatune.algebra.recipe import load_recipe as load

    return load(path / "recipe.yaml")


def run_merge_recipe(path: Path) -> Any:
    """``deltatune merge recipe.yaml --out SCRATCH --overwrite``: the recipe and its input deltas, merged for
    real, into a scratch folder next to (never inside) the folder under test."""
    from deltatune.algebra.recipe import load_recipe as load
    from deltatune.algebra.recipe import run_recipe

    scratch = path.parent / f".fuzz-merge-{os.getpid()}" / "merged"
    return run_recipe(load(path / "recipe.yaml"), out=str(scratch), overwrite=True)


_RUNS: dict[str, tuple[Any, ...]] = {}


def _run_objects(run: dict[str, str]) -> tuple[Any, ...]:
    """Model, optimizer, scheduler, hooks and accelerator of the run that wrote a checkpoint, built as
    :func:`deltatune.train.loop.train` builds them (once per worker and method)."""
    import torch
    from accelerate import Accelerator

    import deltatune as dt
    from deltatune.train.loop import lr_lambda
    from deltatune.train.tasks import build_task
    from fuzz.originals import RESUME_METHODS, train_config

    if run["method"] not in _RUNS:
        cfg = train_config(Path(run["model"]), Path(run["data"]), Path(run["model"]).parent, resume=True)
        mc = dt.make_config(run["method"], RESUME_METHODS[run["method"]])
        method = dt.get_method(run["method"])
        model = build_task(cfg).load_model().train()
        delta = dt.attach(model, mc)
        optimizer = method.optimizer([p for p in model.parameters() if p.requires_grad], cfg.lr, cfg.weight_decay,
                                     mc)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
        hooks = method.hooks(model, delta, mc, optimizer, cfg.max_steps, cfg.grad_accum)
        _RUNS[run["method"]] = (model, delta, optimizer, scheduler, hooks, Accelerator(cpu=True))
    return _RUNS[run["method"]]


def resume_noverify(path: Path) -> Any:
    """What ``train --resume`` restores from a checkpoint read with ``verify=False`` (trainable tensors,
    optimizer, scheduler, hook and RNG states), through the loop's own ``_resume``."""
    import functools
    import random
    from unittest import mock

    import numpy as np
    import torch

    from deltatune.train import checkpoint as ckpt
    from deltatune.train.loop import _resume

    model, delta, optimizer, scheduler, hooks, accelerator = _run_objects(json.loads((path / "run.json").read_text()))
    unverified = functools.partial(ckpt.load_checkpoint, verify=False)
    with mock.patch.object(ckpt, "load_checkpoint", unverified):
        state = _resume(path, model, delta, optimizer, scheduler, hooks, accelerator)
    return {"state": state, "trainable": ckpt.trainable_state(model, delta), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "hooks": [h.state_dict() for h in hooks],
            "rng": [torch.get_rng_state(), random.getstate(), np.random.get_state()]}


def load_train_config(path: Path) -> Any:
    """``deltatune train --config FILE`` without flags: the (TrainConfig, method config) pair it parses."""
    from deltatune.cli import _train_configs

    return _train_configs("sparse", path / "run.yaml", {}, [])


_DELTA = {"manifest.json": 3.0, "parts.safetensors": 3.0, "heads.safetensors": 1.0, ".deltatune-output.json": 0.3}
_COMPACT = {"manifest.json": 3.0, "data.safetensors": 3.0, ".deltatune-output.json": 0.3}
_PEFT = {"adapter_config.json": 3.0, "adapter_model.safetensors": 3.0, ".deltatune-output.json": 0.3}
_CKPT = {"state.json": 3.0, "tensors.safetensors": 3.0, ".deltatune-output.json": 0.3}

TARGETS: dict[str, Target] = {t.name: t for t in [
    Target("delta", _folder_loader("delta", None), True, "deltas", _DELTA),
    Target("delta-noverify", _folder_loader("delta", False), False, "deltas", _DELTA, verify=False),
    Target("compact", _folder_loader("compact", None), True, "compacts", _COMPACT),
    Target("compact-noverify", _folder_loader("compact", False), False, "compacts", _COMPACT, verify=False),
    Target("peft", _folder_loader("peft", None), True, "pefts", _PEFT),
    Target("peft-noverify", _folder_loader("peft", False), False, "pefts", _PEFT, verify=False),
    Target("peft-with-model", load_peft_with_model, True, "pefts", _PEFT),
    Target("checkpoint", _folder_loader("checkpoint", None), True, "checkpoints", _CKPT),
    Target("checkpoint-noverify", _folder_loader("checkpoint", False), False, "checkpoints", _CKPT,
           verify=False),
    Target("resume-noverify", resume_noverify, False, "resume_checkpoints", {**_CKPT, "run.json": 0.0}),
    Target("recipe-native", load_recipe, False, "recipes_native"),
    Target("recipe-mergekit", load_recipe, False, "recipes_mergekit"),
    Target("recipe-merge", run_merge_recipe, False, "recipes_merge", {"recipe.yaml": 12.0}),
    Target("train-config", load_train_config, False, "train_configs"),
]}
