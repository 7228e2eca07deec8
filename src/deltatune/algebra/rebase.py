"""Rebase (fine-tuning transfer): move a delta from the base it was trained on to an updated base.

Lin et al., "Efficient Model Development through Fine-tuning Transfer" (arXiv 2503.20110): the
fine-tuning of version 1 transfers to version 2 by adding its diff vector,
``θ'_v2 = θ_v2 + (θ_ft,v1 − θ_v1)``.  A deltatune delta *is* ``θ_ft,v1 − θ_v1``, so rebasing keeps its
parts unchanged and re-labels it: every part must fit the new base (shape and layer kind), the
fingerprint becomes the new base's and the old one is kept in ``metrics["rebased_from"]``.

* :func:`rebase_delta` — a :class:`Delta` (or delta / PEFT folder) onto a new base model;
* :func:`rebase_checkpoint` — a full fine-tuned checkpoint: ``θ_v2 + (θ_ft − θ_v1)`` written as a
  checkpoint of the new base, streamed tensor by tensor by the merge engine.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from torch import nn

from deltatune.algebra.compose import check_fits, describe_fingerprint_diff, fingerprint_diff
from deltatune.algebra.sum_deltas import clone_part
from deltatune.delta import Delta
from deltatune.errors import ConfigError, FingerprintMismatch, NotMergeable
from deltatune.fingerprint import fingerprint
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


def rebase_delta(delta: Delta | str | Path, new_base: BaseLike, old_base: BaseLike | None = None,
                 force: bool = False, verify: bool = True) -> Delta:
    """A copy of ``delta`` for ``new_base``: ``Δ`` unchanged, fingerprint of the new base.

    ``old_base`` (model or folder) is the base the delta claims to come from: its fingerprint must match
    the delta's (:class:`FingerprintMismatch` naming both, unless ``force``).  Without ``old_base`` nothing
    can be checked, so ``force=True`` is required (:class:`ConfigError` otherwise).  Every part must fit
    the new base (:class:`ShapeMismatch` naming the module) and be additive (:class:`NotMergeable`: a base-independent
    ``Δ`` is what transfers).  Heads are kept; ``metrics["rebased_from"]``
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
                           "transfers base-independent deltas (LoRA, sparse, dense, adapters)")
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


def rebase_checkpoint(checkpoint: str | Path, new_base: str | Path, old_base: str | Path, out: str | Path,
                      progress: bool = False, overwrite: bool = False) -> Path:
    """``θ_v2 + (θ_ft − θ_v1)`` for a full fine-tuned checkpoint, written to ``out`` as a checkpoint.

    Task arithmetic with one input and λ = 1 on ``old_base``, written onto ``new_base`` (the merge
    engine's ``target_base``), one tensor at a time.
    """
    try:
        from deltatune.algebra import merge
    except ImportError:
        raise ConfigError("rebasing a full checkpoint needs the merge engine (deltatune.algebra.merge), "
                          "which this installation does not have") from None
    return Path(merge([checkpoint], "task_arithmetic", base=old_base, output="checkpoint", out=out,
                      target_base=new_base, progress=progress, overwrite=overwrite))
