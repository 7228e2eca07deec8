"""``RoutedHead``: a delta's task head (e.g. a classifier) attached as a part, so that heads route like parts.

A task head has no base value to be a delta of, so a :class:`~deltatune.delta.Delta` stores it whole.  Applied
without merging, the head's tensors are not loaded into the model: the head module is wrapped like any other
and this part runs it with the delta's tensors (``torch.func.functional_call``).  The rows of one mixed batch
can then use different classifier heads, and detaching restores the model's own head.  It owns buffers only,
is never saved on its own (the delta keeps ``heads``) and is never merged (merging loads the head instead).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.func import functional_call

from deltatune.parts.base import Part


def _key(name: str) -> str:
    return name.replace(".", "__")


class RoutedHead(Part):
    """The head module computed with a delta's head tensors ``{name: tensor}`` (replacing the module's own)."""

    additive, base_dependent, mixed_rows, has_aux_loss = False, False, True, False
    is_alias = True

    def __init__(self, tensors: dict[str, Tensor]) -> None:
        super().__init__()
        self.names = list(tensors)
        for name, t in tensors.items():
            self.register_buffer(_key(name), t.detach().clone())

    def tensors(self) -> dict[str, Tensor]:
        return {n: getattr(self, _key(n)) for n in self.names}

    def forward(self, x: Tensor, base: Any) -> Any:
        """The head module's own forward with the delta's tensors; the module's output without them is unused."""
        module = getattr(base, "module", base)
        call = getattr(base, "call", None)
        args, kwargs = call.arguments(x) if call is not None else ((x,), {})
        return functional_call(module, self.tensors(), args, kwargs)

    def meta(self) -> dict[str, Any]:
        return {"tensors": list(self.names)}

    def check_base(self, base: nn.Module, where: str) -> None:
        """Shapes are checked when the head is applied (:func:`deltatune.model.check_heads`)."""
