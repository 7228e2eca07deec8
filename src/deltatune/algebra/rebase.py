"""Rebase (fine-tuning transfer): move a delta from the base it was trained on to an updated base.

Lin et al., "Efficient Model Development through Fine-tuning Transfer" (arXiv 2503.20110): the
fine-tuning of version 1 transfers to version 2 by adding its diff vector,
``θ'_v2 = θ_v2 + (θ_ft,v1 − θ_v1)``.  A deltatune delta *is* ``θ_ft,v1 − θ_v1``, so rebasing keeps its
parts unchanged and re-labels it: every part must fit the new base (shape and layer kind), the
fingerprint becomes the new base's and the old one is kept in ``metrics["rebased_from"]``.

* :func:`rebase_delta` — a :class:`Delta` (or delta / PEFT folder) onto a new base model;
* :func:`rebase_checkpoint` — a full fine-tuned checkpoint: ``θ_v2 + (θ_ft − θ_v1)`` written as a
  checkpoint of the new base, streamed tensor by tensor with the merge engine's reader and writer.

A tied weight (GPT-2's ``lm_head.weight`` *is* ``transformer.wte.weight``) takes the update of its twin, so the
same ``Δ`` reaches other modules on a base that ties otherwise: both functions compare the ties of the old and
the new base, carry an update over where that is exact, and refuse the rest (:class:`NotMergeable`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from deltatune.algebra.checkpoint import CheckpointReader
from deltatune.algebra.compose import check_fits, describe_fingerprint_diff, fingerprint_diff
from deltatune.algebra.inputs import CheckpointInput
from deltatune.algebra.output import write_checkpoint
from deltatune.algebra.sum_deltas import clone_part
from deltatune.algebra.workspace import Workspace
from deltatune.delta import Delta
from deltatune.errors import ConfigError, FingerprintMismatch, NotMergeable, ShapeMismatch
from deltatune.fingerprint import fingerprint
from deltatune.model import tied_aliases, weight_owners
from deltatune.parts.capabilities import require_capability
from deltatune.provenance import path_reference, require_unstacked

BaseLike = nn.Module | str | Path


def _load_base(base: BaseLike, delta: Delta) -> nn.Module:
    if isinstance(base, nn.Module):
        return base
    from deltatune.api import load_base_for

    return load_base_for(delta, str(base))


def _base_name(base: BaseLike, role: str) -> str:
    return f"{role} {str(base)!r}" if not isinstance(base, nn.Module) else f"the {role}"


def _model_path(base: BaseLike) -> str | None:
    if not isinstance(base, nn.Module):
        return str(base)
    path = getattr(getattr(base, "config", None), "name_or_path", None)
    return str(path) if path else None


def _check_ties(d: Delta, old_model: nn.Module, new_model: nn.Module, where: str, old_name: str,
                new_name: str) -> None:
    """Every part's module shares its weight with the same modules in both bases (:class:`NotMergeable` naming the
    module and both bases' ties otherwise): a part's ``Δ`` reaches its module and every tied twin, so on a base
    that ties otherwise the same ``Δ`` is another ``θ_ft − θ_old``."""
    old_owners, new_owners = weight_owners(old_model), weight_owners(new_model)
    for module, part in d.parts.items():
        if part.is_alias or part.model_level:
            continue
        try:
            old = sorted(tied_aliases(old_model, module, old_owners))
        except AttributeError:  # forced onto an old base without the module: nothing to compare
            continue
        new = sorted(tied_aliases(new_model, module, new_owners))
        if old == new:
            continue
        shown = " and ".join(f"with {ties or 'no other module'} in {name}"
                             for ties, name in ((old, old_name), (new, new_name)))
        fix = ("merge it into the old base (`deltatune apply`) and rebase that checkpoint (`deltatune rebase CKPT "
               "--from OLD_BASE --to NEW_BASE`), which gives the untied twin the same update" if set(old) - set(new)
               else "the new base holds those modules' weights as one tensor, which cannot take this update alone")
        raise NotMergeable(f"cannot rebase {where}: module {module!r} shares its weight {shown}, so its {part.kind} "
                           f"update would not reach the modules it changed on the old base; {fix}",
                           module=module, kind=part.kind)


def rebase_delta(delta: Delta | str | Path, new_base: BaseLike, old_base: BaseLike | None = None,
                 force: bool = False, verify: bool = True) -> Delta:
    """A copy of ``delta`` for ``new_base``: ``Δ`` unchanged, fingerprint of the new base.

    ``old_base`` (model or folder) is the base the delta claims to come from: its fingerprint must match
    the delta's (:class:`FingerprintMismatch` naming both, unless ``force``).  Without ``old_base`` nothing
    can be checked, so ``force=True`` is required (:class:`ConfigError` otherwise).  Every part must fit
    the new base (:class:`ShapeMismatch` naming the module) and be additive (:class:`NotMergeable`: a base-independent
    ``Δ`` is what transfers).  With ``old_base``, every part's module must share its weight with the same modules in
    both bases (:class:`NotMergeable` naming the module and both ties otherwise): on a tied base (GPT-2's ``wte`` and
    ``lm_head``) a part's ``Δ`` changes every twin, so on a base tied otherwise it would be another update — a
    tied→untied delta can be merged into the old base and rebased as a checkpoint (:func:`rebase_checkpoint`
    carries the update to both twins).  Heads are kept; ``metrics["rebased_from"]``
    holds the old fingerprint and ``metrics["train"]["model"]`` the new base's folder when known.
    """
    from deltatune.api import as_delta

    where = f"delta {str(delta)!r}" if not isinstance(delta, Delta) else "the delta"
    d = as_delta(delta, verify=verify)
    require_capability(d, "additive", f"rebase ({where})")
    require_unstacked(d, f"rebase ({where}; rebase the deltas beneath it too, then train or compose on the new base)")
    dependent = sorted(name for name, part in d.parts.items() if part.base_dependent and not part.is_alias)
    if dependent:  # DoRA, (IA)³, SSF: the same parameters give another Δθ on another base
        shown = f"{dependent[:3]}{' …' if len(dependent) > 3 else ''}, {d.parts[dependent[0]].kind}"
        raise NotMergeable(f"cannot rebase {where}: the update of {len(dependent)} part(s) depends on the base "
                           f"weights ({shown}), so copying its parameters would not carry θ_ft − θ_old over; rebase "
                           "transfers additive deltas whose update is independent of the base (LoRA, sparse, slice, "
                           "dense, bias)")
    heads = list(d.heads)
    old_fp: dict[str, Any] | None = d.fingerprint
    if old_base is None:
        if not force:
            raise ConfigError(
                f"cannot check that {where} was trained on the base it is moved from: pass the old base "
                "(old_base=..., CLI --from OLD_BASE) to check its fingerprint, or force=True (CLI --force) to "
                "rebase it unchecked"
            )
    else:
        old_model = _load_base(old_base, d)
        actual = fingerprint(old_model, exclude=heads)
        if old_fp is None:
            old_fp = actual  # a PEFT import records no fingerprint: trust the named old base
        elif not force and fingerprint_diff(old_fp, actual):
            old_name = _base_name(old_base, "old base")
            raise FingerprintMismatch(
                f"{where} was not trained on {old_name}: {describe_fingerprint_diff(old_fp, actual, where, old_name)}. "
                "Name the base it was trained on, or pass force=True (CLI --force)"
            )
    new_model = _load_base(new_base, d)
    check_fits(d, new_model, where)
    if old_base is not None:
        _check_ties(d, old_model, new_model, where, _base_name(old_base, "old base"), _base_name(new_base, "new base"))
    metrics = copy.deepcopy(d.metrics)
    metrics["rebased_from"] = dict(old_fp) if old_fp else None
    provenance = d.provenance.derived("rebase", [d])
    provenance.base = path_reference(_model_path(new_base))  # where `deltatune eval/apply` find the base by default
    provenance.train = copy.deepcopy(d.provenance.train)
    if provenance.train is not None:
        provenance.train["model"] = provenance.base
    return Delta(
        method=d.method,
        config=copy.deepcopy(d.config),
        parts={name: clone_part(part) for name, part in d.parts.items()},
        heads={h: {k: v.detach().clone() for k, v in t.items()} for h, t in d.heads.items()},
        fingerprint=fingerprint(new_model, exclude=heads),
        metrics=metrics,
        provenance=provenance,
    )


def _tie_text(name: str, source: str | None) -> str:
    return f"ties {name!r} to {source!r}" if source is not None else f"stores {name!r} apart"


def _carried_ties(base: CheckpointReader, target: CheckpointReader, shapes: dict[str, tuple[int, ...]],
                  where: str) -> dict[str, str]:
    """``{tensor of the new base: the old base's stored tensor whose τ it takes}`` for the weights the old base ties
    and the new base stores apart; :class:`NotMergeable` naming the tensor and both bases' ties for any other
    difference in ties that concerns a tensor the old base updates.

    Ties are transformers' (:func:`~deltatune.algebra.engine.tied_weights` of each folder's ``config.json``):
    none are known, so none compared, for a folder without a config naming a model class."""
    from deltatune.algebra.engine import BaseLookup, tied_weights

    old_ties, new_ties = tied_weights(base.path), tied_weights(target.path)
    carried: dict[str, str] = {}
    for name in sorted(set(old_ties) | set(new_ties)):
        old, new = old_ties.get(name), new_ties.get(name)
        if old == new or (old is None and name not in shapes):  # same tie, or no tensor the old base updates
            continue
        if old is not None and new is None:
            if name in target and name not in shapes:  # the twin's τ reached it on the old base: exact
                carried[name] = BaseLookup(base, {}, {}).stored_name(name)  # the stored twin (a ShapeMismatch if none)
            continue
        raise NotMergeable(f"cannot rebase {where}: the old base {base.path} {_tie_text(name, old)} and the new base "
                           f"{target.path} {_tie_text(name, new)}, so the update {name!r} had on the old base cannot "
                           "be written on the new one (rebase onto a base tied like the old one)",
                           module=name.rsplit(".", 1)[0])
    return carried


def rebase_checkpoint(checkpoint: str | Path, new_base: str | Path, old_base: str | Path, out: str | Path,
                      progress: bool = False, overwrite: bool = False) -> Path:
    """``θ_v2 + (θ_ft − θ_v1)`` for a full fine-tuned checkpoint, written to ``out`` as a checkpoint of ``new_base``.

    Streamed one tensor at a time (the merge engine's :class:`CheckpointInput` for ``τ`` and
    :func:`~deltatune.algebra.output.write_checkpoint`), in the new base's dtypes, with its config and tokenizer
    files; tensors the old base does not update (integer buffers) are the new base's.  The fine-tune's tensors
    are matched to the old base's names as in a merge (a ``bert.``-prefixed classifier against its bare base).

    * **Task heads** — the fine-tune's floating tensors the old base lacks (a classifier) have no ``θ_v1``: they
      are copied unchanged, under the fine-tune's names (a new base holding one of another shape is a
      :class:`ShapeMismatch`), as :func:`rebase_delta` keeps a delta's heads.  ``deltatune_merge.json`` in
      ``out`` lists them under ``"copied_heads"``.
    * **Ties** — a weight the old base ties to another (GPT-2's ``lm_head.weight`` to ``transformer.wte.weight``)
      changed with its twin, so where the new base stores it apart it gets ``θ_v2 + τ_twin`` (recorded under
      ``"carried_ties"``); a weight the old base stores apart but the new base ties (or ties to another
      tensor) is a :class:`NotMergeable` naming it and both bases' ties, since one tensor cannot hold two updates.
    """
    base = CheckpointReader(old_base)
    target = CheckpointReader(new_base)
    source = CheckpointInput(checkpoint, base, keep_heads=True)
    where = f"checkpoint {str(checkpoint)!r}"
    shapes = {k: source.shape(k) for k in source.names()}
    carried = _carried_ties(base, target, shapes, where)
    shapes.update({name: shapes[twin] for name, twin in carried.items()})
    for head in source.heads:
        if head in target and target.shape(head) != source.reader.shape(head):
            raise ShapeMismatch(f"{where}: task head tensor {head!r} has shape {source.reader.shape(head)}, the new "
                                f"base {target.path} has {target.shape(head)}")
    written = target.view({**{k: (target, k) for k in target.names()}, **{k: (source.reader, k) for k in source.heads}})
    workspace = Workspace()

    def taus() -> Iterator[tuple[str, Tensor]]:
        keys: Any = list(shapes)
        if progress:
            from rich.progress import track

            keys = track(keys, description="rebase", transient=True)
        for key in keys:
            stored = carried.get(key, key)
            yield key, source.tau(stored, workspace.read_float(base, stored, "base"), workspace)

    record = {"method": "rebase", "formula": "θ_new + (θ_ft − θ_old)", "checkpoint": str(checkpoint),
              "old_base": str(old_base), "new_base": str(new_base), "copied_heads": list(source.heads),
              "carried_ties": carried}
    return write_checkpoint(Path(out), taus(), written, shapes, {}, None, "5GB", record, workspace,
                            overwrite=overwrite)
