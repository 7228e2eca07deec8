"""Random-subset sparse fine-tuning: a fixed, uniformly random support of ``K`` entries, never reselected.

The baseline of SpaRTA (Rios et al., 2025, "Sparsity May Be All You Need: Sparse Random Parameter Adaptation") and
Random Masking (Xu & Zhang, ICML 2024, "Random Masking Finds Winning Tickets for PEFT"): ``K = density × (all
base parameters)`` (or ``num_tunable``) trainable scalars at seeded random positions of the target matrices, split
in proportion to their sizes exactly as SpIEL's initial support (:mod:`deltatune.methods.sparse`), values 0;
training updates only those values (sparse part, optimiser state only for them).  Random Masking notes that the
learning rate must grow as the density shrinks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from deltatune.config import require, seed_option
from deltatune.methods.in_place import InPlaceTraining
from deltatune.methods.registry import TrainHook, adamw, register_method
from deltatune.methods.sparse import Sparse
from deltatune.parts.sparse import SparsePart


@dataclass
class RandomSparseConfig:
    method: ClassVar[str] = "random-sparse"
    density: float = field(default=0.01, metadata={"help": "trainable fraction of ALL base parameters"})
    num_tunable: int | None = field(default=None, metadata={"help": "exact trainable count (overrides density)"})
    targets: list[str] = field(default_factory=lambda: ["all-linear"], metadata={"help": "module-name patterns"})
    seed: int = seed_option("seed of the random support")
    in_place: bool = field(default=True, metadata={"help": "keep W + ΔW in the base's own weight while training "
                                                           "(rewritten once per step, not patched in every call)"})

    def __post_init__(self) -> None:
        require(isinstance(self.density, float | int) and 0.0 < self.density <= 1.0,
                f"random-sparse config.density must be in (0, 1], got {self.density}")
        require(self.num_tunable is None or self.num_tunable > 0,
                f"random-sparse config.num_tunable must be > 0, got {self.num_tunable}")
        require(len(self.targets) > 0, "random-sparse config.targets is empty")


@register_method
class RandomSparse(Sparse):
    name = "random-sparse"
    config_cls = RandomSparseConfig
    summary = "random-subset sparse fine-tuning: a fixed seeded random support of K entries (SpaRTA baseline)"
    part_kinds = (SparsePart,)
    examples = {"": {"num_tunable": 777}, "embedding": {"num_tunable": 777, "targets": ["type:Embedding"]}}
    default_lr = 1e-3

    def optimizer(self, params, lr, weight_decay, config):
        """Plain AdamW: the support never changes, so no per-element age is needed; state exists only for the
        ``K`` values (and task heads)."""
        return adamw(params, lr, weight_decay)

    def hooks(self, model, delta, config, optimizer, total_steps, grad_accum) -> list[TrainHook]:
        """In-place training only (:meth:`SparsePart.bind`): the support never changes."""
        return [InPlaceTraining(model, delta, optimizer)] if config.in_place else []
