"""``deltatune compose DELTA DELTA … --out DIR [--heads-of N] [--overwrite] [--no-verify]``: sum deltas into one.

``Δ = Σ_t Δ_t`` per module in the most compact exact form (sparse + sparse: index union; LoRA + LoRA: ranks
concatenated; otherwise dense), :func:`deltatune.algebra.sum_deltas.compose_deltas` (Ansell et al., ACL 2022,
arXiv 2110.07560: sparse fine-tunings compose by summation).  Every input must belong to the same base
(:class:`~deltatune.errors.FingerprintMismatch` naming the two that differ) and be additive
(:class:`~deltatune.errors.NotMergeable`).  Task heads are replaced, not summed: by default inputs may carry the
same head only if it is identical; ``--heads-of N`` keeps the heads of input ``N`` (1-based) and drops the
others' (e.g. a task delta composed with a language delta, or one task's score over several tasks' deltas).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer

from deltatune.commands.options import NoVerify, Overwrite


def compose_paths(deltas: list[Path], heads_of: int | None = None, verify: bool = True):
    """The composed :class:`~deltatune.delta.Delta` of the delta folders ``deltas`` (see the module docstring)."""
    from deltatune.algebra.sum_deltas import compose_deltas
    from deltatune.api import as_delta
    from deltatune.errors import ConfigError

    if len(deltas) < 2:
        raise ConfigError(f"compose needs at least two deltas, got {len(deltas)}")
    if heads_of is not None and not 1 <= heads_of <= len(deltas):
        raise ConfigError(f"--heads-of {heads_of} names no input: give 1 … {len(deltas)}")
    loaded = [as_delta(p, verify=verify) for p in deltas]
    check_same_base(loaded, [str(p) for p in deltas])
    if heads_of is not None:
        loaded = [d if i == heads_of - 1 else dataclasses.replace(d, heads={}) for i, d in enumerate(loaded)]
    return compose_deltas(loaded, names=[str(p) for p in deltas])


def check_same_base(deltas: list, names: list[str]) -> None:
    """:class:`~deltatune.errors.FingerprintMismatch` naming two deltas with the same task-head set (so comparable
    fingerprints) whose bases differ — checked before ``--heads-of`` drops heads, which would make them
    incomparable."""
    from deltatune.algebra.compose import describe_fingerprint_diff, fingerprint_diff
    from deltatune.errors import FingerprintMismatch

    first: dict[frozenset[str], int] = {}
    for i, d in enumerate(deltas):
        if not d.fingerprint:
            continue
        j = first.setdefault(frozenset(d.heads), i)
        if fingerprint_diff(deltas[j].fingerprint, d.fingerprint):
            what = describe_fingerprint_diff(deltas[j].fingerprint, d.fingerprint, names[j], names[i])
            raise FingerprintMismatch(f"{names[j]} and {names[i]} were trained on different base models: {what}; "
                                      "rebase one of them first (`deltatune rebase`)")


def compose_command(
    deltas: Annotated[list[Path], typer.Argument(help="delta folders (deltatune or PEFT LoRA), two or more")],
    out_dir: Annotated[Path, typer.Option("--out", help="folder to write the composed delta to")],
    heads_of: Annotated[int | None, typer.Option("--heads-of", help="keep only the task heads of input N "
                                                                    "(1-based); default: all, which must agree")]
    = None,
    overwrite: Overwrite = False,
    verify: NoVerify = True,
) -> None:
    """Sum deltas of one base into one delta (sparse index sets united, LoRA ranks concatenated, else dense)."""
    from rich.console import Console

    from deltatune.io.outputs import DELTA_KIND, guard_output

    guard_output(out_dir, DELTA_KIND, overwrite)  # before any input is read
    composed = compose_paths(deltas, heads_of, verify)
    written = composed.save(out_dir, overwrite=overwrite)
    Console(stderr=True, highlight=False, soft_wrap=True).print(
        f"composed {len(deltas)} deltas → {len(composed.parts)} parts {composed.part_kinds()}, "
        f"{composed.trainable_count:,} values")
    Console(highlight=False).print(str(written))
