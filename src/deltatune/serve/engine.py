"""The serving engine: continuous batching of many deltas over one base model, on a KV cache.

Each :meth:`Engine.step`

1. admits waiting requests while the batch has room, and drops cancelled ones (their slot is free at once);
2. runs one batch of encoding requests (embeddings, classification), each row routed to its own delta and head;
3. runs **one decode step for every running request** in one forward: the rows' KV caches are kept left-padded in
   one ``DynamicCache`` (:class:`~deltatune.serve.kv.BatchKV`), each row has its own positions, and the routing
   context (:mod:`deltatune.routing`) sends row ``i`` through the delta it leased when it started — every part
   kind, additive or chained, and its task head;
4. **prefills** at most ``prefill_chunk`` prompt tokens in all, first come first served: whole prompts that fit
   run together in one left-padded forward (each row routed to its delta); a longer prompt goes on in chunks on
   its own cache, one chunk per step, so it never stalls the running rows' decoding.  A prompt whose last chunk
   is done samples its first token and joins the decode batch at the next step.

**Model-level deltas** (prompt tuning's virtual tokens, :mod:`deltatune.parts.prompt`).  A prompted row's history
is ``[P | prompt | generated]``: its ``n`` virtual tokens are prefilled once, as the first ``n`` positions of its
KV cache, and its real length in :class:`~deltatune.serve.kv.BatchKV` is ``n + len(prompt) + generated``, so
decode steps give it position ``n + t`` and a mask over the virtual columns like any other history.  Such a row
is always prefilled on its own cache (the chunked path, even when its prompt fits the budget): prepending
virtual tokens to a left-padded batch would put them before the padding and right-pad the shorter prompts,
which breaks the "real positions at the right end" layout the decode batch relies on.  Its first chunk is the
only forward on an empty cache, so the model-level hook prepends the virtual tokens there and nowhere else;
later chunks and every decode step continue from the cache (the hook passes them on unchanged, with the mask
and positions of the cache's layout, which the engine builds).  The virtual tokens count against the step's
prefill budget and the model's context.

Requests join and leave the batch at every step.  A row on the bare base is routed to ``None``: every wrapped
layer runs its base module alone for it.  Outputs go to each request's ``sink`` from the engine's thread.

Why not ``transformers``' own continuous batching (``generate_batch`` / ``ContinuousBatchingManager``)?  It runs on
CPU (checked with transformers 5.25 on a tiny Llama), but it packs all requests' tokens into one row of a paged
cache and runs its own loop in its own thread: there is no per-step hook where the caller could say which
request (hence which delta) each packed token belongs to, so per-request delta routing would need patching its
private batch preparation — and per-token routing cannot serve model-level parts or chain adapters cheaply.  A
small scheduler that owns the loop keeps routing per *row*, which every part kind supports.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from deltatune.config import require
from deltatune.parts.base import MODEL_LEVEL
from deltatune.routing import Routing, routed
from deltatune.serve.encode import encode_group, encoder_positions, row_routing
from deltatune.serve.errors import BadRequest, EngineStopped
from deltatune.serve.hot import HotMerge
from deltatune.serve.kv import BatchKV, context_length
from deltatune.serve.outputs import eos_ids, token_output
from deltatune.serve.requests import EncodeRequest, EncodeResult, GenerateRequest, Output
from deltatune.serve.sampling import SamplingParams, choose, make_generator
from deltatune.serve.store import DeltaStore, Lease


@dataclass(frozen=True)
class EngineConfig:
    """Batch bounds of the engine."""

    max_batch: int = field(default=16, metadata={"help": "generation requests running at once (decode rows)"})
    prefill_chunk: int = field(default=128, metadata={"help": "prompt tokens prefilled per step, over all requests"})
    max_waiting: int = field(default=4096, metadata={"help": "requests queued before new ones are refused"})
    encode_batch: int = field(default=32, metadata={"help": "encoding requests run in one forward"})
    merge_hot: float = field(default=0.0, metadata={
        "help": "merge a delta into the base while every row uses it and it carried at least this share of the "
                "rows of the last hot_window steps (dLoRA; 0: never merge)"})
    hot_window: int = field(default=32, metadata={"help": "steps over which merge_hot measures a delta's share"})

    def __post_init__(self) -> None:
        for name in ("max_batch", "prefill_chunk", "max_waiting", "encode_batch", "hot_window"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 1, f"EngineConfig.{name} must be an integer ≥ 1, got {value!r}")
        require(isinstance(self.merge_hot, (int, float)) and 0.0 <= self.merge_hot <= 1.0,
                f"EngineConfig.merge_hot must be a share in [0, 1] (0: off), got {self.merge_hot!r}")


@dataclass
class _Seq:
    """A generation request inside the engine."""

    req: GenerateRequest
    lease: Lease
    generator: torch.Generator
    virtual: int = 0  # virtual tokens of the row's delta (prompt tuning), prefilled before its first prompt token
    pos: int = 0  # prompt tokens prefilled
    cache: DynamicCache | None = None
    generated: list[int] = field(default_factory=list)
    sent: str = ""
    decoded: str = ""  # the decode of ``generated`` (each token's logprob text is what it adds to the last one)
    done: bool = False

    @property
    def params(self) -> SamplingParams:
        return self.req.params


def virtual_tokens(lease: Lease) -> int:
    """The number of virtual tokens (prompt tuning) the leased delta puts before every prompt; 0 for the base and
    for deltas without a model-level part."""
    part = None if lease.entry is None else lease.entry.delta.parts.get(MODEL_LEVEL)
    return (part.cached_prefix() or 0) if part is not None else 0


def vocab_size(model: nn.Module) -> int | None:
    """The rows of the model's input embedding (what ids a prompt may hold), or the config's ``vocab_size``."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(getattr(embedding, "base", embedding), "num_embeddings", None)
    rows = rows if isinstance(rows, int) else getattr(model.config, "vocab_size", None)
    return rows if isinstance(rows, int) and rows > 0 else None


class Engine:
    """Continuous batching over ``model`` with the deltas of ``store`` (see the module docstring)."""

    def __init__(self, model: nn.Module, tokenizer: Any, store: DeltaStore, config: EngineConfig | None = None,
                 eos: set[int] | None = None) -> None:
        self.model, self.tokenizer, self.store = model.eval(), tokenizer, store
        self.config = config or EngineConfig()
        self.eos = eos_ids(model, tokenizer) if eos is None else set(eos)
        self.lock = store.lock  # held while the model runs: deltas attach and detach between steps
        self.classifier = type(model).__name__.endswith("ForSequenceClassification")
        self.generative = bool(getattr(model, "can_generate", lambda: False)())
        self.max_positions = context_length(model.config)
        self.vocab_size = vocab_size(model)
        self.encoder_positions = encoder_positions(model, self.max_positions)  # once: it walks the modules
        self._queue = threading.Condition()
        self._waiting: deque[_Seq] = deque()
        self._encodes: deque[tuple[EncodeRequest, Lease]] = deque()
        self._cancelled: set[str] = set()
        self._inflight: set[str] = set()  # ids submitted and not finished (what pending() counts)
        self.finished: Counter[str] = Counter()  # generation requests finished, by reason
        self._prefilling: list[_Seq] = []
        self._running: list[_Seq] = []
        self._kv = BatchKV(model.config)
        self._routing: Routing | None = None
        self._routing_version = -1  # the store's version the routing was built for; -1: rebuild it
        self._jobs: list[Any] = []  # co-served training jobs (deltatune.serve.coserve.CoTrainJob)
        self.hot = HotMerge(model, self.config.merge_hot, self.config.hot_window) if self.config.merge_hot else None
        if self.hot is not None:
            store.restore_base = self.hot.release  # a later read of the base's values unmerges first
        self._used = 0  # inference tokens of the current step
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.steps = 0

    # --- submitting ----------------------------------------------------------------------------------
    def submit(self, req: GenerateRequest) -> str:
        """Queue a generation request (the delta is leased now: :class:`UnknownDelta` for an unknown name)."""
        if not self.generative:
            raise BadRequest(f"{type(self.model).__name__} is not a causal language model; it cannot generate")
        if not req.prompt_ids:
            raise BadRequest("the prompt is empty (no tokens)", "prompt")
        self._check_ids(req.prompt_ids, "prompt")
        lease = self.store.acquire(req.delta)  # the store's lock before the queue's, never the other way
        try:
            virtual = virtual_tokens(lease)
            if req.fit_context and self.max_positions is not None:  # a ceiling: lowered to what the context leaves
                room = self.max_positions - virtual - len(req.prompt_ids)
                if 1 <= room < req.params.max_tokens:
                    req.params = replace(req.params, max_tokens=room)
            generator = make_generator(req.params.seed)
        except Exception:
            self.store.release(lease)  # a request that is not queued holds no lease
            raise
        with self._queue:
            refused = self._refusal() or self._too_long(req, virtual)
            if refused is None:
                self._waiting.append(_Seq(req, lease, generator, virtual))
                self._inflight.add(req.request_id)
                self._queue.notify_all()
        if refused is not None:
            self.store.release(lease)
            raise refused
        return req.request_id

    def submit_encode(self, req: EncodeRequest) -> str:
        if not req.input_ids:
            raise BadRequest("the input is empty (no tokens)", "input")
        self._check_ids(req.input_ids, "input")
        lease = self.store.acquire(req.delta)
        limit = self.encoder_positions
        if limit is not None and virtual_tokens(lease) + len(req.input_ids) > limit:
            # past a learned position table the shared forward would fail every request batched with this one
            self.store.release(lease)
            virtual = virtual_tokens(lease)
            prefix = f"{virtual} virtual tokens of delta {req.delta!r} + " if virtual else ""
            raise BadRequest(f"{prefix}input ({len(req.input_ids)} tokens) exceeds the model's context of {limit} "
                             "positions", "input")
        with self._queue:
            refused = self._refusal()
            if refused is None:
                self._encodes.append((req, lease))
                self._inflight.add(req.request_id)
                self._queue.notify_all()
        if refused is not None:
            self.store.release(lease)
            raise refused
        return req.request_id

    def _check_ids(self, ids: Sequence[int], param: str) -> None:
        """Refuse (400) token ids outside the model's vocabulary at submit: in a batch, the embedding lookup would
        fail every request sharing the forward."""
        if self.vocab_size is None:
            return
        bad = next((t for t in ids if not isinstance(t, int) or not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise BadRequest(f"token id {bad!r} is outside the model's vocabulary [0, {self.vocab_size})", param)

    def _refusal(self) -> Exception | None:
        """Why a new request cannot be queued now (called with the queue's lock held), or ``None``."""
        if self._stopping:
            return EngineStopped("the engine is shutting down")
        if len(self._waiting) + len(self._encodes) >= self.config.max_waiting:
            return BadRequest(f"{self.config.max_waiting} requests are already waiting; retry later", status=429)
        return None

    def _too_long(self, req: GenerateRequest, virtual: int) -> BadRequest | None:
        """A refusal when the delta's virtual tokens, the prompt and ``max_tokens`` exceed the model's context."""
        if self.max_positions is None or virtual + len(req.prompt_ids) + req.params.max_tokens <= self.max_positions:
            return None
        prefix = f"{virtual} virtual tokens of delta {req.delta!r} + " if virtual else ""
        return BadRequest(f"{prefix}prompt ({len(req.prompt_ids)} tokens) + max_tokens ({req.params.max_tokens}) "
                          f"exceeds the model's context of {self.max_positions} positions", "max_tokens")

    def cancel(self, request_id: str) -> None:
        """Stop a request (a client went away): its slot is freed at the next step."""
        with self._queue:
            self._cancelled.add(request_id)
            self._queue.notify_all()

    def pending(self) -> int:
        """Generation and encoding requests not finished yet."""
        with self._queue:
            return len(self._inflight)

    # --- the loop --------------------------------------------------------------------------------------
    def start(self) -> None:
        """Run steps in a background thread until :meth:`stop`."""
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="deltatune-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._queue:
            self._stopping = True
            self._queue.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for seq in [*self._waiting, *self._prefilling, *self._running]:
            self._finish(seq, "cancelled", error="the engine stopped")
        self._waiting.clear()
        self._prefilling, self._running = [], []
        self._kv.keep([])
        if self.hot is not None:
            with self.lock:
                self.hot.release()
        while self._encodes:
            req, lease = self._encodes.popleft()
            self.store.release(lease)
            self._inflight.discard(req.request_id)
            if req.sink is not None:
                req.sink(EncodeResult(req.request_id, error="the engine stopped"))

    def _loop(self) -> None:
        while True:
            with self._queue:
                while not self._stopping and not self._has_work():
                    self._queue.wait(timeout=0.5)
                if self._stopping:
                    return
            self.step()
            self.store.let_waiters_in()  # a load waiting for the model's lock takes it before the next step

    def _has_requests(self) -> bool:
        return bool(self._waiting or self._encodes or self._prefilling or self._running or self._cancelled)

    def _has_work(self) -> bool:
        return self._has_requests() or bool(self._jobs)

    def add_job(self, job: Any) -> None:
        """Run a co-served training job (:class:`~deltatune.serve.coserve.CoTrainJob`) with what each step leaves of
        its token budget, until it is done."""
        with self._queue:
            self._jobs.append(job)
            self._queue.notify_all()

    def run_until_idle(self, max_steps: int = 1_000_000) -> None:
        """Step in the caller's thread until every request has finished (no background thread running); co-served
        jobs advance meanwhile but are not waited for."""
        require(self._thread is None, "run_until_idle steps in the caller's thread; the engine thread is running")
        for _ in range(max_steps):
            if not self._has_requests():
                return
            self.step()

    @torch.inference_mode()
    def step(self) -> None:
        """One scheduling step (see the module docstring)."""
        with self._queue:
            cancelled, self._cancelled = self._cancelled, set()
            room = self.config.max_batch - len(self._running) - len(self._prefilling)
            while room > 0 and self._waiting:
                self._prefilling.append(self._waiting.popleft())
                room -= 1
            encodes = [self._encodes.popleft() for _ in range(min(len(self._encodes), self.config.encode_batch))]
            waiting = [s for s in self._waiting if s.req.request_id in cancelled]
            for seq in waiting:
                self._waiting.remove(seq)
        for seq in waiting:
            self._finish(seq, "cancelled")
        with self.lock:
            self.steps += 1
            self._used = 0
            try:
                self._drop(cancelled)
                self._settle_hot(encodes)
                if encodes:
                    self._encode(encodes)
                if self._running:
                    self._decode()
                if self._prefilling:
                    self._prefill()
            except Exception as exc:  # noqa: BLE001 - a failing step fails its requests, never the engine
                self._fail_all(f"{type(exc).__name__}: {exc}")
            if self._jobs:
                self._train()

    def _settle_hot(self, encodes: list[tuple[EncodeRequest, Lease]]) -> None:
        """Merge the hot delta, or unmerge it, for the rows this step runs (:mod:`deltatune.serve.hot`)."""
        if self.hot is None:
            return
        leases = [s.lease for s in (*self._running, *self._prefilling)] + [lease for _, lease in encodes]
        if self.hot.settle([(lease.key, lease.entry) for lease in leases], training=bool(self._jobs)):
            self._routing_version = -1

    def _route(self, key: str | None) -> str | None:
        """The key a row's forward is routed to (the base for the delta merged while hot)."""
        return key if self.hot is None else self.hot.route(key)

    def _train(self) -> None:
        """Co-served jobs get what the step's inference left of their token budget (inference first)."""
        from deltatune.serve.coserve import train_budget

        with torch.inference_mode(False):
            for job in list(self._jobs):
                try:
                    job.step(train_budget(job.config.step_tokens, self._used))
                except Exception as exc:  # noqa: BLE001 - a failing job stops, serving goes on
                    job.error, job.done = f"{type(exc).__name__}: {exc}", True
                    self.store.detach_key(job.key)
                if job.done:
                    with self._queue:
                        self._jobs.remove(job)

    def _drop(self, cancelled: set[str]) -> None:
        if not cancelled:
            return
        for seq in [s for s in self._prefilling if s.req.request_id in cancelled]:
            self._prefilling.remove(seq)
            self._finish(seq, "cancelled")
        gone = [i for i, s in enumerate(self._running) if s.req.request_id in cancelled]
        for i in gone:
            self._finish(self._running[i], "cancelled")
        if gone:
            self._keep([i for i in range(len(self._running)) if i not in gone])

    def _keep(self, rows: list[int]) -> None:
        self._kv.keep(rows)
        self._running = [self._running[i] for i in rows]
        self._routing_version = -1

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _decode(self) -> None:
        if self._routing_version != self.store.version:
            self._routing = row_routing([self._route(s.lease.key) for s in self._running])
            self._routing_version = self.store.version
        device = self._device()
        tokens = torch.tensor([[s.generated[-1]] for s in self._running], device=device)
        mask, positions = self._kv.step_inputs()
        with routed(self._routing):
            logits = self.model(input_ids=tokens, attention_mask=mask.to(device), position_ids=positions.to(device),
                                cache=self._kv.cache, use_cache=True).logits[:, -1].float().cpu()
        self._kv.advance()
        self._used += len(self._running)
        keep = [i for i, seq in enumerate(self._running) if not self._token(seq, logits[i])]
        if len(keep) < len(self._running):
            self._keep(keep)

    def _prefill(self) -> None:
        """Whole prompts that fit the step's budget are prefilled together (one left-padded forward); a longer
        prompt, or any prompt on a delta with virtual tokens, goes on in chunks on its own cache, one chunk per
        step (the virtual tokens, prefilled with the first chunk, count against the budget)."""
        budget = self.config.prefill_chunk
        together: list[_Seq] = []
        chunked: list[tuple[_Seq, int]] = []
        for seq in self._prefilling:  # first come, first served: the budget goes in admission order
            if budget <= 0:
                break
            left = len(seq.req.prompt_ids) - seq.pos
            extra = seq.virtual if seq.cache is None else 0  # virtual tokens go with the first chunk
            if seq.pos == 0 and seq.cache is None and not seq.virtual and left <= budget:
                together.append(seq)
                n = left
            else:
                n = min(left, max(1, budget - extra))  # at least one prompt token with the virtual ones
                chunked.append((seq, n))
            budget -= extra + n
        self._used += self.config.prefill_chunk - budget
        if together:
            self._prefill_together(together)
        device = self._device()
        for seq, n in chunked:
            prompt, start = seq.req.prompt_ids, seq.pos
            # a fresh cache: the model-level hook prepends the row's virtual tokens; a filled one already holds
            # them, so the mask covers them and positions count them (the cache's layout)
            offset = 0 if seq.cache is None else seq.virtual
            if seq.cache is None:
                seq.cache = DynamicCache(config=self.model.config)
            with routed(row_routing([self._route(seq.lease.key)])):
                logits = self.model(input_ids=torch.tensor([prompt[start:start + n]], device=device),
                                    attention_mask=torch.ones(1, offset + start + n, dtype=torch.long, device=device),
                                    position_ids=torch.arange(offset + start, offset + start + n, device=device)[None],
                                    cache=seq.cache, use_cache=True, logits_to_keep=1).logits
            seq.pos += n
            if seq.pos < len(prompt):
                continue
            finished = self._token(seq, logits[0, -1].float().cpu())
            self._prefilling.remove(seq)  # after the token: a step that raises still finds it here (_fail_all)
            if not finished:
                self._kv.add(seq.cache, [seq.virtual + len(prompt)])
                self._running.append(seq)
                self._routing_version = -1
            seq.cache = None

    def _prefill_together(self, seqs: list[_Seq]) -> None:
        device = self._device()
        lengths = [len(s.req.prompt_ids) for s in seqs]
        width = max(lengths)
        pad = getattr(self.tokenizer, "pad_token_id", None) or 0
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        positions = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, (seq, n) in enumerate(zip(seqs, lengths, strict=True)):
            ids[i, width - n:] = torch.tensor(seq.req.prompt_ids)
            mask[i, width - n:] = 1
            positions[i, width - n:] = torch.arange(n)
        cache = DynamicCache(config=self.model.config)
        with routed(row_routing([self._route(s.lease.key) for s in seqs])):
            logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device),
                                position_ids=positions.to(device), cache=cache, use_cache=True,
                                logits_to_keep=1).logits[:, -1].float().cpu()
        joined = []
        for i, (seq, n) in enumerate(zip(seqs, lengths, strict=True)):
            seq.pos = n
            finished = self._token(seq, logits[i])
            self._prefilling.remove(seq)
            if not finished:
                joined.append(i)
                self._running.append(seq)
        if joined:
            self._kv.add(cache, lengths, joined)
            self._routing_version = -1

    # --- outputs ---------------------------------------------------------------------------------------
    def _token(self, seq: _Seq, logits: Tensor) -> bool:
        """Sample ``seq``'s next token from ``logits``, send what it adds, and say whether ``seq`` finished (a row
        whose sampling fails ends with ``error`` alone; the batch goes on)."""
        try:
            choice = choose(logits, seq.params, seq.generator)
        except RuntimeError as exc:
            self._finish(seq, "error", error=f"{type(exc).__name__}: {exc}")
            return True
        seq.generated.append(choice.token)
        out, reason, seq.decoded = token_output(seq.req.request_id, len(seq.req.prompt_ids), seq.generated, seq.sent,
                                                choice, seq.params, self._decode_text, self.eos, self.max_positions,
                                                seq.virtual, seq.decoded)
        seq.sent += out.text
        if reason:
            self._finish(seq, reason, out)
        else:
            self._send(seq, out)
        return reason is not None

    def _decode_text(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _send(self, seq: _Seq, out: Output) -> None:
        if seq.req.sink is not None:
            seq.req.sink(out)

    def _finish(self, seq: _Seq, reason: str, out: Output | None = None, error: str | None = None) -> None:
        if seq.done:
            return
        seq.done = True
        seq.cache = None
        self.store.release(seq.lease)
        with self._queue:
            self._inflight.discard(seq.req.request_id)
            self.finished[reason] += 1
        out = out or Output(seq.req.request_id, prompt_tokens=len(seq.req.prompt_ids),
                            completion_tokens=len(seq.generated))
        out.finish_reason, out.error = reason, error
        self._send(seq, out)

    def _fail_all(self, message: str) -> None:
        """A step raised: every request in flight ends with ``error`` and the batch starts empty."""
        with self.lock:
            for seq in [*self._prefilling, *self._running]:
                self._finish(seq, "error", error=message)
            self._prefilling, self._running = [], []
            self._kv.keep([])
            self._routing_version = -1

    # --- encoders ----------------------------------------------------------------------------------------
    def _encode(self, items: list[tuple[EncodeRequest, Lease]]) -> None:
        for task in ("embed", "classify"):
            group = [(r, lease) for r, lease in items if r.task == task]
            if not group:
                continue
            try:
                pad = getattr(self.tokenizer, "pad_token_id", None) or 0
                results = encode_group(self.model, pad, self._device(), task,
                                       [(r, self._route(lease.key)) for r, lease in group])
            except Exception as exc:  # noqa: BLE001 - the group's requests fail, the server goes on
                results = [EncodeResult(r.request_id, error=f"{type(exc).__name__}: {exc}") for r, _ in group]
            for (req, lease), result in zip(group, results, strict=True):
                self.store.release(lease)
                with self._queue:
                    self._inflight.discard(req.request_id)
                if req.sink is not None:
                    req.sink(result)

    # --- convenience ---------------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], deltas: Sequence[str | None],
                 params: SamplingParams | Sequence[SamplingParams]) -> list[Output]:
        """Run the requests to the end in the caller's thread; one merged :class:`Output` per request."""
        many = params if isinstance(params, (list, tuple)) else [params] * len(prompts)
        results = [Output("") for _ in prompts]
        for result, prompt, delta, p in zip(results, prompts, deltas, many, strict=True):
            self.submit(GenerateRequest(list(prompt), p, delta, result.extend))
        self.run_until_idle()
        return results
