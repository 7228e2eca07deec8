"""Delta algebra: merge, compress, compose and rebase deltas and fine-tuned checkpoints, out of core."""

from deltatune.algebra.engine import merge
from deltatune.algebra.recipe import MergeRecipe, load_recipe, run_recipe

__all__ = ["MergeRecipe", "load_recipe", "merge", "run_recipe"]
