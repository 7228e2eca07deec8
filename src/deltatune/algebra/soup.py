"""Greedy soup over deltas (Wortsman et al., "Model soups", ICML 2022, arXiv 2203.05482).

Ingredients are sorted by their own held-out score; each is added to the soup only if the uniform
average of the chosen ingredients scores strictly higher (:func:`deltatune.ops.soup.greedy_soup`).
The caller supplies ``evaluate(delta) → score`` (higher is better) on held-out data, never the test set.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from deltatune.algebra.engine import merge
from deltatune.api import as_delta
from deltatune.delta import Delta
from deltatune.ops.soup import greedy_soup as greedy_order


def greedy_soup(ingredients: Sequence[Delta | str | Path], evaluate: Callable[[Delta], float],
                force: bool = False) -> tuple[Delta, list[dict[str, Any]]]:
    """The greedy soup of ``ingredients`` and the log of every accept/reject decision."""
    deltas = [as_delta(d) for d in ingredients]
    cache: dict[tuple[int, ...], Delta] = {}

    def soup(indices: list[int]) -> Delta:
        key = tuple(sorted(indices))
        if key not in cache:
            cache[key] = merge([deltas[i] for i in key], "linear", force=force)
        return cache[key]

    chosen, log = greedy_order(deltas, lambda indices: evaluate(soup(indices)))
    result = soup(chosen)
    result.metrics["greedy_soup"] = {"chosen": chosen, "log": log}
    return result, log
