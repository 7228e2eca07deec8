"""``deltatune merge CONFIG.yaml [--out DIR] [--overwrite] [--no-verify]``: run a merge recipe (deltatune or
mergekit YAML).

The output folder (``--out`` or the recipe's ``out:``) is checked before merging: an existing folder that
is not an earlier output of the same kind is refused unless ``--overwrite``.  Heavy imports happen inside
the command so ``deltatune --help`` stays fast.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Annotated

import typer

from deltatune.commands.options import NoVerify, Overwrite


def merge_command(
    config: Annotated[Path, typer.Argument(help="merge recipe (deltatune keys or a mergekit config)")],
    out_dir: Annotated[str | None, typer.Option("--out", help="output folder (overrides 'out' in the recipe)")]
    = None,
    preset: Annotated[str | None, typer.Option(help="paper | mergekit | peft (overrides the recipe)")] = None,
    output: Annotated[str | None, typer.Option(help="dense | sparse | lowrank | checkpoint")] = None,
    seed: Annotated[int | None, typer.Option(help="seed for random masks (DARE, DELLA)")] = None,
    force: Annotated[bool, typer.Option("--force", help="merge deltas of different bases anyway")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="show progress bars")] = True,
    overwrite: Overwrite = False,
    verify: NoVerify = True,
) -> None:
    """Merge deltas or fine-tuned checkpoints as a recipe describes (mergekit YAML accepted)."""
    from rich.console import Console

    from deltatune.algebra.output import output_kind
    from deltatune.algebra.recipe import load_recipe, run_recipe
    from deltatune.algebra.task_heads import task_names
    from deltatune.commands.process import keep_freed_memory, skip_teardown
    from deltatune.delta import Delta
    from deltatune.errors import ConfigError
    from deltatune.io.outputs import folder_bytes, guard_output

    keep_freed_memory()

    recipe = load_recipe(config)
    for name, value in (("preset", preset), ("output", output), ("seed", seed)):
        if value is not None:
            setattr(recipe, name, value)
    recipe.force = recipe.force or force
    if not verify:
        recipe = dataclasses.replace(recipe, verify=False)
    target = out_dir or recipe.out
    if target is None:
        raise ConfigError(f"{config}: no output folder: give --out or 'out' in the recipe")
    guard_output(target, output_kind(recipe.output), overwrite)  # before any input is read
    start = time.perf_counter()
    result = run_recipe(recipe, out=target, progress=progress, overwrite=overwrite)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    if isinstance(result, Delta):
        disk = folder_bytes(Path(target))
        err.print(f"{recipe.method} ({recipe.preset}) of {len(recipe.inputs)} inputs → {recipe.output} delta, "
                  f"{len(result.parts)} parts, {disk:,} bytes on disk, in {time.perf_counter() - start:.1f} s")
        kept = task_names(result)
        if kept:
            err.print(f"the inputs were trained on different tasks: each keeps its own head ({', '.join(kept)}); "
                      "pick one with deltatune.algebra.task_heads.for_task(delta, NAME)")
        elif result.heads:
            err.print(f"task heads: {', '.join(result.heads)}")
        else:
            err.print("task heads: none")
    else:
        err.print(f"{recipe.method} ({recipe.preset}) of {len(recipe.inputs)} inputs → checkpoint in "
                  f"{time.perf_counter() - start:.1f} s")
    Console(highlight=False).print(str(target))
    skip_teardown()
