"""Merging the hottest delta into the base (dLoRA's trade-off, ``EngineConfig.merge_hot``): merged while every row
uses it and it carried the traffic, unmerged before any other row runs, with each request's tokens equal to the
unmerged engine's and the base restored bit for bit."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_delta, tiny_llama
from serve_tests_common import Tok

from deltatune.errors import ConfigError
from deltatune.methods import make_config
from deltatune.serve import DeltaStore, Engine, EngineConfig, GenerateRequest, SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")

GREEDY = SamplingParams(max_tokens=8)
PROMPTS = [[5, 9, 17, 3], [1, 2, 3], [7] * 6, [100, 101, 102, 4]]


@pytest.fixture(scope="module")
def deltas():
    return {"hot": randomize_delta(tiny_llama(), make_config("lora", {"r": 4}), seed=1, std=0.3),
            "dora": randomize_delta(tiny_llama(), make_config("dora", {"r": 2}), seed=2, std=0.3),
            "adapter": randomize_delta(tiny_llama(), make_config("adapter", {"bottleneck": 8}), seed=3, std=0.3)}


def _engine(deltas, **config) -> Engine:
    model = tiny_llama()
    store = DeltaStore(model, "base")
    for name, d in deltas.items():
        store.add(name, d)
    return Engine(model, Tok(), store, EngineConfig(**config), eos=set())


def _base_state(engine: Engine) -> dict[str, torch.Tensor]:
    from deltatune.fingerprint import base_parameters

    return {n: p.detach().clone() for n, p in base_parameters(engine.model)}


def test_a_hot_delta_is_merged_then_unmerged_with_the_same_tokens(deltas):
    plain = _engine(deltas)
    hot = _engine(deltas, merge_hot=0.9, hot_window=2)
    before = _base_state(hot)
    want = plain.generate(PROMPTS, ["hot"] * len(PROMPTS), GREEDY)
    got = hot.generate(PROMPTS, ["hot"] * len(PROMPTS), GREEDY)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert hot.hot.merges == 1 and hot.hot.key is not None  # merged after the window, still merged when idle
    changed = [n for n, t in _base_state(hot).items() if not torch.equal(t, before[n])]
    assert changed  # the LoRA is in the base weights now
    # a base row and a DoRA row arrive: unmerged before they run, their tokens as unmerged, the base bit-exact
    mixed = hot.generate(PROMPTS[:2], [None, "dora"], GREEDY)
    assert hot.hot.unmerges == 1 and hot.hot.key is None
    assert all(torch.equal(t, before[n]) for n, t in _base_state(hot).items())
    assert [o.token_ids for o in mixed] == [o.token_ids for o in plain.generate(PROMPTS[:2], [None, "dora"], GREEDY)]


def test_rows_of_another_delta_joining_a_merged_batch_unmerge_it_first(deltas):
    hot = _engine(deltas, merge_hot=0.5, hot_window=1)
    plain = _engine(deltas)
    hot.submit(GenerateRequest(PROMPTS[0], SamplingParams(max_tokens=30), delta="hot"))
    for _ in range(3):
        hot.step()
    assert hot.hot.key is not None
    outs = hot.generate([PROMPTS[1]], [None], GREEDY)  # joins the running merged row: unmerged first
    assert hot.hot.unmerges >= 1  # (merged again afterwards, once the hot row runs alone)
    assert outs[0].token_ids == plain.generate([PROMPTS[1]], [None], GREEDY)[0].token_ids


def test_deltas_that_cannot_merge_and_cold_deltas_stay_unmerged(deltas):
    hot = _engine(deltas, merge_hot=0.9, hot_window=2)
    hot.generate(PROMPTS, ["adapter"] * len(PROMPTS), GREEDY)  # not additive: never merged
    assert hot.hot.merges == 0
    hot.generate(PROMPTS, ["hot", None, "hot", None], GREEDY)  # half the traffic: below the share
    assert hot.hot.merges == 0


@pytest.mark.parametrize("bad", [{"merge_hot": 1.5}, {"merge_hot": -0.1}, {"hot_window": 0}])
def test_merge_settings_out_of_range_are_refused(bad):
    with pytest.raises(ConfigError):
        EngineConfig(**bad)


def test_a_delta_loaded_while_another_is_merged_meets_the_real_base(deltas, tmp_path):
    """The store checks a new delta's fingerprint against the base as it is unmerged, not the merged weights."""
    hot = _engine({"hot": deltas["hot"]}, merge_hot=0.9, hot_window=1)
    hot.generate(PROMPTS, ["hot"] * len(PROMPTS), GREEDY)
    assert hot.hot.key is not None
    hot.store.add("dora", deltas["dora"].save(tmp_path / "dora"))
    plain = _engine({"dora": deltas["dora"]})
    got = hot.generate(PROMPTS[:1], ["dora"], GREEDY)
    assert got[0].token_ids == plain.generate(PROMPTS[:1], ["dora"], GREEDY)[0].token_ids
