"""LISA: Layerwise Importance Sampled AdamW (Pan et al., NeurIPS 2024).

Everything outside the transformer blocks (embeddings, final norm, LM head) always trains; of the ``L`` blocks,
``γ`` (``layers``) drawn uniformly without replacement train, re-drawn every ``K`` (``interval``) steps
(LMFlow's released sampler; the paper motivates importance sampling, the code samples uniformly).

The blocks are those of every block list of the model, pooled: an encoder–decoder's (T5 ``encoder.block`` and
``decoder.block``, BART ``model.encoder.layers`` and ``model.decoder.layers``) form one pool of
``L = L_enc + L_dec`` blocks, numbered in list order (the encoder's ``0 … L_enc − 1``, then the decoder's), from
which the ``γ`` are drawn, so a draw may take blocks of either stack.  The lists are ``layers_path`` (one
module path, or several separated by commas, pooled in the order given; a stack left out of it is outside the
blocks and always trains), else the model type's default (:data:`LAYER_PATHS`: decoder- and encoder-only
models, one list), else every outermost ``nn.ModuleList`` holding parameters (not inside another such list nor
inside a task head).

As a delta: a dense part per trained module, created *lazily* the first time its block is drawn, so the delta
and the memory hold only blocks that were ever trained.  When a block is re-frozen its part stays (its ``Δ`` is
part of the result) but stops training, and its optimiser state is really freed (the reference implementation
keeps it: OptimalScale/LMFlow#729, #768).  Parts train ``θ`` in the base's own storage
(:mod:`deltatune.methods.in_place`), so a trained block costs its gradient and optimiser state, not a second copy
of it.  At every draw each optimiser group is re-listed as its own always-trained parameters (the delta's outside
the blocks; the task heads in their group) followed by its share of the active blocks, in a fixed order, so the
heads' state survives the draws and a resumed run rebuilds exactly the same optimiser.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from deltatune.config import require, seed_option
from deltatune.errors import ConfigError, TargetError
from deltatune.layer import PartHolder
from deltatune.methods.adamw_rows import AdamWRows
from deltatune.methods.in_place import InPlaceTraining
from deltatune.methods.lift import require_single_process
from deltatune.methods.registry import Method, TrainHook, adamw, register_method, unwrap_optimizer
from deltatune.methods.targets import modules_with_parameters
from deltatune.model import HALF_PRECISION, attach_parts, get_module, in_trainable_precision, logical_modules
from deltatune.parts.dense import DensePart

#: where each architecture keeps its blocks (PEFT-style per-model_type defaults); others: every outermost ModuleList
LAYER_PATHS = {"llama": "model.layers", "gpt2": "transformer.h", "bert": "bert.encoder.layer",
               "mistral": "model.layers", "qwen2": "model.layers", "gemma": "model.layers", "phi3": "model.layers"}


@dataclass
class LisaConfig:
    method: ClassVar[str] = "lisa"
    layers: int = field(default=2, metadata={"help": "γ: blocks trained at a time"})
    interval: int = field(default=20, metadata={"help": "K: steps between draws of the trained blocks"})
    train_outside: bool = field(default=True, metadata={"help": "always train what is outside the blocks "
                                                                "(embeddings, final norm, LM head)"})
    layers_path: str | None = field(default=None, metadata={
        "help": "module path of the blocks' ModuleList, or several separated by commas, whose blocks form one pool "
                "(default: by model type, else every outermost ModuleList, e.g. an encoder's and a decoder's)"})
    seed: int = seed_option("seed of the draws (draw s uses seed and s)")
    in_place: bool = field(default=True, metadata={"help": "train θ in the base's own storage, θ₀ in a temporary "
                                                           "file (see full); false: a separate Δθ per part"})
    sparse_embeddings: bool = field(default=True, metadata={
        "help": "an always-trained embedding trained in place gets row-sparse gradients, and optimiser state only "
                "for the rows looked up (AdamW's update up to rounding, not lazy Adam's); false: a dense gradient "
                "and dense moments"})

    def __post_init__(self) -> None:
        require(self.layers >= 1, f"lisa config.layers must be ≥ 1, got {self.layers}")
        require(self.interval >= 1, f"lisa config.interval must be ≥ 1, got {self.interval}")


def find_blocks(model: nn.Module, path: str | None, exclude: Iterable[str] = ()) -> list[tuple[str, int]]:
    """``[(path, number of blocks), …]``: the model's block lists, pooled by :class:`BlockPlan` in this order.

    ``path`` (``config.layers_path``; several paths separated by commas, in the order given), else the model type's
    default (:data:`LAYER_PATHS`), else every outermost ``nn.ModuleList`` holding parameters, in module order
    (an encoder–decoder: the encoder's blocks, then the decoder's); lists inside ``exclude`` (the task heads) are
    not blocks."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    spec = path or LAYER_PATHS.get(model_type)
    paths = [p.strip() for p in (spec or "").split(",") if p.strip()]
    if not paths:
        return block_lists(model, list(exclude))
    found = []
    for p in paths:
        try:
            blocks = get_module(model, p)
        except AttributeError:
            raise TargetError(f"lisa: {p!r} is not a module of this model; give config.layers_path") from None
        if not isinstance(blocks, nn.ModuleList):
            raise TargetError(f"lisa: {p!r} is a {type(blocks).__name__}, not the ModuleList of blocks")
        for q, _ in found:
            if p == q or p.startswith(f"{q}.") or q.startswith(f"{p}."):
                raise ConfigError(f"lisa config.layers_path {spec!r}: {q!r} and {p!r} overlap; give each list of "
                                  "blocks once, none inside another")
        found.append((p, len(blocks)))
    return found


def block_lists(model: nn.Module, exclude: list[str]) -> list[tuple[str, int]]:
    """Every outermost ``nn.ModuleList`` holding parameters (not inside another one, nor inside ``exclude``), in
    module order, as ``(path, length)``."""
    lists = [n for n, m in logical_modules(model) if n and isinstance(m, nn.ModuleList)
             and not any(n == e or n.startswith(f"{e}.") for e in exclude) and next(m.parameters(), None) is not None]
    outer = [n for n in lists if not any(n.startswith(f"{o}.") for o in lists)]
    if not outer:
        raise TargetError("lisa: the model has no ModuleList of blocks; give config.layers_path")
    return [(n, len(get_module(model, n))) for n in outer]


def draw(n_blocks: int, gamma: int, seed: int, step: int) -> list[int]:
    """The sorted ``γ`` blocks trained from step ``step`` on: uniform without replacement, seeded by
    ``(seed, step)`` so a resumed run draws the same ones."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return sorted(torch.randperm(n_blocks, generator=gen)[:gamma].tolist())


class BlockPlan:
    """Which modules (with parameters of their own) are always trained and which belong to each block of the pool.

    The pool numbers the blocks of :func:`find_blocks`' lists one after another: block ``i`` of the ``k``-th
    list is ``offset_k + i``, ``offset_k`` the lengths of the lists before it (one list: its own indices)."""

    def __init__(self, model: nn.Module, config: LisaConfig, exclude: list[str]) -> None:
        self.lists = find_blocks(model, config.layers_path, exclude)
        self.n = sum(size for _, size in self.lists)
        if config.layers > self.n:
            counts = "" if len(self.lists) == 1 else f" ({', '.join(f'{p}: {k}' for p, k in self.lists)})"
            raise ConfigError(f"lisa config.layers is {config.layers}, but the model has {self.n} blocks{counts}")
        offsets = [sum(size for _, size in self.lists[:k]) for k in range(len(self.lists))]
        names = modules_with_parameters(model, exclude)
        self.blocks: list[list[str]] = [[] for _ in range(self.n)]
        self.outside: list[str] = []
        for name in names:
            for (path, _), offset in zip(self.lists, offsets, strict=True):
                if name.startswith(f"{path}."):
                    self.blocks[offset + int(name[len(path) + 1:].split(".")[0])].append(name)
                    break
            else:
                if config.train_outside:
                    self.outside.append(name)


def dense_parts(model: nn.Module, names: list[str], seen: set[int]) -> dict[str, DensePart]:
    """A dense part per module owning parameters not already in ``seen`` (a tied weight gets its first owner's
    part as an alias on attach), updating ``seen``."""
    parts = {}
    for n in names:
        module = get_module(model, n)
        own = [k for k, p in module.named_parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for p in module.parameters(recurse=False))
        if own:
            parts[n] = DensePart.for_module(module, names=own)
    return parts


@register_method
class Lisa(Method):
    name = "lisa"
    config_cls = LisaConfig
    summary = "LISA: embeddings and head always train, plus γ random blocks re-drawn every K steps (lazy parts)"
    part_kinds = (DensePart,)
    examples = {"": {"layers": 1, "interval": 20}, "blocks-only": {"layers": 2, "train_outside": False}}
    default_lr = 5e-5

    def create_parts(self, model: nn.Module, config: LisaConfig, exclude: list[str]) -> dict[str, DensePart]:
        plan = BlockPlan(model, config, exclude)
        seen = {id(p) for h in exclude for p in model.get_submodule(h).parameters()}
        parts = dense_parts(model, plan.outside, seen)
        for b in draw(plan.n, config.layers, config.seed, 0):
            parts.update(dense_parts(model, plan.blocks[b], seen))
        if not parts:
            raise TargetError("lisa: nothing to train (no parameters outside the blocks and in the drawn blocks)")
        return parts

    def optimizer(self, params: list[nn.Parameter], lr: float, weight_decay: float,
                  config: LisaConfig) -> torch.optim.Optimizer:
        """AdamW, fused where it can be; one that also takes the embeddings' row-sparse gradients (:class:`AdamWRows`)
        where they can arise (trained in place, ``sparse_embeddings``)."""
        rows = config.in_place and config.sparse_embeddings
        return adamw(params, lr, weight_decay, AdamWRows if rows else torch.optim.AdamW)

    def hooks(self, model, delta, config: LisaConfig, optimizer, total_steps, grad_accum) -> list[TrainHook]:
        return [LisaSampler(model, delta, optimizer, config, total_steps)]


def sparse_lookups(parts: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer) -> list[nn.Embedding]:
    """The embeddings among ``parts`` to look up with ``sparse=True`` (set here; the caller sets it back): those
    trained in place (their gradient is the module's own weight's) by an optimiser that takes row-sparse gradients
    (:class:`AdamWRows`).  Their gradient is then the looked-up rows only, and AdamWRows keeps state for those rows
    alone, instead of a vocab × dim gradient and two vocab × dim moments."""
    if not isinstance(optimizer, AdamWRows):
        return []
    found = []
    for name, part in parts.items():
        module = get_module(model, name)
        if isinstance(module, nn.Embedding) and getattr(part, "bound", False) and not module.sparse:
            module.sparse = True
            found.append(module)
    return found


def holder_name(model: nn.Module, part: nn.Module) -> str:
    """The name the delta's parts are attached under (found from one of its parts)."""
    for module in model.modules():
        if isinstance(module, PartHolder):
            for key, p in module.parts.items():
                if p is part:
                    return key
    raise ConfigError("lisa: the delta's parts are not attached to this model")


class LisaSampler(TrainHook):
    """Draws the trained blocks before steps ``K, 2K, …``; creates parts of blocks drawn for the first time,
    freezes the parts of blocks left out and frees their optimiser state."""

    def __init__(self, model: nn.Module, delta: Any, optimizer: torch.optim.Optimizer, config: LisaConfig,
                 total_steps: int) -> None:
        require_single_process("lisa")  # lazily created parameters would not be registered with DDP
        self.model, self.delta, self.config = model, delta, config
        self.optimizer = unwrap_optimizer(optimizer)
        self.total = max(1, total_steps)
        exclude = list(delta.heads)
        self.plan = BlockPlan(model, config, exclude)
        self.name = holder_name(model, next(iter(delta.parts.values())))
        #: parts created later take the precision attach gave the first ones (fp32 over a half-precision base
        #: unless ``autocast_dtype=False``: :func:`~deltatune.model.in_trainable_precision`)
        self.in_fp32 = any(p.dtype not in HALF_PRECISION for part in delta.parts.values() for p in part.parameters())
        self.active = draw(self.plan.n, config.layers, config.seed, 0)
        self.visited = list(self.active)
        self._seen = {id(p) for h in exclude for p in model.get_submodule(h).parameters()}
        self._seen |= {id(p) for n in delta.parts for p in get_module(model, n).parameters(recurse=False)}
        block_params = {id(p) for part in self._parts(self.active) for p in part.parameters()}
        # indices, not the dicts: Optimizer.load_state_dict replaces the group dicts.  Each group keeps what it held
        # outside the blocks (the task heads' group, a Trainer's no-decay group); a block parameter returns to the
        # group it was first listed in, a lazily created one joins the group of the first block's parameters
        groups = self.optimizer.param_groups
        self.group = next((i for i, g in enumerate(groups) if any(id(p) in block_params for p in g["params"])), 0)
        self.home = {id(p): i for i, g in enumerate(groups) for p in g["params"] if id(p) in block_params}
        self.always = [[p for p in g["params"] if id(p) not in block_params] for g in groups]
        self._relist()
        self.in_place = InPlaceTraining(model, delta, self.optimizer, config.in_place)
        outside = {n: delta.parts[n] for n in self.plan.outside if n in delta.parts}
        self.sparse = sparse_lookups(outside, model, self.optimizer) if config.sparse_embeddings else []

    def _parts(self, blocks) -> list[DensePart]:
        return [self.delta.parts[n] for b in blocks for n in self.plan.blocks[b] if n in self.delta.parts]

    def _relist(self) -> None:
        """Each group's parameters: its always-trained ones, then the active blocks' that belong to it (block
        order); the state of a parameter left in no group is freed."""
        block = [p for part in self._parts(self.active) for p in part.parameters()]
        keep: set[int] = set()
        for i, always in enumerate(self.always):
            params = always + [p for p in block if self.home.get(id(p), self.group) == i]
            keep.update(id(p) for p in params)
            self.optimizer.param_groups[i]["params"] = params
        for p in list(self.optimizer.state):
            if id(p) not in keep:
                del self.optimizer.state[p]

    def before_step(self, step: int) -> None:
        if step and step % self.config.interval == 0 and step < self.total:
            self.switch(draw(self.plan.n, self.config.layers, self.config.seed, step))

    def switch(self, blocks: list[int]) -> None:
        """Train ``blocks`` (and what is always trained) from now on."""
        for part in self._parts(set(self.active) - set(blocks)):
            for p in part.parameters():
                p.requires_grad_(False)
                p.grad = None
        new = [b for b in blocks if b not in self.visited]
        if new:
            parts = {}
            for b in new:
                parts.update(dense_parts(self.model, self.plan.blocks[b], self._seen))
            if self.in_fp32:
                in_trainable_precision(self.model, parts)
            attach_parts(self.model, parts, self.name)
            self.delta.parts.update(parts)
            self.in_place.bind(parts)
            self.visited = sorted(set(self.visited) | set(new))
        for part in self._parts(blocks):
            for p in part.parameters():
                p.requires_grad_(True)
        self.active = list(blocks)
        self._relist()

    def close(self) -> None:
        for module in self.sparse:
            module.sparse = False
        self.sparse = []
        self.in_place.close()

    def state_bytes(self) -> int:
        """Bytes of optimiser state held now."""
        return sum(t.numel() * t.element_size() for st in self.optimizer.state.values() for t in st.values()
                   if isinstance(t, Tensor))

    # --- exact resume ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"active": list(self.active), "visited": list(self.visited)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Create the parts of every block visited so far and train the active ones (before the trainable
        tensors and the optimiser are restored)."""
        active, visited = [int(b) for b in state["active"]], [int(b) for b in state["visited"]]
        if any(not 0 <= b < self.plan.n for b in [*active, *visited]):
            raise ValueError(f"lisa: blocks {active} / {visited} do not fit a model of {self.plan.n} blocks")
        for b in visited:
            if b not in self.visited:
                self.switch([b])
        self.switch(active)
