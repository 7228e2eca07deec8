"""What a training checkpoint records of its run, and whether a ``--resume`` is the same run: the settings that
decide what is computed (data, batches, schedule, method and its configuration), the fingerprint of the base the
delta trains on, and the content fingerprint of the training data (:func:`data_fingerprint`: a file re-sorted,
shrunk or relabelled under the same path gives other rows at the saved offset).  A resume that differs is refused
naming what differs (:func:`check_same_run`); ``eval`` refuses to rebuild a hold-out from a changed training file
(:func:`check_data_unchanged`)."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from deltatune.delta import Delta
from deltatune.errors import ConfigError, DataError, FingerprintMismatch
from deltatune.fingerprint import describe_field, fingerprint_differences
from deltatune.provenance import local_reference, split_spec
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
#: tasks whose ``data`` is the user's own file (or ``save_to_disk`` folder) of training rows, fingerprinted by
#: :func:`run_settings`; a GLUE task's ``data`` is the shared folder of every GLUE task (not hashed)
DATA_TASKS = (*USER_TASKS, "text", "jsonl")
#: bytes read at a time while hashing a data file (a file of several GB is streamed, never read whole)
HASH_CHUNK = 1 << 20


def run_settings(cfg: TrainConfig, delta: Delta) -> dict[str, Any]:
    """What a checkpoint records of its run so that a resume can be refused when it differs (JSON values): the
    training settings but :data:`FREE_ON_RESUME`, the method and its configuration, the fingerprint of the base
    the delta trains on (a model folder rewritten since: another base under the same path) and, under ``data``, the
    content fingerprint of the training file of a :data:`DATA_TASKS` task (:func:`data_fingerprint`; ``None`` for
    GLUE or data that is not local).  A delta's provenance records the same fingerprint as ``data_fingerprint``, for
    ``eval``'s rebuilt hold-out (:func:`check_data_unchanged`)."""
    train = {k: v for k, v in asdict(cfg).items() if k not in FREE_ON_RESUME}
    _resolve_paths(train)
    train["on"] = [str(Path(p).resolve()) if Path(p).exists() else p for p in train.get("on") or []]
    if cfg.task in USER_TASKS:
        train["holds_out"] = cfg.eval_data is None
    data = data_fingerprint(cfg.data) if cfg.task in DATA_TASKS else None
    return json.loads(json.dumps({"train": train, "method": delta.method, "config": delta.config,
                                  "base": delta.fingerprint, "data": data}, default=str))


def data_fingerprint(spec: str | None) -> dict[str, Any] | None:
    """``{"bytes", "sha256"}`` of the local data file ``spec`` names (the whole file of a ``FILE:SPLIT``), streamed
    :data:`HASH_CHUNK` bytes at a time: ``sha256(content)``.  A folder (``save_to_disk``) is hashed as
    ``sha256(‖ over its files in sorted relative-path order of: path ‖ 0 ‖ size ‖ 0 ‖ content)`` and ``bytes`` is their
    total.  ``None`` when ``spec`` names nothing local (a hub dataset, no data)."""
    parts = split_spec(spec) if spec else None
    if parts is None:
        return None
    root = Path(parts[0])
    if root.is_file():
        files = [(root, "")]
    else:
        files = sorted(((p, p.relative_to(root).as_posix()) for p in root.rglob("*") if p.is_file()),
                       key=lambda item: item[1])
    h, total = hashlib.sha256(), 0
    for path, name in files:
        size = path.stat().st_size
        total += size
        if name:
            h.update(f"{name}\0{size}\0".encode())
        with path.open("rb") as handle:
            while chunk := handle.read(HASH_CHUNK):
                h.update(chunk)
    return {"bytes": total, "sha256": h.hexdigest()}


def check_data_unchanged(spec: str | None, recorded: Any, since: str, advice: str) -> None:
    """:class:`DataError` naming the data file ``spec`` when its content no longer has the fingerprint ``recorded``
    (:func:`data_fingerprint`) — rows re-sorted, added, removed or relabelled since ``since`` ("the delta was
    trained"); ``advice`` says what to do instead.  A file of another size is not hashed.  Nothing is checked where
    nothing was recorded (runs and deltas written before data was fingerprinted) or where ``spec`` names no local
    file (gone or moved: reading it names it)."""
    parts = split_spec(spec) if spec else None
    if not isinstance(recorded, dict) or parts is None:
        return
    size = _size(Path(parts[0]))
    now = data_fingerprint(spec) if size == recorded.get("bytes") else {"bytes": size, "sha256": None}
    _refuse_changed(parts[0], recorded, now, since, advice)


def _refuse_changed(path: str, then: Any, now: Any, since: str, advice: str) -> None:
    """:class:`DataError` naming ``path`` when both fingerprints were taken and they differ."""
    if not isinstance(then, dict) or not isinstance(now, dict) or then == now:
        return
    sizes = (f"{then.get('bytes')} bytes then, {now.get('bytes')} now" if then.get("bytes") != now.get("bytes")
             else f"same size ({now.get('bytes')} bytes), sha256 {str(then.get('sha256'))[:12]}… then, "
                  f"{str(now.get('sha256'))[:12]}… now")
    raise DataError(f"{path}: the data changed since {since} ({sizes}): its rows were re-sorted, added, removed or "
                    f"relabelled; {advice}")


def _size(root: Path) -> int:
    """Bytes of the file ``root``, or of every file under the folder ``root``."""
    if root.is_file():
        return root.stat().st_size
    return sum(os.path.getsize(p) for p in root.rglob("*") if p.is_file())


def _resolve_paths(train: dict[str, Any]) -> None:
    """:data:`PATH_SETTINGS` of ``train`` that name local files (or ``FILE:SPLIT``) made absolute and resolved, in
    place: a relative path one time and an absolute one the next compare equal."""
    for key in PATH_SETTINGS:
        if isinstance(train.get(key), str):
            train[key] = local_reference(train[key], lambda p: str(Path(p).resolve())) or train[key]


def check_same_run(where: Path, recorded: dict[str, Any] | None, run: dict[str, Any]) -> None:
    """:class:`ConfigError` naming the settings in which this run differs from the one that wrote the checkpoint
    (``--resume`` continues bit for bit only with the same data, batches, schedule and method);
    :class:`FingerprintMismatch` for another base under the model's path, :class:`DataError` naming the data file
    whose content changed under its path (a checkpoint that recorded no data fingerprint resumes as before)."""
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
    _refuse_changed(str(run["train"].get("data")), recorded.get("data"), run.get("data"),
                    f"the checkpoint {where} was written",
                    "--resume continues at the saved offset of the same rows and labels: restore the file, or train "
                    "afresh into another --out")
