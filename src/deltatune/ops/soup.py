"""Model soups (Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves
accuracy without increasing inference time", ICML 2022, arXiv 2203.05482).

* :func:`uniform_soup` — ``θ = (1/K)·Σ_i θ_i`` (equivalently ``θ₀ + mean_i τ_i``: the mean commutes with
  subtracting the shared base, so it accepts full weights or task vectors alike).
* :func:`greedy_soup` — the control flow of the greedy recipe: score every ingredient alone, visit them
  in descending order of that score, start from the best and add an ingredient only when the uniform
  soup of the chosen set plus it scores **strictly** higher on held-out data.  Each ingredient is
  visited once, so the result never scores below the best single ingredient on that held-out set.
  Building and scoring a soup is the caller's ``evaluate(indices)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor

from deltatune.errors import ConfigError
from deltatune.ops.sparsify import stack_task_vectors


def uniform_soup(taus: Sequence[Tensor]) -> Tensor:
    """Element-wise mean of same-shape tensors (fp32)."""
    return stack_task_vectors(taus, "soup ingredients").mean(0)


def _score(evaluate: Callable[[list[int]], float], indices: list[int]) -> float:
    value = float(evaluate(list(indices)))
    if math.isnan(value):
        raise ConfigError(f"greedy soup: evaluate({indices}) returned NaN")
    return value


def greedy_soup(candidates: Sequence[Any], evaluate: Callable[[list[int]], float]
                ) -> tuple[list[int], list[dict[str, Any]]]:
    """Greedy soup over ``candidates`` (only their count is used; ``evaluate`` knows what they are).

    ``evaluate(indices)`` builds the uniform soup of those ingredients and returns its held-out score
    (higher is better).  Returns the chosen indices in the order they were accepted (the best single
    ingredient first) and a log with one dict per evaluation:
    ``{"step", "phase": "single"|"greedy", "candidate", "indices", "score", "accepted", "best"}``.
    Ties between single scores keep the candidates' original order.
    """
    if len(candidates) == 0:
        raise ConfigError("greedy soup needs at least one candidate")
    log: list[dict[str, Any]] = []
    singles: list[float] = []
    for i in range(len(candidates)):
        score = _score(evaluate, [i])
        singles.append(score)
        log.append({"step": len(log), "phase": "single", "candidate": i, "indices": [i], "score": score,
                    "accepted": None, "best": None})
    order = sorted(range(len(candidates)), key=lambda i: -singles[i])
    chosen = [order[0]]
    best = singles[order[0]]
    log.append({"step": len(log), "phase": "greedy", "candidate": order[0], "indices": list(chosen),
                "score": best, "accepted": True, "best": best})
    for i in order[1:]:
        trial = [*chosen, i]
        score = _score(evaluate, trial)
        accepted = score > best
        if accepted:
            chosen, best = trial, score
        log.append({"step": len(log), "phase": "greedy", "candidate": i, "indices": trial, "score": score,
                    "accepted": accepted, "best": best})
    return chosen, log
