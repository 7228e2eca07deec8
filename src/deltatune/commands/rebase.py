"""``deltatune rebase DELTA --to NEW_BASE [--from OLD_BASE] [--force] --out DIR [--overwrite] [--no-verify]``.

Moves a fine-tuning onto an updated base (fine-tuning transfer, Lin et al., arXiv 2503.20110:
``θ'_v2 = θ_v2 + (θ_ft,v1 − θ_v1)``).  ``DELTA`` is a deltatune delta folder or a PEFT LoRA folder
(the rebased delta is written to ``--out``), or a full fine-tuned checkpoint folder (then ``--from`` is
required and ``--out`` receives a full checkpoint of the new base).  Heavy imports happen inside the
command so ``deltatune --help`` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from deltatune.commands.options import NoVerify, Overwrite


def rebase_command(
    delta: Annotated[Path, typer.Argument(help="delta folder, PEFT LoRA folder, or fine-tuned checkpoint folder")],
    to: Annotated[str, typer.Option("--to", help="new base-model folder")],
    out_dir: Annotated[Path, typer.Option("--out", help="folder to write (delta, or checkpoint for checkpoints)")],
    from_: Annotated[str | None, typer.Option("--from", help="base the delta was trained on (fingerprint checked)")]
    = None,
    force: Annotated[bool, typer.Option("--force", help="skip the old-base fingerprint check")] = False,
    overwrite: Overwrite = False,
    verify: NoVerify = True,
) -> None:
    """Transfer a delta (or a fine-tuned checkpoint) to a new base: θ_new + (θ_ft − θ_old)."""
    from rich.console import Console

    from deltatune.algebra.checkpoint import is_checkpoint
    from deltatune.algebra.rebase import rebase_checkpoint, rebase_delta
    from deltatune.commands.process import keep_freed_memory, skip_teardown
    from deltatune.errors import ConfigError
    from deltatune.io.compact_format import save_compact
    from deltatune.io.delta_format import is_compact
    from deltatune.io.outputs import CHECKPOINT_KIND, COMPACT_KIND, DELTA_KIND, guard_output

    is_delta = (delta / "manifest.json").is_file() or (delta / "adapter_config.json").is_file()
    if not is_delta and is_checkpoint(delta):
        if from_ is None:
            raise ConfigError(f"{delta} is a full checkpoint: its delta is θ_ft − θ_old, so --from OLD_BASE "
                              "(the checkpoint it was fine-tuned from) is required")
        guard_output(out_dir, CHECKPOINT_KIND, overwrite)
        keep_freed_memory()
        written = rebase_checkpoint(delta, to, from_, out_dir, overwrite=overwrite)
        _say_what_was_carried(Console(highlight=False, stderr=True), written)
    elif is_compact(delta):  # a compressed delta stays compressed: the same exact encodings, another base
        guard_output(out_dir, COMPACT_KIND, overwrite)
        rebased = rebase_delta(delta, to, old_base=from_, force=force, verify=verify)
        written = save_compact(rebased, out_dir, overwrite=overwrite).path
    else:
        guard_output(out_dir, DELTA_KIND, overwrite)
        rebased = rebase_delta(delta, to, old_base=from_, force=force, verify=verify)
        written = rebased.save(out_dir, overwrite=overwrite)
    Console(highlight=False).print(str(written))
    skip_teardown()


def _say_what_was_carried(console: Any, written: Path) -> None:
    """Name the tensors a checkpoint rebase copied or carried besides ``θ_new + τ`` (from its record file): the
    fine-tune's task heads, copied unchanged, and untied twins given their tied weight's update."""
    from deltatune.algebra.output import RECORD_FILE

    try:
        record = json.loads((Path(written) / RECORD_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    heads, ties = record.get("copied_heads") or [], record.get("carried_ties") or {}
    if heads:
        console.print(f"copied {len(heads)} task-head tensor(s) of the fine-tune unchanged: "
                      f"{', '.join(heads[:6])}", soft_wrap=True)
    for twin, source in list(ties.items())[:6]:
        console.print(f"gave {twin} (untied in the new base) the update of {source}", soft_wrap=True)

