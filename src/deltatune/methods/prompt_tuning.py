"""Prompt tuning (Lester et al., "The Power of Scale for Parameter-Efficient Prompt Tuning", EMNLP 2021):
``n`` trainable virtual-token embeddings prepended to the input embeddings; the base model is frozen.

One model-level :class:`~deltatune.parts.prompt.PromptPart` stored under the module name ``""``.  The
initialisations follow PEFT's ``PromptTuningInit``: ``random`` draws ``N(0, 1)`` (PEFT's ``nn.Embedding``
default), ``vocab`` copies the embeddings of ``n`` token ids drawn uniformly from the vocabulary
(``SAMPLE_VOCAB``), ``text`` copies the embeddings of an init text's token ids, repeated and cut to ``n``
(``TEXT``).  The text is tokenized with ``tokenizer`` (a name or local path; default: the model's own
``name_or_path``, ``add_special_tokens`` as PEFT); where no tokenizer is available (offline, tiny random
models) give the ids directly as ``init_token_ids``.  Not mergeable: merge, compose and compress refuse it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import nn

from deltatune.config import require, seed_option
from deltatune.errors import ConfigError
from deltatune.methods.registry import Method, register_method
from deltatune.parts.base import MODEL_LEVEL
from deltatune.parts.prompt import PromptPart, init_token_ids, input_embedding, model_context

INITS = ("random", "vocab", "text")


@dataclass
class PromptTuningConfig:
    method: ClassVar[str] = "prompt_tuning"
    num_virtual_tokens: int = field(default=20, metadata={"help": "virtual tokens n prepended to every input "
                                                                  "(n + the longest input ≤ the model's context)"})
    init: Literal["random", "vocab", "text"] = field(
        default="random", metadata={"help": "random: N(0,1); vocab: embeddings of random vocabulary tokens; text: "
                                            "embeddings of init_text (or init_token_ids), repeated to n"})
    init_text: str | None = field(default=None, metadata={"help": "init text (init=text), tokenized by tokenizer"})
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer name or path for init_text "
                                                                  "(default: the model's name_or_path)"})
    init_token_ids: list[int] | None = field(default=None, metadata={"help": "token ids of the init text "
                                                                             "(init=text, instead of init_text)"})
    seed: int = seed_option("seed of the random/vocab initialisation")

    def __post_init__(self) -> None:
        require(self.num_virtual_tokens >= 1,
                f"prompt_tuning config.num_virtual_tokens must be ≥ 1, got {self.num_virtual_tokens}")
        require(self.init in INITS, f"prompt_tuning config.init must be one of {list(INITS)}, got {self.init!r}")
        if self.init == "text":
            require((self.init_text is None) != (self.init_token_ids is None),
                    "prompt_tuning config: init=text needs exactly one of init_text or init_token_ids")
            require(self.init_text is None or bool(self.init_text.strip()), "prompt_tuning config.init_text is empty")
            require(self.init_token_ids is None or len(self.init_token_ids) > 0,
                    "prompt_tuning config.init_token_ids is empty")
            require(all(i >= 0 for i in self.init_token_ids or ()),
                    f"prompt_tuning config.init_token_ids must be ≥ 0, got {self.init_token_ids}")
        else:
            given = [n for n in ("init_text", "tokenizer", "init_token_ids") if getattr(self, n) is not None]
            require(not given, f"prompt_tuning config: {given} apply only to init=text, not init={self.init!r}")


def _text_ids(model: nn.Module, config: PromptTuningConfig) -> list[int]:
    if config.init_token_ids is not None:
        return list(config.init_token_ids)
    name = config.tokenizer or getattr(getattr(model, "config", None), "name_or_path", "") or None
    if name is None:
        raise ConfigError("prompt_tuning config: init=text with init_text needs a tokenizer (config.tokenizer, or a "
                          "model loaded from a path), or give the ids as init_token_ids")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name)  # never trust_remote_code (PEFT drops it too)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"prompt_tuning config: cannot load tokenizer {name!r} ({str(exc)[:120]}); give the "
                          "init text's ids as init_token_ids instead") from None
    ids = tok(config.init_text)["input_ids"]
    if not ids:
        raise ConfigError(f"prompt_tuning config: init_text {config.init_text!r} tokenizes to no tokens")
    return ids


def initial_prompt(model: nn.Module, config: PromptTuningConfig) -> torch.Tensor:
    """The ``(n, d)`` fp32 initial virtual tokens for ``config`` (see the module docstring)."""
    embedding = input_embedding(model)
    table = embedding.weight
    vocab, dim = table.shape
    n = config.num_virtual_tokens
    gen = torch.Generator().manual_seed(config.seed)
    if config.init == "random":
        return torch.randn(n, dim, generator=gen)
    if config.init == "vocab":
        ids = torch.randint(0, vocab, (n,), generator=gen)
    else:
        ids = torch.tensor(init_token_ids(_text_ids(model, config), n))
        bad = sorted({int(i) for i in ids if not 0 <= int(i) < vocab})
        if bad:
            raise ConfigError(f"prompt_tuning config: init token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
    with torch.no_grad():  # through the module, as PEFT does: a scaled embedding (Gemma) applies its embed_scale
        return embedding(ids.to(table.device)).float().cpu()


@register_method
class PromptTuning(Method):
    name = "prompt_tuning"
    config_cls = PromptTuningConfig
    summary = "n trainable virtual-token embeddings prepended to the input (prompt tuning, Lester et al. 2021)"
    part_kinds = (PromptPart,)
    default_lr = 3e-2
    identity_at_init = False  # the virtual tokens change the outputs from the start
    examples: ClassVar[dict[str, dict]] = {
        "": {"num_virtual_tokens": 4},
        "vocab": {"num_virtual_tokens": 3, "init": "vocab", "seed": 1},
        "text": {"num_virtual_tokens": 5, "init": "text", "init_token_ids": [5, 6, 7]},
    }

    def create_parts(self, model: nn.Module, config: PromptTuningConfig, exclude: list[str]) -> dict[str, PromptPart]:
        context = model_context(model)
        if context is not None and config.num_virtual_tokens >= context[0]:
            raise ConfigError(f"prompt_tuning config.num_virtual_tokens is {config.num_virtual_tokens}, which leaves "
                              f"no room for input in the model's context of {context[0]} positions "
                              f"(config.{context[1]})")
        init = initial_prompt(model, config)
        part = PromptPart(config.num_virtual_tokens, init.shape[1])
        with torch.no_grad():
            part.prompt_embeddings.copy_(init)
        part.to(input_embedding(model).weight.device)
        return {MODEL_LEVEL: part}
