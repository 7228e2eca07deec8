"""What a training checkpoint records of its run, and whether a ``--resume`` is the same run: the settings that
decide what is computed (data, batches, schedule, method and its configuration) and the fingerprint of the base the
delta trains on.  A resume that differs is refused naming what differs (:func:`check_same_run`)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from deltatune.delta import Delta
from deltatune.errors import ConfigError, FingerprintMismatch
from deltatune.fingerprint import describe_field, fingerprint_differences
from deltatune.provenance import local_reference
from deltatune.train import checkpoint as ckpt
from deltatune.train.config import TrainConfig
from deltatune.train.user_data import USER_TASKS

#: settings that may change between a run and its resume without changing what it computes
FREE_ON_RESUME = frozenset({"out_dir", "resume", "overwrite", "progress", "report_to", "checkpoint_every",
                            "eval_every", "eval_before", "eval_batch_size", "keep_best", "eval_data", "eval_limit"})
#: settings holding paths, compared resolved (a relative path one time, an absolute one the next)
PATH_SETTINGS = ("model", "data", "eval_data")
#: what a run records beyond its settings, compared only where the checkpoint recorded it (older ones did not):
#: ``holds_out`` — a user task without ``eval_data`` holds 10 % of ``data`` out, so adding or dropping ``eval_data``
#: changes the training rows (another eval file, or none for a task that never holds out, does not)
RECORDED_SINCE = ("holds_out",)


def run_settings(cfg: TrainConfig, delta: Delta) -> dict[str, Any]:
    """What a checkpoint records of its run so that a resume can be refused when it differs (JSON values): the
    training settings but :data:`FREE_ON_RESUME`, the method and its configuration, and the fingerprint of the base
    the delta trains on (a model folder rewritten since: another base under the same path)."""
    train = {k: v for k, v in asdict(cfg).items() if k not in FREE_ON_RESUME}
    _resolve_paths(train)
    train["on"] = [str(Path(p).resolve()) if Path(p).exists() else p for p in train.get("on") or []]
    if cfg.task in USER_TASKS:
        train["holds_out"] = cfg.eval_data is None
    return json.loads(json.dumps({"train": train, "method": delta.method, "config": delta.config,
                                  "base": delta.fingerprint}, default=str))


def _resolve_paths(train: dict[str, Any]) -> None:
    """:data:`PATH_SETTINGS` of ``train`` that name local files (or ``FILE:SPLIT``) made absolute and resolved, in
    place: a relative path one time and an absolute one the next compare equal."""
    for key in PATH_SETTINGS:
        if isinstance(train.get(key), str):
            train[key] = local_reference(train[key], lambda p: str(Path(p).resolve())) or train[key]


def check_same_run(where: Path, recorded: dict[str, Any] | None, run: dict[str, Any]) -> None:
    """:class:`ConfigError` naming the settings in which this run differs from the one that wrote the checkpoint
    (``--resume`` continues bit for bit only with the same data, batches, schedule and method)."""
    if recorded is None:
        return  # written before checkpoints recorded their run
    then_base, now_base = recorded.get("base"), run.get("base")
    diffs = fingerprint_differences(then_base, now_base) if then_base and now_base else []  # older: not recorded
    if diffs:
        detail = ", ".join(describe_field(k, then_base, now_base, "checkpoint", "now") for k in diffs)
        raise FingerprintMismatch(f"{where}: --resume needs the base model the run started on, but "
                                  f"{run['train'].get('model')} differs from it now ({detail}); restore that model, "
                                  "or train afresh into another --out")
    then = dict(recorded.get("train", {}))
    _resolve_paths(then)  # a checkpoint written before ``FILE:SPLIT`` was recorded resolved kept it as given
    differ = [(key, then.get(key), run["train"].get(key)) for key in sorted(set(then) | set(run["train"]))
              if then.get(key) != run["train"].get(key) and (key in then or key not in RECORDED_SINCE)]
    config = recorded.get("config")
    if isinstance(config, dict) and recorded.get("method") == run["method"]:
        config = ckpt.config_as_recorded(config, run["method"])  # fields added since compare as their defaults
    recorded_method = {"method": recorded.get("method"), "config": config}
    differ += [(key, value, run[key]) for key, value in recorded_method.items() if value != run[key]]
    if differ:
        shown = "; ".join(f"{n}: {str(o)[:40]} in the checkpoint, {str(v)[:40]} now" for n, o, v in differ[:4])
        raise ConfigError(f"{where}: --resume needs the settings of the run that wrote the checkpoint ({shown}); "
                          "give the same flags, or train afresh into another --out")
