"""``deltatune compose DELTA DELTA … --out DIR [--heads-of N] [--overwrite] [--no-verify]``: sum deltas into one.

``Δ = Σ_t Δ_t`` per module in the most compact exact form (sparse + sparse: index union; LoRA + LoRA: ranks
concatenated; otherwise dense), :func:`deltatune.algebra.sum_deltas.compose_deltas` (Ansell et al., ACL 2022,
arXiv 2110.07560: sparse fine-tunings compose by summation).  Every input must belong to the same base
(:class:`~deltatune.errors.FingerprintMismatch` naming the two that differ) and be additive
(:class:`~deltatune.errors.NotMergeable`).  Task heads are replaced, not summed: by default inputs may carry the
same head only if it is identical; ``--heads-of N`` keeps the heads of input ``N`` (1-based) and drops the
others' (e.g. a task delta composed with a language delta, or one task's score over several tasks' deltas).
When every input is compressed (the compact format), so is the sum: only its non-zeros, exactly encoded
(:func:`deltatune.io.compact_format.save_compact`); otherwise the standard delta format.
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
    """:class:`~deltatune.errors.FingerprintMismatch` naming two deltas whose bases differ (the same check as
    :func:`~deltatune.algebra.sum_deltas.check_same_bases`: every field for equal head sets, ``model_type`` and the
    probe tensors across head sets) — made before ``--heads-of`` drops heads."""
    from deltatune.algebra.sum_deltas import check_same_bases

    check_same_bases(deltas, names)


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

    from deltatune.io.compact_format import save_compact
    from deltatune.io.delta_format import is_compact
    from deltatune.io.outputs import COMPACT_KIND, DELTA_KIND, guard_output

    compact = all(is_compact(p) for p in deltas)  # compressed inputs: the sum stays compressed
    guard_output(out_dir, COMPACT_KIND if compact else DELTA_KIND, overwrite)  # before any input is read
    composed = compose_paths(deltas, heads_of, verify)
    written = save_compact(composed, out_dir, overwrite=overwrite).path if compact else composed.save(
        out_dir, overwrite=overwrite)
    Console(stderr=True, highlight=False, soft_wrap=True).print(
        f"composed {len(deltas)} deltas → {len(composed.parts)} parts {composed.part_kinds()}, "
        f"{composed.trainable_count:,} values")
    Console(highlight=False).print(str(written))
