"""Delta algebra: merge, compress, compose and rebase deltas and fine-tuned checkpoints, out of core."""

from deltatune.algebra.compose import DeltaStack, compose
from deltatune.algebra.compress import compress_delta
from deltatune.algebra.engine import merge
from deltatune.algebra.rebase import rebase_checkpoint, rebase_delta
from deltatune.algebra.recipe import MergeRecipe, load_recipe, run_recipe
from deltatune.algebra.soup import greedy_soup
from deltatune.algebra.sum_deltas import compose_deltas

__all__ = ["DeltaStack", "MergeRecipe", "compose", "compose_deltas", "compress_delta", "greedy_soup", "load_recipe",
           "merge", "rebase_checkpoint", "rebase_delta", "run_recipe"]
