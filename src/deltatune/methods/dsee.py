"""DSEE: sparse + low-rank together (Chen et al., "DSEE: Dually Sparsity-embedded Efficient Tuning of Pre-trained
Language Models", ACL 2023; arXiv 2111.00160), ``ΔW = s · (B A + S)``, ``S`` on a fixed support ``Ω`` of ``N``
entries per target (the paper's ``num_sparse``).

``Ω`` comes from a decomposition of the *pretrained* weight ``W ≈ L + S₀`` (``L`` of rank ``r_Ω``, ``S₀`` sparse):
the reference uses GreBsmo (greedy bilateral smoothing, rank grown 5 rows at a time); here a fixed-rank GoDec-style
alternation (Zhou & Tao, ICML 2011) computes the same kind of split, :func:`sparse_support`:
``L ← SVD_r(W − S₀)``, ``S₀ ← P_N(W − L)`` (the ``N`` largest-magnitude entries), ``Ω = supp(S₀)``.
``selection="magnitude"`` takes the ``N`` largest ``|W|`` instead, ``"random"`` a seeded random support.
Defaults: W_q and W_v as in the paper's scripts; ``r = 8`` (the scripts' 16, lowered for small models), ``α = 2r``
(``s = 2``); ``N = 64``, between the RTE/SST-2 scripts' 16 and the code's default 128.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from deltatune.config import require, seed_option
from deltatune.errors import ConfigError
from deltatune.methods.registry import Method, register_method
from deltatune.methods.targets import one_per_weight, select_modules
from deltatune.model import get_module
from deltatune.parts.dsee import DSEEPart
from deltatune.parts.layers import in_out_features, layer_kind

#: the paper's targets (query and value projections), by ``model.config.model_type``
DEFAULT_TARGETS = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"],
                   "roberta": ["query", "value"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"]}


@dataclass
class DSEEConfig:
    method: ClassVar[str] = "dsee"
    r: int = field(default=8, metadata={"help": "rank of B·A"})
    alpha: float = field(default=16.0, metadata={"help": "low-rank scale numerator: s = alpha/r"})
    num_sparse: int = field(default=64, metadata={"help": "N: sparse entries per target weight"})
    selection: Literal["decomposition", "magnitude", "random"] = field(
        default="decomposition", metadata={"help": "support Ω: sparse part of W ≈ L + S (decomposition), top |W| "
                                                   "(magnitude) or random"})
    decomposition_rank: int = field(default=8, metadata={"help": "rank of L in the decomposition W ≈ L + S"})
    decomposition_iters: int = field(default=3, metadata={"help": "alternations of the decomposition"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the low-rank branch input"})
    targets: list[str] | None = field(default=None, metadata={"help": "module-name patterns (default: the "
                                                                      "attention query and value projections)"})
    seed: int = seed_option("seed of the random support")

    def __post_init__(self) -> None:
        require(self.r >= 1, f"dsee config.r must be ≥ 1, got {self.r}")
        require(self.alpha > 0, f"dsee config.alpha must be > 0, got {self.alpha}")
        require(self.num_sparse >= 1, f"dsee config.num_sparse must be ≥ 1, got {self.num_sparse}")
        require(self.selection in ("decomposition", "magnitude", "random"),
                f"dsee config.selection must be decomposition, magnitude or random, got {self.selection!r}")
        require(self.decomposition_rank >= 1 and self.decomposition_iters >= 1,
                "dsee config.decomposition_rank and decomposition_iters must be ≥ 1")
        require(0.0 <= self.dropout < 1.0, f"dsee config.dropout must be in [0, 1), got {self.dropout}")
        require(self.targets is None or len(self.targets) > 0, "dsee config.targets is empty")


@torch.no_grad()
def sparse_support(weight: Tensor, n: int, rank: int, iters: int) -> Tensor:
    """Sorted flat indices of ``Ω = supp(S)`` for ``W ≈ L + S``, ``rank(L) ≤ rank``, ``‖S‖₀ = n`` (GoDec-style
    alternation, Zhou & Tao 2011, as DSEE's GreBsmo split: ``L ← SVD_r(W − S)``, ``S ← P_n(W − L)``)."""
    w = weight.detach().float().reshape(weight.shape[0], -1)
    s = torch.zeros_like(w)
    rank = min(rank, *w.shape)
    idx = torch.empty(0, dtype=torch.int64)
    for _ in range(iters):
        u, sig, vh = torch.linalg.svd(w - s, full_matrices=False)
        low = (u[:, :rank] * sig[:rank]) @ vh[:rank]
        resid = (w - low).reshape(-1)
        idx = resid.abs().topk(n).indices
        s = torch.zeros_like(resid).index_copy_(0, idx, resid.index_select(0, idx)).view_as(w)
    return idx.sort().values


def choose_support(weight: Tensor, config: DSEEConfig, gen: torch.Generator) -> Tensor:
    n = config.num_sparse
    if config.selection == "random":
        return torch.randperm(weight.numel(), generator=gen)[:n].sort().values
    if config.selection == "magnitude":
        return weight.detach().reshape(-1).abs().topk(n).indices.sort().values.cpu()
    return sparse_support(weight, n, config.decomposition_rank, config.decomposition_iters).cpu()


@register_method
class DSEE(Method):
    name = "dsee"
    config_cls = DSEEConfig
    summary = "DSEE: low-rank B·A plus a sparse S on a support from the decomposition W ≈ L + S"
    part_kinds = (DSEEPart,)
    examples = {"": {"r": 2, "alpha": 4.0, "num_sparse": 20},
                "random": {"r": 2, "alpha": 4.0, "num_sparse": 20, "selection": "random", "targets": ["all-linear"]}}
    default_lr = 5e-4

    def create_parts(self, model: nn.Module, config: DSEEConfig, exclude: list[str]) -> dict[str, DSEEPart]:
        targets = config.targets
        if targets is None:
            model_type = getattr(getattr(model, "config", None), "model_type", None)
            targets = DEFAULT_TARGETS.get(model_type, ["all-linear"])
        gen = torch.Generator().manual_seed(config.seed)
        parts = {}
        for name in one_per_weight(model, select_modules(model, targets, exclude)):  # one part per weight tensor
            module = get_module(model, name)
            w = module.weight
            if config.num_sparse > w.numel():
                raise ConfigError(f"dsee config.num_sparse is {config.num_sparse}, more than the {w.numel()} entries "
                                  f"of {name}'s weight")
            d_in, d_out = in_out_features(module)
            parts[name] = DSEEPart(d_in, d_out, config.r, config.alpha / config.r, tuple(w.shape),
                                   choose_support(w, config, gen).to(w.device), layer_kind(module),
                                   dropout=config.dropout, dtype=w.dtype if w.dtype.is_floating_point else None,
                                   device=w.device)
        return parts
