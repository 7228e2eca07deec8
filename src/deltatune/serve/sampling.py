"""Per-request sampling: greedy, temperature, top-k, top-p, seed, stop strings, max tokens and logprobs.

Each request carries its own :class:`SamplingParams` and its own seeded ``torch.Generator``, so rows of one batch
sample independently and a request's tokens do not depend on what else is in the batch.  The logits of a row
are processed in the order ``transformers`` uses for its warpers (temperature, then top-k, then top-p), then
either the arg-max (greedy, ``temperature`` below :data:`GREEDY_BELOW`, 1e-5) or one multinomial draw is taken.

Reported logprobs are ``log softmax`` of the model's raw logits (before temperature and filtering), as vLLM
and OpenAI report them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from deltatune.config import require

#: The most alternatives a request may ask to see per token (OpenAI's completions limit).
MAX_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    """How one request is continued."""

    max_tokens: int = field(default=16, metadata={"help": "tokens to generate at most (≥ 1)"})
    temperature: float = field(default=0.0, metadata={"help": "0: greedy; > 0: sample from softmax(logits / T)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus: keep the smallest set of tokens of mass ≥ top_p"})
    top_k: int = field(default=0, metadata={"help": "keep the k most likely tokens (0: all)"})
    seed: int | None = field(default=None, metadata={"help": "seed of this request's sampler (None: random)"})
    stop: tuple[str, ...] = field(default=(), metadata={"help": "strings that end the text (cut before them)"})
    logprobs: int | None = field(default=None, metadata={"help": "report each token's logprob and this many "
                                                                  "top alternatives (None: no logprobs)"})
    ignore_eos: bool = field(default=False, metadata={"help": "keep generating past the end-of-sequence token"})

    def __post_init__(self) -> None:
        require(isinstance(self.max_tokens, int) and self.max_tokens >= 1,
                f"max_tokens must be an integer ≥ 1, got {self.max_tokens!r}")
        require(self.temperature >= 0 and self.temperature == self.temperature,
                f"temperature must be ≥ 0, got {self.temperature!r}")
        require(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p!r}")
        require(isinstance(self.top_k, int) and self.top_k >= 0, f"top_k must be an integer ≥ 0, got {self.top_k!r}")
        require(all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings")
        require(self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
                f"logprobs must be between 0 and {MAX_LOGPROBS}, got {self.logprobs!r}")

    @property
    def greedy(self) -> bool:
        """Arg-max decoding: ``temperature`` below :data:`GREEDY_BELOW` (vLLM's rule; ``logits / T`` would
        overflow to ``inf`` for a tiny ``T``)."""
        return self.temperature < GREEDY_BELOW


def make_generator(seed: int | None) -> torch.Generator:
    """The request's own sampler: seeded when asked, else from fresh entropy."""
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed))
    return g


#: temperatures below this decode greedily (vLLM's ``_SAMPLING_EPS``): a smaller ``T`` divides the logits to ``inf``
GREEDY_BELOW = 1e-5


def filter_logits(logits: Tensor, temperature: float, top_k: int, top_p: float) -> Tensor:
    """``logits / T`` with every token outside the top-k and outside the top-p nucleus set to ``-inf``.

    Top-p (Holtzman et al., 2020, "The Curious Case of Neural Text Degeneration"): sort by probability, keep the
    smallest prefix whose cumulative mass reaches ``top_p`` (the most likely token is always kept)."""
    out = logits.float() / temperature if temperature >= GREEDY_BELOW else logits.float().clone()
    if 0 < top_k < out.shape[-1]:
        kth = torch.topk(out, top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = torch.sort(out, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass strictly before each token
        drop_sorted = before >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


@dataclass
class Choice:
    """One chosen token: its id, its logprob under the raw logits, and the top alternatives ``[(id, logprob)]``."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


def choose(logits: Tensor, params: SamplingParams, generator: torch.Generator) -> Choice:
    """The next token of one row (``logits`` of shape ``(vocab,)``)."""
    if params.greedy:
        token = int(torch.argmax(logits))
    else:
        probs = filter_logits(logits, params.temperature, params.top_k, params.top_p).softmax(-1)
        token = int(torch.multinomial(probs, 1, generator=generator))
    if params.logprobs is None:
        return Choice(token, 0.0, [])
    logp = logits.float().log_softmax(-1)
    top: list[tuple[int, float]] = []
    if params.logprobs:
        values, ids = torch.topk(logp, params.logprobs)
        top = [(int(i), float(v)) for i, v in zip(ids, values, strict=True)]
    return Choice(token, float(logp[token]), top)


def stop_cut(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """``(text before the first stop string, whether one occurred)``."""
    ends = [i for s in stop if (i := text.find(s)) >= 0]
    return (text[:min(ends)], True) if ends else (text, False)


def safe_prefix(text: str, stop: tuple[str, ...]) -> str:
    """The part of ``text`` that can be sent now: not a possible start of a stop string still forming, and not an
    unfinished multi-byte character (decoded as U+FFFD).

    Held back: ``hold = max over s in stop of max{k : 1 ≤ k ≤ len(s) − 1, text ends with s[:k]}`` (0 if none).
    Only the last ``len(s) − 1`` characters can begin such a suffix, and only where they equal ``s[0]``: those
    candidate starts are found with ``str.find`` and tried longest first, the first that matches ends the search for
    ``s``, and a candidate no longer than the ``hold`` found so far is never tried.  A token costs one scan of
    ``len(s) − 1`` characters per stop string plus one comparison per candidate start (ordinary text: a few), instead
    of building and comparing every prefix ``s[:k]`` (``O(len(s)²)`` always).  Text where ``s[0]`` recurs at every
    character and most of ``s`` matches (``"aaa…"`` against ``"aa…ab…"``) still costs up to ``O(len(s)²)``; the
    HTTP API bounds a stop string's length (:data:`deltatune.serve.protocol.MAX_STOP_CHARS`)."""
    n, hold = len(text), 0
    for s in stop:
        if len(s) < 2:
            continue
        first, j = s[0], n - min(len(s) - 1, n)  # the leftmost start of a proper prefix of s that fits
        while n - j > hold:
            j = text.find(first, j)
            if j < 0 or n - j <= hold:
                break
            if s.startswith(text[j:]):
                hold = n - j
                break
            j += 1
    return text[:n - hold].rstrip("\ufffd")
