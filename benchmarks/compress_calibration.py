"""ComPEFT's old default (α = 1) against calibrated α and DAREx-q's calibrated q on a real trained delta (the
README's compression table): each compressed delta scored on the delta's own recorded eval data.

Run: ``python benchmarks/compress_calibration.py runs/sst2-sparse/delta [DENSITY=0.1]``; prints JSON.
"""

from __future__ import annotations

import json
import sys
import time

import deltatune
from deltatune.algebra.compress import compress_delta
from deltatune.algebra.compress_calibration import calibrated_compress
from deltatune.api import evaluate_delta


def main() -> None:
    path, density = sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 0.1
    delta = deltatune.load_delta(path)
    start = time.time()
    out = {"delta": path, "density": density, "original": evaluate_delta(delta)["delta"],
           "compeft_alpha1": evaluate_delta(compress_delta(delta, "compeft", density=density, alpha=1.0))["delta"]}
    compeft = calibrated_compress(delta, "compeft", density=density)
    rec = compeft.metrics["compression"][-1]
    out["compeft_calibrated"] = {"alpha": rec["alpha"], "sweep": rec["alpha_sweep"], "on": rec["calibrated_on"],
                                 **evaluate_delta(compeft)["delta"]}
    darex = calibrated_compress(delta, "darex-q", density=density)
    rec = darex.metrics["compression"][-1]
    out["darexq_calibrated"] = {"q": rec["q"], "sweep": rec["q_sweep"], **evaluate_delta(darex)["delta"]}
    out["dare"] = evaluate_delta(compress_delta(delta, "dare", density=density))["delta"]
    out["seconds"] = round(time.time() - start)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
