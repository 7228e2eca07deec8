"""``deltatune search SEARCH.yaml --out DIR [--storage FILE] [--trials N] [--minutes M] [--keep-runs] [--overwrite]``.

AutoPEFT-style multi-objective configuration search (see :mod:`deltatune.search.space` for the YAML).  Each
trial trains with the normal loop into ``DIR/trials/NNNN`` (removed afterwards unless ``--keep-runs``); the
study lives in ``--storage`` (default ``DIR/study.db``) and a second invocation resumes it.  The Pareto front
is printed, plotted to ``DIR/front.png`` and saved as ``DIR/front/trial-NNNN.yaml`` for ``train --config``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from deltatune.commands.options import Overwrite

SEARCH_KIND = "search_run"
SEARCH_ENTRIES = ("study.db", "trials", "front", "front.json", "front.png")


def read_search_yaml(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(train mapping, search mapping)`` of a ``{train: {...}, search: {...}}`` file."""
    from deltatune.config import read_sections

    train, search = read_sections(path, ("train", "search"))
    return train, search


def search_command(
    config: Annotated[Path, typer.Argument(help="YAML with train: (fixed fields) and search: (the space)")],
    out_dir: Annotated[Path, typer.Option("--out", help="output folder (trials, front, plot, study)")],
    storage: Annotated[str | None, typer.Option(help="optuna storage: FILE.db (sqlite) or a journal file; "
                                                     "default OUT/study.db; an existing one is resumed")] = None,
    trials: Annotated[int | None, typer.Option(help="total trials (overrides search.trials)")] = None,
    minutes: Annotated[float | None, typer.Option(help="wall-clock budget (overrides search.minutes)")] = None,
    keep_runs: Annotated[bool, typer.Option("--keep-runs", help="keep every trial's run folder")] = False,
    overwrite: Overwrite = False,
) -> None:
    """Search methods, budgets, layers and modules for the best metric at the fewest trainable parameters."""
    from rich.console import Console

    from deltatune.config import parse_config
    from deltatune.io.outputs import guard_output, write_marker
    from deltatune.search.front import check_writable, front_rows, front_table, save_front
    from deltatune.search.space import SearchSpace
    from deltatune.search.study import run_search

    train, search = read_search_yaml(config)
    if trials is not None:
        search["trials"] = trials
    if minutes is not None:
        search["minutes"] = minutes
    space = parse_config(SearchSpace, search, f"{config}: search")
    guard_output(out_dir, SEARCH_KIND, overwrite)
    check_writable(out_dir)
    write_marker(out_dir, SEARCH_KIND, SEARCH_ENTRIES)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    err, out = Console(stderr=True, highlight=False), Console(highlight=False)
    with Progress(TextColumn("search"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err) as bar:
        task = bar.add_task("trials", total=space.trials)
        result = run_search(space, train, out_dir, storage or out_dir / "study.db", keep_runs=keep_runs,
                            say=lambda text: bar.console.print(f"[bold]search[/bold] {text}"),
                            on_trial=lambda done: bar.update(task, completed=done))
    rows = front_rows(result)
    if not rows:
        err.print("no trial finished: the front is empty (each trial's error is in its run folder's log and in the "
                  "study)")
        raise typer.Exit(code=1)
    save_front(result, out_dir)
    out.print(front_table(result, _with_configs(out_dir, rows)))
    out.print(str(out_dir / "front.png"))


def _with_configs(out_dir: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for row in rows:
        row["config"] = str(out_dir / "front" / f"trial-{row['trial']:04d}.yaml")
    return rows
