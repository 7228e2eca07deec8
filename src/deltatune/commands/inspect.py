"""``deltatune inspect DELTA [DELTA …] [--base MODEL] [--out DIR] [--json]``.

Per tensor: relative norm, density, concentration, spectrum and effective rank of ΔW, intruder dimensions,
alignment with W's top singular directions, placement of sparse entries; between inputs: cosine, principal
angles, sign agreement, TIES conflict mass, support overlap and a (heuristic) merge suggestion.  Inputs are
deltas or full fine-tuned checkpoints (with ``--base``), read tensor by tensor.  Heavy imports happen inside the
command so ``deltatune --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from deltatune.commands.options import NoVerify, Overwrite


def inspect_command(
    deltas: Annotated[list[Path], typer.Argument(help="delta folders, PEFT LoRA folders, or fine-tuned checkpoints")],
    base: Annotated[str | None, typer.Option("--base", help="base-model folder (default: the delta's recorded "
                                                             "base; required for checkpoints)")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="report folder: PNG plots, report.html, "
                                                               "report.json")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the numbers as JSON instead of tables")] = False,
    label: Annotated[list[str] | None, typer.Option("--label", help="a short name per input, in order")] = None,
    epsilon: Annotated[float, typer.Option(help="intruder threshold ε on max |cos|")] = 0.5,
    top_k: Annotated[int, typer.Option("--top-k", help="top singular vectors of W + ΔW examined for intruders")]
    = 10,
    svd_full_max: Annotated[int, typer.Option(help="exact SVD up to this min(m, n), randomised above")] = 4096,
    svd_rank: Annotated[int, typer.Option(help="rank of the randomised SVD")] = 256,
    force: Annotated[bool, typer.Option("--force", help="inspect deltas of different bases together")] = False,
    overwrite: Overwrite = False,
    verify: NoVerify = True,
) -> None:
    """What the fine-tunings changed, per layer and between deltas (plots and an HTML report with --out)."""
    from rich.console import Console

    from deltatune.config import parse_config
    from deltatune.inspect import InspectOptions, inspect_deltas
    from deltatune.inspect.report import print_summary, report_json

    opts = parse_config(InspectOptions, {
        "base": base, "out": str(out_dir) if out_dir is not None else None, "labels": label or None,
        "epsilon": epsilon, "intruder_k": top_k, "svd_full_max": svd_full_max, "svd_rank": svd_rank,
        "force": force, "overwrite": overwrite, "verify": verify, "progress": not as_json}, "inspect")
    report = inspect_deltas(deltas, opts)
    console = Console(highlight=False)
    if as_json:
        console.print_json(report_json(report))
        return
    print_summary(report, console)
