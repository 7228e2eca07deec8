"""OpenAI response and stream-chunk bodies built from engine outputs (pure functions of their inputs)."""

from __future__ import annotations

import base64
import struct
import time
from typing import Any

from deltatune.serve.requests import Output, TokenLogprob


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_logprobs(items: list[TokenLogprob], offset: int = 0) -> dict[str, Any]:
    """The legacy completions ``logprobs`` object: tokens, their logprobs, top alternatives and text offsets."""
    offsets, at = [], offset
    for t in items:
        offsets.append(at)
        at += len(t.token)
    return {"tokens": [t.token for t in items], "token_logprobs": [t.logprob for t in items],
            "top_logprobs": [{text: lp for text, lp in t.top} for t in items], "text_offset": offsets}


def chat_logprobs(items: list[TokenLogprob]) -> dict[str, Any]:
    """The chat ``logprobs`` object: ``{"content": [{token, logprob, bytes, top_logprobs}]}``."""
    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}
    return {"content": [{**entry(t.token, t.logprob), "top_logprobs": [entry(a, lp) for a, lp in t.top]}
                        for t in items]}


def completion(rid: str, model: str, outputs: list[Output], logprobs: bool) -> dict[str, Any]:
    choices = [{"index": i, "text": o.text, "finish_reason": o.finish_reason,
                "logprobs": completion_logprobs(o.logprobs) if logprobs else None} for i, o in enumerate(outputs)]
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model, "choices": choices,
            "usage": usage(sum(o.prompt_tokens for o in outputs), sum(o.completion_tokens for o in outputs))}


def completion_chunk(rid: str, model: str, index: int, out: Output, logprobs: bool, offset: int) -> dict[str, Any]:
    choice = {"index": index, "text": out.text, "finish_reason": out.finish_reason,
              "logprobs": completion_logprobs(out.logprobs, offset) if logprobs else None}
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model, "choices": [choice]}


def chat(rid: str, model: str, out: Output, logprobs: bool) -> dict[str, Any]:
    choice = {"index": 0, "message": {"role": "assistant", "content": out.text}, "finish_reason": out.finish_reason,
              "logprobs": chat_logprobs(out.logprobs) if logprobs else None}
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model, "choices": [choice],
            "usage": usage(out.prompt_tokens, out.completion_tokens)}


def usage_chunk(rid: str, model: str, kind: str, out: Output) -> dict[str, Any]:
    """The last chunk of a stream asked for with ``stream_options.include_usage``: no choices, the usage."""
    return {"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": [],
            "usage": usage(out.prompt_tokens, out.completion_tokens)}


def chat_chunk(rid: str, model: str, delta: dict[str, Any], finish: str | None,
               logprobs: list[TokenLogprob] | None = None) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "finish_reason": finish,
              "logprobs": chat_logprobs(logprobs) if logprobs is not None else None}
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [choice]}


def embedding_value(vector: list[float], encoding: str) -> list[float] | str:
    """The vector as floats, or as base64 of little-endian float32 (what the ``openai`` client asks for)."""
    if encoding == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    return vector


def model_card(name: str, created: int, root: str | None, parent: str | None) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "deltatune", "root": root,
            "parent": parent}
