"""Training: data, metrics, loop."""
