"""PNG plots of an inspect report, drawn with matplotlib's object API on the Agg canvas (no pyplot state).

Each function takes the report dict and a path, draws one figure and returns the path (``None`` when the
report has nothing to show, e.g. pairwise plots for one input).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

DPI = 90


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path, left: float = 0.12, wspace: float = 0.3, top: float = 0.88) -> Path:
    fig.subplots_adjust(left=left, right=0.97, bottom=0.16, top=top, wspace=wspace)
    fig.savefig(path, format="png", dpi=DPI)
    return path


def _short(module: str) -> str:
    return module.removesuffix(".weight").replace("attention.", "attn.").replace("self.", "")


def grid(rows: list[dict[str, Any]], label: str, name: str) -> tuple[list[str], list[int], list[list[float]]]:
    """``(modules, layers, values[module][layer])`` of field ``name`` for one input's block tensors (nan: absent)."""
    mine = [r for r in rows if r["input"] == label and r["layer"] is not None and r["matrix"]]
    modules = sorted({r["module"] for r in mine})
    layers = sorted({r["layer"] for r in mine})
    values = [[math.nan] * len(layers) for _ in modules]
    for r in mine:
        v = r.get(name)
        if v is not None:
            values[modules.index(r["module"])][layers.index(r["layer"])] = float(v)
    return modules, layers, values


def heatmaps(report: dict[str, Any], name: str, title: str, path: Path, log: bool = False) -> Path | None:
    """One panel per input: ``name`` per module (rows) × block (columns); ``log`` shows ``log10`` of the values."""
    labels = [s["input"] for s in report["summaries"]]
    grids = [grid(report["layers"], lab, name) for lab in labels]
    if not any(g[0] for g in grids):
        return None
    height = max(2.5, 0.3 * max(len(g[0]) for g in grids) + 1.2)
    fig = _figure(min(4.2 * len(labels), 16), height)
    axes = fig.subplots(1, len(labels), squeeze=False)[0]
    for ax, lab, (modules, layers, values) in zip(axes, labels, grids, strict=True):
        finite = [v for row in values for v in row if not math.isnan(v)]
        if not modules or not finite:
            ax.set_axis_off()
            ax.set_title(f"{lab}\n(no values)", fontsize=8)
            continue
        if log:
            values = [[math.log10(v) if v > 0 else math.nan for v in row] for row in values]
        im = ax.imshow(values, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_yticks(range(len(modules)), [_short(m) for m in modules], fontsize=7)
        ax.set_xticks(range(len(layers)), [str(x) for x in layers], fontsize=7)
        ax.set_xlabel("block", fontsize=8)
        ax.set_title(lab, fontsize=9)
        fig.colorbar(im, ax=ax, shrink=0.8).ax.tick_params(labelsize=7)
    fig.suptitle(f"log10 {title}" if log else title, fontsize=10)
    return _save(fig, path, left=0.3 / len(labels), wspace=0.9, top=0.8)


def spectra(report: dict[str, Any], path: Path) -> Path | None:
    """Median (over matrices) of ``σ_i(ΔW) / σ_1(ΔW)`` per input, log scale."""
    fig = _figure(5.5, 3.6)
    ax = fig.subplots()
    drawn = False
    for s in report["summaries"]:
        curves = [r["spectrum"] for r in report["layers"] if r["input"] == s["input"] and r.get("spectrum")
                  and r["spectrum"][0] > 0]
        if not curves:
            continue
        length = max(len(c) for c in curves)
        med = []
        for i in range(length):  # the median over the matrices that have an i-th singular value
            vals = sorted(c[i] / c[0] for c in curves if len(c) > i)
            med.append(max(vals[len(vals) // 2], 1e-12))
        ax.plot(range(1, length + 1), med, marker=".", label=f"{s['input']} (median erank "
                f"{s['erank_median']:.1f})" if s.get("erank_median") is not None else s["input"])
        drawn = True
    if not drawn:
        return None
    ax.set_yscale("log")
    ax.set_xlabel("singular value index i")
    ax.set_ylabel("σ_i(ΔW) / σ_1(ΔW), median over matrices")
    ax.set_title("spectrum of the update", fontsize=10)
    ax.legend(fontsize=7)
    return _save(fig, path)


def intruders(report: dict[str, Any], path: Path) -> Path | None:
    """Total intruder dimensions over all matrices against the threshold ε (the paper's sweep)."""
    curve = report["intruder_curve"]
    if not any(r.get("intruder_cos") for r in report["layers"]):
        return None
    fig = _figure(5.5, 3.6)
    ax = fig.subplots()
    for s in report["summaries"]:
        ax.plot(curve["epsilons"], curve[s["input"]], marker="o", label=s["input"])
    eps = report["options"]["epsilon"]
    ax.axvline(eps, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("ε (intruder if max |cos| with every singular vector of W < ε)")
    where = "block matrices" if curve.get("in_blocks") else "matrices"
    ax.set_ylabel(f"intruders in top-{report['options']['intruder_k']}, sum over {curve['matrices']} {where}",
                  fontsize=8)
    ax.set_title("intruder dimensions of W + ΔW", fontsize=10)
    ax.legend(fontsize=7)
    return _save(fig, path)


def concentration(report: dict[str, Any], path: Path) -> Path | None:
    """Left: per input, density and the share of ‖ΔW‖² in the largest 1 % / 10 % of entries.  Right: the median
    over tensors of the 50/90/99 % quantiles of ``|ΔW_ij| / rms(W)`` (how big entries' changes are, log scale)."""
    sums = report["summaries"]
    fig = _figure(10, 3.6)
    ax, sizes = fig.subplots(1, 2)
    fields = (("density", "density (non-zero)"), ("top1_energy", "energy in top 1 %"),
              ("top10_energy", "energy in top 10 %"))
    width = 0.8 / len(fields)
    for k, (name, label) in enumerate(fields):
        vals = [s[name] if s[name] is not None else 0.0 for s in sums]
        ax.bar([i + k * width for i in range(len(sums))], vals, width, label=label)
    ax.set_xticks([i + width for i in range(len(sums))], [s["input"] for s in sums], fontsize=8)
    ax.set_ylim(0, 1.25)
    ax.set_title("how concentrated the update is", fontsize=10)
    ax.legend(fontsize=7, loc="upper center", ncols=3)
    quantiles = ("q50", "q90", "q99")
    drawn = False
    for k, q in enumerate(quantiles):
        vals = []
        for s in sums:
            found = sorted(r[f"rel_entry_{q}"] for r in report["layers"]
                           if r["input"] == s["input"] and r.get(f"rel_entry_{q}") is not None)
            vals.append(found[len(found) // 2] if found else 0.0)
        drawn = drawn or any(v > 0 for v in vals)
        sizes.bar([i + k * width for i in range(len(sums))], [max(v, 1e-9) for v in vals], width,
                  label=f"{q[1:]} % quantile")
    sizes.set_xticks([i + width for i in range(len(sums))], [s["input"] for s in sums], fontsize=8)
    if drawn:
        sizes.set_yscale("log")
        sizes.set_ylim(bottom=1e-5)
    sizes.set_ylabel("|ΔW_ij| / rms(W), median over tensors", fontsize=8)
    sizes.set_title("how large the entries' changes are", fontsize=10)
    sizes.legend(fontsize=7)
    return _save(fig, path, left=0.07, wspace=0.25)


def pairwise(report: dict[str, Any], path: Path) -> Path | None:
    """Model-level cosine between inputs (matrix) and per-block mean cosine for each pair."""
    pairs = report["pairs_summary"]
    if not pairs:
        return None
    labels = [s["input"] for s in report["summaries"]]
    n = len(labels)
    fig = _figure(10, 3.8)
    left, right = fig.subplots(1, 2)
    mat = [[1.0 if i == j else math.nan for j in range(n)] for i in range(n)]
    for p in pairs:
        i, j = labels.index(p["a"]), labels.index(p["b"])
        mat[i][j] = mat[j][i] = p["cosine"] if p["cosine"] is not None else math.nan
    im = left.imshow(mat, vmin=-1, vmax=1, cmap="coolwarm")
    left.set_xticks(range(n), labels, fontsize=7, rotation=30)
    left.set_yticks(range(n), labels, fontsize=7)
    for i in range(n):
        for j in range(n):
            if not math.isnan(mat[i][j]):
                left.text(j, i, f"{mat[i][j]:.2f}", ha="center", va="center", fontsize=7)
    left.set_title("cosine of the whole deltas", fontsize=9)
    fig.colorbar(im, ax=left, shrink=0.8)
    layer_of = {x["key"]: x["layer"] for x in report["layers"]}
    for p in pairs:
        by_layer: dict[int, list[float]] = {}
        for r in report["pairs"]:
            if r["a"] == p["a"] and r["b"] == p["b"] and r["cosine"] is not None:
                layer = layer_of.get(r["key"])
                if layer is not None:
                    by_layer.setdefault(layer, []).append(r["cosine"])
        if by_layer:
            xs = sorted(by_layer)
            right.plot(xs, [sum(by_layer[x]) / len(by_layer[x]) for x in xs], marker="o", label=f"{p['a']}–{p['b']}")
            right.set_xticks(xs)
    right.axhline(0, color="grey", linewidth=0.8)
    right.set_xlabel("block")
    right.set_ylabel("mean cosine over the block's tensors")
    right.set_title("similarity per block", fontsize=9)
    right.legend(fontsize=7)
    return _save(fig, path, left=0.08)


def draw_all(report: dict[str, Any], folder: Path) -> dict[str, Path]:
    """Every plot the report supports, into ``folder``: ``{name: path}``."""
    made = {
        "rel_norm": heatmaps(report, "rel_norm", "‖ΔW‖ / ‖W‖ per module and block", folder / "rel_norm.png", log=True),
        "erank": heatmaps(report, "erank", "effective rank of ΔW", folder / "erank.png"),
        "intruders_map": heatmaps(report, "intruders", f"intruder dimensions (ε = {report['options']['epsilon']})",
                                  folder / "intruders_map.png"),
        "density": heatmaps(report, "density", "density of ΔW (non-zero share)", folder / "density.png"),
        "spectra": spectra(report, folder / "spectra.png"),
        "intruders": intruders(report, folder / "intruders.png"),
        "concentration": concentration(report, folder / "concentration.png"),
        "pairwise_cosine": pairwise(report, folder / "pairwise_cosine.png"),
    }
    return {k: v for k, v in made.items() if v is not None}
