"""From a choice (method, budget, layers, modules) to a typed method config and its trainable parameter count."""

from __future__ import annotations

import copy
import itertools
import json
import re
from dataclasses import dataclass, fields
from typing import Any

from torch import nn

from deltatune.errors import ConfigError, DeltaTuneError
from deltatune.search.space import DEFAULT_MODULES, EmptySearchSpace, SearchSpace, layer_indices

_BLOCK = re.compile(r"\.(\d+)\.")
#: how many configurations the up-front validity check tries before giving up
CHECK_LIMIT = 500


def block_index(name: str) -> int | None:
    """The block a module sits in: the first integer path component (``encoder.layer.3.…`` → 3)."""
    match = _BLOCK.search(f".{name}.")
    return int(match.group(1)) if match else None


@dataclass
class Candidate:
    method: str
    mapping: dict[str, Any]  # the method config mapping (`train --config`'s method section, without name)
    config: Any  # the typed method config
    params: int  # trainable scalars of the delta (task heads excluded)


class Resolver:
    """Resolves choices on a pristine copy of the base model (never modified); counts are cached."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        blocks = [i for n, _ in model.named_modules() if (i := block_index(n)) is not None]
        self.num_layers = max(blocks) + 1 if blocks else 0
        self._counts: dict[str, int] = {}

    def resolve(self, method: str, budget: dict[str, Any], layers: str, modules: Any) -> Candidate:
        """Raises :class:`ConfigError` (or another :class:`DeltaTuneError`) when the choice is not a valid config."""
        from deltatune.methods.registry import get_method
        from deltatune.methods.targets import select_modules
        from deltatune.model import attach

        m = get_method(method)
        mapping = dict(budget)
        restrict = layers != "all" or modules != DEFAULT_MODULES
        if restrict:
            if "targets" not in {f.name for f in fields(m.config_cls)}:
                raise ConfigError(f"method {method} has no 'targets' field: layers {layers!r} / modules "
                                  f"{modules!r} do not apply to it")
            targets = list(modules) if modules != DEFAULT_MODULES else m.parse(mapping).targets
            if not targets:
                raise ConfigError(f"method {method} chooses its modules itself; give search.modules target lists "
                                  f"to restrict its layers")
            names = select_modules(self.model, targets)
            keep = layer_indices(layers, self.num_layers)
            if keep is not None:
                names = [n for n in names if block_index(n) in keep]
            if not names:
                raise ConfigError(f"layers {layers!r} hold none of the modules {targets} ({self.num_layers} blocks)")
            mapping["targets"] = names
        config = m.parse(dict(mapping))
        key = json.dumps([method, mapping], sort_keys=True, default=str)
        if key not in self._counts:
            self._counts[key] = attach(copy.deepcopy(self.model), config).trainable_count
        return Candidate(method, mapping, config, self._counts[key])


def combinations(space: SearchSpace):
    """Every (method, budget, layers, modules label, modules) of the space, in a stable order."""
    for method, choices in space.method_choices().items():
        keys = sorted(choices)
        for values in itertools.product(*(choices[k] for k in keys)):
            for layers in space.layers:
                for modules in space.modules:
                    yield method, dict(zip(keys, values, strict=True)), str(layers), modules


def check_space(space: SearchSpace, resolver: Resolver) -> int:
    """Raise :class:`EmptySearchSpace` unless some configuration is valid (tries at most :data:`CHECK_LIMIT`);
    returns the number tried until the first valid one."""
    reasons: list[str] = []
    for tried, (method, budget, layers, modules) in enumerate(combinations(space), 1):
        if tried > CHECK_LIMIT:
            break
        try:
            cand = resolver.resolve(method, budget, layers, modules)
        except DeltaTuneError as exc:
            reasons.append(f"{method} {budget} layers={layers} modules={modules}: {str(exc)[:120]}")
            continue
        if space.max_params is None or cand.params <= space.max_params:
            return tried
        reasons.append(f"{method} {budget} layers={layers} modules={modules}: {cand.params} trainable parameters "
                       f"> max_params {space.max_params}")
    shown = "; ".join(reasons[:3]) + (f" (and {len(reasons) - 3} more)" if len(reasons) > 3 else "")
    raise EmptySearchSpace(f"search space has no valid configuration among {len(reasons)} tried: {shown}")
