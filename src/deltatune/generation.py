"""``generate``: continue prompts with causal-LM deltas, greedy or sampled, several deltas in one batch.

Rows are ``(prompt, delta)`` pairs, left-padded into one batch and run by ``transformers``' ``generate`` inside a
routing context (:mod:`deltatune.routing`), so every decoding step routes each row to its own delta; with one
delta it is a plain batched generation.  Greedy when ``temperature`` is 0, else sampled with ``temperature``,
``top_p`` and ``top_k`` from ``seed``.  Generation stops at ``max_new_tokens`` or at any of the ``stop`` strings
(the text is cut before it).  With one row, ``stream`` receives the text as it is produced.

**Chat deltas.** A delta trained with ``--task chat`` (its provenance task is ``chat``) learnt conversations in the
tokenizer's chat template, so its rows get the prompt as one user turn in that template with the generation
prompt (``apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)``), tokenized
without added special tokens as in training (the template writes BOS and its markers itself).  ``raw=True`` sends
the prompt as given, as for every other delta.  A base tokenizer without a template is a :class:`ConfigError`; a
template other than the one trained with (``chat_template_sha256`` in the provenance) is warned about.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from deltatune.api import as_delta, base_model_path, load_base_for
from deltatune.config import SEED_RANGE
from deltatune.delta import Delta
from deltatune.errors import ConfigError, DataError
from deltatune.model import apply_delta, mixed_batch, model_parts
from deltatune.parts.prompt import cached_positions, from_caller_layout
from deltatune.provenance import require_unstacked
from deltatune.train.stacking import attach_for_use


def _name(item: Delta | str | Path, index: int) -> str:
    if isinstance(item, Delta):
        return f"delta{index}"
    path = Path(item)
    return path.parent.name if path.name in ("delta", "best") and path.parent.name else path.name


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to (not including) the first occurrence of any stop string."""
    ends = [i for s in stop if s and (i := text.find(s)) >= 0]
    return text[:min(ends)] if ends else text


def is_chat_delta(delta: Delta) -> bool:
    """Whether ``delta`` was trained with ``--task chat`` (its provenance says so)."""
    task = delta.provenance.task or {}
    return task.get("task") == "chat" or task.get("name") == "chat"


def check_chat_template(tokenizer: Any, delta: Delta, where: str, model: str) -> None:
    """ConfigError when ``tokenizer`` has no chat template for the chat delta at ``where``; a warning when its
    template is not the one the delta was trained with."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise ConfigError(f"{where}: the delta was trained with --task chat, but the tokenizer of {model} has no chat "
                          "template to format the prompt with; pass --raw (raw=True) to send the prompt as is")
    trained = (delta.provenance.task or {}).get("chat_template_sha256")
    if trained and hashlib.sha256(str(template).encode()).hexdigest() != trained:
        warnings.warn(f"{where}: the tokenizer of {model} has another chat template than the delta was trained with "
                      f"(sha256 {str(trained)[:12]}…); the prompt is formatted with the tokenizer's", stacklevel=3)


def chat_prompt(tokenizer: Any, prompt: str) -> str:
    """``prompt`` as one user turn in the tokenizer's chat template, ending with the generation prompt."""
    from deltatune.train.chat import render_chat

    try:
        return render_chat(tokenizer, [{"role": "user", "content": prompt}], True, f"the prompt {prompt[:40]!r}")
    except DataError as exc:
        raise ConfigError(f"{exc}; pass --raw to send it as is") from None


def encode_rows(tokenizer: Any, texts: Sequence[str], special: Sequence[bool]) -> dict[str, torch.Tensor]:
    """Left-padded ``input_ids`` and ``attention_mask`` of ``texts``, each tokenized with or without the
    tokenizer's special tokens (``special``)."""
    ids = [list(tokenizer(t, add_special_tokens=s)["input_ids"]) for t, s in zip(texts, special, strict=True)]
    width = max(len(x) for x in ids)
    if width == 0:
        raise ConfigError("every prompt is empty after tokenization; give at least one token to continue")
    pad = tokenizer.pad_token_id
    return {"input_ids": torch.tensor([[pad] * (width - len(x)) + x for x in ids], dtype=torch.long),
            "attention_mask": torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], dtype=torch.long)}


def cache_prefixes(net: torch.nn.Module, names: Sequence[str | None]) -> list[int] | None:
    """Per row (the delta ``names[i]``, ``None``: the base), how many positions its model-level part (prompt
    tuning's virtual tokens) puts before the prompt — 0 without one — or ``None`` when some row's part cannot
    continue from a KV cache (:meth:`~deltatune.parts.base.Part.cached_prefix`): then every step is a full forward."""
    container = model_parts(net)
    if container is None or not container.parts:
        return [0] * len(names)
    parts = [container.parts[n] if n is not None and n in container.parts else None for n in names]
    prefixes = [0 if p is None else p.cached_prefix() for p in parts]
    return None if any(n is None for n in prefixes) else prefixes


@contextmanager
def continuing_past_prefixes(net: torch.nn.Module, prefixes: Sequence[int], first_seq: int) -> Iterator[None]:
    """Within the block, ``transformers``' ``generate`` decodes ``net`` from its KV cache although rows have
    model-level parts: the first forward prepends each row's ``prefixes[i]`` virtual tokens to the ``first_seq``
    prompt tokens (and so puts them in the cache), and every later step continues with an attention mask and
    positions that ``generate`` counts over the caller's tokens only — translated here (wrapping the model's
    ``prepare_inputs_for_generation``) into the cache's layout, which the part checks
    (:func:`deltatune.parts.prompt.from_caller_layout`, :func:`~deltatune.parts.prompt.continuation`).  A step
    then costs one token's forward, not the whole sequence's."""
    if not any(prefixes):
        yield
        return
    lengths = torch.tensor(list(prefixes), dtype=torch.long)
    prepare_inputs = net.prepare_inputs_for_generation

    def prepare(*args: Any, **kwargs: Any) -> dict[str, Any]:
        inputs = prepare_inputs(*args, **kwargs)
        past = cached_positions(inputs)
        if past:
            tokens = inputs["input_ids"] if inputs.get("input_ids") is not None else inputs["inputs_embeds"]
            seq = int(tokens.shape[1])
            inputs["attention_mask"], inputs["position_ids"] = from_caller_layout(
                lengths.to(tokens.device), first_seq, past, seq, inputs.get("attention_mask"),
                inputs.get("position_ids"))
            if inputs.get("cache_position") is not None:  # transformers 4.x: the cache's slots, counted in it
                inputs["cache_position"] = torch.arange(past, past + seq, device=tokens.device)
        return inputs

    net.prepare_inputs_for_generation = prepare
    try:
        yield
    finally:
        del net.prepare_inputs_for_generation  # the class's own method again


class _Stream:
    """A ``transformers`` streamer for one row: decodes the new tokens and hands each new piece of text on."""

    def __init__(self, tokenizer: Any, prompt_tokens: int, emit: Callable[[str], None], stop: Sequence[str]) -> None:
        self.tokenizer, self.emit, self.stop = tokenizer, emit, stop
        self.skip, self.ids, self.shown = prompt_tokens, [], ""

    def put(self, value: torch.Tensor) -> None:
        tokens = value.reshape(-1).tolist()
        if self.skip:
            taken = min(self.skip, len(tokens))
            self.skip -= taken
            tokens = tokens[taken:]
        self.ids.extend(tokens)
        text = cut_at_stop(self.tokenizer.decode(self.ids, skip_special_tokens=True), self.stop)
        if len(text) > len(self.shown) and not text.endswith("\ufffd"):
            self.emit(text[len(self.shown):])
            self.shown = text

    def end(self) -> None:
        """Nothing buffered: every piece was emitted as it was decoded."""


def generate(deltas: Sequence[Delta | str | Path] | Delta | str | Path, prompts: Sequence[str] | str,
             model: str | None = None, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
             top_k: int = 0, seed: int = 0, stop: Sequence[str] = (), stream: Callable[[str], None] | None = None,
             verify: bool = True, proxy: Any | None = None, raw: bool = False) -> list[dict[str, Any]]:
    """Continue each prompt with each delta.  Returns one dict per prompt: ``{"prompt", "text"}`` for one delta,
    or ``{"prompt", <delta name>: text, …}`` for several.  A delta trained with ``--task chat`` gets each prompt
    as one user turn in the tokenizer's chat template (module docstring) unless ``raw``.  ``proxy`` (a
    :class:`deltatune.proxy.ProxyConfig`) steers every row with small proxy models (proxy tuning / EFT); then
    ``deltas`` may be empty and ``model`` names the large base."""
    from transformers import AutoTokenizer

    items = list(deltas) if isinstance(deltas, (list, tuple)) else [deltas]
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if (not items and (proxy is None or model is None)) or not prompts:
        raise ConfigError("generate needs at least one delta (or, with proxy tuning, --model) and one prompt")
    if max_new_tokens < 1 or temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ConfigError(f"generate needs max_new_tokens ≥ 1, temperature ≥ 0, 0 < top_p ≤ 1 and top_k ≥ 0; got "
                          f"{max_new_tokens}, {temperature}, {top_p}, {top_k}")
    if not SEED_RANGE[0] <= seed < SEED_RANGE[1]:  # before the model loads, not inside manual_seed after
        raise ConfigError(f"generate needs a seed in [{SEED_RANGE[0]}, {SEED_RANGE[1]}), got {seed}")
    names = [_name(item, i) for i, item in enumerate(items)]
    if len(set(names)) != len(names):
        names = [f"{n}#{i}" for i, n in enumerate(names)]
    loaded = [as_delta(item, verify=verify) for item in items]
    for item, d in zip(items, loaded, strict=True):
        if d.heads:
            raise ConfigError(f"{item}: the delta has a task head ({sorted(d.heads)}); generate needs a causal-LM "
                              "delta (use predict for classifiers)")
    path = base_model_path(loaded[0], model) if loaded else str(model)
    net = load_base_for(loaded[0], path).eval() if loaded else _plain_lm(path)
    if not (hasattr(net, "can_generate") and net.can_generate()):
        raise ConfigError(f"{path}: not a causal language model ({type(net).__name__}); generate needs one")
    if len(loaded) == 1:  # alone on its model: a stacked delta with the deltas it was trained on beneath it
        attach_for_use(net, loaded[0], names[0], where=str(items[0]))
    else:  # one model serves the mixed batch: a stacked delta's beneath would change the base for the others
        for name, d, item in zip(names, loaded, items, strict=True):
            require_unstacked(d, f"generate with {len(loaded)} deltas in one batch ({item}; generate with it alone)")
            apply_delta(net, d, name=name, where=str(item))
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    chat = [is_chat_delta(d) and not raw for d in loaded]
    for d, item, templated in zip(loaded, items, chat, strict=True):
        if templated:
            check_chat_template(tokenizer, d, str(item), path)
    rows = [(i, j) for i in range(len(prompts)) for j in range(max(1, len(items)))]
    templated_rows = [bool(chat) and chat[j] for _, j in rows]
    batch = encode_rows(tokenizer, [chat_prompt(tokenizer, prompts[i]) if t else prompts[i]
                                    for (i, _), t in zip(rows, templated_rows, strict=True)],
                        [not t for t in templated_rows])  # no token types for a decoder
    sampling = temperature > 0
    row_names = [names[j] if items else None for _, j in rows]
    prefixes = cache_prefixes(net, row_names)
    options: dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=sampling,
                                   pad_token_id=tokenizer.pad_token_id, use_cache=prefixes is not None)
    if sampling:
        options.update(temperature=temperature, top_p=top_p, top_k=top_k or None)
    if stop:
        options.update(stop_strings=list(stop), tokenizer=tokenizer)
    if stream is not None and len(rows) == 1:
        options["streamer"] = _Stream(tokenizer, int(batch["input_ids"].shape[1]), stream, stop)
    if proxy is not None:  # the large model's logits steered by small tuned − small base (deltatune.proxy)
        from transformers import LogitsProcessorList

        from deltatune.proxy import proxy_processor

        options["logits_processor"] = LogitsProcessorList([proxy_processor(
            proxy, net, tokenizer, path, batch["attention_mask"], verify)])
    torch.manual_seed(seed)
    with (torch.no_grad(), mixed_batch(net, row_names),
          continuing_past_prefixes(net, prefixes or [], int(batch["input_ids"].shape[1]))):
        out = net.generate(**batch, **options)
    new = out[:, batch["input_ids"].shape[1]:]
    texts = [cut_at_stop(tokenizer.decode(t, skip_special_tokens=True), stop) for t in new]
    results: list[dict[str, Any]] = [{"prompt": p} for p in prompts]
    for (i, j), text in zip(rows, texts, strict=True):
        results[i]["text" if len(items) <= 1 else names[j]] = text
    return results


def _plain_lm(path: str) -> torch.nn.Module:
    from deltatune.proxy import load_plain_lm

    return load_plain_lm(path)
