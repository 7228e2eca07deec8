"""A generation that fails reaches the client as an error, never as a ``finish_reason`` outside OpenAI's set, and a
completion of several prompts cancels its other runs when one fails."""

from __future__ import annotations

import asyncio

import pytest
from serve_helpers import small_llama

from deltatune.serve import app as served_app
from deltatune.serve.engine import Engine, EngineConfig
from deltatune.serve.errors import EngineFailure, EngineStopped
from deltatune.serve.requests import Output
from deltatune.serve.sampling import SamplingParams
from deltatune.serve.store import DeltaStore


class _Tok:
    eos_token_id = None

    def decode(self, ids, **_):
        return " ".join(str(i) for i in ids)


class _Connected:
    async def is_disconnected(self) -> bool:
        return False


def _state() -> tuple[Engine, served_app.ServerState]:
    model = small_llama()
    engine = Engine(model, _Tok(), DeltaStore(model, "base"), EngineConfig(), eos=set())  # never stepped
    return engine, served_app.ServerState(engine, _Tok(), served_app.ServerLimits())


def test_one_failed_prompt_fails_the_completion_and_cancels_the_others():
    engine, state = _state()

    async def handler():
        runs = await served_app._submit_all(state, [[5, 6, 7], [8, 9]], SamplingParams(max_tokens=40), None, False)
        runs[0]._sink(Output(runs[0].req.request_id, finish_reason="error", error="boom"))  # the first row failed
        with pytest.raises(EngineFailure, match="boom"):
            await asyncio.wait_for(served_app._collect_while_connected(_Connected(), runs), timeout=5)
        engine.run_until_idle()
    asyncio.run(handler())
    assert engine.finished["cancelled"] == 2 and not engine.finished["length"]  # nothing decoded for nobody


def test_a_run_the_engine_stopped_is_a_503_not_a_finish_reason():
    engine, state = _state()

    async def handler():
        run = await served_app._Run(state, [5, 6, 7], SamplingParams(max_tokens=4), None).submit()
        engine.stop()  # what a shutdown does to the runs in flight
        with pytest.raises(EngineStopped, match="the engine stopped"):
            await asyncio.wait_for(run.collect(), timeout=5)
    asyncio.run(handler())


@pytest.mark.parametrize("reason,status", [("error", 500), ("cancelled", 503)])
def test_a_stream_that_fails_ends_with_an_error_event_and_no_foreign_finish_reason(reason, status):
    out, failure = served_app.stream_ending(Output("r", text="ab", finish_reason=reason, error="why"))
    assert out.finish_reason is None and out.text == "ab"
    assert failure["error"]["message"] == f"generation {reason}: why"
    assert failure["error"]["type"] == "server_error" and served_app.FAILED_ENDINGS[reason] == status
    ok = Output("r", text="c", finish_reason="length")
    assert served_app.stream_ending(ok) == (ok, None)
