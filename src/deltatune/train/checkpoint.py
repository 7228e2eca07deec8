"""Resumable training state: trainable tensors, optimizer, scheduler, hooks, RNGs and position, with the run's
settings and each part's kind and meta, which a resume must match (:func:`check_parts`).

A checkpoint is a directory ``out_dir/checkpoint`` holding ``tensors.safetensors`` (every tensor and
NumPy array of the state) and ``state.json`` (everything else, with references to those tensors, see
:mod:`deltatune.train.state_codec`, plus SHA-256 digests of each tensor and of the JSON itself).
Nothing is unpickled, so a planted file cannot run code; the digests turn a flipped bit into an
:class:`IntegrityError` naming the tensor.  It is written with ``atomic_dir`` (a crash mid-save keeps
the previous checkpoint, and :func:`load_checkpoint` first completes or rolls back an interrupted
swap), so a resumed run continues bit-for-bit where the interrupted one stopped (CPU).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from deltatune.delta import Delta
from deltatune.errors import ConfigError, DeltaFormatError, IntegrityError
from deltatune.io.atomic import atomic_dir, recover_dir
from deltatune.io.digest import DIGEST_FIELD, manifest_digest, tensor_digest, verify_tensor
from deltatune.io.json_io import parse_json
from deltatune.layer import DeltaLayer, ModelParts
from deltatune.model import get_module
from deltatune.parts.base import Part
from deltatune.parts.meta_checks import check_finite
from deltatune.train.state_codec import decode, encode

FORMAT = "deltatune.train_checkpoint"
FORMAT_VERSION = 1
OUTPUT_KIND = "train_checkpoint"
STATE_FILE = "state.json"
TENSOR_FILE = "tensors.safetensors"
LEGACY_FILE = "state.pt"
FIELDS = {"format", "format_version", "state", DIGEST_FIELD}
STATE_FIELDS = {"trainable", "optimizer", "scheduler", "hooks", "step", "epoch", "offset", "before", "best",
                "history", "rng"}
#: fields a checkpoint may carry beyond :data:`STATE_FIELDS` (absent in checkpoints written before they were
#: recorded): ``run``, the settings a resume must match; ``parts``, each part's kind and meta (:func:`parts_record`);
#: ``bound``, the parts whose tensors were ``θ`` itself, trained in the base's storage (:func:`bound_record`)
OPTIONAL_STATE_FIELDS = {"run", "parts", "bound"}


_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.",)


def portable_name(name: str) -> str:
    """``name`` without the prefixes FSDP's wrappers add (``layer.0._fsdp_wrapped_module.attention…`` →
    ``layer.0.attention…``), so a checkpoint written under one launch route resumes under another."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def trainable_state(model: nn.Module, delta: Delta | None = None) -> dict[str, Tensor]:
    """What a resumed run must get back, by the model's tensor names: every tensor of every part of ``delta``
    (parameters and buffers, training or frozen right now — so a schedule that changes what trains resumes
    exactly), the live tensors of its task heads, and any other parameter that trains.  Without ``delta``,
    the parts are found as the :class:`DeltaLayer` s of ``model``."""
    names: dict[int, str] = {}
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        names.setdefault(id(t), portable_name(name))
    if delta is not None:
        parts = list(delta.parts.values())
        heads = [model.get_submodule(h) for h in delta.heads]
    else:
        parts = [p for m in model.modules() if isinstance(m, DeltaLayer | ModelParts) for p in m.parts.values()]
        heads = []
    tensors = [t for part in parts for t in (*part.parameters(), *part.buffers())]
    tensors += [t for head in heads for t in (*head.parameters(), *head.buffers())]
    tensors += [p for p in model.parameters() if p.requires_grad]
    return {names[id(t)]: t.detach().clone() for t in tensors if id(t) in names}


def rng_state() -> dict[str, Any]:
    """This process's RNG states: torch CPU (uint8 tensor), CUDA (one per device), ``random`` and NumPy."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], where: Path) -> None:
    """Restore :func:`rng_state`'s result; a malformed entry raises :class:`DeltaFormatError` naming ``where``."""
    try:
        torch.set_rng_state(state["torch"])
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
    except (KeyError, IndexError, TypeError, ValueError, OverflowError, RuntimeError) as exc:
        raise DeltaFormatError(f"{where}: RNG state is malformed ({str(exc)[:80]})") from None


def save_checkpoint(path: Path, payload: dict[str, Any], overwrite: bool = False) -> None:
    """Write ``payload`` (the fields of :data:`STATE_FIELDS`) to the directory ``path`` atomically.

    An earlier checkpoint at ``path`` is replaced; anything else there only with ``overwrite=True``.
    """
    tree, tensors = encode(payload, where=str(path))
    _check_finite(tensors, path)
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "state": tree,
                DIGEST_FIELD: {"tensors": {ref: tensor_digest(ref, t) for ref, t in tensors.items()}}}
    manifest[DIGEST_FIELD]["manifest"] = manifest_digest(manifest)
    with atomic_dir(path, OUTPUT_KIND, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / TENSOR_FILE), metadata={"format": FORMAT})
        (tmp / STATE_FILE).write_text(json.dumps(manifest, allow_nan=False))


def load_checkpoint(path: Path, verify: bool = True, recover: bool = True) -> dict[str, Any]:
    """The state :func:`save_checkpoint` wrote, its digests checked unless ``verify=False``.

    An interrupted swap is rolled back first (``recover=False`` when the caller did that once for all ranks).
    An old pickle checkpoint (``state.pt``) is refused without being opened.
    """
    path = Path(path)
    if recover:
        recover_dir(path)
    file = path / STATE_FILE
    if not file.is_file():
        if (path / LEGACY_FILE).exists():
            raise DeltaFormatError(f"{path / LEGACY_FILE}: checkpoint is in the old pickle format, which deltatune "
                                   f"no longer loads because unpickling can run code; start the run again")
        raise DeltaFormatError(f"{file}: no checkpoint to resume from")
    manifest = _read_manifest(file)
    tensor_file = path / TENSOR_FILE
    try:
        tensors = load_file(str(tensor_file))
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a damaged file
        raise DeltaFormatError(f"{tensor_file}: unreadable tensor file ({str(exc)[:80]})") from None
    if verify:
        _verify(manifest, tensors, file, tensor_file)
    _check_finite(tensors, tensor_file)
    state = decode(manifest["state"], tensors, where=str(file))
    _check_state(state, file)
    return state


def _read_manifest(file: Path) -> dict[str, Any]:
    try:
        text = file.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DeltaFormatError(f"{file}: cannot read as UTF-8 JSON ({str(exc)[:80]})") from None
    manifest = parse_json(text, str(file))  # typed errors for NaN/Infinity, overflow, deep nesting
    if not isinstance(manifest, dict) or set(manifest) != FIELDS:
        got = sorted(manifest) if isinstance(manifest, dict) else type(manifest).__name__
        raise DeltaFormatError(f"{file}: expected an object with the fields {sorted(FIELDS)}, got {got}")
    if manifest["format"] != FORMAT:
        raise DeltaFormatError(f"{file}: field 'format' is {str(manifest['format'])[:80]!r}, expected {FORMAT!r}")
    if manifest["format_version"] != FORMAT_VERSION or type(manifest["format_version"]) is not int:
        raise DeltaFormatError(f"{file}: format_version {str(manifest['format_version'])[:20]} is not "
                               f"{FORMAT_VERSION}, the one this deltatune reads")
    return manifest


def _verify(manifest: dict[str, Any], tensors: dict[str, Tensor], file: Path, tensor_file: Path) -> None:
    digests = manifest[DIGEST_FIELD]
    stored = digests.get("tensors") if isinstance(digests, dict) else None
    if not isinstance(stored, dict) or not isinstance(digests.get("manifest"), str):
        raise DeltaFormatError(f"{file}: field {DIGEST_FIELD!r} must hold 'tensors' and 'manifest' digests")
    if manifest_digest(manifest) != digests["manifest"]:
        raise IntegrityError(f"{file}: the state fails its SHA-256 check; the file is corrupt or was modified")
    missing, extra = sorted(set(stored) - set(tensors)), sorted(set(tensors) - set(stored))
    if missing or extra:
        raise IntegrityError(f"{tensor_file}: tensors {str(missing or extra)[:80]} are "
                             f"{'missing' if missing else 'not in the digests'}")
    for ref, t in tensors.items():
        verify_tensor(tensor_file, ref, t, stored[ref])


def _check_finite(tensors: dict[str, Tensor], file: Path) -> None:
    """Every floating-point tensor of a checkpoint is finite (trainable values, optimizer moments, sums)."""
    for ref, t in tensors.items():
        check_finite(t, f"{file}: tensor {ref[:80]!r}")


def _check_state(state: Any, file: Path) -> None:
    """The top-level fields the training loop relies on, with their types."""
    if not isinstance(state, dict) or set(state) - OPTIONAL_STATE_FIELDS != STATE_FIELDS:
        got = sorted(map(str, state)) if isinstance(state, dict) else type(state).__name__
        raise DeltaFormatError(f"{file}: state must have the fields {sorted(STATE_FIELDS)}, got {str(got)[:80]}")
    for key in OPTIONAL_STATE_FIELDS & set(state):
        if not isinstance(state[key], dict):
            raise DeltaFormatError(f"{file}: state field {key!r} must be a dict")
    bound = state.get("bound", {"parts": []})
    if set(bound) != {"parts"} or not isinstance(bound["parts"], list) or not all(
            isinstance(n, str) for n in bound["parts"]):
        raise DeltaFormatError(f"{file}: state field 'bound' must be {{'parts': [module names]}}, got "
                               f"{str(bound)[:80]}")
    for key in ("step", "epoch", "offset"):
        if type(state[key]) is not int or state[key] < 0:
            raise DeltaFormatError(f"{file}: state field {key!r} must be an integer ≥ 0, got {state[key]!r:.40}")
    expect = {"trainable": dict, "optimizer": dict, "scheduler": dict, "hooks": list, "before": dict,
              "history": list, "rng": list}
    for key, kind in expect.items():
        if not isinstance(state[key], kind):
            raise DeltaFormatError(f"{file}: state field {key!r} must be a {kind.__name__}")
    if state["best"] is not None and not isinstance(state["best"], dict):
        raise DeltaFormatError(f"{file}: state field 'best' must be a dict or null")
    bad = [k for k, v in state["trainable"].items() if not (isinstance(k, str) and isinstance(v, Tensor))]
    if bad:
        raise DeltaFormatError(f"{file}: state field 'trainable' maps {str(bad[:3])[:80]} to non-tensors")
    if not state["rng"] or not all(isinstance(r, dict) for r in state["rng"]):
        raise DeltaFormatError(f"{file}: state field 'rng' must be a non-empty list of per-process RNG states")


def bound_record(delta: Delta) -> dict[str, Any]:
    """``{"parts": [...]}``: the parts whose trained tensors are ``θ`` itself now (bound in the base's storage,
    :attr:`~deltatune.parts.base.Part.bound_trains_base`), so a resume reads the checkpoint's tensors of those parts
    as ``θ`` and of the others as ``Δθ``, whichever way it binds them itself."""
    return {"parts": sorted(n for n, p in delta.parts.items() if p.bound_trains_base and p.bound)}


def restore_trainable(model: nn.Module, state: dict[str, Tensor], where: Path, delta: Delta | None = None,
                      bound_then: set[str] | None = None) -> None:
    """Copy the checkpoint's tensors (:func:`trainable_state`) into ``model`` (names and shapes must match).

    ``bound_then``: the parts the checkpoint's run had bound (:func:`bound_record`; ``None``: as this run binds
    them); a part bound now and not then, or the reverse, reads its tensors through
    :meth:`~deltatune.parts.base.Part.trained_from` (``θ₀ + Δθ`` or ``θ − θ₀``)."""
    own = {portable_name(n): t for n, t in [*model.named_parameters(), *model.named_buffers()]}
    missing = sorted(set(trainable_state(model, delta)) - set(state))
    if missing:
        raise DeltaFormatError(f"{where}: checkpoint lacks {missing[:5]} — was it written by another method?")
    read_as: dict[int, tuple[Part, nn.Module, bool]] = {}
    if delta is not None and bound_then is not None:
        for name, part in delta.parts.items():
            if part.bound_trains_base and part.bound != (name in bound_then):
                for t in part.parameters():
                    read_as[id(t)] = (part, get_module(model, name), name in bound_then)
    with torch.no_grad():
        for name, tensor in state.items():
            if name not in own or own[name].shape != tensor.shape or own[name].dtype != tensor.dtype:
                raise DeltaFormatError(f"{where}: checkpoint tensor {name[:80]!r} does not fit this model "
                                       f"(name, shape or dtype)")
            target = own[name]
            if id(target) in read_as:
                part, base, then = read_as[id(target)]
                tensor = part.trained_from(tensor.to(target.device), target, base, then)
            target.copy_(tensor)


def parts_record(delta: Delta) -> dict[str, Any]:
    """``{module: {"kind", "meta"}}`` of ``delta``'s parts, as the delta's manifest records them (JSON values): what
    the tensors of :func:`trainable_state` mean (a LoRA's scale, a DSEE part's ``sparse_scale``)."""
    record = {name: {"kind": part.kind, "meta": part.meta()} for name, part in delta.parts.items()}
    return json.loads(json.dumps(record, default=str))


def check_parts(recorded: dict[str, Any] | None, delta: Delta, where: Path) -> None:
    """:class:`DeltaFormatError` where a part that the checkpoint recorded (:func:`parts_record`) is built otherwise
    now, its tensors restored: its kind or a meta field differs, so its tensors would mean another update (the
    checkpoint was written by another deltatune, or another version of the method).  Parts made since (a lazily
    drawn block) and checkpoints written before parts were recorded are not compared."""
    if recorded is None:
        return
    now = parts_record(delta)
    for name in sorted(set(recorded) & set(now)):
        then, current = recorded[name], now[name]
        if then == current:
            continue
        if not isinstance(then, dict) or then.get("kind") != current["kind"]:
            shown = then.get("kind") if isinstance(then, dict) else then
            raise DeltaFormatError(f"{where}: part {name!r} is a {str(shown)[:40]} part in the checkpoint and a "
                                   f"{current['kind']} part now; train afresh into another --out")
        old, new = then.get("meta") if isinstance(then.get("meta"), dict) else {}, current["meta"]
        field = next((k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)), None)
        shown = (f"was written with {field} = {str(old.get(field))[:40]} and is built with "
                 f"{str(new.get(field))[:40]} now" if field is not None else
                 f"is recorded as {str(then)[:80]} and built as {str(current)[:80]} now")
        raise DeltaFormatError(f"{where}: part {name!r} ({current['kind']}) {shown}, so its tensors would mean "
                               "another update (a checkpoint of another deltatune or method version?); train afresh "
                               "into another --out")


def hooks_for(hooks: list[Any], n_states: int) -> list[Any] | None:
    """The hooks that ``n_states`` checkpointed hook states belong to, in order: all of them, or — for a checkpoint
    written before a stateless hook (:attr:`TrainHook.stateless`, e.g. in-place training) joined the method's list —
    the others; ``None`` when neither fits."""
    if n_states == len(hooks):
        return list(hooks)
    stateful = [h for h in hooks if not h.stateless]
    return stateful if n_states == len(stateful) else None


def config_as_recorded(recorded: dict[str, Any], method: str) -> dict[str, Any]:
    """A checkpoint's method configuration with the fields it predates filled in with their defaults (a field added
    to the method later: the recorded run trained with its default), as JSON values: the method's own parser fills
    them (:meth:`Method.parse`, as :func:`deltatune.train.integration.method_config` rebuilds a delta's config)."""
    from deltatune.methods.registry import get_method

    try:
        method_ = get_method(method)
        parsed = method_.config_dict(method_.parse(dict(recorded)))
    except ConfigError:  # an unknown method, or a configuration it no longer takes: compared as recorded
        return recorded
    return {**json.loads(json.dumps(parsed, default=str)), **recorded}
