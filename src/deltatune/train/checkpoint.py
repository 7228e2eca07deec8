"""Resumable training state: trainable tensors, optimizer, scheduler, hooks, RNGs and position.

Written atomically to ``out_dir/checkpoint`` (a crash mid-save keeps the previous checkpoint), so a
resumed run continues bit-for-bit where the interrupted one stopped (CPU).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deltatune.errors import DeltaFormatError
from deltatune.io.atomic import atomic_dir
from deltatune.layer import DeltaLayer

STATE_FILE = "state.pt"


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters plus the buffers of attached parts (sparse indices)."""
    state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for lname, layer in model.named_modules():
        if isinstance(layer, DeltaLayer):
            for pname, part in layer.parts.items():
                for bname, buf in part.named_buffers():
                    state[f"{lname}.parts.{pname}.{bname}"] = buf.detach().clone()
    return state


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    with atomic_dir(path) as tmp:
        torch.save(payload, tmp / STATE_FILE)


def load_checkpoint(path: Path) -> dict[str, Any]:
    file = Path(path) / STATE_FILE
    if not file.is_file():
        raise DeltaFormatError(f"{file}: no checkpoint to resume from")
    try:
        return torch.load(file, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a corrupt file
        raise DeltaFormatError(f"{file}: unreadable checkpoint ({exc})") from None


def restore_trainable(model: nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    own = dict(model.named_parameters()) | dict(model.named_buffers())
    missing = sorted(set(trainable_state(model)) - set(state))
    if missing:
        raise DeltaFormatError(f"{where}: checkpoint lacks {missing[:5]} — was it written by another method?")
    with torch.no_grad():
        for name, tensor in state.items():
            if name not in own or own[name].shape != tensor.shape:
                raise DeltaFormatError(f"{where}: checkpoint tensor {name!r} does not fit this model")
            own[name].copy_(tensor)
