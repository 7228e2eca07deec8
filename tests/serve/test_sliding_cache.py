"""Models with sliding-window attention layers (Gemma 2: sliding and full layers alternate, the first sliding;
Mistral: every layer sliding; Qwen2 with ``max_window_layers``: the first full) generate in the engine exactly the
tokens of transformers' own ``generate`` (greedy, fp32), with prompts longer than the window: rebuilding the batch
cache keeps each sliding layer's count of positions seen, and the batch width is read from a full layer."""

from __future__ import annotations

import pytest
import torch
from serve_tests_common import Tok
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from deltatune.serve import DeltaStore, Engine, EngineConfig, GenerateRequest, SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")

COMMON = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)


def _model(name: str, window: int = 6):
    torch.manual_seed(0)
    if name == "gemma2":
        return Gemma2ForCausalLM(Gemma2Config(**COMMON, head_dim=8, sliding_window=window)).eval()
    if name == "mistral":
        return MistralForCausalLM(MistralConfig(**COMMON, sliding_window=window)).eval()
    return Qwen2ForCausalLM(Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=window,
                                        max_window_layers=1)).eval()


def _hf(model, prompts: list[list[int]], counts: list[int]) -> list[list[int]]:
    with torch.no_grad():
        return [model.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False)[0, len(p):].tolist()
                for p, n in zip(prompts, counts, strict=True)]


PROMPTS = [list(range(10, 30)), [5, 9, 17], [7] * 9, list(range(40, 52))]  # 20 and 12 > the window of 6
COUNTS = [3, 12, 8, 10]


@pytest.mark.parametrize("name", ["gemma2", "mistral", "qwen2"])
@pytest.mark.parametrize("chunk", [1000, 4])
def test_prompts_longer_than_the_window_generate_as_hf(name, chunk):
    model = _model(name)
    engine = Engine(model, Tok(), DeltaStore(model, "base"), EngineConfig(max_batch=4, prefill_chunk=chunk), eos=set())
    got = engine.generate(PROMPTS, [None] * 4, [SamplingParams(max_tokens=n) for n in COUNTS])
    assert [g.token_ids for g in got] == _hf(model, PROMPTS, COUNTS)


@pytest.mark.parametrize("name,window", [("gemma2", 4), ("gemma2", 6), ("mistral", 6), ("qwen2", 4)])
@pytest.mark.parametrize("max_batch", [2, 3])
def test_rows_join_and_leave_a_running_batch_of_sliding_layers_exactly(name, window, max_batch):
    # more prompts than batch slots: rows of different lengths join while others decode and leave; each sliding
    # layer keeps its last min(kept, width) columns through every rebuild
    model = _model(name, window)
    engine = Engine(model, Tok(), DeltaStore(model, "base"), EngineConfig(max_batch=max_batch, prefill_chunk=5),
                    eos=set())
    assert engine.config.max_batch == max_batch  # batched, not one row at a time
    got = engine.generate(PROMPTS, [None] * 4, [SamplingParams(max_tokens=n) for n in COUNTS])
    assert [g.token_ids for g in got] == _hf(model, PROMPTS, COUNTS)


def test_gemma2_with_a_window_as_long_as_the_context_batches_rows_of_different_lengths():
    model = _model("gemma2", window=64)
    engine = Engine(model, Tok(), DeltaStore(model, "base"), EngineConfig(max_batch=4), eos=set())
    assert engine.config.max_batch == 4
    got = engine.generate(PROMPTS, [None] * 4, [SamplingParams(max_tokens=n) for n in COUNTS])
    assert [g.token_ids for g in got] == _hf(model, PROMPTS, COUNTS)
    assert engine._kv.width == 0  # every row left


def test_rebuilt_sliding_layers_keep_their_count_of_positions_and_the_width_is_the_full_layers():
    model = _model("gemma2")
    engine = Engine(model, Tok(), DeltaStore(model, "base"), EngineConfig(max_batch=1), eos=set())

    engine.submit(GenerateRequest(PROMPTS[0], SamplingParams(max_tokens=5), None))
    engine.step()
    sliding, full = engine._kv.cache.layers
    assert sliding.keys.shape[-2] == 5 and full.keys.shape[-2] == 20  # window − 1 kept, every column kept
    assert sliding.get_seq_length() == full.get_seq_length() == engine._kv.width == 20
    engine.step()
    assert sliding.get_seq_length() == engine._kv.width == 21
