"""Pure tensor operations on deltas: sparsification and merging (issue 3 builds on these)."""
