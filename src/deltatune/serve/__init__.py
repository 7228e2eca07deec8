"""Serving many deltas over one base model: the engine (continuous batching on a KV cache, every row routed to
its own delta), the delta store (LRU, hot load and unload) and an OpenAI-compatible server
(:mod:`deltatune.serve.app`, started by ``deltatune serve``)."""

from deltatune.serve.engine import Engine, EngineConfig
from deltatune.serve.requests import EncodeRequest, EncodeResult, GenerateRequest, Output
from deltatune.serve.sampling import SamplingParams
from deltatune.serve.store import DeltaStore

__all__ = ["DeltaStore", "EncodeRequest", "EncodeResult", "Engine", "EngineConfig", "GenerateRequest", "Output",
           "SamplingParams"]
