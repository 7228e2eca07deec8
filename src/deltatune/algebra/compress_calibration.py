"""Calibrated compression defaults: ComPEFT's ``α`` and DAREx-q's ``q`` chosen on data, never guessed.

ComPEFT (Yadav et al., arXiv 2311.13171) replaces every kept value by ``±α·σ``; the paper tunes ``α`` on
validation data, and the reference code's CLI default ``α = 1`` can take a delta to chance (a 0.94 classifier to
0.23 in the new-user trial).  DAREx-q (Deng et al., ICLR 2025, arXiv 2410.09344) rescales DARE's kept values by
``1/q`` with ``q`` chosen (a) by labelled validation performance over a grid, or (b) by an unlabelled proxy.
So neither has a safe constant default: :func:`calibrated_compress` chooses them on data, by the task's own
main metric (accuracy, Pearson, or minus the LM loss — higher is better):

* ``α``: the best of ``alphas`` (``α* = argmax_α metric(θ₀ ⊕ ComPEFT_α(τ))``);
* ``q``: the best of the grid ``[ρ … 1]`` (:func:`deltatune.ops.compress.q_grid`), option (a) of the paper.

The data: ``data`` when given (a file in the format the delta was trained on, read with the columns and label
map recorded in its provenance; a GLUE folder for a GLUE delta), else the delta's own eval data as recorded at
training time (the eval file, or the seeded hold-out of the training file, or the GLUE dev split) — at most
``limit`` rows (a seeded sample: files are often sorted by label).  A delta that records no training task:
:class:`CalibrationNeeded`, which says to pass ``alpha``/``q`` (CLI ``--alpha``/``--q``) or to calibrate a delta
trained by deltatune.  Given ``alpha``/``q`` are used as they are.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from deltatune.delta import Delta
from deltatune.errors import ConfigError

#: Eval rows scored per candidate α or q (the first rows of the eval data; enough to rank the candidates).
CALIBRATION_ROWS = 500
#: The option each method calibrates, and the CLI flag that fixes it instead.
CALIBRATED = {"compeft": ("alpha", "--alpha"), "darex-q": ("q", "--q")}


class CalibrationNeeded(ConfigError):
    """A lossy compression option has no safe default and there is no data to calibrate it on."""


def needs_calibration(method: str, options: dict[str, Any]) -> bool:
    """True when ``method``'s calibrated option (ComPEFT ``alpha``, DAREx-q ``q``) is not given."""
    return method in CALIBRATED and options.get(CALIBRATED[method][0]) is None


def has_recorded_task(delta: Delta) -> bool:
    """True when the delta records the training task it was trained on (so its eval data can be rebuilt)."""
    train = delta.provenance.train or {}
    return isinstance(train.get("task"), str) and bool(train["task"])


def calibration_task(delta: Delta, data: str | None, model: str | None, limit: int | None, method: str) -> Any:
    """The eval :class:`~deltatune.train.tasks.Task` to calibrate ``delta`` on (see the module docstring), or
    :class:`CalibrationNeeded` naming what to pass."""
    from deltatune.api import _eval_task

    if not has_recorded_task(delta):
        option, flag = CALIBRATED[method]
        what = "no data to calibrate on" if data is None else f"no training task, so {data!r} cannot be read"
        raise CalibrationNeeded(
            f"compress ({method}): {option} has no safe default (a fixed {option} can take a delta to chance) and "
            f"the delta records {what} (it was not trained by deltatune: provenance operation "
            f"{delta.provenance.operation!r}); pass {option} explicitly (CLI {flag}), or compress a delta trained "
            "with deltatune, whose recorded eval data (or --data FILE) calibrates it")
    task = _eval_task(delta, model, None, data, None)
    if limit is not None and task.eval is not None and len(task.eval) > limit:  # a seeded sample: files are often
        task = dataclasses.replace(task, eval=task.eval.shuffle(seed=0).select(range(limit)))  # sorted by label
    return task


def metric_score(delta: Delta, task: Any, batch_size: int = 64) -> Callable[[Delta], float]:
    """``score(Δ')``: the task's main metric of ``θ₀ ⊕ Δ'`` on ``task.eval`` (negated when lower is better, so
    higher is always better).  The base is loaded once, the fingerprint checked, ``delta``'s heads loaded (the
    candidates share them), and each candidate's parts are attached, scored and detached again."""
    from deltatune.fingerprint import check_fingerprint
    from deltatune.model import attach_parts, detach, load_heads
    from deltatune.train.evaluate import evaluate

    torch.manual_seed(0)
    net: nn.Module = task.load_model()
    check_fingerprint(delta.fingerprint, net, delta.heads, "compress calibration")
    load_heads(net, delta, "compress calibration")
    net.eval()
    name = "__compress_calibration__"
    sign = 1.0 if task.greater_is_better else -1.0

    def score(candidate: Delta) -> float:
        attach_parts(net, candidate.parts, name)
        try:
            value = evaluate(net, task, batch_size, torch.device("cpu")).get(task.main_metric)
        finally:
            detach(net, name)
        return float("nan") if value is None or not math.isfinite(value) else sign * float(value)

    return score


def calibrated_compress(delta: Delta, method: str, *, data: str | None = None, model: str | None = None,
                        limit: int | None = CALIBRATION_ROWS, **options: Any) -> Delta:
    """:func:`~deltatune.algebra.compress.compress_delta` with ComPEFT's ``α`` / DAREx-q's ``q`` calibrated on
    data when not given (see the module docstring); every other method, or a given ``alpha``/``q``, is passed
    through unchanged.  The choice and every candidate's score are in ``metrics["compression"][-1]``
    (``alpha_sweep`` / ``q_sweep``, with ``calibrated_on``: rows and where they came from)."""
    from deltatune.algebra.compress import compress_delta

    if not needs_calibration(method, options):
        return compress_delta(delta, method, **options)
    task = calibration_task(delta, data, model, limit, method)
    score = metric_score(delta, task)
    if method == "compeft":
        out = compress_delta(delta, method, eval_fn=score, **options)
    else:  # DAREx-q option (a): the q of the best validation metric (choose_q minimises, so negate)
        out = compress_delta(delta, method, calibration_fn=lambda d: -score(d), **options)
        result = out.metrics["compression"][-1]
        result["q_sweep"] = {k: -v for k, v in result["q_sweep"].items()}  # as the metric, higher is better
    out.metrics["compression"][-1]["calibrated_on"] = {
        "rows": len(task.eval), "data": data or "the delta's recorded eval data", "metric": task.main_metric}
    return out
