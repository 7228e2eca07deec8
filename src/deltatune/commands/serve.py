"""``deltatune serve --model BASE --delta name=PATH …``: serve many deltas over one base model over HTTP.

An OpenAI-compatible server (FastAPI + uvicorn, see :mod:`deltatune.serve.app`): the request's ``model`` names the
delta, the base model's name means no delta.  It binds to loopback unless ``--host`` says otherwise; with
``--api-key`` (or ``DELTATUNE_API_KEY``) every ``/v1`` route needs ``Authorization: Bearer KEY``.  Heavy imports
happen inside the command so ``deltatune --help`` stays fast.
"""

from __future__ import annotations

import os
from typing import Annotated

import typer

from deltatune.commands.options import NoVerify


def serve_command(
    model: Annotated[str, typer.Option(help="local base-model folder (with its tokenizer)")],
    delta: Annotated[list[str] | None, typer.Option(
        "--delta", help="name=PATH of a delta to serve (repeatable; deltatune, compact or PEFT adapter folder)")]
    = None,
    host: Annotated[str, typer.Option(help="address to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    api_key: Annotated[str | None, typer.Option(help="require 'Authorization: Bearer KEY' (default: "
                                                     "$DELTATUNE_API_KEY)")] = None,
    served_model_name: Annotated[str | None, typer.Option(help="the base model's name in the API (default: the "
                                                               "folder's name)")] = None,
    max_batch: Annotated[int, typer.Option(help="generation requests decoded together")] = 16,
    prefill_chunk: Annotated[int, typer.Option(help="prompt tokens prefilled per engine step")] = 128,
    merge_hot: Annotated[float, typer.Option(help="merge a delta into the base while every running request uses "
                                                  "it and it carried this share of recent traffic (0: never)")]
    = 0.0,
    max_tokens: Annotated[int, typer.Option(help="largest max_tokens a request may ask")] = 1024,
    max_prompt_tokens: Annotated[int, typer.Option(help="longest prompt in tokens")] = 4096,
    max_body_bytes: Annotated[str, typer.Option(help="largest request body, e.g. 1MiB")] = "1MiB",
    max_delta_bytes: Annotated[str | None, typer.Option(help="LRU bound on attached deltas, e.g. 2GB")] = None,
    lazy: Annotated[bool, typer.Option("--lazy", help="attach each delta on its first request, not at start")]
    = False,
    allow_load: Annotated[bool, typer.Option("--allow-load", help="enable the load/unload endpoints")] = False,
    verify: NoVerify = True,
) -> None:
    """Serve deltas over one base model with an OpenAI-compatible API (completions, chat, embeddings, models)."""
    import uvicorn
    from rich.console import Console

    from deltatune.io.shards import parse_size
    from deltatune.serve.app import ServerLimits
    from deltatune.serve.engine import EngineConfig
    from deltatune.serve.launch import ServeConfig, build_app, parse_deltas

    key = api_key or os.environ.get("DELTATUNE_API_KEY") or None
    cfg = ServeConfig(model=model, deltas=parse_deltas(delta or []), host=host, port=port,
                      served_name=served_model_name,
                      max_delta_bytes=parse_size(max_delta_bytes) if max_delta_bytes else None, preload=not lazy,
                      verify=verify, engine=EngineConfig(max_batch=max_batch, prefill_chunk=prefill_chunk,
                                          merge_hot=merge_hot),
                      limits=ServerLimits(max_body_bytes=parse_size(max_body_bytes),
                                          max_prompt_tokens=max_prompt_tokens, max_tokens=max_tokens, api_key=key,
                                          allow_load=allow_load))
    err = Console(stderr=True, highlight=False)
    if not cfg.loopback and key is None:
        err.print(f"[bold]warning[/bold]: serving on {host} without an API key: anyone who can reach it can use it")
    app = build_app(cfg)
    err.print(f"serving {cfg.base_name!r} and {len(cfg.deltas)} delta(s) on http://{host}:{port}/v1")
    uvicorn.run(app, host=host, port=port, log_level="warning")
