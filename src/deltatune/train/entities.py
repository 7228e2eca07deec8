"""Entities of tag sequences and entity-level precision, recall and F1 (``--task tokens``).

Tags are ``O`` or ``P-TYPE`` with the prefix ``P`` one of ``B`` (begin), ``I`` (inside), ``E`` (end), ``S``
(single); ``TYPE`` may itself contain ``-`` (``B-creative-work``).  Entities are read with the chunking rules of
the CoNLL evaluation script ``conlleval`` (Tjong Kim Sang & De Meulder, CoNLL-2003; the default mode of
``seqeval``), which also gives ill-formed sequences a meaning.  With ``p, t`` the previous and the current
prefix and ``τp, τ`` their types (``O`` has the empty type):

* an entity **ends** before position ``i`` when ``p ≠ O`` and (``p ∈ {E, S}`` or ``t ∈ {B, S, O}`` or ``τ ≠ τp``);
* an entity **starts** at ``i`` when ``t ≠ O`` and (``t ∈ {B, S}`` or ``p ∈ {E, S, O}`` or ``τ ≠ τp``).

So ``O I-x I-x`` is one entity of type ``x`` and ``B-x I-y`` two.  An entity is ``(type, start, end)`` with
``end`` exclusive.  Over a corpus, with ``G`` the gold and ``P`` the predicted entities (each tagged with its
sentence), ``C = |G ∩ P|`` (same sentence, type and span):

* precision = C / |P|,  recall = C / |G|,  F1 = 2 · precision · recall / (precision + recall)

each 0.0 when its denominator is 0 (micro averaging over all entity types, as ``conlleval``).
"""

from __future__ import annotations

from collections.abc import Sequence

from deltatune.errors import DataError

PREFIXES = ("B", "I", "E", "S")
_ENDS_PREVIOUS = {"B", "S", "O"}
_CLOSED = {"E", "S"}


def split_tag(tag: str) -> tuple[str, str]:
    """``"B-person"`` → ``("B", "person")``; ``"O"`` → ``("O", "")``; anything else raises DataError."""
    if tag == "O":
        return "O", ""
    if len(tag) > 2 and tag[0] in PREFIXES and tag[1] == "-":
        return tag[0], tag[2:]
    raise DataError(f"tag {tag!r} is not a BIO tag: use 'O' or B-/I-/E-/S- followed by the entity type "
                    "(e.g. 'B-person')")


def entity_spans(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """The entities ``(type, start, end_exclusive)`` of one sentence's tags, by the rules of the module
    docstring."""
    spans: list[tuple[str, int, int]] = []
    prev, prev_type, begin = "O", "", 0
    for i, tag in enumerate([*tags, "O"]):
        prefix, kind = split_tag(tag)
        if prev != "O" and (prev in _CLOSED or prefix in _ENDS_PREVIOUS or kind != prev_type):
            spans.append((prev_type, begin, i))
        if prefix != "O" and (prefix in ("B", "S") or prev in ("E", "S", "O") or kind != prev_type):
            begin = i
        prev, prev_type = prefix, kind
    return spans


def entity_counts(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> tuple[int, int, int]:
    """``(C, |P|, |G|)``: correct, predicted and gold entities over sentences of equal lengths."""
    if len(gold) != len(pred):
        raise DataError(f"entity scores: {len(pred)} predicted sentences for {len(gold)} gold ones")
    correct = n_pred = n_gold = 0
    for i, (g, p) in enumerate(zip(gold, pred, strict=True)):
        if len(g) != len(p):
            raise DataError(f"entity scores: sentence {i} has {len(g)} gold tags and {len(p)} predicted ones")
        gs, ps = set(entity_spans(g)), set(entity_spans(p))
        correct += len(gs & ps)
        n_pred += len(ps)
        n_gold += len(gs)
    return correct, n_pred, n_gold


def entity_scores(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> dict[str, float]:
    """``{"entity_precision", "entity_recall", "entity_f1"}``: micro-averaged over every entity (module
    docstring)."""
    correct, n_pred, n_gold = entity_counts(gold, pred)
    precision = correct / n_pred if n_pred else 0.0
    recall = correct / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"entity_precision": precision, "entity_recall": recall, "entity_f1": f1}


def word_accuracy(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> float:
    """Fraction of words whose predicted tag equals the gold tag (``O`` included)."""
    total = sum(len(g) for g in gold)
    same = sum(a == b for g, p in zip(gold, pred, strict=True) for a, b in zip(g, p, strict=True))
    return same / total if total else 0.0
