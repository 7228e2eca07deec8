"""Where SpIEL's backward time goes, per layer: the sampled weight gradient against LoRA's weight-gradient matmuls.

For one linear layer ``y = x Wᵀ`` with ``T`` tokens, the sparse delta needs ``(gᵀx).flat[indices]`` at its ``k``
trained entries (``k`` = LoRA r's count on that layer, ``r·(d_in + d_out)``, random positions; ``--rank``,
default 8: 4.2 % of MiniLM's 384×384 matrices and 2.6 % of its 1536×384 ones; r = 32: 16.7 % and 10.4 %, around
the 11 % above which the backward switches from the SDDMM to row blocks).  Rows (medians of ``--repeats`` calls,
milliseconds):

* ``sddmm_shipped``      ``deltatune.parts.sparse_grad.sampled_weight_grad`` as the backward calls it for a layer whose
                         input no other layer shares (q, o, down; k and v reuse q's copy of ``xᵀ``): torch's
                         ``sampled_addmm`` on token-major copies of ``gᵀ`` and ``xᵀ`` that
                         ``deltatune.parts.sparse_grad.token_major`` makes, with the cached CSR support;
* ``sddmm_padded``       the same on a padded batch: the share of the tokens that ``benchmarks/train_step.py``'s
                         SST-2 batches pad (counted over its 300 batches, ``padded_fraction`` in the meta; 0.63
                         with ``--quick``) have an all-zero output gradient, which the shipped path leaves out
                         (``live_tokens``);
* ``sddmm_views``        the path before ``token_major``: the same kernel given ``gᵀ`` and ``x`` as strided views,
                         which it makes contiguous itself;
* ``transposes``         ``token_major``'s two copies alone (``gᵀ`` and ``xᵀ``);
* ``transposes_plain``   the same two copies as ``m.t().contiguous()``;
* ``dense_gather``       the dense ``gᵀx`` then the ``k`` entries gathered;
* ``blocked_gather``     ``deltatune.parts.sparse_grad.blocked_weight_grad``, the backward's path above 11 % density:
                         ``gᵀx`` formed a block of rows (≤ 2¹⁷ entries) at a time, each block's entries gathered;
* ``lora_r8``            what LoRA r (``lora_r8`` for r = 8) computes in the same place: ``∂A = (g B)ᵀ x``-style
                         thin matmuls for both factors and the extra input-gradient term ``(g B) A`` (α/r = 1).

``ratio_vs_lora`` divides by the ``lora_r{rank}`` row of the same shape.  Shapes: MiniLM's (384 wide, FFN 1536) at 640
tokens (16 rows × 40, a typical SST-2 batch of ``benchmarks/train_step.py`` after padding to its longest row: its
steps have 600–700 tokens) and the ~54M Llama's (512 wide, FFN 1024) at 512 tokens (4 × 128, as there).  A
power-of-two token count (1,024) makes the transposes several times slower on this CPU (cache-set conflicts), so
it is not used as the typical case.  fp32 on CPU; on a CUDA machine with ``--device cuda`` (cuSPARSE's SDDMM).

Run::

    PYTHONPATH=src python benchmarks/sparse_backward.py --out benchmarks/results/sparse_backward.json
    PYTHONPATH=src python benchmarks/sparse_backward.py --rank 32 --out benchmarks/results/sparse_backward_r32.json
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import StepTimer, machine_meta, ratio, write_report  # noqa: E402

COLUMNS = ("model", "d_out", "d_in", "tokens", "k", "row", "ms", "ratio_vs_lora")
SHAPES = {"minilm": (640, [(384, 384), (1536, 384), (384, 1536)]),
          "llama_50m": (512, [(512, 512), (1024, 512), (512, 1024)])}


def median_ms(fn: Callable[[], Any], repeats: int, cuda: bool) -> float:
    """Median wall time of ``repeats`` calls after 10 warm-up calls (allocator, thread pool, caches), in ms."""
    timer = StepTimer(cuda=cuda)
    for _ in range(10 + repeats):
        with timer.step():
            fn()
    return timer.summary(skip=10)["median_s"] * 1e3


def sddmm_on_views(g: Any, x: Any, support: Any) -> Any:
    """``(gᵀx)`` at the CSR ``support`` by torch's ``sampled_addmm`` on the strided views ``gᵀ`` and ``x`` (it makes
    its own contiguous copies): the shipped path before ``token_major``."""
    import torch

    return torch.sparse.sampled_addmm(support.pattern(g.dtype), g.t(), x, beta=0.0).values()


def padded_fraction() -> float:
    """The share of the positions that are padding in ``benchmarks/train_step.py``'s MiniLM SST-2 batches (16 rows
    padded to the longest, ≤ 64 tokens; 300 batches): what a classifier's backward can leave out."""
    import train_step

    batches, _ = train_step.sst2_batches(train_step.settings(False)["minilm"], 0)
    total = sum(int(b["attention_mask"].numel()) for b in batches)
    return 1 - sum(int(b["attention_mask"].sum()) for b in batches) / total


def layer_rows(model: str, tokens: int, d_out: int, d_in: int, repeats: int, device: str,
               rank: int = 8, padding: float = 0.63) -> list[dict[str, Any]]:
    import torch

    from deltatune.parts.layers import LayerKind
    from deltatune.parts.sparse import index_dtype
    from deltatune.parts.sparse_grad import (
        blocked_weight_grad,
        csr_support,
        row_blocks,
        sampled_weight_grad,
        token_major,
    )

    gen = torch.Generator().manual_seed(0)
    k = rank * (d_in + d_out)
    idx = torch.randperm(d_out * d_in, generator=gen)[:k].sort().values.to(index_dtype(d_out * d_in)).to(device)
    support = csr_support(idx, (d_out, d_in))
    blocks = row_blocks(idx, (d_out, d_in))  # kept between backwards, as a SparsePart keeps them
    g = torch.randn(tokens, d_out, generator=gen).to(device)
    x = torch.randn(tokens, d_in, generator=gen).to(device)
    a = torch.randn(rank, d_in, generator=gen).to(device)
    b = torch.randn(d_out, rank, generator=gen).to(device)
    flat = idx.long()
    padded = g.clone()
    padded[torch.randperm(tokens, generator=gen)[:round(padding * tokens)].to(device)] = 0

    def lora() -> None:
        gb = g @ b                    # (T, r)
        _ = gb.t() @ x                # ∂A
        _ = g.t() @ (x @ a.t())       # ∂B
        _ = gb @ a                    # the extra term of ∂x

    variants = {
        "sddmm_shipped": lambda: sampled_weight_grad(LayerKind.LINEAR, x, g, (d_out, d_in), idx, support),
        "sddmm_padded": lambda: sampled_weight_grad(LayerKind.LINEAR, x, padded, (d_out, d_in), idx, support),
        "sddmm_views": lambda: sddmm_on_views(g, x, support),
        "transposes": lambda: (token_major(g), token_major(x)),
        "transposes_plain": lambda: (g.t().contiguous(), x.t().contiguous()),
        "dense_gather": lambda: (g.t() @ x).reshape(-1).index_select(0, flat),
        "blocked_gather": lambda: blocked_weight_grad(LayerKind.LINEAR, x, g, (d_out, d_in), idx, blocks=blocks),
        f"lora_r{rank}": lora,
    }
    reference = variants["dense_gather"]()
    for name in ("sddmm_shipped", "sddmm_views", "blocked_gather"):  # each computes the same k entries
        torch.testing.assert_close(variants[name](), reference, rtol=1e-4, atol=1e-3, msg=lambda m, n=name: f"{n}: {m}")
    torch.testing.assert_close(variants["sddmm_padded"](), (padded.t() @ x).reshape(-1).index_select(0, flat),
                               rtol=1e-4, atol=1e-3)
    rows = [{"model": model, "d_out": d_out, "d_in": d_in, "tokens": tokens, "k": k, "row": name,
             "ms": round(median_ms(fn, repeats, device.startswith("cuda")), 4)} for name, fn in variants.items()]
    lora_ms = next(r["ms"] for r in rows if r["row"] == f"lora_r{rank}")
    for r in rows:
        r["ratio_vs_lora"] = ratio(r["ms"], lora_ms)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results/sparse_backward.json", help="JSON output; FILE.md beside it")
    ap.add_argument("--repeats", type=int, default=100, help="timed calls per row (median reported)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--quick", action="store_true", help="10 repeats, MiniLM shapes only")
    ap.add_argument("--rank", type=int, default=8, help="k = LoRA r's trainable count per layer, r·(d_in + d_out)")
    args = ap.parse_args(argv)
    repeats = 10 if args.quick else args.repeats
    padding = 0.63 if args.quick else round(padded_fraction(), 4)
    rows = []
    for model, (tokens, shapes) in SHAPES.items():
        if args.quick and model != "minilm":
            continue
        for d_out, d_in in shapes:
            rows += layer_rows(model, tokens, d_out, d_in, repeats, args.device, args.rank, padding)
    meta = {**machine_meta(), "repeats": repeats, "device": args.device, "rank": args.rank,
            "padded_fraction": padding}
    print(write_report(args.out, meta, rows, COLUMNS, title=f"SpIEL's sampled weight gradient vs LoRA r={args.rank}, "
                                                           f"per layer ({args.device})"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
