"""Seeded mutation fuzzing of every deltatune loader (see ``runner.py`` for the passing rule)."""
