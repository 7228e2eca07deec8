"""The Pareto front of a finished search: a rich table, a PNG plot and one ``train --config`` YAML per point."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import optuna
import yaml

from deltatune.errors import ConfigError
from deltatune.io.atomic import atomic_file
from deltatune.search.study import SearchResult


def front_rows(result: SearchResult) -> list[dict[str, Any]]:
    """One row per Pareto-optimal trained trial (optuna's non-dominated set; a repeat of a configuration, which
    has its first trial's values, is left out), sorted by parameter count."""
    rows = []
    for trial in result.study.best_trials:
        if "duplicate_of" in trial.user_attrs:
            continue
        row: dict[str, Any] = {"trial": trial.number, "method": trial.user_attrs["method_config"]}
        row.update(dict(zip(result.objectives, trial.values, strict=True)))
        row["params"] = int(row["params"])
        rows.append(row)
    return sorted(rows, key=lambda r: (r["params"], -r["metric"]))


def all_points(result: SearchResult) -> list[tuple[int, float]]:
    """``(params, metric)`` of every trained complete trial (repeats left out), for the plot."""
    done = [t for t in result.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if "duplicate_of" not in t.user_attrs]
    i, j = result.objectives.index("params"), result.objectives.index("metric")
    return [(int(t.values[i]), float(t.values[j])) for t in done]


def run_yaml(result: SearchResult, row: dict[str, Any]) -> dict[str, Any]:
    """``{train: {...}, method: {name: ..., ...}}`` as ``deltatune train --config`` reads it."""
    return {"train": dict(result.train), "method": dict(row["method"])}


def check_writable(folder: Path) -> None:
    """Raise :class:`ConfigError` naming ``folder`` when the plots and configs cannot be written there."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{folder}: cannot create the output folder ({exc.strerror})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"{folder}: the output folder is not writable")


def save_front(result: SearchResult, out: Path) -> list[Path]:
    """Write ``front.json``, ``front.png`` and ``front/trial-NNNN.yaml``; returns the config paths."""
    check_writable(out)
    rows = front_rows(result)
    configs = []
    (out / "front").mkdir(exist_ok=True)
    for row in rows:
        path = out / "front" / f"trial-{row['trial']:04d}.yaml"
        with atomic_file(path) as tmp:
            tmp.write_text(yaml.safe_dump(run_yaml(result, row), sort_keys=False), encoding="utf-8")
        configs.append(path)
        row["config"] = str(path)
    with atomic_file(out / "front.json") as tmp:
        tmp.write_text(json.dumps({"metric": result.metric, "objectives": result.objectives,
                                   "directions": result.directions, "front": rows}, indent=1), encoding="utf-8")
    plot_front(result, rows, out / "front.png")
    return configs


def plot_front(result: SearchResult, rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    pts = all_points(result)
    if pts:
        ax.scatter([p for p, _ in pts], [m for _, m in pts], s=18, c="0.6", label="trials")
    fx, fy = [r["params"] for r in rows], [r["metric"] for r in rows]
    ax.step(fx, fy, where="post", c="C3", lw=1.2)
    ax.scatter(fx, fy, s=36, c="C3", label="Pareto front", zorder=3)
    for r in rows:
        ax.annotate(f"{r['method']['name']}#{r['trial']}", (r["params"], r["metric"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel(result.metric)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("deltatune search")
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def front_table(result: SearchResult, rows: list[dict[str, Any]]):
    from rich.table import Table

    table = Table(title=f"Pareto front ({len(rows)} of {len(result.study.trials)} trials)")
    for col in ("trial", "method", result.metric, "params", *(o for o in result.objectives
                                                              if o not in ("metric", "params")), "config"):
        table.add_column(col)
    for r in rows:
        method = {k: v for k, v in r["method"].items() if k != "name"}
        if isinstance(method.get("targets"), list) and len(method["targets"]) > 3:
            method["targets"] = f"[{len(method['targets'])} modules]"
        extra = [f"{r[o]:.4g}" for o in result.objectives if o not in ("metric", "params")]
        table.add_row(str(r["trial"]), f"{r['method']['name']} {method}", f"{r['metric']:.4f}", str(r["params"]),
                      *extra, r.get("config", ""))
    return table
