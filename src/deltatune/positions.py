"""How many tokens a model's table of absolute positions lets an input hold (BERT, RoBERTa, GPT-2, OPT, BART …)."""

from __future__ import annotations

from torch import nn

#: names of the learned (or fixed) tables of absolute positions, one row per position
POSITION_TABLES = ("position_embeddings", "wpe", "embed_positions")


def table_positions(model: nn.Module) -> int | None:
    """The rows of ``model``'s tables of absolute positions (``nn.Embedding`` modules named as in
    :data:`POSITION_TABLES`) less the rows each skips — ``offset`` (OPT, BART: 2) and, for a table with a
    ``padding_idx``, ``padding_idx + 1`` (RoBERTa's positions start there: XLM-R's 514 rows leave 512) — the smallest
    over the tables, seen through any delta's wrappers; ``None`` where no such table bounds an input (rotary, relative
    or ALiBi positions)."""
    from deltatune.model import logical_modules

    limits = [m.num_embeddings - int(getattr(m, "offset", 0) or 0)
              - (m.padding_idx + 1 if m.padding_idx is not None else 0)
              for name, m in logical_modules(model)
              if isinstance(m, nn.Embedding) and name.rsplit(".", 1)[-1] in POSITION_TABLES]
    return min(limits) if limits else None
