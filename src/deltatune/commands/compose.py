"""``deltatune compose DELTA DELTA … --out DIR [--heads-of N] [--overwrite] [--no-verify]``: sum deltas into one.

``Δ = Σ_t Δ_t`` per module in the most compact exact form (sparse + sparse: index union; LoRA + LoRA: ranks
concatenated; otherwise dense), :func:`deltatune.algebra.sum_deltas.compose_deltas` (Ansell et al., ACL 2022,
arXiv 2110.07560: sparse fine-tunings compose by summation).  Every input must belong to the same base
(:class:`~deltatune.errors.FingerprintMismatch` naming the two that differ) and be additive
(:class:`~deltatune.errors.NotMergeable`).  Task heads are replaced, not summed: by default inputs may carry the
same head only if it is identical; ``--heads-of N`` keeps the heads of input ``N`` (1-based) and its task (their
label names) and drops the others' (e.g. a task delta composed with a language delta, or one task's score over several
tasks' deltas).  The sum's base fingerprint is the one for the heads it keeps
(:func:`~deltatune.algebra.sum_deltas.output_fingerprint`).
When every input is compressed (the compact format), so is the sum: only its non-zeros, exactly encoded
(:func:`deltatune.io.compact_format.save_compact`); otherwise the standard delta format.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from deltatune.commands.options import NoVerify, Overwrite


def compose_paths(deltas: list[Path], heads_of: int | None = None, verify: bool = True):
    """The composed :class:`~deltatune.delta.Delta` of the delta folders ``deltas`` (see the module docstring):
    :func:`~deltatune.algebra.sum_deltas.compose_deltas` with ``heads_of`` 1-based here, so its one base check
    sees every input with the heads its fingerprint was taken without, and the sum gets the fingerprint of the heads
    it keeps."""
    from deltatune.algebra.sum_deltas import compose_deltas
    from deltatune.api import as_delta
    from deltatune.errors import ConfigError

    if len(deltas) < 2:
        raise ConfigError(f"compose needs at least two deltas, got {len(deltas)}")
    if heads_of is not None and not 1 <= heads_of <= len(deltas):
        raise ConfigError(f"--heads-of {heads_of} names no input: give 1 … {len(deltas)}")
    loaded = [as_delta(p, verify=verify) for p in deltas]
    return compose_deltas(loaded, names=[str(p) for p in deltas], heads_of=None if heads_of is None else heads_of - 1)


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
