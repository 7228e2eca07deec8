"""``TiedAlias``: how a delta reaches a second module that shares the targeted weight.

GPT-2's ``lm_head.weight`` *is* ``transformer.wte.weight``.  Merging a delta into the shared tensor
changes both modules, so while attached both must see ``W + ΔW`` too: the owner runs its part as
usual, and every alias runs ``base(x)`` with ``W + owner.delta_weight()`` (same native layout,
whatever the alias's layer kind).  Aliases own no tensors and are never saved; they are re-created
from the model's ties whenever a delta is attached.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from deltatune.parts.base import Part, base_layer_kind


class TiedAlias(Part):
    """The owner's weight update seen from a module that shares its weight (no tensors of its own)."""

    additive, base_dependent, mixed_rows, has_aux_loss = True, False, True, False
    is_alias = True

    def __init__(self, owner: Part, owner_name: str) -> None:
        super().__init__()
        self.owner_name = owner_name
        self._owner = [owner]  # a list keeps the owner out of this module's parameters (no double count)

    @property
    def owner(self) -> Part:
        return self._owner[0]

    def forward(self, x: Tensor, base: nn.Module) -> Tensor:
        return self.owner.forward_shared(base, base_layer_kind(base, self.owner_name), x)

    def delta_weight(self) -> Tensor:
        return self.owner.delta_weight()

    def updates(self, base: nn.Module | None = None) -> dict[str, Tensor]:
        """``{"weight": ΔW_owner}``: the alias sees only the owner's (shared) weight update (computed with this
        module's weight, which *is* the owner's)."""
        return {"weight": self.owner.update("weight", base)}

    def update_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"weight": self.owner.update_shapes()["weight"]}

    def merge_into(self, base: nn.Module) -> None:
        """No-op: the owner merges into the shared tensor once."""

    def unmerge_from(self, base: nn.Module) -> None:
        """No-op: see :meth:`merge_into`."""

    def meta(self) -> dict[str, Any]:
        return {"owner": self.owner_name}
