"""Delta merges written as a checkpoint, streamed: ``θ₀ + τ_m`` tensor by tensor, no model in memory.

A merge of deltas with ``output="checkpoint"`` used to collect the merged delta and hand it to
:func:`deltatune.api.apply_to_checkpoint` (the *model path*): load the base with ``from_pretrained``, load the
task heads, merge every merged parameter (:meth:`DensePart.merge_into <deltatune.parts.dense.DensePart>`), and
save each state-dict tensor once with ``config.to_json_string()`` and the base's tokenizer files.
:func:`streamable_base` plans the same output without weights: the architecture
:func:`deltatune.api.load_base_for` picks (a ``*ForSequenceClassification`` with ``num_labels`` = the head's
rows when the merge keeps a ``classifier``/``score`` head) is built on the ``meta`` device under the dtype
``from_pretrained`` loads in, and :meth:`StreamedCheckpoint.write` sends every tensor through the shard writer
(:func:`deltatune.algebra.output.write_planned`), reading the checkpoint one tensor at a time:

* loaded dtype ``D`` (transformers' ``dtype="auto"``): the config's ``dtype``, else the checkpoint's one floating
  dtype; tensor ``n`` of the loaded model is the stored tensor ``.to(T_n)``, ``T_n`` its dtype in the model built
  under ``D`` (what the loader casts to; ``D`` for every floating parameter);
* names: transformers' own key renaming (``base_model_prefix`` added or stripped, registered renames) maps the
  checkpoint's names onto the model's; tensors it leaves unmatched are dropped, as loading drops them; tied
  tensors are written once, under their first state-dict name;
* a merged parameter: ``θ = (θ₀.float() + τ_m.float()).to(T_n)`` (the fp32 sum cast back of ``merge_into``);
  a task-head tensor: the merged head copied into ``T_n`` (``load_state_dict``); any other: ``θ₀``;
  then ``θ.to(out_dtype)`` for floating tensors when ``out_dtype`` is set;
* ``config.json``: the config ``from_pretrained`` leaves on the model (``dtype`` = ``D``; ``num_labels``), with
  ``architectures`` = the class written and a classifier's ``id2label``/``label2id`` = the label names of the heads'
  task (:func:`deltatune.algebra.labels.describe_classifier`, as the model path records them), as
  ``to_json_string()``.  A merge keeping several inputs' heads is refused before anything is merged
  (:func:`deltatune.algebra.task_heads.require_one_task`).

:func:`streamable_base` returns ``None`` — the caller falls back to the model path, which loads the whole base —
only where the streamed output could differ from it (see :func:`_refusal` and :func:`_tensor_sources`):
transformers older than 5 (other loading rules: fp32 by default, other renames), a base folder that is not one
``model.safetensors`` or one index, a quantized, custom-weight-file or fp32-kept-module base, no single loaded
dtype, a checkpoint key the loader converts (fuses) or two keys landing on one name, a model tensor the
checkpoint does not hold (the loader would initialise it at random), a tied group stored under more than one
name, an empty tensor (the model path's storage-pointer de-duplication would drop it), a merged tensor that is
not one written parameter of the same shape, a head that is not a module with exactly those tensors, or a
fingerprint parameter with no stored value.  The model path then raises its own error where it has one.

The two outputs differ only outside the checkpoint's content: the streamed one writes the merged tensors first
(so tensors may sit in other shards, under the same names, dtypes and values) and adds the merge record
``deltatune_merge.json``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from deltatune.algebra.checkpoint import INDEX, CheckpointReader, config_with_dtype
from deltatune.algebra.labels import describe_classifier
from deltatune.algebra.output import write_planned
from deltatune.algebra.task_heads import require_one_task
from deltatune.errors import NotMergeable
from deltatune.fingerprint import SAMPLED_TENSORS, base_parameters, check_fingerprint
from deltatune.io.json_io import parse_json

Source = str | Tensor  # a checkpoint tensor's name, or a merged task-head tensor


@dataclass
class StreamedCheckpoint:
    """What the model path would write, tensor by tensor: ``sources`` maps each written name (the loaded
    model's state-dict names, tied tensors once) to its stored tensor or merged head, ``dtypes`` to its dtype in
    the loaded model, ``shapes`` to its shape; ``keys`` are the merged tensors in the order the merge yields them."""

    reader: CheckpointReader
    keys: list[str]
    sources: dict[str, Source]
    dtypes: dict[str, torch.dtype]
    shapes: dict[str, tuple[int, ...]]
    out_dtype: torch.dtype | None
    config: bytes

    def loaded(self, name: str) -> Tensor:
        """``θ₀`` as the loaded model holds it: the stored tensor ``.to(T)``, or the head copied into ``T``."""
        source, dtype = self.sources[name], self.dtypes[name]
        if isinstance(source, str):
            return self.reader.get(source).to(dtype)
        return torch.empty(self.shapes[name], dtype=dtype).copy_(source)

    def written_dtype(self, name: str) -> torch.dtype:
        dtype = self.dtypes[name]
        return self.out_dtype if self.out_dtype is not None and dtype.is_floating_point else dtype

    def written(self, value: Tensor) -> Tensor:
        """``value.to(out_dtype)`` for a floating tensor when ``out_dtype`` is set (``apply_to_checkpoint``'s cast)."""
        return value.to(self.out_dtype) if self.out_dtype is not None and value.is_floating_point() else value

    def merged(self, name: str, tau: Tensor) -> Tensor:
        """``(θ₀.float() + τ_m.float()).to(T)``, cast for writing: ``W ← W + ΔW`` of the model path."""
        return self.written((self.loaded(name).float() + tau.float()).to(self.dtypes[name]))

    def tensors(self, merged: Iterable[tuple[str, Tensor]]) -> Iterator[tuple[str, Tensor]]:
        """The merged tensors as they arrive, then every other tensor, in :meth:`plan` order."""
        for name, tau in merged:
            yield name, self.merged(name, tau)
        merged_keys = set(self.keys)
        for name in self.sources:
            if name not in merged_keys:
                yield name, self.written(self.loaded(name))

    def plan(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        merged_keys = set(self.keys)
        names = self.keys + [n for n in self.sources if n not in merged_keys]
        return [(n, self.written_dtype(n), self.shapes[n]) for n in names]

    def files(self) -> list[tuple[str, bytes]]:
        """``config.json`` as the loaded model's config writes it (with ``out_dtype`` as its dtype), and the
        tokenizer files the model path copies."""
        from deltatune.api import _tokenizer_files

        return [("config.json", config_with_dtype(self.config, self.out_dtype)),
                *_tokenizer_files(str(self.reader.path))]

    def write(self, out: Path, merged: Iterable[tuple[str, Tensor]], shard_size: str | int,
              record: dict[str, Any], overwrite: bool = False) -> Path:
        """Stream the checkpoint into ``out`` through :func:`write_planned` (atomic)."""
        return write_planned(out, self.plan(), self.tensors(merged), shard_size, self.files, record, overwrite)


def _follows_the_loader() -> bool:
    """transformers ≥ 5, whose loading rules (``dtype="auto"``, key renaming, symmetric tying) this module
    reproduces; an older one loads in fp32 and renames otherwise, so its merges take the model path."""
    import importlib.util

    return importlib.util.find_spec("transformers.core_model_loading") is not None


def _auto_class(path: Path, heads: dict[str, Any]) -> tuple[Any, Any] | None:
    """``(auto class, config)`` as :func:`deltatune.api.load_base_for` loads them: a classifier with the
    head's rows as ``num_labels`` for a ``classifier``/``score`` head, else a causal LM or the bare model."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    head = next((h for h in ("classifier", "score") if h in heads), None)
    try:
        if head is not None:
            weight = heads[head].get("weight")
            labels = int(weight.shape[0]) if weight is not None else 2
            return AutoModelForSequenceClassification, AutoConfig.from_pretrained(path, num_labels=labels)
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError):
        return None
    archs = getattr(config, "architectures", None) or []
    causal = any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs)
    return (AutoModelForCausalLM if causal else AutoModel), config


def _load_dtype(config: Any, reader: CheckpointReader) -> torch.dtype | None:
    """transformers' ``dtype="auto"``: the config's ``dtype``, else the checkpoint's floating dtype (``None``
    where it holds several: which one the loader picks depends on the file order)."""
    dtype = getattr(config, "dtype", None)
    if dtype is None:
        if "dtype" in _index_metadata(reader.path):
            return None  # the loader would take the index's word for it
        found = {reader.dtype(k) for k in reader.names() if reader.is_floating(k) and reader.dtype(k).itemsize > 1}
        dtype = found.pop() if len(found) == 1 else None
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


def _index_metadata(path: Path) -> dict[str, Any]:
    """The ``metadata`` of the checkpoint's safetensors index (empty without an index)."""
    if not (path / INDEX).is_file():
        return {}
    metadata = parse_json((path / INDEX).read_text(encoding="utf-8"), str(path / INDEX)).get("metadata")
    return metadata if isinstance(metadata, dict) else {}


def _refusal(config: Any, path: Path) -> bool:
    """True where ``from_pretrained`` reads other files or quantizes: the stream could not match it."""
    one_file = (path / "model.safetensors").is_file() != (path / INDEX).is_file()
    return (not one_file or getattr(config, "quantization_config", None) is not None
            or bool(getattr(type(config), "extra_files", ())) or bool(getattr(config, "transformers_weights", None)))


def _keeps_fp32(model: nn.Module, dtype: torch.dtype) -> bool:
    """True where the loader's dtype plan keeps some modules in fp32 under ``dtype`` (``_keep_in_fp32_modules``
    in fp16, ``_keep_in_fp32_modules_strict`` in fp16 and bf16): a per-module plan this stream does not follow."""
    if dtype == torch.float16 and getattr(model, "_keep_in_fp32_modules", None):
        return True
    return dtype in (torch.float16, torch.bfloat16) and bool(getattr(model, "_keep_in_fp32_modules_strict", None))


def _meta_model(reader: CheckpointReader, heads: dict[str, Any]) -> nn.Module | None:
    """The model ``from_pretrained`` would build, on ``meta`` under its load dtype, with the config it records."""
    path = reader.path
    found = _auto_class(path, heads) if path.is_dir() else None
    if found is None:
        return None
    cls, config = found
    dtype = _load_dtype(config, reader)
    if dtype is None or _refusal(config, path):
        return None
    for sub in [config, *(getattr(config, key, None) for key in getattr(config, "sub_configs", {}))]:
        if sub is not None:
            sub.dtype = dtype  # what ``from_pretrained`` records on the config and its sub-configs
    try:
        with torch.device("meta"):
            model = cls.from_config(config, dtype=dtype)
    except (ValueError, KeyError, TypeError):
        return None  # no such architecture (e.g. no classifier for this model type): the model path says why
    return None if _keeps_fp32(model, dtype) else model


def _checkpoint_names(model: nn.Module, reader: CheckpointReader) -> dict[str, str] | None:
    """``model name → checkpoint name`` as transformers' loader renames the checkpoint's keys (in its order,
    with its retry without renames); ``None`` for a converted (fused) key, two keys on one name, or a
    transformers without this loader."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key
    except ImportError:
        return None
    transforms = get_model_conversion_mapping(model, None, None)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta, prefix = model.state_dict(), model.base_model_prefix
    names: dict[str, str] = {}
    for key in sorted(reader.names(), key=dot_natural_key):
        name, pattern = rename_source_key(key, renamings, converters, prefix, meta)
        if name not in meta and key in meta:
            name, pattern = rename_source_key(key, [], [], base_model_prefix=prefix, meta_state_dict=meta)
        if name not in meta:
            continue  # an unexpected key: loading drops it
        if pattern is not None or name in names:
            return None
        names[name] = key
    return names


def _head_tensors(model: nn.Module, heads: dict[str, dict[str, Tensor]]) -> dict[str, Tensor] | None:
    """``state-dict name → merged head tensor``; ``None`` unless each head is a module whose state dict has
    exactly those tensors and shapes (``load_state_dict(strict=True)`` of the model path)."""
    tensors: dict[str, Tensor] = {}
    for head, own in heads.items():
        try:
            module = model.get_submodule(head)
        except AttributeError:
            return None
        expected = module.state_dict()
        if set(expected) != set(own) or any(tuple(expected[k].shape) != tuple(t.shape) for k, t in own.items()):
            return None
        tensors.update({f"{head}.{k}" if head else k: t for k, t in own.items()})
    return tensors


def _tied_groups(model: nn.Module) -> dict[str, list[str]]:
    """First state-dict name → every name of that tensor (tied tensors share one)."""
    groups: dict[int, list[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(t), []).append(name)
    return {names[0]: names for names in groups.values()}


def _tensor_sources(model: nn.Module, reader: CheckpointReader, stored: dict[str, str],
                    heads: dict[str, Tensor]) -> dict[str, Source] | None:
    """Written name → its stored tensor or merged head (a head replaces what loading put there); ``None``
    where a tensor would keep its random initialisation, a tied group is stored twice (the loader may untie
    it), a stored shape differs, or a tensor is empty."""
    meta = model.state_dict()
    sources: dict[str, Source] = {}
    for first, names in _tied_groups(model).items():
        found = [heads[n] if n in heads else stored[n] for n in names if n in heads or n in stored]
        if len(found) != 1 or meta[first].numel() == 0:
            return None
        if isinstance(found[0], str) and reader.shape(found[0]) != tuple(meta[first].shape):
            return None
        sources[first] = found[0]
    return sources


def _merged_keys_fit(model: nn.Module, sources: dict[str, Source], shapes: dict[str, tuple[int, ...]]) -> bool:
    """Every merged tensor is a written, stored parameter of the same shape (what ``merge_into`` adds to); a bias
    the merge adds to a bias-free module is not, so such a merge takes the model path, whose
    :func:`express_added_biases` makes the config create it."""
    params = dict(model.named_parameters())
    return all(isinstance(sources.get(k), str) and k in params and tuple(params[k].shape) == tuple(shape)
               for k, shape in shapes.items())


def _check_fingerprint(model: nn.Module, reader: CheckpointReader, sources: dict[str, Source],
                       heads: Iterable[str], expected: dict[str, Any], where: str) -> bool:
    """:func:`check_fingerprint` of the base as loaded: the sampled parameters are read, cast to their loaded
    dtype, into the meta model (swapped in place, so ties hold).  False when one has no stored value."""
    heads = list(heads)
    stored = {id(t): sources.get(n) for n, t in model.state_dict(keep_vars=True).items() if n in sources}
    params = sorted(base_parameters(model, heads), key=lambda item: item[0])
    step = max(1, len(params) // SAMPLED_TENSORS)
    sampled = [(p, stored.get(id(p))) for _, p in params[::step][:SAMPLED_TENSORS]]
    if any(not isinstance(source, str) for _, source in sampled):
        return False
    for p, source in sampled:
        torch.utils.swap_tensors(p, nn.Parameter(reader.get(source).to(p.dtype), requires_grad=False))
    check_fingerprint(expected, model, heads, where)
    return True


def streamable_base(reader: CheckpointReader | None, shapes: dict[str, tuple[int, ...]],
                    heads: dict[str, dict[str, Tensor]], out_dtype: torch.dtype | None,
                    expected: dict[str, Any] | None, force: bool, where: str) -> StreamedCheckpoint | None:
    """How to stream the merge of ``shapes`` (merged tensors) and ``heads`` into the base checkpoint in
    ``reader`` as the model path would write it (see the module docstring), or ``None`` to fall back.

    Checks the inputs' base fingerprint as applying the delta would (unless ``force``):
    :class:`~deltatune.errors.FingerprintMismatch` before anything is written."""
    require_one_task(heads, where)  # before anything is merged: a checkpoint holds one head per module
    if reader is None or not _follows_the_loader():
        return None
    model = _meta_model(reader, heads)
    if model is None:
        return None
    describe_classifier(model, getattr(heads, "task", None))  # as apply_to_checkpoint records it
    stored, head_tensors = _checkpoint_names(model, reader), _head_tensors(model, heads)
    if stored is None or head_tensors is None:
        return None
    sources = _tensor_sources(model, reader, stored, head_tensors)
    if sources is None or not _merged_keys_fit(model, sources, shapes):
        return None
    meta = model.state_dict()
    plan = StreamedCheckpoint(reader, list(shapes), sources, {n: meta[n].dtype for n in sources},
                              {n: tuple(meta[n].shape) for n in sources}, out_dtype,
                              model.config.to_json_string().encode())
    if not force and expected and not _check_fingerprint(model, reader, sources, heads, expected, where):
        return None
    return plan


#: config flags that give every module of a group a bias (Llama, Mistral-style configs: ``attention_bias`` for
#: q/k/v/o, ``mlp_bias`` for gate/up/down; the model class decides which modules each flag reaches)
BIAS_FLAGS = ("attention_bias", "mlp_bias")


def _bias_shapes(model: nn.Module, config: Any) -> dict[str, tuple[int, ...]]:
    """``name → shape`` of the ``.bias`` tensors of ``type(model)`` built from ``config`` on ``meta``: what
    ``from_pretrained`` of a checkpoint with that config creates (and loads stored biases into)."""
    with torch.device("meta"):
        built = type(model)._from_config(copy.deepcopy(config))
    return {n: tuple(t.shape) for n, t in built.state_dict().items() if n.endswith(".bias")}


def express_added_biases(model: nn.Module, where: str) -> None:
    """Make ``model``'s config load the biases a merge added to bias-free modules (BitFit on Llama), before it is
    written as a checkpoint: without it ``from_pretrained`` builds those modules without a bias and drops the
    stored ones, so the checkpoint computes the base, not the merged model.

    Each flag of :data:`BIAS_FLAGS` that is off in the config and would create one of the added biases is turned
    on; a flag gives every module of its group a bias, so a module of the group that got none is given a zero bias
    (the model computes the same).  An added bias no flag creates (an architecture without such flags, a module
    outside every group) raises :class:`~deltatune.errors.NotMergeable` naming the modules — nothing is written.
    A model without added biases is left alone."""
    config = model.config
    plain = _bias_shapes(model, config)
    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items() if n.endswith(".bias")}
    added = {n for n in shapes if n not in plain}
    if not added:
        return
    reached: dict[str, dict[str, tuple[int, ...]]] = {}
    for flag in BIAS_FLAGS:
        if getattr(config, flag, None) is False:
            flagged = _bias_shapes(model, _with_flag(config, flag))
            reached[flag] = {n: s for n, s in flagged.items() if n not in plain}
    chosen = [flag for flag, names in reached.items() if added & set(names)]
    created = {n: s for flag in chosen for n, s in reached[flag].items()}
    wrong = [n for n in shapes if n in added and created.get(n) != shapes[n]]  # in model order
    if wrong:
        modules = [n.rsplit(".", 1)[0] for n in wrong]
        raise NotMergeable(f"{where}: the delta adds biases to the bias-free modules {modules[:6]}"
                           f"{' …' if len(modules) > 6 else ''}, which the config of {type(model).__name__} cannot "
                           f"create (no flag among {list(BIAS_FLAGS)} gives exactly those modules a bias): a "
                           "checkpoint would load without them; nothing was written. Use the delta attached, or "
                           "train BitFit without add_missing", module=modules[0], kind="bias")
    for flag in chosen:
        setattr(config, flag, True)
    for name in sorted(set(created) - added):
        _add_zero_bias(model, name, created[name])


def _with_flag(config: Any, flag: str) -> Any:
    """A copy of ``config`` with ``flag`` on."""
    flagged = copy.deepcopy(config)
    setattr(flagged, flag, True)
    return flagged


def _add_zero_bias(model: nn.Module, name: str, shape: tuple[int, ...]) -> None:
    """Give the module owning ``name`` a zero bias of ``shape`` (in its weight's dtype and device)."""
    module = model.get_submodule(name.rsplit(".", 1)[0])
    ref = module.weight
    module.bias = nn.Parameter(torch.zeros(shape, dtype=ref.dtype, device=ref.device), requires_grad=False)
