"""The streaming merge driver: plan the tensors, gather global statistics, merge tensor by tensor, write.

For every parameter the driver reads the inputs' task vectors (``θ_ft − θ₀`` from checkpoints, or a
part's ``ΔW`` from deltas), runs the method's kernel and writes ``θ₀ + f(ℓ)·τ_m`` (``f`` = LiNeS'
depth factor, 1 without it) to a sharded checkpoint, or collects ``τ_m`` into a delta.  Only one
tensor group is resident at a time when reading checkpoints; global statistics (per-task top-k
thresholds, PCB quantiles, the majority sign) come from extra streaming passes.  Random masks use a
generator seeded from ``(seed, tensor name, input index)``, so results do not depend on order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from deltatune.algebra.checkpoint import CheckpointReader, is_checkpoint
from deltatune.algebra.delta_checkpoint import streamable_base
from deltatune.algebra.inputs import CheckpointInput, DeltaInput, VocabRule, has_vocab_axis
from deltatune.algebra.methods import MergeMethod, TensorJob, get_merge_method
from deltatune.algebra.options import check_input_count, resolve_params
from deltatune.algebra.output import (
    align_rows,
    collect_delta,
    fingerprint_heads,
    merged_heads,
    save_output,
    write_checkpoint,
)
from deltatune.algebra.spec import MergeSpec
from deltatune.algebra.stacked_inputs import check_stacked_inputs
from deltatune.algebra.stats import gather_stats, lines_norms
from deltatune.algebra.sum_deltas import check_same_bases, output_fingerprint
from deltatune.algebra.workspace import Workspace
from deltatune.config import brief, finite_float, parse_config
from deltatune.delta import Delta
from deltatune.errors import ConfigError, NotMergeable, ShapeMismatch
from deltatune.ops import lines as lines_ops
from deltatune.ops.compress import stable_seed

OUTPUTS = ("dense", "sparse", "lowrank", "checkpoint")


def tensor_seed(seed: int, key: str, index: int) -> int:
    """A stable 63-bit seed for ``(seed, tensor, input)``: :func:`stable_seed` of ``"<tensor>\\0<input>"``."""
    return stable_seed(seed, f"{key}\x00{index}")


def _open_inputs(inputs: Sequence[Delta | str | Path], base: CheckpointReader | None, vocab: VocabRule,
                 verify: bool = True) -> list[DeltaInput] | list[CheckpointInput]:
    """Each input as a :class:`DeltaInput` or :class:`CheckpointInput` (delta folders digest-checked unless
    ``verify`` is false)."""
    from deltatune.api import as_delta

    opened: list[Any] = []
    for i, item in enumerate(inputs):
        if isinstance(item, Delta):
            opened.append(DeltaInput(item, f"input {i}"))
        elif is_checkpoint(item) and not (Path(item) / "manifest.json").is_file():
            if base is None:
                raise ConfigError(f"{item} is a full checkpoint: merging checkpoints needs base (the checkpoint "
                                  "they were fine-tuned from)")
            opened.append(CheckpointInput(item, base, vocab))
        else:
            opened.append(DeltaInput(as_delta(item, verify=verify), str(item)))
    if len({type(x) for x in opened}) > 1:
        raise ConfigError("inputs mix full checkpoints and deltas; merge them separately (a delta can be written "
                          "as a checkpoint with `deltatune apply`)")
    return opened


def _check_same_base(sources: list[Any], heads: Iterable[str] | None, force: bool) -> dict[str, Any] | None:
    """The merged delta's base fingerprint, for an output carrying the task heads ``heads`` (``None``: kept per
    task, :func:`~deltatune.algebra.output.fingerprint_heads`), after checking that the inputs share one base as
    composing checks it (:func:`~deltatune.algebra.sum_deltas.check_same_bases`: inputs with other head sets
    compared on the fields their heads do not change); ``force`` skips the check."""
    deltas, labels = [s.delta for s in sources], [s.label for s in sources]
    if not force:
        check_same_bases(deltas, labels, hint=", or pass force=True (CLI --force) to merge anyway")
    return output_fingerprint(deltas, heads)  # heads=None (kept per task): the partial fingerprint


def plan_keys(sources: list[Any]) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    owner: dict[str, str] = {}
    for s in sources:
        for key in s.names():
            shape = tuple(s.shape(key))
            if key in shapes and shapes[key] != shape:
                raise ShapeMismatch(f"tensor {key!r}: {owner[key]} has shape {shapes[key]}, {s.label} has {shape}")
            shapes.setdefault(key, shape)
            owner.setdefault(key, s.label)
    return shapes


def added_bias_keys(sources: Sequence[Any]) -> frozenset[str]:
    """``<module>.bias`` of every delta part that adds a bias its bias-free base module lacks (BitFit on Llama):
    the base holds no such tensor, and ``θ₀`` there is zero."""
    return frozenset(f"{module}.bias" for s in sources if isinstance(s, DeltaInput)
                     for module, part in s.delta.parts.items() if part.adds_bias and not part.is_alias)


def tied_weights(path: Path) -> dict[str, str]:
    """``tied name → source name`` (state-dict names) of the model class the checkpoint's ``config.json`` names in
    ``architectures``, built on ``meta``: transformers' ``get_expanded_tied_weights_keys``, which reads the config's
    tie flags (``tie_word_embeddings``), so a tied ``lm_head.weight`` maps to the input embedding's name.  ``{}`` when
    there is no config or the class cannot be built (a missing name then stays an error)."""
    from deltatune.algebra.checkpoint import meta_architecture

    model = meta_architecture(path)
    return dict(model.get_expanded_tied_weights_keys(all_submodels=True)) if model is not None else {}


def tied_match(ties: Mapping[str, str], key: str) -> tuple[str, str] | None:
    """``(tied name, source name)`` of the entry of ``ties`` (:func:`tied_weights`) that ``key`` names, itself or
    under a leading model prefix; ``None`` when ``key`` is not tied."""
    return next(((tied, source) for tied, source in ties.items() if key == tied or key.endswith(f".{tied}")), None)


def fold_tied_keys(sources: Sequence[DeltaInput], base: CheckpointReader | None) -> None:
    """Key each input's updates of a tied tensor by its owner's name (:meth:`DeltaInput.fold_ties`), the ties read
    from the base's model class (:func:`tied_weights`): ``base``, else the first base folder an input's provenance
    names that is here.  Without either the ties are unknown and every name stays its own key."""
    recorded = [Path(b) for s in sources if isinstance(b := s.delta.provenance.base, str)]
    path = base.path if base is not None else next((p for p in recorded if (p / "config.json").is_file()), None)
    ties = tied_weights(Path(path)) if path is not None else {}
    if not ties:
        return

    def owner_of(key: str) -> str | None:  # the source's name under the key's own prefix
        match = tied_match(ties, key)
        return None if match is None else key[: len(key) - len(match[0])] + match[1]

    for s in sources:
        s.fold_ties(owner_of)


class BaseLookup:
    """``key → θ₀`` (fp32: a new tensor, or with a ``workspace`` a view of its ``"base"`` buffer), mapping a delta's
    module path onto the checkpoint's key names (a model prefix the checkpoint lacks is dropped).

    Two names a checkpoint does not store still have a ``θ₀``: a tied tensor (a tied ``lm_head.weight``, stored only
    as the input embedding) reads its stored twin (:func:`tied_weights`), and a bias a delta part adds
    (``added``, :func:`added_bias_keys`) reads as zeros of the inputs' shape.  Any other missing name is a
    :class:`ShapeMismatch` naming it."""

    def __init__(self, base: CheckpointReader | None, shapes: dict[str, tuple[int, ...]], rows: dict[str, int],
                 added: frozenset[str] = frozenset()) -> None:
        self.base, self.shapes, self.rows, self.added = base, shapes, rows, added
        self._names: dict[str, str | None] = {}
        self._tied: dict[str, str] | None = None

    def _direct(self, key: str) -> str | None:
        """The checkpoint's name for ``key`` itself, or for ``key`` without leading module names."""
        assert self.base is not None
        candidates = [key] + [key.split(".", i)[-1] for i in range(1, key.count("."))]
        return next((c for c in candidates if c in self.base), None)

    def _twin(self, key: str) -> str | None:
        """The stored name of the tensor ``key`` is tied to, if the base's model class ties it."""
        assert self.base is not None
        if self._tied is None:
            self._tied = tied_weights(self.base.path)
        match = tied_match(self._tied, key)
        return self._direct(match[1]) if match is not None else None

    def stored_name(self, key: str) -> str | None:
        """The checkpoint tensor holding ``θ₀`` of ``key`` (its tied twin's for a tied name); ``None`` for an added
        bias (zero base); :class:`ShapeMismatch` when the checkpoint holds neither."""
        if key not in self._names:
            if self.base is None:
                raise ConfigError("this merge needs the base weights: pass base (CLI: base_model / base in the YAML)")
            found = self._direct(key) or self._twin(key)
            if found is None and key not in self.added:
                raise ShapeMismatch(f"base checkpoint {self.base.path} has no tensor for {key!r}")
            self._names[key] = found
        return self._names[key]

    def __call__(self, key: str, workspace: Workspace | None = None) -> Tensor:
        name = self.stored_name(key)
        assert self.base is not None
        if name is None:
            return torch.zeros(self.shapes[key])
        if workspace is not None and key not in self.rows:
            value = workspace.read_float(self.base, name, "base")
        else:
            value = self.base.get_float(name)
        if key in self.rows:
            return align_rows(value, self.rows[key])
        if key in self.shapes and tuple(value.shape) != self.shapes[key]:
            raise ShapeMismatch(f"base tensor {key!r} has shape {tuple(value.shape)}, the inputs have "
                                f"{self.shapes[key]}")
        return value


def base_lookup(base: CheckpointReader | None, shapes: dict[str, tuple[int, ...]], rows: dict[str, int],
                added: frozenset[str] = frozenset()) -> BaseLookup:
    """The :class:`BaseLookup` of ``base`` for the planned tensors ``shapes``."""
    return BaseLookup(base, shapes, rows, added)


def _vocab_rows(sources: list[Any], base: CheckpointReader | None, vocab: VocabRule) -> dict[str, int]:
    if vocab == "error" or base is None or not isinstance(sources[0], CheckpointInput):
        return {}
    rows: dict[str, int] = {}
    for key in sources[0].names():
        if not has_vocab_axis(key, base.shape(key)):  # other tensors' shapes are checked equal to the base's
            continue
        sizes = {s.rows(key) for s in sources} | {base.shape(key)[0]}
        if len(sizes) > 1:
            rows[key] = base.shape(key)[0] if vocab == "truncate" else max(sizes)
    return rows


@dataclass
class MergePlan:
    """Everything a pass over the tensors needs: the inputs, the tensor names and shapes, the resolved
    parameters, the base lookup, the seed and the global statistics gathered so far.  With a
    ``workspace``, checkpoint task vectors are views of reused buffers, valid until the next job."""

    sources: list[Any]
    shapes: dict[str, tuple[int, ...]]
    method: MergeMethod
    params: dict[str, Any]
    per_input: list[dict[str, Any]]
    base_of: Callable[..., Tensor]
    seed: int
    stats: dict[str, Any] = field(default_factory=dict)
    workspace: Workspace | None = None

    def jobs(self, progress: str | None = None) -> Iterator[TensorJob]:
        keys: Any = list(self.shapes)
        if progress:
            from rich.progress import track

            keys = track(keys, description=progress, transient=True)
        checkpoint = isinstance(self.sources[0], CheckpointInput)
        for key in keys:
            if checkpoint:
                base_value = self.base_of(key, self.workspace)
                taus = [s.tau(key, base_value, self.workspace, i) for i, s in enumerate(self.sources)]
                del base_value  # a workspace keeps it for job.base() and the writer; otherwise re-read on demand
            else:
                taus = [s.tau(key, self.base_of) if key in s.keys_set else torch.zeros(self.shapes[key])
                        for s in self.sources]
            base_fn: Callable[[], Tensor] = lambda k=key: self.base_of(k, self.workspace)  # noqa: E731
            yield TensorJob(key, taus, self.params, self.per_input, base_fn,
                            lambda i, k=key: torch.Generator().manual_seed(tensor_seed(self.seed, k, i)), self.stats)

    def visit(self, fn: Callable[[TensorJob], None], progress: bool = False) -> None:
        for job in self.jobs("statistics" if progress else None):
            fn(job)


def merge(inputs: Sequence[Delta | str | Path], method: str, **options: Any) -> Delta | Path:
    """Merge deltas or fine-tuned checkpoints with ``method``: :func:`run_merge` of the :class:`MergeSpec`
    built from ``options`` by :func:`~deltatune.config.parse_config` (so an unknown option or a bad value is the
    :class:`ConfigError` a YAML recipe gets).

    Options (see :class:`~deltatune.algebra.spec.MergeSpec`): ``base``, ``weights``, ``params``,
    ``input_params``, ``preset``, ``output``, ``out``, ``rank``, ``seed``, ``lines``, ``target_base``,
    ``vocab``, ``heads``, ``out_dtype``, ``shard_size``, ``force``, ``progress``, ``verify``, ``overwrite``.
    """
    fields = {"inputs": list(inputs), "method": method, **options}
    if fields.get("weights") is not None:
        fields["weights"] = list(fields["weights"])
    return run_merge(parse_config(MergeSpec, fields, "merge"))


def run_merge(recipe: MergeSpec) -> Delta | Path:
    """Run the merge ``recipe`` describes; see the module docstring for the flow.

    ``verify=False`` skips the digest check of delta folders (CLI ``--no-verify``); an existing ``out`` must be
    an earlier output of the same kind unless ``overwrite`` (:class:`~deltatune.errors.OutputExists`); at most
    :data:`~deltatune.algebra.options.MAX_INPUTS` inputs (:class:`~deltatune.errors.InputTooLarge`)."""
    inputs, method, base, weights, params = recipe.inputs, recipe.method, recipe.base, recipe.weights, recipe.params
    input_params, preset, output, out, rank = (recipe.input_params, recipe.preset, recipe.output, recipe.out,
                                               recipe.rank)
    seed, lines, target_base, vocab, heads = recipe.seed, recipe.lines, recipe.target_base, recipe.vocab, recipe.heads
    out_dtype, shard_size, force, progress = recipe.out_dtype, recipe.shard_size, recipe.force, recipe.progress
    verify, overwrite = recipe.verify, recipe.overwrite
    spec = get_merge_method(method)
    if output not in OUTPUTS:
        raise ConfigError(f"output must be one of {list(OUTPUTS)}, got {brief(output)}")
    if not inputs:
        raise ConfigError("no inputs to merge")
    check_input_count(len(inputs), f"merge ({method})")
    if len(inputs) < spec.min_inputs or (spec.max_inputs is not None and len(inputs) > spec.max_inputs):
        most = spec.max_inputs if spec.max_inputs is not None else "any"
        raise ConfigError(f"{method} takes {spec.min_inputs}..{most} inputs, got {len(inputs)}")
    if vocab not in ("error", "truncate", "extend"):
        raise ConfigError(f"vocab must be 'error', 'truncate' or 'extend', got {brief(vocab)}")
    if output == "checkpoint" and out is None:
        raise ConfigError("output 'checkpoint' needs out (a directory to write)")
    raw_inputs = [dict(p) for p in (input_params or [{} for _ in inputs])]
    if len(raw_inputs) != len(inputs):
        raise ConfigError(f"{len(raw_inputs)} input parameter sets for {len(inputs)} inputs")
    if weights is not None:
        if len(weights) != len(inputs):
            raise ConfigError(f"{len(weights)} weights for {len(inputs)} inputs")
        for p, w in zip(raw_inputs, weights, strict=True):
            p.setdefault("weight", w)
    resolved, per_input = resolve_params(method, spec.params, preset, params or {}, raw_inputs)
    if base is None and method == "linear" and all(not isinstance(x, Delta) and is_checkpoint(x) for x in inputs):
        base = inputs[0]  # a soup of checkpoints needs no base: Σ w θ_t / Σ w = θ_1 + Σ w (θ_t − θ_1) / Σ w
    base_reader = CheckpointReader(base) if base is not None else None
    sources = _open_inputs(inputs, base_reader, vocab, verify)
    checkpoint_inputs = isinstance(sources[0], CheckpointInput)
    if not checkpoint_inputs:
        check_stacked_inputs([s.delta for s in sources], [s.label for s in sources], method, spec.needs_base,
                             resolved, per_input)
        fold_tied_keys(sources, base_reader)
    heads_out = None if checkpoint_inputs else merged_heads(sources, per_input, heads)
    fingerprint = None if heads_out is None else _check_same_base(sources, fingerprint_heads(heads_out, sources), force)
    shapes = plan_keys(sources)
    rows = _vocab_rows(sources, base_reader, vocab)
    base_of = base_lookup(base_reader, shapes, rows, added_bias_keys(sources))
    if spec.needs_base and base_reader is None:
        raise ConfigError(f"{method} needs the base weights: pass base")
    dependent = [(s, m) for s in sources if isinstance(s, DeltaInput) for m in s.base_dependent]
    if dependent and base_reader is None:
        source, module = dependent[0]
        kind = source.delta.parts[module].kind
        raise NotMergeable(f"merge ({source.label}): module {module!r} holds a {kind!r} part, whose update depends "
                           f"on the base weights; pass base (CLI: base_model / base in the YAML); nothing was written",
                           module=module, kind=kind)
    streamed = checkpoint_inputs and output == "checkpoint"  # every merged tensor is written before the next
    plan = MergePlan(sources, shapes, spec, resolved, per_input, base_of, seed,
                     workspace=Workspace() if streamed else None)
    plan.stats.update(gather_stats(spec, resolved, per_input, lambda fn: plan.visit(fn, progress)))
    factor = _lines_factor(lines, plan)

    def merged() -> Iterator[tuple[str, Tensor]]:
        for job in plan.jobs(method if progress else None):
            out = spec.kernel(job)
            job.taus.clear()  # free the inputs before the output is written
            scale = factor(job.key)
            yield job.key, out if scale == 1.0 else out.mul_(scale)

    record = {"method": method, "preset": preset, "params": resolved, "inputs": per_input, "seed": seed,
              "sources": [s.label for s in sources], "lines": lines}
    if streamed:
        assert base_reader is not None
        target = CheckpointReader(target_base) if target_base is not None else base_reader
        return write_checkpoint(Path(out), merged(), target, shapes, rows, out_dtype, shard_size, record,
                                plan.workspace, overwrite=overwrite)
    if checkpoint_inputs:
        return collect_delta(merged(), None, output, rank, record, base_path=base, out=out, overwrite=overwrite)
    assert heads_out is not None
    if output == "checkpoint":  # stream θ₀ + τ_m through the shard writer when the model path would match
        stream = streamable_base(base_reader, shapes, heads_out, out_dtype, fingerprint, force, "delta")
        if stream is not None:
            return stream.write(Path(out), merged(), shard_size, record, overwrite=overwrite)
    result = collect_delta(merged(), sources, output, rank, record, fingerprint=fingerprint, heads=heads_out,
                           out=None)
    if output == "checkpoint":
        from deltatune.api import apply_to_checkpoint

        apply_to_checkpoint(result, out, model=str(base) if base else None, force=force, shard_size=shard_size,
                            dtype=out_dtype, overwrite=overwrite)
        return Path(out)
    if out is not None:
        save_output(result, out, output, overwrite=overwrite)
    return result


def lines_params(lines: Any, where: str) -> tuple[float | str, float, int | None]:
    """LiNeS' ``(alpha, beta, layers)`` from ``{alpha: number | 'auto', beta: number, layers: L}`` (finite numbers;
    ``layers`` optional, a positive integer), else :class:`ConfigError` naming ``where``."""
    if not isinstance(lines, Mapping) or set(lines) - {"alpha", "beta", "layers"} or "beta" not in lines:
        raise ConfigError(f"{where}: takes 'alpha' (a number or 'auto'), 'beta' and optionally 'layers' (the "
                          f"model's number of blocks); got {brief(lines)}")
    alpha = lines.get("alpha", "auto")
    if alpha != "auto":
        alpha = finite_float(alpha, f"{where}.alpha")
    layers = lines.get("layers")
    if layers is not None and (isinstance(layers, bool) or not isinstance(layers, int) or layers < 1):
        raise ConfigError(f"{where}.layers must be a positive integer (the model's blocks), got {brief(layers)}")
    return alpha, finite_float(lines["beta"], f"{where}.beta"), layers


def _lines_factor(lines: dict[str, Any] | None, plan: MergePlan) -> Callable[[str], float]:
    """LiNeS (Wang et al., ICLR 2025, arXiv 2410.17146): ``λ(ℓ) = α + β·ℓ/(L − 1)`` per block ``ℓ``.

    ``alpha: auto`` is the multi-task rule ``α = ‖Σ_t τ_t‖₁ / (T·‖τ_m‖₁)`` (one extra pass).  ``L`` is ``layers``
    when given, else counted from the merged tensors' names (1 + the largest block index): the whole model in a
    checkpoint merge, but only the blocks the deltas touch in a delta merge — give ``layers`` for deltas that leave
    out the last blocks (layer-restricted LoRA, S2FT, sparse deltas).
    """
    if not lines:
        return lambda key: 1.0
    alpha, beta, layers = lines_params(lines, "lines")
    counted = lines_ops.count_layers(plan.shapes)
    if layers is not None and layers < counted:
        raise ConfigError(f"lines.layers is {layers}, but the merged tensors reach block {counted - 1}")
    num_layers = layers or counted
    if num_layers < 1:
        raise ConfigError("lines: no transformer blocks found in the tensor names (expected e.g. 'layers.3.')")
    if alpha == "auto":
        total, merged_l1 = lines_norms(plan.jobs(), plan.method.kernel)
        alpha = lines_ops.lines_multitask_alpha(total, merged_l1, len(plan.sources))
    alpha = float(alpha)
    return lambda key: lines_ops.lines_factor(lines_ops.layer_index(key, num_layers), num_layers, alpha, beta)
