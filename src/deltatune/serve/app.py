"""The OpenAI-compatible HTTP server (FastAPI) over an :class:`~deltatune.serve.engine.Engine`.

Routes: ``/v1/completions`` and ``/v1/chat/completions`` (both with SSE streaming), ``/v1/models``,
``/v1/embeddings``, ``/v1/classifications``, ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` (vLLM's names;
any delta kind, not only LoRA), ``/health``.  The request's ``model`` names the delta; the base model's name means
no delta.

Safety: every body is read with a byte bound (413 past it), must be UTF-8 JSON (400 otherwise) and is validated
by a typed model (400 naming the field); prompts are bounded in tokens and ``max_tokens`` by a limit and by the
model's context; an unknown delta is a 404; with an API key every ``/v1`` route needs ``Authorization: Bearer
KEY`` (401).  Every error has OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.  A streaming
client that disconnects cancels its request, which frees its batch slot at the next engine step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from deltatune.config import require
from deltatune.errors import ConfigError, DeltaTuneError
from deltatune.serve import responses as R
from deltatune.serve.engine import Engine
from deltatune.serve.errors import BadRequest, EngineFailure, EngineStopped, UnknownDelta
from deltatune.serve.protocol import (
    MAX_ITEMS,
    ChatBody,
    ClassificationBody,
    CompletionBody,
    EmbeddingBody,
    LoadBody,
    error_body,
)
from deltatune.serve.requests import EncodeRequest, EncodeResult, GenerateRequest, Output
from deltatune.serve.sampling import SamplingParams


@dataclass(frozen=True)
class ServerLimits:
    """Bounds on what one request may ask."""

    max_body_bytes: int = field(default=1 << 20, metadata={"help": "request body size (bytes) before a 413"})
    max_prompt_tokens: int = field(default=4096, metadata={"help": "prompt (or input) length in tokens"})
    max_tokens: int = field(default=1024, metadata={"help": "largest max_tokens a request may ask"})
    default_max_tokens: int = field(default=256, metadata={"help": "max_tokens of a chat request that gives none"})
    api_key: str | None = field(default=None, metadata={"help": "required as 'Authorization: Bearer KEY'"})
    allow_load: bool = field(default=False, metadata={"help": "allow the load/unload endpoints"})

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_prompt_tokens", "max_tokens", "default_max_tokens"):
            require(getattr(self, name) >= 1, f"ServerLimits.{name} must be ≥ 1, got {getattr(self, name)!r}")
        require(self.api_key is None or len(self.api_key) >= 8, "the API key must have at least 8 characters")


class ServerState:
    def __init__(self, engine: Engine, tokenizer: Any, limits: ServerLimits) -> None:
        self.engine, self.tokenizer, self.limits = engine, tokenizer, limits
        self.base = engine.store.base_name
        self.created = int(time.time())


def create_app(engine: Engine, tokenizer: Any, limits: ServerLimits | None = None) -> FastAPI:
    """The FastAPI app; the engine's thread runs while the app does (started and stopped by its lifespan)."""
    state = ServerState(engine, tokenizer, limits or ServerLimits())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="deltatune serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serve = state
    _errors(app)
    _routes(app, state)
    return app


def _error(message: str, status: int, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, status, param, code), status_code=status)


def _errors(app: FastAPI) -> None:
    @app.exception_handler(BadRequest)
    async def bad(_: Request, exc: BadRequest) -> JSONResponse:
        return _error(str(exc), exc.status, exc.param)

    @app.exception_handler(UnknownDelta)
    async def unknown(_: Request, exc: UnknownDelta) -> JSONResponse:
        return _error(str(exc), 404, "model", "model_not_found")

    @app.exception_handler(EngineStopped)
    async def stopped(_: Request, exc: EngineStopped) -> JSONResponse:
        return _error(str(exc), 503)

    @app.exception_handler(EngineFailure)
    async def failed(_: Request, exc: EngineFailure) -> JSONResponse:
        return _error(str(exc), 500)

    @app.exception_handler(DeltaTuneError)
    async def typed(_: Request, exc: DeltaTuneError) -> JSONResponse:
        return _error(str(exc), 400)

    @app.exception_handler(StarletteHTTPException)
    async def http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(str(exc.detail), exc.status_code)

    @app.exception_handler(Exception)
    async def internal(_: Request, exc: Exception) -> JSONResponse:
        return _error(f"internal error: {type(exc).__name__}", 500)


async def read_body(request: Request, cls: type[BaseModel], limit: int) -> Any:
    """The body as ``cls``: at most ``limit`` bytes (413), UTF-8 (400), a JSON object (400), valid (400)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BadRequest(f"the request body is {declared} bytes; the limit is {limit}", status=413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequest(f"the request body exceeds {limit} bytes", status=413)
        chunks.append(chunk)
    try:
        text = b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"the request body is not valid UTF-8 (byte {exc.start})") from None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"the request body is not valid JSON ({str(exc)[:120]})") from None
    if not isinstance(data, dict):
        raise BadRequest(f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise BadRequest(f"{where or 'body'}: {first.get('msg', 'invalid value')}", where or None) from None


def _auth(state: ServerState, request: Request) -> None:
    key = state.limits.api_key
    if key is None:
        return
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
        raise BadRequest("missing or wrong API key (send 'Authorization: Bearer KEY')", status=401)


def _delta(state: ServerState, model: str) -> str | None:
    if model == state.base:
        return None
    if model not in state.engine.store.names():
        raise UnknownDelta(model, [state.base, *state.engine.store.names()])
    return model


def _encode(state: ServerState, text: str, special: bool = True) -> list[int]:
    ids = list(state.tokenizer(text, add_special_tokens=special)["input_ids"])
    if len(ids) > state.limits.max_prompt_tokens:
        raise BadRequest(f"the prompt has {len(ids)} tokens; the limit is {state.limits.max_prompt_tokens}", "prompt")
    return ids


def _chat_text(state: ServerState, messages: list[dict[str, str]]) -> str:
    """The prompt text the tokenizer's chat template makes of ``messages``; a template that refuses them (Llama 2's
    "roles must alternate" ``raise_exception``, a ``ValueError`` of the tokenizer) is the client's error: a 400 naming
    ``messages``, not a 500."""
    from jinja2 import TemplateError

    if not getattr(state.tokenizer, "chat_template", None):
        raise BadRequest(f"the tokenizer of {state.base!r} has no chat template; use /v1/completions", "messages")
    try:
        return state.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except (TemplateError, ValueError, TypeError, KeyError) as exc:
        raise BadRequest(f"messages: the chat template refused them: {exc}", "messages") from None


def _params(state: ServerState, body: Any, max_tokens: int | None, logprobs: int | None,
            field: str = "max_tokens") -> tuple[SamplingParams, bool]:
    """The request's sampling parameters, and whether ``max_tokens`` is the server's default — a ceiling the engine
    lowers to what the context leaves (:attr:`GenerateRequest.fit_context`) — rather than the client's demand
    (``field``: the body's name for it, which an over-limit 400 names)."""
    wanted = max_tokens
    if wanted is None:
        wanted = min(state.limits.default_max_tokens, state.limits.max_tokens)
    if isinstance(wanted, int) and wanted > state.limits.max_tokens:
        raise BadRequest(f"{field} is {wanted}; the limit is {state.limits.max_tokens}", field)
    try:
        return SamplingParams(max_tokens=wanted, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                              seed=body.seed, stop=body.stop_strings(), logprobs=logprobs,
                              ignore_eos=body.ignore_eos), max_tokens is None
    except ConfigError as exc:
        param = str(exc).split(" ", 1)[0] if str(exc).split(" ", 1)[0].isidentifier() else None
        raise BadRequest(str(exc), param) from None


class _Run:
    """One submitted generation request and the queue its outputs arrive on (from the engine's thread)."""

    def __init__(self, state: ServerState, ids: list[int], params: SamplingParams, delta: str | None,
                 fit_context: bool = False) -> None:
        self.state, self.loop, self.queue = state, asyncio.get_running_loop(), asyncio.Queue()
        self.req = GenerateRequest(ids, params, delta, sink=self._sink, fit_context=fit_context)
        self.finished = False

    def _sink(self, out: Output) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, out)

    async def submit(self) -> _Run:
        await run_in_threadpool(self.state.engine.submit, self.req)  # may load an evicted delta from disk
        return self

    async def events(self) -> AsyncIterator[Output]:
        try:
            while True:
                out = await self.queue.get()
                if out.finish_reason is not None:
                    self.finished = True
                yield out
                if self.finished:
                    return
        finally:
            if not self.finished:
                self.state.engine.cancel(self.req.request_id)

    async def collect(self) -> Output:
        """The run's events folded into one output; a run that ended in one of :data:`FAILED_ENDINGS` raises its
        error (:class:`EngineFailure`, 500; :class:`EngineStopped`, 503)."""
        total = Output(self.req.request_id)
        async for out in self.events():
            total.extend(out)
        status = FAILED_ENDINGS.get(total.finish_reason or "")
        if status is not None:
            raise (EngineFailure if status == 500 else EngineStopped)(_failure_message(total))
        return total


#: The engine's endings that are failures, not one of OpenAI's finish reasons, and the HTTP status a client gets in
#: their place: ``error`` (a model step or the row's sampling failed: 500) and ``cancelled`` (a run cancelled while
#: someone still reads it: the engine stopped, 503).
FAILED_ENDINGS = {"error": 500, "cancelled": 503}


def stream_ending(out: Output) -> tuple[Output, dict[str, Any] | None]:
    """A streamed event as the client sees it: unchanged, or for a :data:`FAILED_ENDINGS` ending the event with no
    finish reason (its text and tokens still sent) and the error event that follows it in OpenAI's error shape."""
    status = FAILED_ENDINGS.get(out.finish_reason or "")
    if status is None:
        return out, None
    return replace(out, finish_reason=None), error_body(_failure_message(out), status)


def _failure_message(out: Output) -> str:
    """What a client is told of a run that ended in one of :data:`FAILED_ENDINGS`."""
    return f"generation {out.finish_reason}: {out.error or 'no reason given'}"


async def _submit_all(state: ServerState, encoded: list[list[int]], params: SamplingParams, delta: str | None,
                      fit: bool) -> list[_Run]:
    """Submit one run per prompt; when one is refused (context, a full queue, an unloaded delta), the runs already
    queued are cancelled before the refusal propagates — nobody would read them, and they would decode to the end."""
    runs: list[_Run] = []
    try:
        for ids in encoded:
            runs.append(await _Run(state, ids, params, delta, fit).submit())
    except BaseException:
        _cancel(runs)
        raise
    return runs


#: Seconds between two looks at whether the client of a non-streaming request is still connected.
DISCONNECT_POLL_S = 0.25


async def _collect_while_connected(request: Request, runs: list[_Run]) -> list[Output]:
    """Every run's merged output; the runs are cancelled (their batch slots freed at the next step) as soon as the
    client goes away: the server does not cancel a non-streaming handler on a disconnect, and the runs would
    otherwise decode to the end for nobody.  A client gone gets 499 (nobody reads it).  When one run fails, the
    request fails with its error (:meth:`_Run.collect`) and the other runs are cancelled the same way."""
    collected = asyncio.ensure_future(asyncio.gather(*(r.collect() for r in runs)))
    while not collected.done():
        await asyncio.wait({collected}, timeout=DISCONNECT_POLL_S)
        if not collected.done() and await request.is_disconnected():
            collected.cancel()
            _cancel(runs)
            await asyncio.wait({collected})  # the runs' cancellation is taken, not logged as never retrieved
            _ = collected.cancelled() or collected.exception()
            raise BadRequest("the client disconnected", status=499)
    if collected.exception() is not None:
        _cancel(runs)  # gather raises the first failure and leaves the others running
    return list(collected.result())


def _cancel(runs: list[_Run]) -> None:
    """Ask the engine to drop ``runs`` (a run already finished is not affected)."""
    for run in runs:
        run.state.engine.cancel(run.req.request_id)


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _stream(body: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _routes(app: FastAPI, state: ServerState) -> None:
    engine, limits = state.engine, state.limits

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "pending": engine.pending(), "finished": dict(engine.finished),
                "resident_delta_bytes": engine.store.nbytes}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        _auth(state, request)
        store = engine.store
        cards = [R.model_card(state.base, state.created, None, None)]
        cards += [R.model_card(n, state.created, store.source(n), state.base) for n in store.names()]
        return {"object": "list", "data": cards}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        _auth(state, request)
        body = await read_body(request, CompletionBody, limits.max_body_bytes)
        prompts = body.prompts()
        if len(prompts) > MAX_ITEMS or (body.stream and len(prompts) != 1):
            raise BadRequest(f"give one prompt to stream, at most {MAX_ITEMS} otherwise", "prompt")
        delta = _delta(state, body.model)
        encoded = [_encode(state, p) for p in prompts]
        params, fit = _params(state, body, body.max_tokens, body.logprobs)
        rid = f"cmpl-{uuid.uuid4().hex}"
        runs = await _submit_all(state, encoded, params, delta, fit)
        if not body.stream:
            outs = await _collect_while_connected(request, runs)
            return R.completion(rid, body.model, outs, body.logprobs is not None)

        async def chunks() -> AsyncIterator[str]:
            offset, last = 0, None
            async for event in runs[0].events():
                out, failure = stream_ending(event)
                yield _sse(R.completion_chunk(rid, body.model, 0, out, body.logprobs is not None, offset))
                offset += sum(len(t.token) for t in out.logprobs)
                last = out
                if failure is not None:
                    yield _sse(failure)
            if body.stream_usage and last is not None:
                yield _sse(R.usage_chunk(rid, body.model, "text_completion", last))
            yield "data: [DONE]\n\n"
        return _stream(chunks())

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        _auth(state, request)
        body = await read_body(request, ChatBody, limits.max_body_bytes)
        delta = _delta(state, body.model)
        text = _chat_text(state, [{"role": m.role, "content": m.text()} for m in body.messages])
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        ids = _encode(state, text, special=False)
        field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        params, fit = _params(state, body, getattr(body, field), logprobs, field)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        run = await _Run(state, ids, params, delta, fit).submit()
        if not body.stream:
            return R.chat(rid, body.model, (await _collect_while_connected(request, [run]))[0], body.logprobs)

        async def chunks() -> AsyncIterator[str]:
            yield _sse(R.chat_chunk(rid, body.model, {"role": "assistant", "content": ""}, None))
            last = None
            async for event in run.events():
                out, failure = stream_ending(event)
                yield _sse(R.chat_chunk(rid, body.model, {"content": out.text} if out.text else {}, out.finish_reason,
                                        out.logprobs if body.logprobs else None))
                last = out
                if failure is not None:
                    yield _sse(failure)
            if body.stream_usage and last is not None:
                yield _sse(R.usage_chunk(rid, body.model, "chat.completion.chunk", last))
            yield "data: [DONE]\n\n"
        return _stream(chunks())

    async def encode(body: EmbeddingBody, task: str) -> tuple[str | None, list[EncodeResult]]:
        inputs = body.inputs()
        if len(inputs) > MAX_ITEMS:
            raise BadRequest(f"at most {MAX_ITEMS} inputs per request, got {len(inputs)}", "input")
        delta = _delta(state, body.model)
        loop = asyncio.get_running_loop()
        futures = []
        for text in inputs:
            encoded = state.tokenizer(text)
            if len(encoded["input_ids"]) > limits.max_prompt_tokens:
                raise BadRequest(f"an input has {len(encoded['input_ids'])} tokens; the limit is "
                                 f"{limits.max_prompt_tokens}", "input")
            future = loop.create_future()
            req = EncodeRequest(list(encoded["input_ids"]), task, delta,  # type: ignore[arg-type]
                                sink=lambda r, f=future: loop.call_soon_threadsafe(f.set_result, r),
                                token_type_ids=list(encoded.get("token_type_ids") or []) or None)
            await run_in_threadpool(engine.submit_encode, req)
            futures.append(future)
        results = list(await asyncio.gather(*futures))
        failed = next((r.error for r in results if r.error), None)
        if failed:
            raise EngineFailure(f"encoding failed: {failed}")
        return delta, results

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> dict[str, Any]:
        _auth(state, request)
        body = await read_body(request, EmbeddingBody, limits.max_body_bytes)
        _, results = await encode(body, "embed")
        data = [{"object": "embedding", "index": i, "embedding": R.embedding_value(r.embedding or [],
                                                                                  body.encoding_format)}
                for i, r in enumerate(results)]
        tokens = sum(r.tokens for r in results)
        return {"object": "list", "data": data, "model": body.model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    @app.post("/v1/classifications")
    async def classifications(request: Request) -> dict[str, Any]:
        _auth(state, request)
        body = await read_body(request, ClassificationBody, limits.max_body_bytes)
        if not engine.classifier:
            raise BadRequest(f"{state.base!r} has no classification head; serve a sequence classifier", "model")
        delta, results = await encode(body, "classify")
        names = engine.store.label_names(delta)
        data = []
        for i, r in enumerate(results):
            probs = r.probs or []
            labels = names if names and len(names) == len(probs) else [str(k) for k in range(len(probs))]
            order = sorted(range(len(probs)), key=lambda k: -probs[k])[:body.top_k or len(probs)]
            data.append({"index": i, "label": labels[order[0]], "score": probs[order[0]],
                         "probs": {labels[k]: probs[k] for k in order}})
        tokens = sum(r.tokens for r in results)
        return {"object": "list", "data": data, "model": body.model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    @app.post("/v1/load_lora_adapter")
    async def load(request: Request) -> dict[str, Any]:
        _auth(state, request)
        if not limits.allow_load:
            raise BadRequest("loading deltas at run time is off; start the server with --allow-load", status=403)
        body = await read_body(request, LoadBody, limits.max_body_bytes)
        name, path = body.delta_name(), body.delta_path()
        if not name or not path:
            raise BadRequest("give the delta's name and path (lora_name/lora_path or name/path)", "name")
        start = time.perf_counter()
        await run_in_threadpool(engine.store.add, name, path)
        return {"object": "delta", "id": name, "path": path, "load_ms": round(1e3 * (time.perf_counter() - start), 3)}

    @app.post("/v1/unload_lora_adapter")
    async def unload(request: Request) -> dict[str, Any]:
        _auth(state, request)
        if not limits.allow_load:
            raise BadRequest("unloading deltas at run time is off; start the server with --allow-load", status=403)
        body = await read_body(request, LoadBody, limits.max_body_bytes)
        name = body.delta_name()
        if not name:
            raise BadRequest("give the delta's name (lora_name or name)", "name")
        await run_in_threadpool(engine.store.remove, name)
        return {"object": "delta", "id": name, "deleted": True}
