"""Where merged task vectors go: a sharded checkpoint ``θ₀ + τ_m`` (streamed), or a delta (dense, sparse
or re-factorised low-rank parts; ``sparse`` is saved in the compact format), with the inputs' task heads
handled explicitly (averaged for a soup, kept per input otherwise: :mod:`deltatune.algebra.task_heads`)."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from deltatune.algebra.checkpoint import CheckpointReader, config_with_dtype
from deltatune.algebra.task_heads import CONFIG_KEY, TaskHeads, keep_heads
from deltatune.algebra.workspace import Workspace
from deltatune.delta import Delta
from deltatune.errors import ConfigError, ShapeMismatch
from deltatune.io.atomic import atomic_dir
from deltatune.io.outputs import CHECKPOINT_KIND, COMPACT_KIND, DELTA_KIND
from deltatune.io.shards import PlannedShardWriter, parse_size
from deltatune.parts.base import Part
from deltatune.parts.bias import BiasPart
from deltatune.parts.dense import DensePart
from deltatune.parts.layers import LayerKind, layer_kind
from deltatune.parts.sparse import SparsePart
from deltatune.provenance import Provenance, path_reference

RECORD_FILE = "deltatune_merge.json"
#: The output kind (see :func:`deltatune.io.atomic.atomic_dir`) each merge ``output`` is written as.
OUTPUT_KINDS = {"checkpoint": CHECKPOINT_KIND, "sparse": COMPACT_KIND, "dense": DELTA_KIND, "lowrank": DELTA_KIND}


def output_kind(output: str) -> str:
    """The kind of folder a merge with ``output`` writes ("checkpoint", "compact" or "delta")."""
    if output not in OUTPUT_KINDS:
        raise ConfigError(f"output must be one of {list(OUTPUT_KINDS)}, got {str(output)[:40]!r}")
    return OUTPUT_KINDS[output]


def align_rows(value: Tensor, rows: int | None) -> Tensor:
    """``value`` with ``rows`` rows: truncated, or extended by copies of its mean row (new tokens)."""
    if rows is None or rows == value.shape[0]:
        return value
    if rows < value.shape[0]:
        return value[:rows]
    return torch.cat([value, value.mean(0, keepdim=True).expand(rows - value.shape[0], *value.shape[1:])])


def write_checkpoint(out: Path, merged: Iterable[tuple[str, Tensor]], target: CheckpointReader,
                     shapes: dict[str, tuple[int, ...]], rows: dict[str, int], out_dtype: torch.dtype | None,
                     shard_size: str | int, record: dict[str, Any], workspace: Workspace | None = None,
                     overwrite: bool = False) -> Path:
    """Stream ``θ₀ + τ_m`` into sharded safetensors (atomically: a failure leaves nothing at ``out``).

    Every output tensor's name, dtype and shape is known before the merge starts, so each shard's header
    is written first and tensors go to disk as they are merged (:class:`PlannedShardWriter`).  Tensors
    the merge does not touch (integer buffers, …) are copied from ``target``.  With a ``workspace``,
    ``τ_m`` is updated in place and the base and the cast output use its ``"base"`` and ``"raw"`` buffers.
    An existing ``out`` must be an earlier checkpoint output unless ``overwrite``.
    """
    plan = _checkpoint_plan(target, shapes, rows, out_dtype)
    tensors = _checkpoint_tensors(merged, target, shapes, rows, out_dtype, workspace)
    return write_planned(out, plan, tensors, shard_size, lambda: _target_files(target, rows, out_dtype), record,
                         overwrite)


def write_planned(out: Path, plan: list[tuple[str, torch.dtype, tuple[int, ...]]],
                  tensors: Iterable[tuple[str, Tensor]], shard_size: str | int,
                  files: Callable[[], Iterable[tuple[str, bytes]]], record: dict[str, Any],
                  overwrite: bool = False) -> Path:
    """The shard writer of streamed merges: ``tensors`` (final values, in ``plan`` order: ``(name, dtype,
    shape)``) into sharded safetensors at ``out``, then ``files()`` (config, tokenizer) and the merge
    ``record``, atomically (a failure leaves nothing at ``out``; an existing ``out`` must be an earlier
    checkpoint output unless ``overwrite``)."""
    with atomic_dir(out, CHECKPOINT_KIND, overwrite=overwrite) as tmp:
        writer = PlannedShardWriter(tmp, plan, parse_size(shard_size))
        for key, value in tensors:
            writer.add(key, value)
        writer.finish()
        for name, data in files():
            (tmp / name).write_bytes(data)
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2, default=str))
    return out


def _checkpoint_plan(target: CheckpointReader, shapes: dict[str, tuple[int, ...]], rows: dict[str, int],
                     out_dtype: torch.dtype | None) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """``(name, dtype, shape)`` of every output tensor: the merged ones, then the rest of ``target``."""
    plan = []
    for key, shape in shapes.items():
        if key not in target:
            raise ShapeMismatch(f"target base {target.path} has no tensor {key!r}")
        want = (rows[key], *shape[1:]) if key in rows else tuple(shape)
        if key not in rows and target.shape(key) != want:
            raise ShapeMismatch(f"tensor {key!r}: the merged delta has shape {want}, the target base "
                                f"{target.path} has {target.shape(key)}")
        plan.append((key, out_dtype or target.dtype(key), want))
    return plan + [(k, target.dtype(k), target.shape(k)) for k in target.names() if k not in shapes]


def _checkpoint_tensors(merged: Iterable[tuple[str, Tensor]], target: CheckpointReader,
                        shapes: dict[str, tuple[int, ...]], rows: dict[str, int], out_dtype: torch.dtype | None,
                        workspace: Workspace | None) -> Iterator[tuple[str, Tensor]]:
    """``θ₀ + τ_m`` of each merged tensor (cast to ``out_dtype``), then ``target``'s untouched tensors."""
    for key, tau in merged:
        dtype = out_dtype or target.dtype(key)
        if workspace is None or key in rows or tau.dtype != torch.float32:
            yield key, align_rows(target.get_float(key), rows.get(key)).add_(tau).to(dtype)
            continue
        merged_value = tau.add_(workspace.read_float(target, key, "base"))  # θ₀ + τ_m, as above
        yield key, (merged_value if dtype == torch.float32 else
                    workspace.take("raw", merged_value.shape, dtype).copy_(merged_value))
    for key in target.names():
        if key not in shapes:
            yield key, target.get(key)


def _target_files(target: CheckpointReader, rows: dict[str, int], out_dtype: torch.dtype | None
                  ) -> list[tuple[str, bytes]]:
    """``target``'s config and tokenizer files; with grown/cut rows, ``vocab_size`` set to the new row count, and
    with ``out_dtype`` the config's dtype set to it (:func:`~deltatune.algebra.checkpoint.config_with_dtype`)."""
    files = []
    for name, data in target.extra_files():
        if name == "config.json":
            data = config_with_dtype(_with_vocab_size(data, rows), out_dtype)
        files.append((name, data))
    return files


def _with_vocab_size(config: bytes, rows: dict[str, int]) -> bytes:
    """``config.json`` with ``vocab_size`` set to the grown/cut row count (unchanged without ``rows``)."""
    if not rows:
        return config
    doc = json.loads(config)
    if "vocab_size" in doc:
        doc["vocab_size"] = max(rows.values())
    return json.dumps(doc, indent=2).encode()


def merged_heads(sources: Sequence[Any], per_input: list[dict[str, Any]], mode: str) -> TaskHeads:
    """Task heads of the merged delta (:mod:`deltatune.algebra.task_heads`), never dropped silently.

    ``auto``: the weighted average ``h = Σ_t w_t·h_t / Σ_t w_t`` when every input has the same heads (same names
    and shapes) and was trained on the same task (a soup); it is a convex combination of the inputs' heads only for
    weights ``w_t ≥ 0`` with ``Σ_t w_t > 0``, so any other weights (task arithmetic's negation, ``[1, −1]``) are a
    :class:`ConfigError` asking for ``heads='first'`` or ``'none'`` (a head of ``h_1 − h_2`` classifies nothing).
    Otherwise every input's heads are kept side by side, each under ``<head>@<input name>`` (inputs trained on
    different tasks: each task keeps its own head, and :func:`~deltatune.algebra.task_heads.for_task` picks one).
    ``first``: the first input's heads; ``none``: no heads.  The result's ``task`` is the task the heads' label
    names come from (``None`` for kept heads: each has its own, recorded in ``kept``).
    """
    if mode not in ("auto", "first", "none"):
        raise ConfigError(f"heads must be 'auto', 'first' or 'none', got {mode!r}")
    deltas: list[Delta] = [s.delta for s in sources]
    if mode == "none" or not any(d.heads for d in deltas):
        return TaskHeads()
    if mode == "first":
        return TaskHeads({h: dict(t) for h, t in deltas[0].heads.items()}, task=deltas[0].provenance.task)
    layout = [{(h, k, tuple(v.shape)) for h, t in d.heads.items() for k, v in t.items()} for d in deltas]
    tasks = [d.provenance.task for d in deltas]
    if any(lay != layout[0] for lay in layout) or any(t != tasks[0] for t in tasks):
        return keep_heads(deltas, [s.label for s in sources])
    w = [float(p["weight"]) for p in per_input]
    total = sum(w)
    if any(wi < 0 for wi in w) or total <= 0:
        raise ConfigError(f"heads='auto' averages the inputs' task heads with the merge weights, which needs weights "
                          f"≥ 0 with a positive sum; got {w}: merge with heads='first' (the first input's heads) or "
                          "heads='none' (in a recipe: heads: first | none)")
    return TaskHeads({h: {k: sum(wi * d.heads[h][k].float() for wi, d in zip(w, deltas, strict=True)) / total
                          for k in t} for h, t in deltas[0].heads.items()}, task=tasks[0])


def fingerprint_heads(heads: TaskHeads, sources: Sequence[Any]) -> frozenset[str] | None:
    """The task heads the merged delta is applied with, which its base fingerprint must leave out
    (:func:`~deltatune.algebra.sum_deltas.output_fingerprint`): the heads it carries; for heads kept per task, the
    head set each task's view (:func:`~deltatune.algebra.task_heads.for_task`) carries — its input's — or ``None``
    when those differ between tasks (no single full fingerprint fits them all)."""
    if not heads.kept:
        return frozenset(heads)
    views = {frozenset(sources[info["index"]].delta.heads) for info in heads.kept.values()}
    return next(iter(views)) if len(views) == 1 else None


def _sparse_part(tau: Tensor, kind: LayerKind) -> SparsePart:
    indices = tau.reshape(-1).nonzero().squeeze(1)
    part = SparsePart(tuple(tau.shape), indices, kind)
    with torch.no_grad():
        part.values.copy_(tau.reshape(-1)[part.indices])
    return part


def _added_bias_part(module: str, params: dict[str, Tensor]) -> BiasPart:
    """The merged bias of a module whose base has none (BitFit on Llama) as a bias part that creates it on merging;
    a merged update with other tensors of that module too is refused (one part cannot carry both)."""
    if set(params) != {"bias"}:
        raise ConfigError(f"{module}: the merged update adds a bias the base does not have (BitFit) beside "
                          f"{sorted(set(params) - {'bias'})}; one part cannot carry both: merge the BitFit deltas "
                          "apart from the others, or compose them live (deltatune.algebra.compose)")
    part = BiasPart(int(params["bias"].numel()), has_bias=False, dtype=params["bias"].dtype)
    part.load_tensors({"bias_delta": params["bias"].reshape(-1)}, f"merged {module}")
    return part


def _dense_part(params: dict[str, Tensor]) -> DensePart:
    part = DensePart({k: tuple(v.shape) for k, v in params.items()})
    part.load_tensors(params, "merged")
    return part


def _layer_kinds(sources: Sequence[Any] | None, model: torch.nn.Module | None) -> dict[str, LayerKind | None]:
    kinds: dict[str, LayerKind | None] = {}
    if model is not None:
        for name, module in model.named_modules():
            kinds[name] = layer_kind(module)
    for s in sources or []:
        for module, part in s.delta.parts.items():
            layer = getattr(part, "layer", None)
            if layer is not None:
                kinds[module] = LayerKind(layer)
    return kinds


def collect_delta(merged: Iterable[tuple[str, Tensor]], sources: Sequence[Any] | None, output: str,
                  rank: int | None, record: dict[str, Any], fingerprint: dict[str, Any] | None = None,
                  heads: dict[str, dict[str, Tensor]] | None = None, base_path: str | Path | None = None,
                  out: str | Path | None = None, overwrite: bool = False) -> Delta:
    """Group merged ``τ_m`` by module into parts: ``dense``, ``sparse`` (non-zeros only) or ``lowrank``."""
    model = None
    if sources is None:  # checkpoint inputs: the base model gives the fingerprint and the layer kinds
        from deltatune.fingerprint import fingerprint as take_fingerprint

        model = _load_base_model(base_path)
        fingerprint = take_fingerprint(model)
    kinds = _layer_kinds(sources, model)
    by_module: dict[str, dict[str, Tensor]] = {}
    for key, tau in merged:
        module, param = key.rsplit(".", 1)
        by_module.setdefault(module, {})[param] = tau.detach().clone()
    added = {m for s in sources or [] for m, p in s.delta.parts.items() if p.adds_bias}
    parts: dict[str, Part] = {}
    for module, params in by_module.items():
        kind = kinds.get(module)
        if module in added:  # a bias BitFit added to a bias-free module: only a bias part can carry it
            parts[module] = _added_bias_part(module, params)
        elif output == "sparse" and set(params) == {"weight"} and kind is not None:
            parts[module] = _sparse_part(params["weight"], kind)
        else:
            parts[module] = _dense_part(params)
    parents = [s.delta for s in sources or []]
    provenance = (parents[0].provenance.derived("merge", parents) if parents
                  else Provenance(operation="merge", base=path_reference(base_path)))
    kept = getattr(heads, "kept", None)
    if kept:  # each input's task (columns, label map) beside its kept head
        record = {**record, CONFIG_KEY: kept}
    if getattr(heads, "task", None) is not None:  # the task the heads' label names come from (heads="first")
        provenance.task = copy.deepcopy(heads.task)
    delta = Delta(method="merge", config=record, parts=parts, heads=dict(heads or {}), fingerprint=fingerprint,
                  metrics={"merge": {k: record[k] for k in ("method", "preset", "sources")}}, provenance=provenance)
    if output == "lowrank":
        if rank is None or rank < 1:
            raise ConfigError("output 'lowrank' needs rank ≥ 1")
        from deltatune.algebra.compress import compress_delta

        delta = compress_delta(delta, "lowrank", rank=rank, layer_kinds=kinds)
    if out is not None:
        save_output(delta, out, output, overwrite=overwrite)
    return delta


def save_output(delta: Delta, out: str | Path, output: str, overwrite: bool = False) -> None:
    """``sparse`` outputs go to the compact format (only non-zeros stored, for every tensor kind, biases
    and norms included); the others to the standard delta format.  An existing ``out`` must be an earlier
    output of the same kind unless ``overwrite``."""
    if output == "sparse":
        from deltatune.io.compact_format import save_compact

        save_compact(delta, out, overwrite=overwrite)
    else:
        delta.save(out, overwrite=overwrite)


def _load_base_model(path: str | Path | None) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    if path is None:
        raise ConfigError("a delta output from checkpoints needs base")
    archs = getattr(AutoConfig.from_pretrained(path), "architectures", None) or []
    causal = any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs)
    return (AutoModelForCausalLM if causal else AutoModel).from_pretrained(path)
