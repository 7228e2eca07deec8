"""Per-tensor numbers of one delta ``ΔW`` against its base tensor ``W``.

* size: ``‖ΔW‖_F``, ``‖ΔW‖_F / ‖W‖_F``; density (exact non-zeros) and ``density_tol`` (``|Δ| > tol``, the
  tolerance of Mukherjee et al., "Reinforcement Learning Finetunes Small Subnetworks", arXiv 2505.11711);
* concentration: the share of ``‖ΔW‖_F²`` held by the largest 1 % and 10 % of entries (1 % and 10 % for an
  update living on 1 % / 10 % of the entries; ≈ 8.5 % and 44 % for i.i.d. Gaussian entries), and quantiles of
  ``|ΔW_ij| / rms(W)`` (how large a typical entry's change is next to a typical weight);
* matrices (2-D): the top singular values of ΔW, its effective rank (Roy & Vetterli 2007) and stable rank, its
  numerical rank over ``min(m, n)`` (``rank_fraction``: the "nearly full-rank updates" measure of Mukherjee et
  al.; ``None`` when the SVD is randomised, which does not see the whole spectrum),
  intruder dimensions of ``W + ΔW`` (Shuttleworth et al. 2024) and the alignment of ΔW with W's top
  singular directions;
* sparse tensors (density below ``sparse_below``): where the entries sit — rows and columns touched, the share
  of entries in the busiest 10 % of rows / columns, and per attention head.

GPT-2's ``Conv1D`` weights are stored ``(in, out)``; they are transposed first so that left singular vectors
always live in the output space, as for ``nn.Linear``.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import Tensor

from deltatune.inspect.linalg import (
    Svd,
    alignment,
    count_intruders,
    effective_rank,
    intruder_similarity,
    numerical_rank,
    stable_rank,
    svd,
)
from deltatune.inspect.options import InspectOptions

CONV1D = ("c_attn", "c_proj", "c_fc", "q_attn")
ROW_HEADS = re.compile(r"(?:^|\.)(query|key|value|q_proj|k_proj|v_proj|c_attn|q_attn)\.weight$")
COL_HEADS = re.compile(r"(?:^|\.)(attention\.output\.dense|o_proj|out_proj|attn\.c_proj)\.weight$")
_BLOCK = re.compile(r"^(.*?(?:^|\.)(?:layers|layer|h|blocks|block|resblocks)\.(\d+)\.)(.+)$")


def locate(key: str) -> tuple[int | None, str]:
    """``(block index, module name inside the block)`` of a tensor name, ``(None, key)`` outside the blocks."""
    match = _BLOCK.match(key)
    return (int(match.group(2)), match.group(3)) if match else (None, key)


def block_path(key: str) -> str | None:
    """The path of the block holding tensor ``key`` (``encoder.block.3``, ``decoder.block.3``), ``None`` outside the
    blocks: an encoder's and a decoder's block N are different blocks."""
    match = _BLOCK.match(key)
    return match.group(1).rstrip(".") if match else None


def canonical(key: str, tensor: Tensor, conv1d: bool | None = None) -> Tensor:
    """``tensor`` in the ``(out, in)`` layout: Conv1D weights (GPT-2) transposed, others unchanged.  ``conv1d``:
    whether the model's ``c_attn``/``c_proj``/``c_fc`` are Conv1D (False for GPTBigCode or Qwen-1, whose modules of
    those names are ``nn.Linear``); ``None`` (model type unknown) decides by the name alone."""
    if conv1d is False:
        return tensor
    module = key.rsplit(".", 2)[-2] if key.count(".") >= 1 else ""
    return tensor.mT if tensor.dim() == 2 and key.endswith(".weight") and module in CONV1D else tensor


def energy_shares(delta: Tensor, fractions: tuple[float, ...] = (0.01, 0.1)) -> list[float]:
    """``Σ_{top ⌈f·n⌉ entries} Δ² / Σ Δ²`` for each ``f`` (nan for a zero tensor)."""
    sq = delta.reshape(-1).square()
    total = float(sq.sum())
    if total == 0:
        return [float("nan")] * len(fractions)
    k_max = max(1, math.ceil(max(fractions) * sq.numel()))
    top = torch.topk(sq, k_max, sorted=True).values.cumsum(0)
    return [float(top[max(1, math.ceil(f * sq.numel())) - 1]) / total for f in fractions]


def abs_quantiles(delta: Tensor, qs: tuple[float, ...] = (0.5, 0.9, 0.99)) -> list[float]:
    """Quantiles of ``|Δ|`` by ``kthvalue`` (exact, no size limit unlike ``torch.quantile``)."""
    flat = delta.reshape(-1).abs()
    n = flat.numel()
    return [float(flat.kthvalue(min(n, max(1, math.ceil(q * n)))).values) for q in qs]


def head_axis(key: str) -> int | None:
    """0 when the heads split the rows (q/k/v projections), 1 when they split the columns (attention output)."""
    if ROW_HEADS.search(key):
        return 0
    if COL_HEADS.search(key):
        return 1
    return None


def placement(mask: Tensor, key: str, head_dim: int | None) -> dict[str, Any]:
    """Where the non-zeros of a 2-D ``mask`` sit: rows/columns touched, the share of entries in the busiest
    10 % of rows/columns (0.1 for an even spread), and the count per attention head when ``key`` is a
    q/k/v/output projection and ``head_dim`` divides its head axis."""
    total = int(mask.sum())
    rows, cols = mask.sum(1), mask.sum(0)

    def busiest(counts: Tensor) -> float:
        k = max(1, math.ceil(0.1 * counts.numel()))
        return float(torch.topk(counts.float(), k).values.sum()) / total if total else float("nan")

    out: dict[str, Any] = {"rows_touched": float((rows > 0).float().mean()),
                           "cols_touched": float((cols > 0).float().mean()),
                           "row_top10_share": busiest(rows), "col_top10_share": busiest(cols)}
    axis = head_axis(key)
    if axis is not None and head_dim and mask.shape[axis] % head_dim == 0:
        per_axis = rows if axis == 0 else cols
        heads = per_axis.reshape(-1, head_dim).sum(1)
        out["head_counts"] = [int(h) for h in heads]
        out["head_max_share"] = float(heads.max()) / total if total else float("nan")
    return out


def tensor_metrics(key: str, label: str, delta: Tensor, base: Tensor | None, base_svd: Svd | None,
                   opts: InspectOptions, head_dim: int | None = None) -> tuple[dict[str, Any], Tensor | None]:
    """The row of numbers for ``ΔW = delta`` (fp32, canonical layout) of tensor ``key`` of input ``label``, and the
    top ``angles_rank`` left singular vectors of ΔW (for principal angles; ``None`` for a vector).

    ``base``/``base_svd`` may be ``None`` (no base weights): the W-relative numbers are then ``None``."""
    layer, module = locate(key)
    numel = delta.numel()
    norm = float(delta.norm())
    row: dict[str, Any] = {"key": key, "input": label, "layer": layer, "module": module,
                           "shape": list(delta.shape), "matrix": delta.dim() == 2 and min(delta.shape) > 1,
                           "numel": numel, "norm": norm}
    base_norm = float(base.norm()) if base is not None else None
    row["rel_norm"] = norm / base_norm if base_norm else None
    nonzero = delta != 0
    row["density"] = float(nonzero.sum()) / numel if numel else float("nan")
    row["density_tol"] = float((delta.abs() > opts.tol).sum()) / numel if numel else float("nan")
    row["top1_energy"], row["top10_energy"] = energy_shares(delta)
    rms = base_norm / math.sqrt(numel) if base_norm else None
    q50, q90, q99 = abs_quantiles(delta)
    row.update({f"rel_entry_{name}": (q / rms if rms else None) for name, q in (("q50", q50), ("q90", q90),
                                                                              ("q99", q99))})
    u_delta = None
    if row["matrix"]:
        d_svd = svd(delta, opts.svd_full_max, opts.svd_rank)
        row["svd_exact"] = d_svd.exact
        row["spectrum"] = [float(s) for s in d_svd.S[: opts.spectrum_len]]
        row["erank"] = effective_rank(d_svd.S) if norm > 0 else 0.0
        row["stable_rank"] = stable_rank(d_svd.S, None if d_svd.exact else norm)
        row["rank_fraction"] = numerical_rank(d_svd.S, delta.shape) / min(delta.shape) if d_svd.exact else None
        rank = min(opts.angles_rank, d_svd.U.shape[1], int((d_svd.S[0] * 1e-6 < d_svd.S).sum()) if norm > 0 else 0)
        u_delta = d_svd.U[:, :rank].contiguous()
        del d_svd
        row["intruder_cos"] = row["intruders"] = row["alignment"] = row["alignment_chance"] = None
        if base is not None and base_svd is not None:
            tuned = svd(base + delta, opts.svd_full_max, opts.svd_rank)
            cos = intruder_similarity(base_svd.U, tuned.U, opts.intruder_k)
            del tuned
            row["intruder_cos"] = [float(c) for c in cos]
            row["intruders"] = count_intruders(cos, opts.epsilon)
            row["alignment"], row["alignment_chance"] = alignment(delta, base_svd.U, base_svd.V, opts.align_k)
        if row["density"] < opts.sparse_below:
            row["placement"] = placement(nonzero, key, head_dim)
    return row, u_delta
