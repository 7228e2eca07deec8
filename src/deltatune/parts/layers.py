"""What a delta can attach to: ``nn.Linear``, GPT-2 ``Conv1D`` and ``nn.Embedding``.

All three are a weight ``W`` applied to an input.  We name their geometry uniformly:

* ``in_features`` / ``out_features`` of the map ``x ↦ y``;
* the *native* weight layout: ``(out, in)`` for ``nn.Linear`` (``y = x Wᵀ + b``),
  ``(in, out)`` for ``Conv1D`` (``y = x W + b``) and ``(in, out) = (num_embeddings, dim)``
  for ``nn.Embedding`` (``y = W[ids]``).

Parts keep their tensors in the ``(out, in)`` convention (LoRA ``B·A``) and convert with
:func:`to_native` when merging, so the same Part works on every kind.
"""

from __future__ import annotations

from enum import StrEnum

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LayerKind(StrEnum):
    LINEAR = "linear"
    CONV1D = "conv1d"
    EMBEDDING = "embedding"


def layer_kind(module: nn.Module) -> LayerKind | None:
    """Return the kind of a supported module, or ``None``.  An ``nn.Embedding`` subclass with a forward of its own
    is an embedding only where that forward is a scaled lookup (:func:`embedding_scale`: BART's and Gemma's word
    embeddings): another one (BART's and OPT's learned positional embeddings compute positions from their input and
    add an offset) is no lookup of its input's ids, so parts that look ids up leave it alone (a dense part runs it
    through its own forward)."""
    if isinstance(module, nn.Linear):
        return LayerKind.LINEAR
    if isinstance(module, nn.Embedding):
        if type(module).forward is not nn.Embedding.forward and embedding_scale(module) is None:
            return None
        return LayerKind.EMBEDDING
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return LayerKind.CONV1D
    return None


def in_out_features(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of the map the module computes."""
    kind = layer_kind(module)
    if kind is LayerKind.LINEAR:
        return module.in_features, module.out_features
    if kind is LayerKind.CONV1D:
        return module.weight.shape[0], module.weight.shape[1]
    if kind is LayerKind.EMBEDDING:
        return module.num_embeddings, module.embedding_dim
    raise TypeError(f"unsupported module type {type(module).__name__}")


def is_transposed(kind: LayerKind) -> bool:
    """True when the native weight is stored ``(in, out)``."""
    return kind is not LayerKind.LINEAR


def to_native(delta_out_in: Tensor, kind: LayerKind) -> Tensor:
    """Convert a ``(out, in)`` update into the module's native weight layout."""
    return delta_out_in.t() if is_transposed(kind) else delta_out_in


def embedding_scale(module: nn.Module) -> Tensor | float | None:
    """The factor an embedding module multiplies its lookup by in its own forward (``embed_scale`` of Gemma's and
    BART's scaled word embeddings, ``√d``), else ``None``."""
    scale = getattr(module, "embed_scale", None)
    return scale if isinstance(scale, Tensor | float | int) and not isinstance(scale, bool) else None


def scaled_lookup(out: Tensor, module: nn.Module) -> Tensor:
    """``out`` (an embedding lookup) times the module's :func:`embedding_scale`, as its own forward applies it: a
    part's lookup term must carry it for the unmerged model to equal the merged one (PEFT does the same)."""
    scale = embedding_scale(module)
    if scale is None:
        return out
    return out * (scale.to(device=out.device, dtype=out.dtype) if isinstance(scale, Tensor) else scale)


def functional_forward(module: nn.Module, kind: LayerKind, x: Tensor, weight: Tensor) -> Tensor:
    """Run ``module``'s computation with ``weight`` (native layout) in place of its own."""
    if kind is LayerKind.LINEAR:
        return F.linear(x, weight, module.bias)
    if kind is LayerKind.CONV1D:
        out = x.reshape(-1, x.shape[-1]) @ weight
        if module.bias is not None:
            out = out + module.bias
        return out.reshape(*x.shape[:-1], weight.shape[1])
    return scaled_lookup(F.embedding(
        x, weight, module.padding_idx, module.max_norm, module.norm_type, module.scale_grad_by_freq, module.sparse
    ), module)


def weight_grad(kind: LayerKind, x: Tensor, grad_out: Tensor, weight_shape: torch.Size,
                out: Tensor | None = None) -> Tensor:
    """Dense gradient of the native weight given input ``x`` and output gradient, written into ``out`` when given
    (of ``weight_shape`` and ``grad_out``'s dtype).

    Linear: ``∂L/∂W = gᵀ x`` (out, in); Conv1D: ``xᵀ g`` (in, out); Embedding: rows of ``g``
    summed into the looked-up ids.
    """
    g2 = grad_out.reshape(-1, grad_out.shape[-1])
    if kind is LayerKind.LINEAR:
        return torch.mm(g2.t(), x.reshape(-1, x.shape[-1]).to(g2.dtype), out=out)
    if kind is LayerKind.CONV1D:
        return torch.mm(x.reshape(-1, x.shape[-1]).to(g2.dtype).t(), g2, out=out)
    grad = torch.zeros(weight_shape, dtype=g2.dtype, device=g2.device) if out is None else out.zero_()
    return grad.index_add_(0, x.reshape(-1), g2)


def input_grad(kind: LayerKind, grad_out: Tensor, weight: Tensor) -> Tensor | None:
    """Gradient of the input: ``g W`` (Linear), ``g Wᵀ`` (Conv1D), none for Embedding ids."""
    if kind is LayerKind.LINEAR:
        return grad_out @ weight
    if kind is LayerKind.CONV1D:
        return grad_out @ weight.t()
    return None
