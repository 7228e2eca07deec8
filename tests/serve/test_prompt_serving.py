"""Prompt-tuning deltas (virtual tokens, a model-level part) in the serving engine: each prompted row prefills its
virtual tokens once into its KV cache and decodes from it, beside base rows, LoRA rows and prompts of other
lengths in one running batch; every row's greedy tokens equal the delta generating alone with no cache (a full
recompute of the whole sequence per token, the virtual tokens prepended every time).  Also chunked prefill of a
long prompt, the HTTP server, encoder requests, and the refusals that remain."""

# ruff: noqa: F811  (pytest fixtures imported from serve_helpers are parameters of the tests)

from __future__ import annotations

import httpx2 as httpx
import pytest
import torch
from conftest import randomize_delta, tiny_bert, tiny_llama
from serve_helpers import API_KEY, greedy_text, served_root, small_llama, start_server  # noqa: F401 (fixtures)
from serve_tests_common import Tok, check_encoder_rows
from transformers import AutoTokenizer, DynamicCache, LlamaForCausalLM

import deltatune
from deltatune.errors import ConfigError
from deltatune.methods import make_config
from deltatune.parts.base import MODEL_LEVEL, Part
from deltatune.serve import DeltaStore, Engine, EngineConfig, GenerateRequest, Output, SamplingParams
from deltatune.serve.errors import BadRequest

pytestmark = pytest.mark.usefixtures("one_thread")

GREEDY = SamplingParams(max_tokens=6, logprobs=1)


def _prompt_delta(n: int, seed: int, arch=tiny_llama):
    return randomize_delta(arch(), make_config("prompt_tuning", {"num_virtual_tokens": n}), seed=seed, std=0.5)


@pytest.fixture(scope="module")
def deltas():
    return {"p3": _prompt_delta(3, seed=11), "p7": _prompt_delta(7, seed=12),
            "lora": randomize_delta(tiny_llama(), make_config("lora", {"r": 2, "alpha": 4.0}), seed=13, std=0.3)}


def _engine(deltas, names, **config) -> Engine:
    model = tiny_llama()
    store = DeltaStore(model, "base")
    for name in names:
        store.add(name, deltas[name])
    return Engine(model, Tok(), store, EngineConfig(**config), eos=set())


def _alone(delta, prompt: list[int], steps: int, arch=tiny_llama) -> tuple[list[int], list[float]]:
    """Greedy tokens and their log-probabilities, the whole sequence recomputed per token with no cache (the
    prompt part prepends its virtual tokens in every forward)."""
    model = arch()
    if delta is not None:
        deltatune.apply_delta(model, delta)
    return _greedy_uncached(model, prompt, steps)


def _greedy_uncached(model, prompt: list[int], steps: int) -> tuple[list[int], list[float]]:
    ids, logprobs = list(prompt), []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].float()
            ids.append(int(logits.argmax()))
            logprobs.append(float(logits.log_softmax(-1)[ids[-1]]))
    return ids[len(prompt):], logprobs


def _joined(outs: list[Output]) -> Output:
    """The events a request's sink received, as one output."""
    got = Output(outs[0].request_id, token_ids=[t for o in outs for t in o.token_ids],
                 logprobs=[lp for o in outs for lp in o.logprobs])
    got.finish_reason, got.error = outs[-1].finish_reason, outs[-1].error
    return got


def _check(got, delta, prompt, steps=6, arch=tiny_llama) -> None:
    tokens, logprobs = _alone(delta, prompt, steps, arch)
    assert got.error is None and got.finish_reason == "length"
    assert got.token_ids == tokens
    assert torch.allclose(torch.tensor([t.logprob for t in got.logprobs]), torch.tensor(logprobs), atol=1e-4)


def test_a_prompt_delta_served_alone_equals_its_uncached_reference(deltas):
    prompt = [5, 9, 17, 3, 44]
    engine = _engine(deltas, ["p3"])
    got = engine.generate([prompt], ["p3"], GREEDY)[0]
    _check(got, deltas["p3"], prompt)
    # the virtual tokens matter, and the engine's own cache held them: n + prompt + generated positions
    assert got.token_ids != _alone(None, prompt, 6)[0]
    seen = []
    engine.submit(GenerateRequest(prompt, SamplingParams(max_tokens=3), "p3"))
    while engine.pending():
        engine.step()
        seen += [(engine._kv.width, list(engine._kv.lengths))] if engine._running else []
    n = 3 + len(prompt)  # after the prefill, then after the first decode step
    assert seen[:2] == [(n, [n]), (n + 1, [n + 1])]


def test_mixed_running_batch_of_base_lora_and_two_prompt_lengths_equals_each_alone(deltas):
    engine = _engine(deltas, ["p3", "p7", "lora"], prefill_chunk=64)
    plan = [  # (step it joins at, prompt, delta)
        (0, [5, 9, 17, 3], "p3"), (0, [1, 2], None), (0, [7] * 11, "lora"), (1, [100, 101, 102], "p7"),
        (2, [42], "p3"), (2, [8, 8, 9, 60, 61], "p7"), (3, list(range(10, 22)), None), (4, [3, 4], "lora"),
    ]
    results: dict[int, list] = {}
    kinds_together = set()
    step = 0
    while step < 5 or engine.pending():
        for i, (at, prompt, name) in enumerate(plan):
            if at == step:
                engine.submit(GenerateRequest(prompt, GREEDY, name, sink=lambda o, i=i: results.setdefault(i, [])
                                              .append(o)))
        engine.step()
        kinds_together.add(frozenset(s.req.delta for s in engine._running))
        step += 1
    # at some step one decode batch held base rows, LoRA rows and both prompt lengths
    assert any({None, "lora", "p3", "p7"} <= k for k in kinds_together)
    for i, (_, prompt, name) in enumerate(plan):
        _check(_joined(results[i]), None if name is None else deltas[name], prompt)


@pytest.mark.parametrize(("name", "chunk"), [("p3", 4), ("p7", 3)])
def test_chunked_prefill_of_a_long_prompt_on_a_prompt_delta_equals_alone(deltas, name, chunk):
    """Virtual tokens only in the first chunk (with at least one prompt token, even when there are more virtual
    tokens than the budget); later chunks continue from the row's cache."""
    prompt = list(range(20, 45))
    engine = _engine(deltas, [name, "lora"], prefill_chunk=chunk)
    engine.submit(GenerateRequest([6, 7, 8], GREEDY, "lora"))  # a running row that decodes meanwhile
    engine.step()
    out: list = []
    engine.submit(GenerateRequest(prompt, GREEDY, name, sink=out.append))
    engine.step()
    seq = next(s for s in engine._prefilling if s.req.delta == name)
    assert seq.pos == max(1, chunk - seq.virtual) and seq.cache.get_seq_length() == seq.virtual + seq.pos
    engine.run_until_idle()
    _check(_joined(out), deltas[name], prompt)


def test_gpt2_learned_positions_count_the_virtual_tokens():
    from conftest import tiny_gpt2

    deltas = {"p": _prompt_delta(5, seed=31, arch=tiny_gpt2),
              "lora": randomize_delta(tiny_gpt2(), make_config("lora", {"r": 2}), seed=32, std=0.3)}
    model = tiny_gpt2()
    store = DeltaStore(model, "base")
    for name, d in deltas.items():
        store.add(name, d)
    rows = [([5, 9, 17, 3], "p"), ([1, 2], None), (list(range(30, 45)), "p"), ([7] * 6, "lora")]
    outs = Engine(model, Tok(), store, EngineConfig(prefill_chunk=8), eos=set()).generate(
        [p for p, _ in rows], [n for _, n in rows], GREEDY)
    for (prompt, name), got in zip(rows, outs, strict=True):
        _check(got, deltas.get(name), prompt, arch=tiny_gpt2)


def test_a_peft_prompt_tuning_folder_serves_peft_s_own_uncached_tokens(tmp_path):
    """PEFT's definition of the adapter (its forward, the whole sequence per token) is the reference."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = peft.get_peft_model(tiny_llama(), peft.PromptTuningConfig(task_type=peft.TaskType.CAUSAL_LM,
                                                                      num_virtual_tokens=4)).eval()
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.normal_(0, 0.5)
    model.save_pretrained(tmp_path / "peft")
    prompt = [5, 9, 17, 3, 44]
    want, logprobs = _greedy_uncached(model, prompt, 6)
    assert want != _alone(None, prompt, 6)[0]
    base = tiny_llama()
    store = DeltaStore(base, "base")
    store.add("p", tmp_path / "peft")
    got = Engine(base, Tok(), store, EngineConfig(prefill_chunk=3), eos=set()).generate(
        [prompt, prompt], ["p", None], GREEDY)
    assert got[0].token_ids == want and got[1].token_ids == _alone(None, prompt, 6)[0]
    assert torch.allclose(torch.tensor([t.logprob for t in got[0].logprobs]), torch.tensor(logprobs), atol=1e-4)


def test_encoder_requests_on_a_prompt_delta_equal_alone():
    prompt = _prompt_delta(4, seed=21, arch=tiny_bert)
    lora = randomize_delta(tiny_bert(), deltatune.LoRAConfig(r=2), seed=22, std=0.3)
    check_encoder_rows({"prompt": prompt, "lora": lora}, seed=30)


# --------------------------------------------------------------------------------------------------
# the HTTP server
# --------------------------------------------------------------------------------------------------
def test_a_completion_on_a_prompt_delta_through_the_server(served_root, tmp_path):
    from deltatune.serve.app import ServerLimits
    from deltatune.serve.launch import ServeConfig, build_app

    root, saved = served_root
    delta = randomize_delta(small_llama(), make_config("prompt_tuning", {"num_virtual_tokens": 5}), seed=3, std=0.5)
    delta.provenance.base = str(root / "base")
    path = delta.save(tmp_path / "soft")
    cfg = ServeConfig(model=str(root / "base"), deltas={"soft": str(path), "a": str(saved["a"])}, served_name="base",
                      engine=EngineConfig(max_batch=4, prefill_chunk=32),
                      limits=ServerLimits(max_prompt_tokens=64, max_tokens=32, api_key=API_KEY))
    server, thread, url = start_server(build_app(cfg))
    try:
        headers = {"authorization": f"Bearer {API_KEY}"}
        ids = httpx.get(f"{url}/v1/models", headers=headers, timeout=60).json()["data"]
        assert [m["id"] for m in ids] == ["base", "soft", "a"]
        body = {"model": "soft", "prompt": "the cat sat on", "max_tokens": 8, "temperature": 0, "logprobs": 1}
        got = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=60)
        assert got.status_code == 200, got.text
        choice = got.json()["choices"][0]
        assert choice["finish_reason"] == "length" and got.json()["usage"]["completion_tokens"] == 8
        assert choice["text"] == greedy_text(root, path, "the cat sat on", 8)
        assert choice["text"] != greedy_text(root, None, "the cat sat on", 8)
        # this small random model's greedy text follows its last token; the log-probabilities see the whole
        # history, virtual tokens included (an uncached recompute of the sequence per token)
        model = LlamaForCausalLM.from_pretrained(root / "base").eval()
        deltatune.apply_delta(model, deltatune.load_delta(path))
        ids = AutoTokenizer.from_pretrained(root / "base")("the cat sat on")["input_ids"]
        want = []
        with torch.no_grad():
            for _ in range(8):
                logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]
                ids.append(int(logits.argmax()))
                want.append(float(logits.log_softmax(-1)[ids[-1]]))
        assert torch.allclose(torch.tensor(choice["logprobs"]["token_logprobs"]), torch.tensor(want), atol=1e-4)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


# --------------------------------------------------------------------------------------------------
# what is still refused: typed errors
# --------------------------------------------------------------------------------------------------
def test_context_counts_the_virtual_tokens(deltas):
    engine = _engine(deltas, ["p7"])
    fits = [1] * (64 - 7 - 4)  # tiny Llama: 64 positions
    assert engine.generate([fits], ["p7"], SamplingParams(max_tokens=4))[0].finish_reason == "length"
    with pytest.raises(BadRequest, match="7 virtual tokens") as refused:
        engine.submit(GenerateRequest(fits + [1], SamplingParams(max_tokens=4), "p7"))
    assert refused.value.param == "max_tokens" and engine.store._resident["p7"].users == 0
    engine.submit(GenerateRequest(fits + [1], SamplingParams(max_tokens=4), None))  # the base has the room


def test_a_default_max_tokens_fits_what_the_virtual_tokens_leave(deltas):
    """A ceiling (``fit_context``: the server's default when a request gives no ``max_tokens``) is lowered to what the
    context leaves after the delta's virtual tokens and the prompt; a demanded ``max_tokens`` is refused instead."""
    engine = _engine(deltas, ["p7"])
    prompt = [1] * 50  # tiny Llama: 64 positions; 7 virtual + 50 prompt leave 7
    with pytest.raises(BadRequest, match="7 virtual tokens"):
        engine.generate([prompt], ["p7"], SamplingParams(max_tokens=256, ignore_eos=True))
    events: list[Output] = []
    req = GenerateRequest(prompt, SamplingParams(max_tokens=256, ignore_eos=True), "p7", sink=events.append,
                          fit_context=True)
    engine.submit(req)
    assert req.params.max_tokens == 64 - 7 - 50
    engine.run_until_idle()
    done = _joined(events)
    assert done.finish_reason == "length" and len(done.token_ids) == 7


def test_continuing_a_cache_needs_the_cache_layout(deltas):
    """Outside the engine, a forward that continues from a cache holding the virtual tokens must say so with a
    mask over the cached columns and explicit positions; generate() with a cache does not, and is refused."""
    model = tiny_llama()
    deltatune.apply_delta(model, deltas["p3"])
    ids = torch.tensor([[5, 9, 17, 3]])
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        first = model(input_ids=ids, cache=cache, use_cache=True).logits
        assert first.shape[1] == 4 and cache.get_seq_length() == 3 + 4
        nxt = first[:, -1:].argmax(-1)
        with pytest.raises(ConfigError, match=r"attention_mask must be \(batch, cached \+ new\) = \(1, 8\)"):
            model(input_ids=nxt, attention_mask=torch.ones(1, 5, dtype=torch.long),
                  position_ids=torch.tensor([[7]]), cache=cache)
        with pytest.raises(ConfigError, match="position_ids"):
            model(input_ids=nxt, attention_mask=torch.ones(1, 8, dtype=torch.long), cache=cache)
        with pytest.raises(ConfigError, match="use_cache=False"):
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False)
        # in the cache's layout it continues exactly
        step = model(input_ids=nxt, attention_mask=torch.ones(1, 8, dtype=torch.long),
                     position_ids=torch.tensor([[7]]), cache=cache).logits[0, -1]
        full = model(input_ids=torch.cat([ids, nxt], 1), use_cache=False).logits[0, -1]
    assert torch.allclose(step, full, atol=1e-5)


class _OtherModelLevel(Part):
    """A test-only model-level part of a kind the engine does not know how to prefill."""

    mixed_rows, model_level = True, True

    def forward(self, x, base):
        raise TypeError("model-level")


def test_a_model_level_kind_other_than_prompt_is_refused_before_it_is_registered():
    store = DeltaStore(tiny_llama(), "base")
    delta = deltatune.Delta(method="test", config={}, parts={MODEL_LEVEL: _OtherModelLevel()})
    with pytest.raises(BadRequest, match="model-level parts of kind") as refused:
        store.add("other", delta)
    assert refused.value.param == "path" and store.names() == [] and store.attached_keys() == []
