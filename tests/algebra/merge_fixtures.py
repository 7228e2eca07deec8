"""Fixtures for the merge engine: tiny random Llama checkpoints (base + fine-tunes) and random deltas."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import randomize_delta, tiny_llama
from transformers import LlamaConfig, LlamaForCausalLM

import deltatune

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=32, tie_word_embeddings=False)


def save_finetune(base: LlamaForCausalLM, path: Path, seed: int, std: float = 1e-3, vocab: int | None = None) -> Path:
    """``base`` + N(0, std²) on every tensor (optionally with a grown vocabulary), saved as safetensors."""
    g = torch.Generator().manual_seed(seed)
    cfg = LlamaConfig(**{**TINY, "vocab_size": vocab or TINY["vocab_size"]})
    model = LlamaForCausalLM(cfg)
    state = {}
    for k, v in base.state_dict().items():
        if vocab and v.shape[0] == TINY["vocab_size"] and ("embed" in k or "lm_head" in k):
            v = torch.cat([v, torch.randn(vocab - v.shape[0], *v.shape[1:], generator=g)])
        state[k] = v + torch.randn(v.shape, generator=g) * std
    model.load_state_dict(state)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**TINY))
    base.save_pretrained(root / "base")
    paths = {"base": root / "base"}
    for i in range(3):
        paths[f"ft{i}"] = save_finetune(base, root / f"ft{i}", 100 + i)
    return paths


def random_delta(config, seed: int, std: float = 0.02, model_seed: int = 0) -> deltatune.Delta:
    """A delta on tiny Llama with random non-zero tensors."""
    return randomize_delta(tiny_llama(model_seed), config, seed, std)
