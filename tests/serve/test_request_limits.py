"""Request validation through the real HTTP server: a stop string is bounded in length, numbers are strict (a JSON
``true`` is not 1), chat's ``max_completion_tokens`` is read when 0 and named by its 400; and ``safe_prefix``, which
holds back a stop string still forming, gives what its definition gives on random strings."""

# ruff: noqa: F811  (pytest fixtures imported from serve_helpers are parameters of the tests)

from __future__ import annotations

import json
import random
import time

import httpx2 as httpx
import pytest
from serve_helpers import API_KEY, served, served_root  # noqa: F401 (fixtures)

from deltatune.serve.protocol import MAX_STOP_CHARS
from deltatune.serve.sampling import safe_prefix

MESSAGES = [{"role": "user", "content": "hi"}]


def _post(served, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{served.url}{path}", content=json.dumps(body).encode(), timeout=60,
                      headers={"content-type": "application/json", "authorization": f"Bearer {API_KEY}"})


def _refused(served, path: str, body: dict, param: str, needle: str) -> None:
    r = _post(served, path, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and needle in err["message"], err
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"


def _defined_safe_prefix(text: str, stop: tuple[str, ...]) -> str:
    """The definition, quadratic: hold back the longest proper prefix of a stop string that ``text`` ends with."""
    hold = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return text[:len(text) - hold].rstrip("\ufffd")


def test_safe_prefix_holds_back_what_its_definition_does_on_random_strings():
    rng = random.Random(0)
    for _ in range(20_000):
        alphabet = rng.choice(["ab", "abc", "a\ufffd", "xyz "])
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14)))
        stop = tuple("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 9))) for _ in range(rng.randint(0, 3)))
        assert safe_prefix(text, stop) == _defined_safe_prefix(text, stop), (text, stop)
    assert safe_prefix("say STO", ("STOP", "TOX")) == "say "  # "STO" and "TO" form: the longer is held back
    assert safe_prefix("aaaa", ("a" * 3 + "b",)) == "a"
    assert safe_prefix("x\ufffd", ("yz",)) == "x"


def test_safe_prefix_only_compares_where_a_stop_string_could_start():
    # building and comparing every prefix of 16 stop strings of 100k characters took seconds per token (the engine
    # takes such strings; the HTTP API bounds them); ordinary text where their first character never occurs is a scan
    text, stop = "hello world, " * 10_000, tuple("x" * 100_000 + str(i) for i in range(16))
    start = time.perf_counter()
    assert safe_prefix(text, stop) == text
    assert time.perf_counter() - start < 0.5


@pytest.mark.parametrize("path, extra", [("/v1/completions", {"prompt": "hi"}),
                                         ("/v1/chat/completions", {"messages": MESSAGES})])
def test_a_stop_string_longer_than_the_limit_is_a_400_naming_stop(served, path, extra):
    long = "x" * (MAX_STOP_CHARS + 1)
    body = {"model": "a", "max_tokens": 2, **extra}
    _refused(served, path, {**body, "stop": ["ok", long]}, "stop", f"stop string 1 has {MAX_STOP_CHARS + 1} characters")
    _refused(served, path, {**body, "stop": long}, "stop", f"the limit is {MAX_STOP_CHARS}")
    assert _post(served, path, {**body, "stop": ["x" * MAX_STOP_CHARS]}).status_code == 200


@pytest.mark.parametrize("field", ["max_tokens", "top_k", "seed", "logprobs", "n", "temperature", "top_p"])
def test_a_boolean_is_not_a_number_in_completions(served, field):
    _refused(served, "/v1/completions", {"model": "a", "prompt": "hi", "max_tokens": 2, field: True}, field, field)


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens", "top_logprobs"])
def test_a_boolean_is_not_a_number_in_chat(served, field):
    _refused(served, "/v1/chat/completions", {"model": "a", "messages": MESSAGES, field: True}, field, field)


def test_chat_max_completion_tokens_zero_is_refused_as_max_tokens_zero_is(served):
    for field in ("max_tokens", "max_completion_tokens"):
        _refused(served, "/v1/chat/completions", {"model": "a", "messages": MESSAGES, field: 0}, field,
                 "greater than or equal to 1")
    _refused(served, "/v1/completions", {"model": "a", "prompt": "hi", "max_tokens": 0}, "max_tokens",
             "greater than or equal to 1")
    # the newer name wins over max_tokens, and an over-limit value is named as the client sent it (the limit is 60)
    _refused(served, "/v1/chat/completions", {"model": "a", "messages": MESSAGES, "max_completion_tokens": 61,
                                              "max_tokens": 3}, "max_completion_tokens", "the limit is 60")
    r = _post(served, "/v1/chat/completions", {"model": "a", "messages": MESSAGES, "max_completion_tokens": 2,
                                              "max_tokens": 50, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
