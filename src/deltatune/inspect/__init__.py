"""``deltatune inspect``: what a fine-tuning changed, per layer and between deltas, with plots and a report.

See :func:`inspect_deltas` (the API), :mod:`.metrics` (per tensor), :mod:`.pairwise` (between deltas),
:mod:`.summary` (model totals and the merge suggestion), :mod:`.plots` and :mod:`.report`.
"""

from deltatune.inspect.analyze import inspect_deltas
from deltatune.inspect.errors import OutputNotWritable
from deltatune.inspect.options import InspectOptions

__all__ = ["InspectOptions", "OutputNotWritable", "inspect_deltas"]
