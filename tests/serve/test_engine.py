"""The serving engine on tiny random models: a mixed batch of deltas of every kind (greedy, fp32) gives each
request exactly the tokens it gets served alone; chunked prefill, joining and leaving, sampling, stop strings,
logprobs, cancellation, hot load/unload with running requests, the LRU bound, and encoder requests."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_delta, tiny_bert, tiny_llama
from serve_tests_common import Tok, check_encoder_rows

import deltatune
from deltatune.methods import make_config
from deltatune.serve import DeltaStore, Engine, EngineConfig, GenerateRequest, SamplingParams
from deltatune.serve.errors import BadRequest, UnknownDelta

pytestmark = pytest.mark.usefixtures("one_thread")

KINDS = {"lora2": ("lora", {"r": 2, "alpha": 4.0}), "lora8": ("lora", {"r": 8, "alpha": 8.0}),
         "sparse": ("sparse", {"num_tunable": 777, "regrow": False}), "dora": ("dora", {"r": 2, "alpha": 4.0}),
         "ia3": ("ia3", {}), "adapter": ("adapter", {"bottleneck": 8})}


def _deltas(arch=tiny_llama, std=0.3):
    return {name: randomize_delta(arch(), make_config(method, cfg), seed=i + 1, std=std)
            for i, (name, (method, cfg)) in enumerate(KINDS.items())}


@pytest.fixture(scope="module")
def deltas():
    return _deltas()


def _engine(deltas, names=None, **config) -> Engine:
    model = tiny_llama()
    store = DeltaStore(model, "base")
    for name in names or deltas:
        store.add(name, deltas[name])
    return Engine(model, Tok(), store, EngineConfig(**config), eos=set())


PROMPTS = [[5, 9, 17, 3], [1, 2], list(range(10, 40)), [7] * 11, [100, 101, 102], [42], [8, 8, 9, 60, 61]]
GREEDY = SamplingParams(max_tokens=6, logprobs=2)


def test_mixed_batch_of_every_kind_equals_each_delta_alone(deltas):
    names = [None, *KINDS]
    rows = [(p, names[i % len(names)]) for i, p in enumerate(PROMPTS + PROMPTS[:3])]
    mixed = _engine(deltas, prefill_chunk=16).generate([p for p, _ in rows], [n for _, n in rows], GREEDY)
    alone_engine = _engine(deltas, prefill_chunk=1000)
    for (prompt, name), got in zip(rows, mixed, strict=True):
        alone = alone_engine.generate([prompt], [name], GREEDY)[0]
        assert got.token_ids == alone.token_ids, name
        assert got.finish_reason == "length" and len(got.token_ids) == 6
        lp = torch.tensor([t.logprob for t in got.logprobs])
        assert torch.allclose(lp, torch.tensor([t.logprob for t in alone.logprobs]), atol=1e-4), name
    # the deltas matter: each changes some tokens compared with the base
    base = alone_engine.generate([PROMPTS[2]] * len(KINDS), [None] * len(KINDS), GREEDY)
    own = alone_engine.generate([PROMPTS[2]] * len(KINDS), list(KINDS), GREEDY)
    assert all(b.token_ids != o.token_ids or b.logprobs[0].logprob != o.logprobs[0].logprob
               for b, o in zip(base, own, strict=True))


def test_greedy_equals_a_full_forward_loop(deltas):
    """The engine's tokens equal a loop re-running the whole sequence through the model with the delta applied."""
    model = tiny_llama()
    deltatune.apply_delta(model, deltas["dora"])
    ids = list(PROMPTS[0])
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    got = _engine(deltas, ["dora"], prefill_chunk=3).generate([PROMPTS[0]], ["dora"], GREEDY)[0]
    assert got.token_ids == ids[len(PROMPTS[0]):]


def test_requests_join_and_leave_every_step_and_long_prompts_are_chunked(deltas):
    engine = _engine(deltas, ["lora2"], max_batch=2, prefill_chunk=4)
    events: dict[str, list] = {}
    reqs = [GenerateRequest(p, SamplingParams(max_tokens=n), d, sink=lambda o: events.setdefault(o.request_id,
            []).append(o)) for p, n, d in [(PROMPTS[2], 3, "lora2"), (PROMPTS[0], 8, None), (PROMPTS[1], 2, "lora2")]]
    for r in reqs:
        engine.submit(r)
    engine.step()  # admits two (max_batch), prefills 4 tokens of the 30-token prompt only
    assert len(engine._prefilling) == 2 and engine._prefilling[0].pos == 4
    steps = 0
    while engine.pending():
        assert len(engine._running) + len(engine._prefilling) <= 2
        engine.step()
        steps += 1
    assert [sum(len(o.token_ids) for o in events[r.request_id]) for r in reqs] == [3, 8, 2]
    # the short prompt's decoding went on while the long prompt was being prefilled chunk by chunk
    assert steps < 30 / 4 + 3 + 8 + 2


def test_sampling_is_seeded_per_request_and_independent_of_the_batch(deltas):
    engine = _engine(deltas, ["lora8"])
    p = SamplingParams(max_tokens=8, temperature=1.3, top_p=0.9, top_k=20, seed=7)
    alone = engine.generate([PROMPTS[0]], ["lora8"], p)[0].token_ids
    mixed = engine.generate([PROMPTS[0], PROMPTS[1], PROMPTS[0]], ["lora8", None, "lora8"],
                            [p, SamplingParams(max_tokens=5, temperature=1.0, seed=1), p])
    assert mixed[0].token_ids == alone == mixed[2].token_ids
    other = engine.generate([PROMPTS[0]], ["lora8"], SamplingParams(max_tokens=8, temperature=1.3, seed=8))[0]
    assert other.token_ids != alone


def test_stop_strings_cut_the_text_and_end_the_request(deltas):
    engine = _engine(deltas, ["lora2"])
    full = engine.generate([PROMPTS[3]], ["lora2"], SamplingParams(max_tokens=6))[0]
    third = f" {full.token_ids[2]}"
    stop = engine.generate([PROMPTS[3]], ["lora2"], SamplingParams(max_tokens=6, stop=(third,)))[0]
    assert stop.finish_reason == "stop"
    assert stop.text == full.text[:full.text.find(third)]
    assert third not in stop.text


def test_cancel_frees_the_slot_and_releases_the_delta(deltas):
    engine = _engine(deltas, ["lora2"], max_batch=1)
    seen = []
    req = GenerateRequest(PROMPTS[0], SamplingParams(max_tokens=50), "lora2", sink=seen.append)
    engine.submit(req)
    engine.step()
    engine.step()
    engine.cancel(req.request_id)
    engine.step()
    assert engine.pending() == 0 and seen[-1].finish_reason == "cancelled"
    assert engine.store._resident["lora2"].users == 0


def test_unload_and_reload_while_running_keep_each_request_on_its_copy(deltas):
    engine = _engine(deltas, ["lora2"])
    expect = engine.generate([PROMPTS[0]], ["lora2"], SamplingParams(max_tokens=8))[0].token_ids
    out: list = []
    engine.submit(GenerateRequest(PROMPTS[0], SamplingParams(max_tokens=8), "lora2", sink=out.append))
    engine.step()
    engine.step()
    engine.store.add("lora2", deltas["lora8"])  # a new version under the same name
    new = []
    engine.submit(GenerateRequest(PROMPTS[0], SamplingParams(max_tokens=8), "lora2", sink=new.append))
    engine.step()
    engine.store.remove("lora2")  # unloaded while both run
    with pytest.raises(UnknownDelta):
        engine.submit(GenerateRequest(PROMPTS[0], SamplingParams(max_tokens=2), "lora2"))
    engine.run_until_idle()
    assert [t for o in out for t in o.token_ids] == expect
    assert [t for o in new for t in o.token_ids] == _engine(deltas, ["lora8"]).generate(
        [PROMPTS[0]], ["lora8"], SamplingParams(max_tokens=8))[0].token_ids
    assert engine.store.attached_keys() == []
    assert not any(isinstance(m, deltatune.layer.DeltaLayer) for m in engine.model.modules())


def test_lru_bound_evicts_idle_deltas_and_reloads_them_on_demand(deltas):
    model = tiny_llama()
    one = deltas["lora2"].nbytes
    store = DeltaStore(model, "base", max_bytes=int(one * 2.5))
    for name in ("a", "b", "c"):
        store.add(name, deltas["lora2"])
    assert list(store.resident()) == ["b", "c"]  # "a" evicted, still registered
    engine = Engine(model, Tok(), store, eos=set())
    got = engine.generate([PROMPTS[0]], ["a"], SamplingParams(max_tokens=3))[0]
    assert got.finish_reason == "length" and "a" in store.resident() and len(store.resident()) == 2
    with pytest.raises(UnknownDelta):
        store.acquire("nope")


def test_bad_requests_are_typed(deltas):
    engine = _engine(deltas, ["lora2"])
    with pytest.raises(BadRequest, match="empty"):
        engine.submit(GenerateRequest([], SamplingParams()))
    with pytest.raises(BadRequest, match="context"):
        engine.submit(GenerateRequest([1] * 60, SamplingParams(max_tokens=10)))
    with pytest.raises(deltatune.errors.ConfigError):
        SamplingParams(max_tokens=-1)
    with pytest.raises(deltatune.errors.ConfigError):
        SamplingParams(top_p=0)
    with pytest.raises(BadRequest):
        engine.store.add("base", deltas["lora2"])


def test_encoder_rows_use_their_own_delta_and_head():
    lora = randomize_delta(tiny_bert(), deltatune.LoRAConfig(r=2), seed=1, std=0.3)
    sparse = randomize_delta(tiny_bert(), deltatune.SparseConfig(num_tunable=300, regrow=False), seed=2, std=0.3)
    check_encoder_rows({"lora": lora, "sparse": sparse}, seed=10)


def test_an_all_base_batch_runs_unrouted_so_base_rows_cost_nothing_extra(deltas):
    from deltatune.routing import current_routing

    engine = _engine(deltas)
    seen = []
    engine.model.model.layers[0].register_forward_pre_hook(lambda m, a: seen.append(current_routing()))
    base_out = engine.generate(PROMPTS[:3], [None] * 3, GREEDY)
    assert seen and all(r is None for r in seen)
    seen.clear()
    engine.generate(PROMPTS[:2], [None, "ia3"], GREEDY)
    assert all(r is not None and r.names == [None, "ia3@5"] for r in seen)
    plain = tiny_llama()
    bare = Engine(plain, Tok(), DeltaStore(plain, "base"), eos=set())
    assert [o.token_ids for o in base_out] == [o.token_ids for o in bare.generate(PROMPTS[:3], [None] * 3, GREEDY)]


def test_gpt2_mixed_batch_equals_each_delta_alone():
    """Conv1D layers and learned positions: left padding and per-row positions are right for GPT-2 too."""
    from conftest import tiny_gpt2

    deltas = {name: randomize_delta(tiny_gpt2(), make_config(method, cfg), seed=i, std=0.3)
              for i, (name, (method, cfg)) in enumerate(KINDS.items()) if name in ("lora2", "adapter", "ia3")}

    def engine(chunk: int) -> Engine:
        model = tiny_gpt2()
        store = DeltaStore(model, "base")
        for name, d in deltas.items():
            store.add(name, d)
        return Engine(model, Tok(), store, EngineConfig(prefill_chunk=chunk), eos=set())

    names = [None, "lora2", "adapter", "ia3", "lora2"]
    mixed = engine(8).generate(PROMPTS[:5], names, GREEDY)
    alone = engine(1000)
    for prompt, name, got in zip(PROMPTS[:5], names, mixed, strict=True):
        assert got.token_ids == alone.generate([prompt], [name], GREEDY)[0].token_ids, name


class _Boom(deltatune.parts.base.Part):
    """A test-only part that fails in its forward (a stand-in for a broken delta)."""

    mixed_rows = True

    def forward(self, x, base):
        raise RuntimeError("boom")


def test_a_failing_step_ends_its_requests_with_an_error_and_the_engine_goes_on(deltas):
    engine = _engine(deltas, ["lora2"])
    engine.store.add("broken", deltatune.Delta(method="test", config={}, parts={"model.layers.0.mlp": _Boom()}))
    outs = engine.generate([PROMPTS[0], PROMPTS[1]], ["broken", "lora2"], GREEDY)
    assert [o.finish_reason for o in outs] == ["error", "error"] and "boom" in outs[0].error
    assert engine.pending() == 0 and engine.store._resident["lora2"].users == 0
    again = engine.generate([PROMPTS[1]], ["lora2"], GREEDY)[0]
    assert again.finish_reason == "length" and again.token_ids == _engine(deltas, ["lora2"]).generate(
        [PROMPTS[1]], ["lora2"], GREEDY)[0].token_ids


def test_a_full_queue_refuses_with_429_and_keeps_no_lease(deltas):
    engine = _engine(deltas, ["lora2"], max_waiting=1)
    engine.submit(GenerateRequest(PROMPTS[0], GREEDY, "lora2"))
    with pytest.raises(BadRequest) as refused:
        engine.submit(GenerateRequest(PROMPTS[1], GREEDY, "lora2"))
    assert refused.value.status == 429 and engine.store._resident["lora2"].users == 1
    engine.run_until_idle()
    assert engine.store._resident["lora2"].users == 0


def test_a_row_whose_sampling_fails_ends_alone_and_a_tiny_temperature_is_greedy(deltas, monkeypatch):
    import deltatune.serve.engine as engine_module

    engine = _engine(deltas, ["lora2"])
    greedy = engine.generate([PROMPTS[0]], ["lora2"], GREEDY)[0].token_ids
    tiny = engine.generate([PROMPTS[0]], ["lora2"], SamplingParams(max_tokens=6, temperature=1e-40))[0]
    assert tiny.finish_reason == "length" and tiny.token_ids == greedy  # T below 1e-5 decodes greedily (vLLM)
    real = engine_module.choose

    def choose(logits, params, generator):  # the second row's sampler fails (e.g. probabilities turned NaN)
        if params.top_k == 7:
            raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
        return real(logits, params, generator)

    monkeypatch.setattr(engine_module, "choose", choose)
    outs = engine.generate([PROMPTS[0], PROMPTS[1]], ["lora2", None],
                           [GREEDY, SamplingParams(max_tokens=6, top_k=7)])
    assert outs[0].finish_reason == "length" and outs[0].token_ids == greedy
    assert outs[1].finish_reason == "error" and "nan" in outs[1].error
    assert engine.pending() == 0 and engine.store._resident["lora2"].users == 0


def test_a_request_that_fails_before_queueing_keeps_no_lease_and_long_encoder_inputs_are_refused(deltas):
    engine = _engine(deltas, ["lora2"])
    with pytest.raises((ValueError, RuntimeError, OverflowError)):
        engine.submit(GenerateRequest(PROMPTS[0], SamplingParams(max_tokens=2, seed=2**70), "lora2"))
    assert engine.store._resident["lora2"].users == 0
    from deltatune.serve import EncodeRequest

    bert = tiny_bert()
    store = DeltaStore(bert, "base")
    encoder = Engine(bert, Tok(), store, EngineConfig(), eos=set())
    with pytest.raises(BadRequest, match="context"):
        encoder.submit_encode(EncodeRequest([5] * (bert.config.max_position_embeddings + 1), task="embed"))


def test_sliding_window_models_batch_and_match_each_request_alone():
    # each sliding layer keeps its own last columns when a longer row leaves the batch (test_sliding_cache.py
    # compares with transformers' generate), so such a model batches without a warning
    import warnings

    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, sliding_window=6,
                                             max_position_embeddings=64)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine = Engine(model, Tok(), DeltaStore(model, "base"), EngineConfig(max_batch=8), eos=set())
    assert engine.config.max_batch == 8
    long, short = list(range(10, 30)), [5, 9, 17]
    params = [SamplingParams(max_tokens=2), SamplingParams(max_tokens=12)]
    both = engine.generate([long, short], [None, None], params)
    alone = engine.generate([short], [None], params[1])[0]
    assert both[1].token_ids == alone.token_ids


def test_reloading_an_evicted_delta_reads_it_without_holding_the_model_lock(deltas, monkeypatch):
    # a disk read (and its digest and fingerprint checks) under the model's lock would stall every running request
    import threading

    model = tiny_llama()
    one = deltas["lora2"].nbytes
    store = DeltaStore(model, "base", max_bytes=int(one * 1.5))
    for name in ("a", "b"):
        store.add(name, deltas["lora2"])
    assert list(store.resident()) == ["b"]
    real, held = store._read, []

    def read(name, src):  # another thread can take the model's lock while the read runs
        got = []
        probe = threading.Thread(target=lambda: got.append(store.lock.acquire(timeout=1) and store.lock.release()
                                                           is None))
        probe.start()
        probe.join()
        held.append(not got[0])
        return real(name, src)

    monkeypatch.setattr(store, "_read", read)
    lease = store.acquire("a")
    assert held == [False] and "a" in store.resident()
    store.release(lease)


def test_encoder_positions_leave_out_roberta_s_offset():
    from transformers import RobertaConfig, RobertaModel

    from deltatune.serve.encode import encoder_positions

    roberta = RobertaModel(RobertaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=32, max_position_embeddings=34, pad_token_id=1))
    assert encoder_positions(roberta, 34) == 32  # position ids start at padding_idx + 1 = 2
    assert encoder_positions(tiny_bert(), 64) == 64 and encoder_positions(tiny_bert(), None) == 64  # its table
    assert encoder_positions(tiny_llama(), None) is None  # rotary: no table bounds it
