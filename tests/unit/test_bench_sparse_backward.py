"""benchmarks/sparse_backward.py: every timed path computes the same gradient entries, and the report has its rows."""

from __future__ import annotations

import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def test_quick_run_writes_one_row_per_variant_and_shape(tmp_path, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(BENCH))
    import sparse_backward

    out = tmp_path / "sb.json"
    assert sparse_backward.main(["--quick", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["row"] for r in rows} == {"sddmm_shipped", "sddmm_padded", "sddmm_views", "transposes",
                                        "transposes_plain", "dense_gather", "blocked_gather", "lora_r8"}
    assert len(rows) == 8 * len(sparse_backward.SHAPES["minilm"][1])
    assert all(r["ms"] > 0 for r in rows) and all(r["ratio_vs_lora"] == 1 for r in rows if r["row"] == "lora_r8")
    assert all(r["k"] == 8 * (r["d_in"] + r["d_out"]) for r in rows)
    assert out.with_suffix(".md").read_text().count("sddmm_shipped") == 3
    sys.modules.pop("sparse_backward", None)
