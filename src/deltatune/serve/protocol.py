"""Request bodies of the OpenAI-compatible API (pydantic models) and the OpenAI error shape.

Fields the OpenAI API defines keep its names and defaults (``temperature`` defaults to 1, as there); ``top_k`` is
an extension, as in vLLM.  Unknown fields are ignored, as OpenAI-compatible servers do, so that newer clients
keep working; every known field is typed and bounded.  Numbers are strict: a JSON ``true`` is not the integer 1
(nor the float 1.0), as pydantic's lax mode would read it, and a string is not a number.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from deltatune.serve.sampling import MAX_LOGPROBS

#: Most prompts (or inputs) one request may carry.
MAX_ITEMS = 64
#: stop strings per request (OpenAI allows 4; each is matched against every generated token on the engine's thread)
MAX_STOPS = 16
#: characters per stop string: at every new token each stop string is looked for in the text and as a start still
#: forming at its end (:func:`~deltatune.serve.sampling.safe_prefix`), a cost that grows with its length and that
#: every other row of the batch waits for (16 strings of 60k characters slowed them twentyfold)
MAX_STOP_CHARS = 1024


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", str_strip_whitespace=False)


class StreamOptions(_Body):
    include_usage: bool = False  # a last chunk with ``choices: []`` and the request's ``usage`` (OpenAI, vLLM)


class _Sampling(_Body):
    model: str = Field(min_length=1, max_length=256)
    temperature: float = Field(default=1.0, ge=0.0, le=100.0, allow_inf_nan=False, strict=True)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, allow_inf_nan=False, strict=True)
    top_k: int = Field(default=0, ge=0, strict=True)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64, strict=True)  # what torch.Generator.manual_seed takes
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1, strict=True)
    ignore_eos: bool = False

    @property
    def stream_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def stop_strings(self) -> tuple[str, ...]:
        items = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return tuple(s for s in items if s)

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        """At most :data:`MAX_STOPS` stop strings of at most :data:`MAX_STOP_CHARS` characters each (every one is
        checked against every new token of the row)."""
        if isinstance(value, list) and len(value) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings, got {len(value)}")
        items = [value] if isinstance(value, str) else value or []
        for i, item in enumerate(items):
            if len(item) > MAX_STOP_CHARS:
                which = "the stop string" if isinstance(value, str) else f"stop string {i}"
                raise ValueError(f"{which} has {len(item)} characters; the limit is {MAX_STOP_CHARS}")
        return value


class CompletionBody(_Sampling):
    prompt: str | list[str] = Field(min_length=1)
    max_tokens: int | None = Field(default=16, ge=1, strict=True)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS, strict=True)
    echo: Literal[False] = False

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class Message(_Body):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # OpenAI's content parts: only text parts are read
            return "".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")
        return self.content or ""


class ChatBody(_Sampling):
    messages: list[Message] = Field(min_length=1, max_length=1024)
    max_tokens: int | None = Field(default=None, ge=1, strict=True)
    # OpenAI's newer name for max_tokens; given, it wins over max_tokens
    max_completion_tokens: int | None = Field(default=None, ge=1, strict=True)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS, strict=True)


class EmbeddingBody(_Body):
    model: str = Field(min_length=1, max_length=256)
    input: str | list[str] = Field(min_length=1)
    encoding_format: Literal["float", "base64"] = "float"

    def inputs(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class ClassificationBody(EmbeddingBody):
    top_k: int | None = Field(default=None, ge=1, strict=True)


class LoadBody(_Body):
    """``{"lora_name", "lora_path"}`` as vLLM takes them, or ``{"name", "path"}``."""

    name: str | None = Field(default=None, max_length=128)
    path: str | None = Field(default=None, max_length=4096)
    lora_name: str | None = Field(default=None, max_length=128)
    lora_path: str | None = Field(default=None, max_length=4096)

    def delta_name(self) -> str | None:
        return self.name or self.lora_name

    def delta_path(self) -> str | None:
        return self.path or self.lora_path


def error_body(message: str, status: int, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    kind = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 413: "invalid_request_error",
            429: "rate_limit_error"}.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
