"""What one sampled token adds to a generation request's stream: its text piece (held back while it may still
become a stop string), its log-probabilities, and whether — and why — the request finished.

Pure functions of the request's state and the token; the engine (:mod:`deltatune.serve.engine`) schedules and runs
the model, and hands each sampled :class:`~deltatune.serve.sampling.Choice` here."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from deltatune.serve.requests import Output, TokenLogprob
from deltatune.serve.sampling import Choice, SamplingParams, safe_prefix, stop_cut

#: ``ids → text`` (the tokenizer's decode, special tokens skipped).
TextOf = Callable[[Sequence[int]], str]


def eos_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    """The end-of-sequence ids of the model's generation config and of the tokenizer."""
    ids: set[int] = set()
    for value in (getattr(getattr(model, "generation_config", None), "eos_token_id", None),
                  getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def finish_reason(text_stopped: bool, token: int, generated: int, used_positions: int, params: SamplingParams,
                  eos: set[int], max_positions: int | None) -> str | None:
    """``"stop"`` (a stop string or an end-of-sequence token), ``"length"`` (``max_tokens`` or the model's
    context reached: ``used_positions`` counts virtual tokens, prompt and generated ones) or ``None``."""
    if text_stopped or (token in eos and not params.ignore_eos):
        return "stop"
    if generated >= params.max_tokens or (max_positions is not None and used_positions >= max_positions):
        return "length"
    return None


def new_piece(generated_text: str, sent: str, stop: Sequence[str], finished: bool) -> str:
    """The text to send now: what ``generated_text`` (already cut at a stop string) adds to ``sent``, less a
    tail that may still turn into a stop string while the request goes on."""
    shown = generated_text if finished else safe_prefix(generated_text, stop)
    return shown[len(sent):] if shown.startswith(sent) and len(shown) > len(sent) else ""


#: Tokens of context an alternative's text is decoded after (its text in context: a word piece's leading space, a
#: continuation without its ``##``), without decoding the whole generation once per alternative.
ALTERNATIVE_CONTEXT = 4


def token_logprobs(choice: Choice, params: SamplingParams, text_of: TextOf, generated: Sequence[int], before: str,
                   text: str) -> list[TokenLogprob]:
    """The chosen token's log-probability and its top alternatives, when the request asked for them.  The chosen
    token's text is what it adds to the decoded generation (``text`` less ``before``, the decode without it), so the
    tokens' texts put together are the generated text and text offsets count right; an alternative's text is what
    it would add after the last few tokens."""
    if params.logprobs is None:
        return []
    context = list(generated[-1 - ALTERNATIVE_CONTEXT:-1])
    shown = text_of(context) if choice.top else ""
    top = [(text_of([*context, t])[len(shown):], lp) for t, lp in choice.top]
    return [TokenLogprob(text[len(before):], choice.token, choice.logprob, top)]


def token_output(request_id: str, prompt_tokens: int, generated: list[int], sent: str, choice: Choice,
                 params: SamplingParams, text_of: TextOf, eos: set[int], max_positions: int | None,
                 virtual: int = 0, before: str = "") -> tuple[Output, str | None, str]:
    """``(output, finish reason or None, the decoded generation)`` after ``choice.token`` was appended to
    ``generated``; ``output.text`` is the piece to send after ``sent``; ``before`` is the decode of ``generated``
    without its last token (the previous call's third value: the engine keeps it, so each token is decoded
    against its prefix once).  While the decode ends in an incomplete character (byte-level BPE splits one over
    several tokens: ``\ufffd``), the token's text is ``""`` and ``before`` stays, so the token completing it carries
    the whole character and the tokens' texts still add up to the text."""
    decoded = text_of(generated)
    text, stopped = stop_cut(decoded, params.stop)
    complete = before if decoded.endswith("\ufffd") else decoded  # a character still missing bytes: text later
    reason = finish_reason(stopped, choice.token, len(generated), virtual + prompt_tokens + len(generated), params,
                           eos, max_positions)
    piece = new_piece(text, sent, params.stop, reason is not None)
    logprobs = token_logprobs(choice, params, text_of, generated, before, complete)
    return Output(request_id, piece, [choice.token], logprobs, prompt_tokens=prompt_tokens,
                  completion_tokens=len(generated)), reason, complete
