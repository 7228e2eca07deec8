"""Workload settings of ``benchmarks/merge.py`` (full and ``--quick``), in one place.

The training specs are also the cache keys of the trained task deltas (see ``merge_glue.TrainSpec``):
changing a number here retrains that delta on the next run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from merge_glue import TASKS, TrainSpec

# --- part 1: speed / memory vs mergekit (merging.md §B) ----------------------------------------------------
LLAMA_100M: dict[str, Any] = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
                                  num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=2048,
                                  tie_word_embeddings=False)
LLAMA_QUICK: dict[str, Any] = dict(vocab_size=4000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                                   tie_word_embeddings=False)
SPEED_METHODS: dict[str, dict[str, Any]] = {
    # per-model parameters and global parameters exactly as merging.md §B's ties.yml / ta.yml / dare_ties.yml
    "ties": {"model": {"weight": 1.0, "density": 0.2}, "global": {"normalize": True, "int8_mask": True}},
    "task_arithmetic": {"model": {"weight": 1.0}, "global": {}},
    "dare_ties": {"model": {"weight": 1.0, "density": 0.2}, "global": {"normalize": True, "int8_mask": True}},
}
TARGETS = {"ties": {"vs_mergekit_time": 0.3, "vs_mergekit_peak": 0.6, "vs_io_floor": 3.0},
           "task_arithmetic": {"vs_io_floor": 3.0}, "dare_ties": {"vs_io_floor": 3.0}}


@dataclass(frozen=True)
class SpeedSettings:
    llama: dict[str, Any]
    n_models: int = 3
    noise_std: float = 1e-3
    base_seed: int = 0
    repeats: int = 3


# --- part 2: merge quality on four GLUE task deltas --------------------------------------------------------
FULL_LR = 1e-4
GLUE_STEPS = {"sst2": 300, "mrpc": 200, "rte": 150, "cola": 800}
LAMBDA_SUM = (0.3, 0.5, 0.7, 1.0, 1.3, 1.6)  # methods that *sum* task vectors (task arithmetic, breadcrumbs)
LAMBDA_MEAN = (0.7, 1.0, 1.3, 1.6, 2.0)      # methods that average them (TIES disjoint mean, DARE-TIES, PCB, DELLA)
LINES_BETA = (0.2, 0.5, 1.0)                 # LiNeS β grid (α from the paper's L1-norm rule)


@dataclass(frozen=True)
class QualitySettings:
    specs: dict[str, TrainSpec]
    lambda_sum: tuple[float, ...] = LAMBDA_SUM
    lambda_mean: tuple[float, ...] = LAMBDA_MEAN
    lines_beta: tuple[float, ...] = LINES_BETA


# --- part 3: compression of an SST-2 LoRA and sparse delta -----------------------------------------------
SPARSE_COUNT = 331_776   # LoRA r=8's trainable count on the encoder blocks (benchmarks/sst2_lr_sweep.py)
COMPEFT_DENSITIES = (0.05, 0.1, 0.2)
COMPEFT_ALPHAS = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
DARE_DENSITIES = (0.1, 0.3, 0.5)


@dataclass(frozen=True)
class CompressSettings:
    specs: dict[str, TrainSpec]
    compeft_densities: tuple[float, ...] = COMPEFT_DENSITIES
    compeft_alphas: tuple[float, ...] = COMPEFT_ALPHAS
    dare_densities: tuple[float, ...] = DARE_DENSITIES
    extra: dict[str, Any] = field(default_factory=dict)


def speed_settings(quick: bool) -> SpeedSettings:
    return SpeedSettings(llama=LLAMA_QUICK if quick else LLAMA_100M, repeats=1 if quick else 3)


def quality_settings(quick: bool) -> QualitySettings:
    if quick:
        specs = {t: TrainSpec(task=t, method="full", steps=6, lr=FULL_LR, batch_size=8, max_length=64, holdout=32,
                              eval_limit=48) for t in TASKS}
        return QualitySettings(specs, lambda_sum=(0.3, 1.0), lambda_mean=(0.7, 1.0), lines_beta=(0.5,))
    return QualitySettings({t: TrainSpec(task=t, method="full", steps=GLUE_STEPS[t], lr=FULL_LR) for t in TASKS})


def compress_settings(quick: bool) -> CompressSettings:
    lora = {"r": 8, "alpha": 8}
    sparse = {"num_tunable": SPARSE_COUNT, "targets": [r"bert\.encoder\..*"]}
    if quick:
        specs = {"lora": TrainSpec("sst2", "lora", 6, 5e-4, batch_size=8, max_length=64, holdout=32, eval_limit=48,
                                   method_args=lora),
                 "sparse": TrainSpec("sst2", "sparse", 6, 5e-4, batch_size=8, max_length=64, holdout=32,
                                     eval_limit=48, method_args={"num_tunable": 20_000,
                                                                 "targets": sparse["targets"]})}
        return CompressSettings(specs, compeft_densities=(0.1,), compeft_alphas=(1.0, 2.0), dare_densities=(0.3,))
    specs = {"lora": TrainSpec("sst2", "lora", 300, 5e-4, max_length=64, method_args=lora),
             "sparse": TrainSpec("sst2", "sparse", 300, 5e-4, max_length=64, method_args=sparse)}
    return CompressSettings(specs)
