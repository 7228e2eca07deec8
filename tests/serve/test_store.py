"""The delta store reads deltatune, compact and PEFT adapter folders (a PEFT LoRA served by the engine gives PEFT's
own greedy tokens), refuses what it cannot serve with typed errors, and serves a classifier base over HTTP with
each row's own head (``/v1/classifications``)."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_delta, tiny_bert, tiny_llama
from serve_tests_common import Tok

import deltatune
from deltatune.errors import DeltaFormatError, FingerprintMismatch
from deltatune.io.compact_format import save_compact
from deltatune.serve import DeltaStore, Engine, SamplingParams
from deltatune.serve.errors import BadRequest

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = [5, 9, 17, 3, 44]


def _greedy(model, prompt, steps):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_a_peft_lora_adapter_folder_serves_peft_s_own_tokens(tmp_path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj",
                                                                                                   "down_proj"],
                                                               init_lora_weights=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.mul_(3.0)
    model.save_pretrained(tmp_path / "peft")
    expect = _greedy(model.eval(), PROMPT, 6)
    assert expect != _greedy(tiny_llama(), PROMPT, 6)
    base = tiny_llama()
    store = DeltaStore(base, "base")
    store.add("p", tmp_path / "peft")
    got = Engine(base, Tok(), store, eos=set()).generate([PROMPT, PROMPT], ["p", None], SamplingParams(max_tokens=6))
    assert got[0].token_ids == expect and got[1].token_ids == _greedy(tiny_llama(), PROMPT, 6)


def test_deltatune_and_compact_folders_serve_the_same_tokens(tmp_path):
    delta = randomize_delta(tiny_llama(), deltatune.LoRAConfig(r=4), seed=3, std=0.4)
    delta.save(tmp_path / "plain")
    save_compact(delta, tmp_path / "compact")
    base = tiny_llama()
    store = DeltaStore(base, "base")
    store.add("plain", tmp_path / "plain")
    store.add("compact", tmp_path / "compact", preload=False)  # read on its first request
    assert store.resident() == {"plain": delta.nbytes}
    outs = Engine(base, Tok(), store, eos=set()).generate([PROMPT] * 2, ["plain", "compact"],
                                                          SamplingParams(max_tokens=6))
    ref = tiny_llama()
    deltatune.apply_delta(ref, delta)
    assert outs[0].token_ids == outs[1].token_ids == _greedy(ref, PROMPT, 6)


def test_what_cannot_be_served_is_refused_before_it_is_registered(tmp_path):
    store = DeltaStore(tiny_llama(), "base")
    with pytest.raises(FingerprintMismatch):
        store.add("other", randomize_delta(tiny_llama(seed=5), deltatune.LoRAConfig(r=2), seed=1, std=0.1))
    with pytest.raises(DeltaFormatError):
        store.add("missing", tmp_path / "nothing")
    with pytest.raises(BadRequest, match="name"):
        store.add("bad name!", tmp_path)
    assert store.names() == [] and store.attached_keys() == []


def test_classification_endpoint_routes_each_row_to_its_head(tmp_path):
    from starlette.testclient import TestClient

    from deltatune.serve.app import create_app

    deltas = [randomize_delta(tiny_bert(), deltatune.LoRAConfig(r=2), seed=s, std=0.3) for s in (1, 2)]
    with torch.no_grad():
        for i, d in enumerate(deltas):
            for t in d.heads["classifier"].values():
                t.copy_(torch.randn(t.shape, generator=torch.Generator().manual_seed(10 + i)))
    model = tiny_bert()
    store = DeltaStore(model, "base")
    store.add("x", deltas[0])
    store.add("y", deltas[1])
    tok = Tok()
    app = create_app(Engine(model, tok, store), tok)
    with TestClient(app) as http:
        got = {name: http.post("/v1/classifications", json={"model": name, "input": ["7 8 9", "10 11"]}).json()
               for name in ("x", "y", "base")}
        assert http.post("/v1/completions", json={"model": "x", "prompt": "1"}).status_code == 400
        assert http.post("/v1/classifications", json={"model": "z", "input": "1"}).status_code == 404
    for name, d in (("x", deltas[0]), ("y", deltas[1]), ("base", None)):
        ref = tiny_bert()
        if d is not None:
            deltatune.apply_delta(ref, d)
        with torch.no_grad():
            probs = ref(input_ids=torch.tensor([[7, 8, 9]])).logits.softmax(-1)[0]
        row = got[name]["data"][0]
        assert torch.allclose(torch.tensor([row["probs"][str(k)] for k in range(3)]), probs, atol=1e-5)
        assert row["label"] == str(int(probs.argmax()))


def test_a_load_waiting_for_the_model_lock_gets_it_at_the_next_step_boundary():
    """Python's locks are not fair: an engine taking its lock straight back could starve a structural load for many
    steps; the engine lets announced waiters in between two steps instead."""
    import threading
    import time

    from serve_tests_common import Tok

    from deltatune.serve import Engine, GenerateRequest, SamplingParams

    model = tiny_llama()
    store = DeltaStore(model, "base")
    engine = Engine(model, Tok(), store, eos=set())
    step = engine.step

    def slow_step() -> None:  # a step that keeps the lock for a while, as a real model's does
        with engine.lock:
            time.sleep(0.01)
            step()
    engine.step = slow_step
    for _ in range(4):
        engine.submit(GenerateRequest([5, 6, 7], SamplingParams(max_tokens=60)))
    engine.start()
    try:
        time.sleep(0.05)
        waited = []
        for seed in range(3):
            delta = randomize_delta(tiny_llama(), deltatune.LoRAConfig(r=2, targets=[f"layers.{seed % 2}.mlp.up_proj"]),
                                    seed=seed, std=0.1)
            before = engine.steps
            t = threading.Thread(target=store.add, args=(f"d{seed}", delta))
            t.start()
            t.join(10)
            waited.append(engine.steps - before)
            store.remove(f"d{seed}")
        assert max(waited) <= 2, waited
    finally:
        engine.stop()
