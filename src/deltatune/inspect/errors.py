"""Errors of ``deltatune inspect`` (kept in :mod:`deltatune.errors`; re-exported here for older imports)."""

from __future__ import annotations

from deltatune.errors import OutputNotWritable

__all__ = ["OutputNotWritable"]
