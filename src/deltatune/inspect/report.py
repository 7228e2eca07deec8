"""Writing an inspect report: ``report.json``, the PNG plots and one self-contained ``report.html`` (the PNGs
embedded as base64 ``data:`` URIs), committed atomically as a folder of kind ``inspect_report``."""

from __future__ import annotations

import base64
import html
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from deltatune.inspect.errors import OutputNotWritable
from deltatune.inspect.options import InspectOptions

REPORT_KIND = "inspect_report"
SUMMARY_COLUMNS = (("density", "density", "{:.4f}"), ("rel_norm", "‖ΔW‖/‖W‖", "{:.4g}"),
                   ("top1_energy", "energy top 1%", "{:.3f}"), ("top10_energy", "energy top 10%", "{:.3f}"),
                   ("rel_entry_q50", "median |Δ|/rms(W)", "{:.3g}"), ("erank_median", "erank (median)", "{:.1f}"),
                   ("rank_fraction_mean", "rank / min(m,n)", "{:.3f}"),
                   ("alignment_median", "align top-k", "{:.3f}"), ("alignment_chance_median", "align chance", "{:.3f}"),
                   ("intruders_total", "intruders", "{}"), ("matrices_with_intruders", "matrices w/ intruders", "{}"))
LAYER_COLUMNS = (("rel_norm", "‖ΔW‖/‖W‖", "{:.4g}"), ("density", "density", "{:.4f}"),
                 ("top10_energy", "energy top 10%", "{:.3f}"), ("erank", "erank", "{:.1f}"),
                 ("intruders", "intruders", "{}"), ("alignment", "align top-k", "{:.3f}"))
BLOCK_COLUMNS = (("density", "density (mean over changed tensors)", "{:.4f}"), ("density_tol", "|Δ| > tol", "{:.4f}"),
                 ("rank_fraction", "rank / min(m,n)", "{:.3f}"))
PAIR_COLUMNS = (("cosine", "cosine", "{:.4f}"), ("subspace_overlap", "subspace overlap", "{:.3f}"),
                ("sign_agreement", "sign agreement", "{:.3f}"), ("conflict_mass", "TIES conflict mass", "{:.3f}"),
                ("support_jaccard", "support Jaccard", "{:.3f}"),
                ("support_jaccard_chance", "Jaccard (chance)", "{:.3f}"),
                ("trimmed_jaccard", "top-20% Jaccard", "{:.3f}"),
                ("trimmed_jaccard_chance", "top-20% (chance)", "{:.3f}"))


def fmt(value: Any, pattern: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return pattern.format(value)


def check_writable(out: Path, overwrite: bool) -> None:
    """:class:`OutputNotWritable` unless a report folder can be created at ``out`` (a temporary file is created
    and removed in its nearest existing ancestor); the existing-output rule of ``guard_output`` also applies."""
    from deltatune.io.outputs import guard_output

    parent = out
    while not parent.exists():
        if parent.parent == parent:
            break
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise OutputNotWritable(f"report folder {out}: {parent} is a file, not a folder")
    probe_dir = out if out.is_dir() else parent
    try:
        fd, name = tempfile.mkstemp(prefix=".inspect-probe-", dir=probe_dir)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise OutputNotWritable(f"report folder {out} cannot be written: {probe_dir} is not writable "
                                f"({exc.strerror or exc})") from None
    if out.is_dir() and probe_dir == out and not os.access(out.parent, os.W_OK | os.X_OK):
        raise OutputNotWritable(f"report folder {out} cannot be replaced: its parent {out.parent} is not writable")
    guard_output(out, REPORT_KIND, overwrite)


def _table(rows: list[dict[str, Any]], columns: tuple[tuple[str, str, str], ...], first: tuple[str, ...]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in first) + "".join(
        f"<th>{html.escape(title)}</th>" for _, title, _ in columns)
    body = ""
    for r in rows:
        cells = "".join(f"<td>{html.escape(str(r[c]))}</td>" for c in first)
        cells += "".join(f"<td>{html.escape(fmt(r.get(k), p))}</td>" for k, _, p in columns)
        body += f"<tr>{cells}</tr>\n"
    return f"<table><tr>{head}</tr>\n{body}</table>"


def render_html(report: dict[str, Any], images: dict[str, Path]) -> str:
    """The report as one HTML page, every PNG inlined (no external file is referenced)."""
    rec = report["recommendation"]
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>deltatune inspect</title><style>",
             "body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px;text-align:right}"
             "img{max-width:100%;margin:0.5em 0}</style></head><body>",
             "<h1>deltatune inspect</h1>",
             f"<p>base: <code>{html.escape(str(report['base']))}</code></p>",
             "<h2>Inputs</h2>", _table(report["summaries"], SUMMARY_COLUMNS, ("input", "tensors", "matrices"))]
    if report["pairs_summary"]:
        parts += ["<h2>Between inputs</h2>", _table(report["pairs_summary"], PAIR_COLUMNS, ("a", "b", "tensors"))]
    parts.append(f"<h2>Merge suggestion (heuristic)</h2><p><b>{html.escape(str(rec['method']))}</b> "
                 f"(rule {rec['rule']}): {html.escape(rec['why'])}</p>")
    for note in report["notes"]:
        parts.append(f"<p><i>{html.escape(note)}</i></p>")
    if report.get("per_layer"):
        parts.append("<details><summary>per block</summary>"
                     + _table(report["per_layer"], BLOCK_COLUMNS, ("input", "block", "tensors")) + "</details>")
    parts.append("<details><summary>per tensor</summary>"
                 + _table(report["layers"], LAYER_COLUMNS, ("input", "key")) + "</details>")
    for name, path in images.items():
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        parts.append(f"<h3>{html.escape(name)}</h3><img alt='{html.escape(name)}' src='data:image/png;base64,{data}'>")
    parts.append("</body></html>")
    return "\n".join(parts)


def report_json(report: Any, indent: int | None = None) -> str:
    """``report`` as strict JSON: NaN and ±∞ (a zero update's relative numbers, an undefined ratio) become
    ``null``, which every JSON parser reads (bare ``NaN`` is Python's extension, refused by strict parsers)."""
    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    return json.dumps(clean(report), indent=indent, default=str, allow_nan=False)


def write_report(report: dict[str, Any], out: Path, opts: InspectOptions) -> Path:
    """``report.json`` (+ plots and ``report.html`` when ``opts.plots``) into ``out``, atomically."""
    from deltatune.inspect.plots import draw_all
    from deltatune.io.atomic import atomic_dir

    try:
        with atomic_dir(out, REPORT_KIND, overwrite=opts.overwrite) as tmp:
            (tmp / "report.json").write_text(report_json(report, indent=1), encoding="utf-8")
            if opts.plots:
                images = draw_all(report, tmp)
                (tmp / "report.html").write_text(render_html(report, images), encoding="utf-8")
                report["plots"] = {k: str(out / v.name) for k, v in images.items()}
    except PermissionError as exc:
        raise OutputNotWritable(f"report folder {out} cannot be written ({exc.strerror or exc})") from None
    return out


def print_summary(report: dict[str, Any], console: Any) -> None:
    """The terminal summary: a metric × input table, a metric × pair table, the suggestion and notes."""
    from rich.table import Table

    sums = report["summaries"]
    table = Table("per delta", *(s["input"] for s in sums))
    for key, title, pattern in SUMMARY_COLUMNS:
        table.add_row(title, *(fmt(s.get(key), pattern) for s in sums))
    console.print(table)
    if report["pairs_summary"]:
        pairs = report["pairs_summary"]
        between = Table("between deltas", *(f"{p['a']} · {p['b']}" for p in pairs))
        for key, title, pattern in PAIR_COLUMNS:
            between.add_row(title, *(fmt(p.get(key), pattern) for p in pairs))
        if report.get("group_conflict_mass") is not None:
            console.print(f"TIES conflict mass over all inputs together: {report['group_conflict_mass']:.3f}")
        console.print(between)
    rec = report["recommendation"]
    console.print(f"merge suggestion (heuristic): {rec['method']} — {rec['why']}")
    for note in report["notes"]:
        console.print(f"note: {note}")
    if report.get("plots"):
        console.print(f"report: {Path(next(iter(report['plots'].values()))).parent / 'report.html'}")
