"""``deltatune compress DELTA --method compeft --density 0.1 [--alpha A] [--q Q] [--dtype int8|bf16|fp16]
[--rank R] [--scope global|tensor|row] [--target factors|product] [--seed S] [--model DIR] [--data FILE]
[--calibration-rows N] [--out DIR] [--overwrite] [--no-verify]``.

ComPEFT's ``--alpha`` and DAREx-q's ``--q`` have no lossy default: when not given they are calibrated on the
delta's own eval data (recorded in its provenance) or on ``--data``, by the task's metric
(:mod:`deltatune.algebra.compress_calibration`); a delta with no recorded task is refused with a message saying
to pass ``--alpha``/``--q``.

Compresses a delta (ComPEFT, DARE, DAREx-q, magnitude, quantisation or a low-rank LoRA extraction; see
:mod:`deltatune.algebra.compress`) and writes it in the compact format (the normal format for
``lowrank``, so ``deltatune export --format peft`` reads it directly), then prints the bytes before and
after.  The flags given become the method's typed options through the same parse as
:func:`deltatune.algebra.compress.compress_delta` (:func:`deltatune.algebra.compress_config.parse_compress_options`):
a flag the method does not take is an error that lists the method's options.  Heavy imports happen inside the
command so ``deltatune --help`` stays fast.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer

from deltatune.commands.options import NoVerify, Overwrite
from deltatune.io.outputs import folder_bytes


def compress_command(
    delta: Annotated[Path, typer.Argument(help="delta folder (deltatune, compact or PEFT LoRA)")],
    method: Annotated[str, typer.Option(help="compeft, dare, darex-q, magnitude, quantize or lowrank")] = "compeft",
    density: Annotated[float | None, typer.Option(help="fraction of entries kept (compeft, dare, darex-q, "
                                                       "magnitude)")] = None,
    alpha: Annotated[float | None, typer.Option(help="compeft: values become ±alpha·σ (default: the best of 0.5 … "
                                                     "10 on the eval data)")] = None,
    q: Annotated[float | None, typer.Option("--q", help="darex-q: rescale 1/q, q in [density, 1] (default: the best "
                                                       "of a grid on the eval data)")] = None,
    dtype: Annotated[str | None, typer.Option(help="int8, bf16 or fp16 (quantize; rounds dare/magnitude "
                                                   "values)")] = None,
    rank: Annotated[int | None, typer.Option(help="lowrank: rank of every LoRA part")] = None,
    scope: Annotated[str | None, typer.Option(help="global or tensor statistics (quantize: tensor or row "
                                                   "scales; default row)")] = None,
    target: Annotated[str | None, typer.Option(help="LoRA parts: factors (A and B) or product (B·A → sparse; "
                                                    "compeft, dare, darex-q, magnitude)")] = None,
    seed: Annotated[int, typer.Option(help="seed of the random masks (dare, darex-q) and randomized SVD")] = 0,
    model: Annotated[str | None, typer.Option(help="base-model folder (lowrank on dense deltas, calibration; "
                                                   "default: as trained)")] = None,
    data: Annotated[str | None, typer.Option(help="compeft/darex-q: eval file to calibrate alpha/q on (default: "
                                                  "the delta's recorded eval data)")] = None,
    calibration_rows: Annotated[int, typer.Option(help="eval rows scored per calibration candidate (a seeded "
                                                       "sample)")] = 500,
    out_dir: Annotated[Path | None, typer.Option("--out", help="folder to write (default: DELTA-METHOD)")] = None,
    overwrite: Overwrite = False,
    verify: NoVerify = True,
) -> None:
    """Compress a delta and report original vs compressed bytes on disk.

    Options by method: compeft (density, alpha, scope, target, seed); magnitude (density, dtype, scope, target,
    seed); dare (density, dtype, scope, target, seed); darex-q (density, q, dtype, scope, target, seed);
    quantize (dtype, scope, target, seed); lowrank (rank, dtype, scope, target, seed).
    """
    from rich.console import Console
    from rich.table import Table

    from deltatune.algebra.compress import compress_delta
    from deltatune.algebra.compress_calibration import calibrated_compress, needs_calibration
    from deltatune.algebra.compress_config import CONFIGS, options_help, parse_compress_options
    from deltatune.api import as_delta, load_base_for
    from deltatune.errors import ConfigError
    from deltatune.io.compact_format import save_compact
    from deltatune.io.outputs import COMPACT_KIND, DELTA_KIND, guard_output

    if scope is None and method == "quantize":
        scope = "row"
    flags = {"density": density, "alpha": alpha, "q": q, "dtype": dtype, "rank": rank, "scope": scope,
             "target": target, "seed": seed}
    try:
        config = parse_compress_options(method, flags)  # before the output folder and the delta are touched
    except ConfigError as exc:
        if method not in CONFIGS:
            raise
        raise ConfigError(f"{exc}\n{method} options:\n{options_help(method)}") from None
    options = dataclasses.asdict(config)
    out_dir = out_dir or delta.with_name(f"{delta.name}-{method}")
    guard_output(out_dir, DELTA_KIND if method == "lowrank" else COMPACT_KIND, overwrite)  # before the work
    d = as_delta(delta, verify=verify)
    base = None
    if method == "lowrank" and any(p.base_dependent or (p.factors() is None and p.layer_kind() is None)
                                   for p in d.parts.values()):  # DoRA's, (IA)³'s, SSF's ΔW reads the base
        base = load_base_for(d, model)
    if needs_calibration(method, options):  # no lossy default: alpha / q chosen on eval data (or refused)
        compressed = calibrated_compress(d, method, data=data, model=model, limit=calibration_rows, **options)
    else:
        compressed = compress_delta(d, method, model=base, **options)
    report = None
    if method == "lowrank":
        compressed.save(out_dir, overwrite=overwrite)
        new_bytes = folder_bytes(out_dir)
    else:
        report = save_compact(compressed, out_dir, overwrite=overwrite)
        new_bytes = folder_bytes(out_dir)  # as `deltatune info` and the original's size count it (marker aside)
    old_bytes = folder_bytes(delta)
    result = compressed.metrics["compression"][-1]
    table = Table(show_header=False, box=None)
    rows = [("method", method), ("original bytes", f"{old_bytes:,}"), ("compressed bytes", f"{new_bytes:,}"),
            ("ratio", f"{old_bytes / new_bytes:.2f}×")]
    if "density_achieved" in result:
        rows.append(("density", f"{result['density_achieved']:.4%}"))
    for key in ("alpha", "q", "sigma", "threshold"):
        if isinstance(result.get(key), float):
            rows.append((key, f"{result[key]:.6g}"))
    if "calibrated_on" in result:
        where = result["calibrated_on"]
        sweep = result.get("alpha_sweep") or result.get("q_sweep") or {}
        rows.append(("calibrated on", f"{where['rows']} rows of {where['data']} ({where['metric']})"))
        rows.append(("candidates", ", ".join(f"{float(k):.3g}: {v:.4f}" for k, v in sweep.items())))
    if method == "lowrank":
        errors = [m["relative_error"] for m in result["modules"].values()]
        rows.append(("max relative error", f"{max(errors, default=0.0):.4f}"))
    for key, value in rows:
        table.add_row(f"[bold]{key}[/bold]", value)
    out = Console(highlight=False)
    out.print(table)
    if report is not None:
        parts = Table("component", "bytes", title="compact format", title_justify="left")
        for name, size in report.by_component().items():
            if size:
                parts.add_row(name, f"{size:,}")
        out.print(parts)
    out.print(str(out_dir))
