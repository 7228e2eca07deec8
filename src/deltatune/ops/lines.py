"""LiNeS: Layer-increasing Network Scaling (Wang et al., ICLR 2025, arXiv 2410.17146).

Scale each tensor's task vector by a factor that grows linearly with its block depth, so shallow
layers stay near ``θ₀`` and deep layers keep their task-specific update:

* ``λ(ℓ) = α + β·ℓ/(L − 1)`` for a tensor of transformer block ``ℓ ∈ {0, …, L−1}``; tensors outside the
  blocks (embeddings, final norm, heads) get ``α`` (reference ``LiNeS_scaling``, wang-kee/LiNeS).
  With ``L = 1`` the formula is 0/0; the single block is then the *deepest* block and gets ``α + β``
  (our choice: single-task editing with ``β = 1 − α`` then keeps that block's delta whole, as LiNeS
  keeps the last block's).
* single-task editing: ``β = 1 − α``, ``α`` swept over ``{1.0, 0.9, …, 0.0}``;
* multi-task merging: ``α = (‖Σ_t τ_t‖₁ / ‖τ_MTL‖₁)·(1/T)`` (:func:`lines_multitask_alpha`, equals ``1/T``
  for task arithmetic) and ``β`` swept; ``θ = θ₀ + λ(ℓ)·τ_MTL``.

The block index comes from the tensor name: the first ``<container>.<digits>.`` with a known block
container (``layers``, ``layer``, ``h``, ``blocks``, ``block``, ``resblocks``), e.g.
``model.layers.3.mlp.up_proj.weight`` (Llama), ``bert.encoder.layer.3.…`` (BERT), ``transformer.h.3.…``
(GPT-2), ``encoder.block.3.layer.0.…`` (T5: the block, not the sub-layer).  The reference code instead
takes the first ``ℓ`` whose ``".ℓ."`` occurs anywhere in the name, which misfires on names such as
``experts.7.`` or ``layer.0.`` inside a block.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

from deltatune.errors import ConfigError

BLOCK_CONTAINERS = ("layers", "layer", "h", "blocks", "block", "resblocks")
_BLOCK = re.compile(r"(?:^|\.)(?:" + "|".join(BLOCK_CONTAINERS) + r")\.(\d+)\.")


def _block(name: str) -> int | None:
    match = _BLOCK.search(name)
    return int(match.group(1)) if match else None


def layer_index(name: str, num_layers: int) -> int | None:
    """Block index ``ℓ`` of the tensor ``name`` (``None`` outside the blocks); ``ℓ ≥ num_layers`` is an error."""
    if num_layers < 0:
        raise ConfigError(f"num_layers must be ≥ 0, got {num_layers}")
    layer = _block(name)
    if layer is not None and layer >= num_layers:
        raise ConfigError(f"tensor {name!r} is in block {layer} but the model has {num_layers} blocks")
    return layer


def count_layers(names: Iterable[str]) -> int:
    """``L`` = 1 + the largest block index among ``names`` (0 when no name lies in a block)."""
    indices = [i for i in (_block(n) for n in names) if i is not None]
    return max(indices) + 1 if indices else 0


def lines_factor(layer: int | None, num_layers: int, alpha: float, beta: float) -> float:
    """``α + β·ℓ/(L − 1)`` for block ``ℓ``; ``α`` outside the blocks (``layer=None``); ``α + β`` when ``L = 1``."""
    if not (math.isfinite(alpha) and math.isfinite(beta)):
        raise ConfigError(f"LiNeS alpha and beta must be finite, got alpha={alpha}, beta={beta}")
    if layer is None:
        return float(alpha)
    if not 0 <= layer < num_layers:
        raise ConfigError(f"LiNeS layer {layer} outside [0, {num_layers}) blocks")
    if num_layers == 1:
        return float(alpha + beta)
    return float(alpha + beta * layer / (num_layers - 1))


def lines_multitask_alpha(sum_l1: float, merged_l1: float, num_tasks: int) -> float:
    """``α = (‖Σ_t τ_t‖₁ / ‖τ_MTL‖₁) / T`` — the multi-task LiNeS base factor (L1 norms over the whole model)."""
    if num_tasks < 1:
        raise ConfigError(f"LiNeS num_tasks must be ≥ 1, got {num_tasks}")
    if not (math.isfinite(sum_l1) and math.isfinite(merged_l1)) or sum_l1 < 0:
        raise ConfigError(f"LiNeS L1 norms must be finite and ≥ 0, got sum={sum_l1}, merged={merged_l1}")
    if merged_l1 <= 0:
        raise ConfigError(f"LiNeS needs a non-zero merged task vector (‖τ_MTL‖₁ = {merged_l1})")
    return float(sum_l1 / merged_l1 / num_tasks)
