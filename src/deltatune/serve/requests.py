"""What goes into the engine (generation and encoding requests) and what comes out (outputs, per event)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from deltatune.serve.sampling import SamplingParams


@dataclass
class TokenLogprob:
    """One generated token: its text, id, logprob (raw logits) and the top alternatives ``[(text, logprob)]``."""

    token: str
    token_id: int
    logprob: float
    top: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class Output:
    """One event of a generation request: the text and tokens produced since the previous event; the last event
    has ``finish_reason`` (``stop``, ``length``, ``cancelled`` or ``error``)."""

    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def extend(self, later: Output) -> Output:
        """Fold a later event of the same request into this one (text, tokens and logprobs appended; the finish
        reason, error and token counts are the later event's); returns ``self``."""
        self.request_id = later.request_id
        self.text += later.text
        self.token_ids += later.token_ids
        self.logprobs += later.logprobs
        self.finish_reason, self.error = later.finish_reason, later.error
        self.prompt_tokens, self.completion_tokens = later.prompt_tokens, later.completion_tokens
        return self


Sink = Callable[[Output], None]


def new_id() -> str:
    return uuid.uuid4().hex


@dataclass
class GenerateRequest:
    """Continue ``prompt_ids`` with the delta ``delta`` (``None`` or the base's name: the bare base)."""

    prompt_ids: list[int]
    params: SamplingParams
    delta: str | None = None
    sink: Sink | None = None
    request_id: str = field(default_factory=new_id)
    #: ``params.max_tokens`` is a ceiling, not a demand: the engine lowers it to what the model's context leaves
    #: after the delta's virtual tokens and the prompt (a server's default when the client gives none).
    fit_context: bool = False


@dataclass
class EncodeResult:
    """An encoding request's result: a unit-norm embedding or class probabilities (or an error)."""

    request_id: str
    embedding: list[float] | None = None
    probs: list[float] | None = None
    tokens: int = 0
    error: str | None = None


@dataclass
class EncodeRequest:
    """Embed ``input_ids`` (mean of the last hidden states, unit norm) or classify it with the delta's head."""

    input_ids: list[int]
    task: Literal["embed", "classify"]
    delta: str | None = None
    sink: Callable[[EncodeResult], None] | None = None
    token_type_ids: list[int] | None = None
    request_id: str = field(default_factory=new_id)
