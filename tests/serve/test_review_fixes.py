"""Regressions of a review of the serving package: a load racing an unload never lands on unwrapped layers and
never exceeds the byte bound; a delta that cannot attach leaves nothing behind; a co-served job trains on the base
even when a hot delta is merged; prompts the model cannot take are refused at submit (400), not failing their
batch; a chat template that refuses the messages is a 400; logprob token texts put together are the text; a
decoder classifier batched gives each row's result alone."""

# ruff: noqa: F811  (pytest fixtures imported from serve_helpers are parameters of the tests)

from __future__ import annotations

import json
import threading

import httpx2 as httpx
import pytest
import torch
import transformers as T
from conftest import randomize_delta, tiny_llama
from serve_helpers import API_KEY, served, served_root  # noqa: F401 (fixtures)
from serve_tests_common import Tok

import deltatune
from deltatune.errors import ShapeMismatch
from deltatune.fingerprint import fingerprint
from deltatune.layer import DeltaLayer
from deltatune.serve import DeltaStore, Engine, EngineConfig, SamplingParams
from deltatune.serve.coserve import CoTrainConfig, CoTrainJob, token_batches
from deltatune.serve.errors import BadRequest
from deltatune.serve.requests import EncodeRequest

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = [5, 9, 17, 3]


def _lora(seed: int, model=tiny_llama):
    return randomize_delta(model(), deltatune.LoRAConfig(r=4), seed=seed, std=0.3)


def _holding(model, prefix: str) -> int:
    """Wrapped modules of ``model`` holding a part whose key starts with ``prefix``."""
    return sum(1 for m in model.modules() if isinstance(m, DeltaLayer) and any(k.startswith(prefix) for k in m.parts))


def _inject_in_wrappers(monkeypatch, action) -> None:
    """Run ``action`` in another thread (to its end) right after the store's first look for wrappers: the
    interleaving of a concurrent load or unload that a thread switch there gives."""
    original, done = DeltaStore._wrappers, []

    def wrappers(self, delta):
        found = original(self, delta)
        if not done:
            done.append(True)
            thread = threading.Thread(target=action)
            thread.start()
            thread.join()
        return found
    monkeypatch.setattr(DeltaStore, "_wrappers", wrappers)


def test_an_add_racing_the_unload_of_the_last_delta_on_its_modules_attaches_to_the_model(monkeypatch):
    model = tiny_llama()
    store = DeltaStore(model, "base")
    store.add("a", _lora(1))
    b = _lora(2)
    _inject_in_wrappers(monkeypatch, lambda: store.remove("a"))  # unwraps every layer "b" found wrapped
    store.add("b", b)
    assert store.names() == ["b"] and _holding(model, "b@") == len(b.parts) and _holding(model, "a@") == 0
    engine = Engine(model, Tok(), store, EngineConfig(), eos=set())
    alone = tiny_llama()
    deltatune.apply_delta(alone, b)
    with torch.no_grad():
        want = alone(input_ids=torch.tensor([PROMPT])).logits[0, -1].log_softmax(-1).max()
    got = engine.generate([PROMPT], ["b"], SamplingParams(max_tokens=1, logprobs=0))[0]
    assert got.logprobs[0].logprob == pytest.approx(float(want), abs=1e-5)  # served with b, not the bare base


def test_an_add_racing_another_add_stays_within_max_bytes(monkeypatch):
    a, b, c = _lora(1), _lora(2), _lora(3)
    model = tiny_llama()
    store = DeltaStore(model, "base", max_bytes=2 * a.nbytes)
    store.add("a", a)
    _inject_in_wrappers(monkeypatch, lambda: store.add("c", c))  # fills the bound after b's first look
    store.add("b", b)
    assert store.nbytes <= store.max_bytes and set(store.resident()) == {"b", "c"}  # "a" (LRU, idle) evicted
    assert _holding(model, "a@") == 0


@pytest.mark.parametrize("first", [True, False], ids=["beside-a-delta", "alone"])
def test_a_delta_that_does_not_fit_every_module_leaves_nothing_attached_and_no_name(first):
    def wider():  # the same module names; a wider MLP: only the attention parts fit the tiny Llama
        torch.manual_seed(0)
        return T.LlamaForCausalLM(T.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96,
                                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                max_position_embeddings=64)).eval()
    bad = _lora(2, wider)
    bad.fingerprint = None
    model = tiny_llama()
    store = DeltaStore(model, "base")
    if first:
        store.add("a", _lora(1))
    version = store.version
    with pytest.raises(ShapeMismatch):
        store.add("bad", bad)
    assert "bad" not in store.names() and _holding(model, "bad") == 0 and store.version == version
    store.add("bad", bad, preload=False)  # registered lazily: the failed attach at its first request takes nothing
    with pytest.raises(ShapeMismatch):
        store.acquire("bad")
    assert _holding(model, "bad") == 0 and "bad" not in store.resident()


def test_a_job_started_while_a_hot_delta_is_merged_trains_on_the_base(tmp_path):
    model = tiny_llama()
    store = DeltaStore(model, "base")
    store.add("hot", _lora(1))
    engine = Engine(model, Tok(), store, EngineConfig(max_batch=4, merge_hot=0.5, hot_window=2), eos=set())
    engine.generate([PROMPT] * 3, ["hot"] * 3, SamplingParams(max_tokens=4))
    assert engine.hot.key is not None  # the idle engine keeps it merged
    job = CoTrainJob(engine, deltatune.LoRAConfig(r=2), token_batches([[7, 8, 9, 10] * 2], 8),
                     CoTrainConfig(name="fresh", out=str(tmp_path / "fresh"), steps=2, step_tokens=64))
    assert engine.hot.key is None and job.delta.fingerprint == fingerprint(tiny_llama())
    engine.add_job(job)
    while not job.done:
        engine.step()
    assert job.error is None and "fresh" in store.names()


def test_prompt_ids_outside_the_vocabulary_are_refused_at_submit_and_the_batch_runs():
    model = tiny_llama()
    engine = Engine(model, Tok(), DeltaStore(model, "base"), EngineConfig(), eos=set())
    for ids in ([1, 2, 500], [1, -1]):
        with pytest.raises(BadRequest) as err:
            engine.generate([PROMPT, ids], [None, None], SamplingParams(max_tokens=3))
        assert err.value.param == "prompt" and err.value.status == 400
    with pytest.raises(BadRequest):
        engine.submit_encode(EncodeRequest([1, 128], "embed"))
    engine.run_until_idle()  # the refused request's neighbour runs to its end
    assert engine.finished["length"] == 2 and not engine.finished["error"]


def test_the_context_is_read_under_each_name_configs_give_it():
    from deltatune.serve.kv import context_length

    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        assert context_length(T.PretrainedConfig(**{key: 77})) == 77
    assert context_length(T.PretrainedConfig()) is None


def test_mpt_s_max_seq_len_bounds_requests_at_submit_and_the_batch_runs():
    torch.manual_seed(0)
    model = T.MptForCausalLM(T.MptConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=4, max_seq_len=16)).eval()
    engine = Engine(model, Tok(), DeltaStore(model, "base"), EngineConfig(max_batch=4), eos=set())
    assert engine.max_positions == 16
    with pytest.raises(BadRequest) as err:
        engine.generate([[1, 2, 3], list(range(10, 24))], [None, None],
                        [SamplingParams(max_tokens=4), SamplingParams(max_tokens=10)])
    assert err.value.param == "max_tokens"
    engine.run_until_idle()
    assert engine.finished["length"] == 1 and not engine.finished["error"]


@pytest.mark.parametrize("pad", [None, 0, 2])
def test_a_decoder_classifier_batched_gives_each_row_its_result_alone(pad):
    torch.manual_seed(0)
    model = T.LlamaForSequenceClassification(T.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, num_labels=3, pad_token_id=pad)).eval()
    engine = Engine(model, Tok(), DeltaStore(model, "base"))
    rows, results = [[5, 6, 7, 8, 9], [9, 10], [11, 12], [2, 2, 3]], {}
    for i, ids in enumerate(rows):
        engine.submit_encode(EncodeRequest(ids, "classify", None, sink=lambda r, i=i: results.__setitem__(i, r)))
    engine.run_until_idle()
    for i, ids in enumerate(rows):
        with torch.no_grad():
            alone = model(input_ids=torch.tensor([ids])).logits.softmax(-1)[0]
        assert results[i].error is None and torch.allclose(torch.tensor(results[i].probs), alone, atol=1e-5)


def test_decoder_classifier_rows_share_one_padded_forward_when_the_config_pads_as_the_engine_does():
    """Grouping by length only where right padding would be misread: with the config's pad id equal to the one the
    rows are padded with, every row goes in one forward (not one forward per length)."""
    from deltatune.serve.encode import padding_free

    torch.manual_seed(0)
    model = T.LlamaForSequenceClassification(T.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, num_labels=3, pad_token_id=0)).eval()
    group = [(EncodeRequest(ids, "classify", None), None) for ids in ([5, 6, 7], [9, 10], [11])]
    assert padding_free(model, group, pad_id=0) == [[0, 1, 2]]
    assert sorted(padding_free(model, group, pad_id=2)) == [[0], [1], [2]]  # another pad: one length each


def _post(served, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{served.url}{path}", content=json.dumps(body).encode(), timeout=60,
                      headers={"content-type": "application/json", "authorization": f"Bearer {API_KEY}"})


def test_a_chat_template_that_refuses_the_messages_is_a_400_naming_messages(served):
    tokenizer = served.app.state.serve.tokenizer
    kept = tokenizer.chat_template
    tokenizer.chat_template = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                               "{{ raise_exception('Conversation roles must alternate') }}{% endif %}"
                               "{{ m['content'] }}{% endfor %}")
    try:
        r = _post(served, "/v1/chat/completions", {"model": "a", "max_tokens": 2, "messages": [
            {"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]})
    finally:
        tokenizer.chat_template = kept
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "messages" and "alternate" in r.json()["error"]["message"]


def test_logprob_token_texts_put_together_are_the_text_and_offsets_follow(served):
    r = _post(served, "/v1/completions", {"model": "a", "prompt": "the cat sat on", "max_tokens": 12,
                                          "temperature": 0, "logprobs": 2, "ignore_eos": True})
    choice = r.json()["choices"][0]
    tokens, offsets = choice["logprobs"]["tokens"], choice["logprobs"]["text_offset"]
    assert "".join(tokens) == choice["text"] and len(tokens) == 12
    assert offsets == [len("".join(tokens[:i])) for i in range(len(tokens))]


def test_a_character_split_over_byte_tokens_is_one_token_text():
    """Byte-level BPE spreads 好 over three tokens: the first two carry "", the third the character, so the token
    texts still add up to the text (they gave 'ab�' for 'ab好')."""
    from deltatune.serve.outputs import token_output
    from deltatune.serve.sampling import Choice, SamplingParams

    def text_of(ids):
        return bytes(ids).decode("utf-8", errors="replace")

    params = SamplingParams(max_tokens=10, logprobs=0)
    generated, sent, before, texts = [], "", "", []
    for token in [*b"ab", *"好".encode()]:
        generated.append(token)
        out, _, before = token_output("r", 1, generated, sent, Choice(token, -0.1, []), params, text_of, set(), None,
                                      0, before)
        sent += out.text
        texts.append(out.logprobs[0].token)
    assert texts == ["a", "b", "", "", "好"] and "".join(texts) == text_of(generated) == "ab好"


def test_a_non_streaming_request_whose_client_left_is_cancelled():
    import asyncio

    from deltatune.serve import app as served_app

    class Gone:
        """A request whose client has disconnected."""

        async def is_disconnected(self) -> bool:
            return True

    model = tiny_llama()
    engine = Engine(model, Tok(), DeltaStore(model, "base"), EngineConfig(), eos=set())  # never stepped: no run ends
    state = served_app.ServerState(engine, Tok(), served_app.ServerLimits())

    async def handler():
        runs = await served_app._submit_all(state, [PROMPT, PROMPT], SamplingParams(max_tokens=50), None, False)
        with pytest.raises(BadRequest) as err:
            await asyncio.wait_for(served_app._collect_while_connected(Gone(), runs), timeout=5)
        engine.run_until_idle()  # the loop still runs: the runs' last outputs reach it
        return err.value.status
    assert asyncio.run(handler()) == 499
    assert engine.finished["cancelled"] == 2 and not engine.finished["length"]
