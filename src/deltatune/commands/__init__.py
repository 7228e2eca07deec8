"""CLI command functions, one module per verb; registered on the typer app in :mod:`deltatune.cli`."""
