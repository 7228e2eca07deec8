"""``deltatune search``: multi-objective configuration search (metric vs trainable parameters) with optuna."""
