"""``deltatune serve`` over loopback: the official ``openai`` client calls completions, chat (streaming and not),
models and embeddings; bad requests get OpenAI-shaped 4xx errors; a client that disconnects mid-stream frees its
slot; unloading a delta under load lets its requests finish and touches nothing else; loading at run time."""

# ruff: noqa: F811  (pytest fixtures imported from serve_helpers are parameters of the tests)

from __future__ import annotations

import asyncio
import json
import time

import httpx2 as httpx
import openai
import pytest
import torch
from serve_helpers import API_KEY, engine_of, greedy_text, served, served_root  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def _post(served, path: str, content: bytes, key: str | None = API_KEY, **headers) -> httpx.Response:
    h = {"content-type": "application/json", **headers}
    if key:
        h["authorization"] = f"Bearer {key}"
    return httpx.post(f"{served.url}{path}", content=content, headers=h, timeout=60)


def _idle(served, timeout: float = 20.0) -> bool:
    engine = engine_of(served)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if engine.pending() == 0:
            return True
        time.sleep(0.05)
    return False


def test_models_lists_the_base_and_every_delta(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["base", "a", "b"]


def test_completion_equals_greedy_with_the_delta_and_differs_from_the_base(client, served):
    out = client.completions.create(model="a", prompt="the cat sat on", max_tokens=8, temperature=0)
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 8
    assert out.choices[0].text == greedy_text(served.root, served.deltas["a"], "the cat sat on", 8)
    base = client.completions.create(model="base", prompt="the cat sat on", max_tokens=8, temperature=0)
    assert base.choices[0].text == greedy_text(served.root, None, "the cat sat on", 8)
    assert base.choices[0].text != out.choices[0].text


def test_streamed_completion_and_logprobs_match_the_plain_one(client):
    plain = client.completions.create(model="b", prompt="hello there", max_tokens=10, temperature=0, logprobs=2)
    pieces = list(client.completions.create(model="b", prompt="hello there", max_tokens=10, temperature=0,
                                            stream=True))
    assert "".join(p.choices[0].text for p in pieces) == plain.choices[0].text
    assert pieces[-1].choices[0].finish_reason == "length"
    lp = plain.choices[0].logprobs
    assert len(lp.token_logprobs) == 10 and all(v <= 0 for v in lp.token_logprobs)
    pairs = zip(lp.top_logprobs, lp.token_logprobs, strict=True)
    assert all(len(top) == 2 and max(top.values()) >= v - 1e-6 for top, v in pairs)


def test_chat_streaming_and_not(client):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    plain = client.chat.completions.create(model="a", messages=messages, max_tokens=7, temperature=0)
    assert plain.choices[0].message.role == "assistant" and plain.usage.completion_tokens == 7
    stream = client.chat.completions.create(model="a", messages=messages, max_tokens=7, temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream)
    assert text == plain.choices[0].message.content
    default = client.chat.completions.create(model="base", messages=messages, temperature=0,
                                             extra_body={"ignore_eos": True})
    assert default.usage.completion_tokens == 60  # no max_tokens: the server's limit (and what the context holds)
    seeded = [client.chat.completions.create(model="b", messages=messages, max_tokens=6, temperature=1.0, seed=5,
                                             top_p=0.9).choices[0].message.content for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_stop_strings_cut_the_completion(client):
    full = client.completions.create(model="a", prompt="one two", max_tokens=8, temperature=0).choices[0].text
    words = full.split()
    assert len(words) >= 3
    cut = client.completions.create(model="a", prompt="one two", max_tokens=8, temperature=0, stop=[words[2]])
    assert cut.choices[0].finish_reason == "stop" and words[2] not in cut.choices[0].text
    assert full.startswith(cut.choices[0].text)


def test_embeddings_through_the_openai_client(client):
    a = client.embeddings.create(model="a", input=["hello world", "bye"])  # the client asks for base64
    base = client.embeddings.create(model="base", input="hello world", encoding_format="float")
    vec = torch.tensor(a.data[0].embedding)
    assert vec.shape == (32,) and abs(float(vec.norm()) - 1) < 1e-4 and len(a.data) == 2
    assert not torch.allclose(vec, torch.tensor(base.data[0].embedding))


@pytest.mark.parametrize("body, status, needle", [
    (b'{"model": "a", "prompt": "hi", ', 400, "not valid JSON"),
    (b'{"model": "a", "prompt": "\xff\xfe hi"}', 400, "UTF-8"),
    (b'{"model": "nope", "prompt": "hi"}', 404, "no delta named 'nope'"),
    (b'{"model": "a", "prompt": "hi", "max_tokens": -3}', 400, "max_tokens"),
    (b'{"model": "a", "prompt": "hi", "max_tokens": 100000}', 400, "limit"),
    (json.dumps({"model": "a", "prompt": "word " * 200}).encode(), 400, "tokens; the limit is 64"),
    (json.dumps({"model": "a", "prompt": "x" * 70_000}).encode(), 413, "limit"),
    (b'{"model": "a", "prompt": "hi", "temperature": -1}', 400, "temperature"),
    (b'{"model": "a", "prompt": "hi", "seed": 1180591620717411303424}', 400, "seed"),  # 2**70: past torch's seeds
    (json.dumps({"model": "a", "prompt": "hi", "stop": [f"s{i}" for i in range(17)]}).encode(), 400, "stop"),
    (b'[1, 2]', 400, "JSON object"),
    (b'{"prompt": "hi"}', 400, "model"),
])
def test_bad_requests_get_openai_shaped_4xx(served, body, status, needle):
    r = _post(served, "/v1/completions", body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] and set(err) == {"message", "type", "param", "code"}


def test_api_key_and_unknown_routes(served, client):
    r = _post(served, "/v1/completions", b'{"model": "a", "prompt": "hi"}', key=None)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert _post(served, "/v1/completions", b'{"model": "a", "prompt": "hi"}', key="wrong-key-000").status_code == 401
    assert httpx.get(f"{served.url}/v1/nothing", timeout=10).json()["error"]["message"] == "Not Found"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="zzz", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="a", messages=[], max_tokens=2)


def test_a_client_that_disconnects_mid_stream_frees_its_slot(served):
    body = json.dumps({"model": "a", "prompt": "tell me a long story", "max_tokens": 60, "stream": True,
                       "temperature": 0, "ignore_eos": True})
    headers = {"authorization": f"Bearer {API_KEY}", "content-type": "application/json"}
    cancelled = engine_of(served).finished["cancelled"]
    engine = engine_of(served)
    with httpx.stream("POST", f"{served.url}/v1/completions", content=body, headers=headers, timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        engine.lock.acquire()  # the engine cannot step: the request cannot run to its end meanwhile
    try:
        deadline = time.time() + 20
        while not engine._cancelled and time.time() < deadline:  # the server saw the disconnect
            time.sleep(0.01)
    finally:
        engine.lock.release()
    assert _idle(served)
    assert engine_of(served).finished["cancelled"] == cancelled + 1  # stopped early, not run to its end
    assert engine_of(served).store._resident["a"].users == 0


async def _stream_all(url: str, model: str, n: int, max_tokens: int) -> list[str | None]:
    async with httpx.AsyncClient(base_url=url, timeout=120,
                                 headers={"authorization": f"Bearer {API_KEY}"}) as http:
        async def one(i: int) -> str | None:
            body = {"model": model, "prompt": f"request {i}", "max_tokens": max_tokens, "stream": True,
                    "temperature": 0, "ignore_eos": True}
            reason = None
            async with http.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    return f"http {r.status_code}"
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        reason = json.loads(line[6:])["choices"][0]["finish_reason"] or reason
            return reason
        return list(await asyncio.gather(*(one(i) for i in range(n))))


def test_unload_under_load_lets_running_requests_finish(served, client):
    from concurrent.futures import ThreadPoolExecutor

    engine = engine_of(served)
    r = _post(served, "/v1/load_lora_adapter", json.dumps({"lora_name": "c", "lora_path": str(served.deltas["c"])})
              .encode())
    assert r.status_code == 200 and r.json()["load_ms"] >= 0
    with ThreadPoolExecutor(2) as pool:
        on_c = pool.submit(asyncio.run, _stream_all(served.url, "c", 6, 40))
        on_a = pool.submit(asyncio.run, _stream_all(served.url, "a", 4, 20))
        deadline = time.time() + 30
        while engine.store._resident.get("c") is None or engine.store._resident["c"].users < 3:
            assert time.time() < deadline
            time.sleep(0.01)
        r = _post(served, "/v1/unload_lora_adapter", b'{"lora_name": "c"}')
        assert r.status_code == 200
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="c", prompt="hi", max_tokens=2)
        assert on_c.result(timeout=120) == ["length"] * 6
        assert on_a.result(timeout=120) == ["length"] * 4
    assert _idle(served)
    assert [m.id for m in client.models.list().data] == ["base", "a", "b"]
    assert all(not k.startswith("c@") for k in engine.store.attached_keys())
    assert _post(served, "/v1/unload_lora_adapter", b'{"lora_name": "c"}').status_code == 404


def test_many_concurrent_mixed_requests_finish(served):
    reasons = []
    for model in ("a", "b", "base"):
        reasons += asyncio.run(_stream_all(served.url, model, 16, 3))
    assert reasons == ["length"] * 48
    assert _idle(served)


def test_a_refused_prompt_of_several_cancels_the_ones_already_queued(served, monkeypatch):
    engine = engine_of(served)
    real, calls = engine.submit, []

    def submit(req):  # the second prompt is refused (e.g. the context, a full queue) after the first was queued
        calls.append(req)
        if len(calls) == 2:
            from deltatune.serve.errors import BadRequest

            raise BadRequest("refused for the test", "prompt")
        return real(req)

    monkeypatch.setattr(engine, "submit", submit)
    before = engine.finished["length"]
    r = _post(served, "/v1/completions", json.dumps({"model": "a", "prompt": ["hi", "there"], "max_tokens": 50,
                                                      "temperature": 0}).encode())
    assert r.status_code == 400 and "refused for the test" in r.text
    assert _idle(served) and engine.finished["length"] == before  # cancelled, not decoded to the end


def test_streams_end_with_a_usage_chunk_when_asked(client):
    plain = client.completions.create(model="a", prompt="the cat", max_tokens=5, temperature=0)
    pieces = list(client.completions.create(model="a", prompt="the cat", max_tokens=5, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert pieces[-1].choices == [] and pieces[-1].usage.completion_tokens == 5
    assert pieces[-1].usage.prompt_tokens == plain.usage.prompt_tokens
    assert all(p.usage is None for p in pieces[:-1])
    without = list(client.completions.create(model="a", prompt="the cat", max_tokens=5, temperature=0, stream=True))
    assert without[-1].choices and without[-1].usage is None
