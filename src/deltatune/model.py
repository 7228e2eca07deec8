"""Attach, apply, merge and detach deltas on a live ``transformers`` model.

* :func:`attach` wraps target modules in :class:`DeltaLayer`, freezes the base and makes the parts
  (and task heads) trainable;
* :func:`apply_delta` checks the fingerprint and attaches a loaded delta (or merges it);
* :func:`merge_delta` / :func:`revert_delta` fold a delta into the base weights and out again,
  explicitly, never as a side effect of ``train()``/``eval()``;
* :func:`detach` restores the original modules.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from deltatune.delta import Delta
from deltatune.errors import DeltaFormatError, NotMergeable, ShapeMismatch, TargetError
from deltatune.fingerprint import check_fingerprint, fingerprint
from deltatune.layer import TIED_SUFFIX, DeltaLayer, ModelParts
from deltatune.parts.base import MODEL_LEVEL, Part, write_in_place
from deltatune.parts.capabilities import require_capability
from deltatune.parts.head import RoutedHead
from deltatune.parts.tied import TiedAlias
from deltatune.routing import Routing, routed

DEFAULT = "default"


def physical_path(model: nn.Module, name: str) -> str:
    """The attribute path of the module the base model calls ``name``, through any ``DeltaLayer`` wrappers on
    the way (``mlp.gate_proj`` is ``mlp.base.gate_proj`` once ``mlp`` is wrapped): parts nest."""
    if not name:
        return ""
    module, path = model, []
    for component in name.split("."):
        if isinstance(module, DeltaLayer):
            module, path = module.base, [*path, "base"]
        module = module.get_submodule(component)
        path.append(component)
    return ".".join(path)


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The base module at ``name`` (its logical path), seen through any ``DeltaLayer`` wrapper."""
    module = model.get_submodule(physical_path(model, name)) if name else model
    return module.base if isinstance(module, DeltaLayer) else module


def _wrapper(model: nn.Module, name: str) -> DeltaLayer:
    path = physical_path(model, name)
    module = model.get_submodule(path)
    if isinstance(module, DeltaLayer):
        return module
    layer = DeltaLayer(module)
    model.set_submodule(path, layer)
    return layer


def _walk(model: nn.Module) -> Iterator[tuple[str, nn.Module, DeltaLayer | None]]:
    """``(logical name, base module, its wrapper or None)`` for every module of the base model, once each."""
    seen: set[int] = set()
    stack: list[tuple[str, nn.Module]] = [("", model)]
    while stack:
        name, module = stack.pop()
        layer = module if isinstance(module, DeltaLayer) else None
        base = layer.base if layer is not None else module
        if id(base) in seen:
            continue
        seen.add(id(base))
        yield name, base, layer
        children = [(f"{name}.{n}" if name else n, c) for n, c in base.named_children()
                    if not isinstance(c, ModelParts)]
        stack.extend(reversed(children))


def delta_layers(model: nn.Module) -> Iterator[tuple[str, DeltaLayer]]:
    """``(logical name, wrapper)`` of every wrapped module."""
    for name, _, layer in _walk(model):
        if layer is not None:
            yield name, layer


def logical_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` of the base model, seeing through ``DeltaLayer`` wrappers (parts not included)."""
    for name, base, _ in _walk(model):
        yield name, base


def model_parts(model: nn.Module, create: bool = False) -> ModelParts | None:
    """The model's container of model-level parts (created and hooked on demand)."""
    container = getattr(model, ModelParts.ATTRIBUTE, None)
    if container is None and create:
        container = ModelParts()
        model.add_module(ModelParts.ATTRIBUTE, container)
        container.hook(model)
    return container


def holders(model: nn.Module) -> list[DeltaLayer | ModelParts]:
    """Every holder of attached parts: the wrapped modules' layers and the model-level container."""
    container = model_parts(model)
    return [layer for _, layer in delta_layers(model)] + ([container] if container is not None else [])


def attach_parts(model: nn.Module, parts: dict[str, Part], name: str = DEFAULT, activate: bool = True) -> None:
    """Wrap each target module and add its part under ``name``, on the base module's device.

    A model-level part (stored under the module name ``""``) goes to the model's :class:`ModelParts`."""
    owners = weight_owners(model)  # one walk of the model for every part's tied aliases
    for module_name, part in parts.items():
        if part.model_level:
            part.check_base(model, "model")
            ref = next(model.parameters())
            part.to(ref.device)
            part.train(model.training)  # a part joins in the model's mode: no dropout in an eval model
            model_parts(model, create=True).add(name, part, activate)
            continue
        try:
            base = get_module(model, module_name)
        except AttributeError:
            raise TargetError(
                f"the delta has a part for {module_name!r}, which is not a module of this model"
            ) from None
        part.check_base(base, module_name)
        ref = next(base.parameters(), None)
        if ref is not None:
            part.to(ref.device)
        part.train(base.training)
        _wrapper(model, module_name).add(name, part, activate)
        weight = getattr(base, "weight", None)
        tied = [] if weight is None else owners.get(id(weight), [])
        first_owner = next((n for n in tied if n in parts), module_name)
        for alias in [n for n in tied if n != module_name]:
            # a tied module with a part of its own keeps it and sees this one too, under its own name; so does one
            # without that several parts' modules share a weight with (T5's shared and encoder/decoder embeddings):
            # each owner's alias gets its own name, none replaces another's
            own_name = alias not in parts and module_name == first_owner
            alias_name = name if own_name else f"{name}{TIED_SUFFIX}{module_name.replace('.', '_')}"
            _wrapper(model, alias).add(alias_name, TiedAlias(part, module_name), activate)


def weight_owners(model: nn.Module) -> dict[int, list[str]]:
    """``id(weight tensor)`` → the logical modules whose ``weight`` it is (more than one: tied embeddings)."""
    owners: dict[int, list[str]] = {}
    for n, m in logical_modules(model):
        weight = getattr(m, "weight", None)
        if weight is not None:
            owners.setdefault(id(weight), []).append(n)
    return owners


def tied_aliases(model: nn.Module, name: str, owners: dict[int, list[str]] | None = None) -> list[str]:
    """Other modules whose ``weight`` is the very tensor of module ``name`` (tied embeddings); ``owners``: the
    model's :func:`weight_owners` when the caller keeps them (one walk for many modules)."""
    weight = getattr(get_module(model, name), "weight", None)
    if weight is None:
        return []
    if owners is not None:
        return [n for n in owners.get(id(weight), []) if n != name]
    return [n for n, m in logical_modules(model) if n != name and getattr(m, "weight", None) is weight]


def freeze_base(model: nn.Module, trainable_heads: Iterable[str] = (), parts: Iterable[Part] | None = None) -> None:
    """Base tensors frozen; ``parts`` (the delta just attached; ``None``: every attached part) and every named head
    module trainable.  Other attached parts keep their state: attaching a second delta leaves the first as it was
    (a delta kept frozen beside the one being trained stays frozen)."""
    attached = [part for container in holders(model) for part in container.parts.values()]
    own = {id(p) for part in attached for p in part.parameters()}
    for p in model.parameters():
        if id(p) not in own:
            p.requires_grad_(False)
    for part in attached if parts is None else parts:
        for p in part.parameters():
            p.requires_grad_(True)
    for head in trainable_heads:
        for p in model.get_submodule(head).parameters():
            p.requires_grad_(True)


#: floating dtypes whose rounding step (2⁻⁸ of a bf16 value, 2⁻¹¹ of an fp16 one) swallows small optimiser updates
HALF_PRECISION = (torch.float16, torch.bfloat16)


def in_trainable_precision(model: nn.Module, parts: Mapping[str, Part]) -> None:
    """Cast the fp16/bf16 floating tensors of freshly created ``parts`` (module name → part) to fp32, in place
    (PEFT's ``autocast_adapter_dtype=True``, its default): AdamW on a bf16 value loses every update below its rounding
    step, while the base may stay in half precision (each part's forward casts its update to the base's dtype).  A
    cast part derives its base-dependent values again in fp32 (:meth:`~deltatune.parts.base.Part.init_from_base`:
    DoRA's magnitude, which rounded to bf16 would scale every output channel by up to 1 ± 2⁻⁸ from the start).  A
    part over a half-precision base then does not train in place (:meth:`~deltatune.parts.base.Part.bind` refuses
    a dtype mismatch): it keeps its own, finely resolved ``Δθ``."""
    for name, part in parts.items():
        if any(t.dtype in HALF_PRECISION for t in (*part.parameters(), *part.buffers())):
            part.float()
            part.init_from_base(get_module(model, name))


def attach(model: nn.Module, config, heads: Sequence[str] | None = None, name: str = DEFAULT,
           autocast_dtype: bool = True) -> Delta:
    """Create a method's parts on ``model`` and return the live :class:`Delta`.

    ``heads`` are task-head modules trained densely and saved whole; by default the model's
    classifier/score head if it has one (see :func:`default_heads`).  ``autocast_dtype``: parts created on a
    half-precision base get fp32 tensors (:func:`in_trainable_precision`; ``False`` keeps the base's dtype, at the
    cost of updates lost to rounding, except prompt tuning's virtual tokens: fp32 either way).  Task heads stay in
    the model's dtype, as PEFT's ``modules_to_save`` do.
    """
    from deltatune.config import check_ranges
    from deltatune.methods.registry import get_method

    heads = list(default_heads(model) if heads is None else heads)
    method = get_method(config.method)
    check_ranges(config, f"{config.method} config")  # a config built in Python, not parsed
    fp = fingerprint(model, exclude=heads)
    parts = method.create_parts(model, config, exclude=heads)
    if autocast_dtype:
        in_trainable_precision(model, parts)
    attach_parts(model, parts, name)
    freeze_base(model, heads, parts.values())
    delta = Delta(method=config.method, config=method.config_dict(config), parts=parts, fingerprint=fp)
    delta.bind_heads({h: get_module(model, h) for h in heads})  # saved as they are when saved: never stale
    return delta


def default_heads(model: nn.Module) -> list[str]:
    """Task heads a ``*ForSequenceClassification`` model creates fresh: ``classifier`` / ``score``."""
    names = dict(model.named_children())
    arch = type(model).__name__
    if "ForSequenceClassification" in arch or "ForTokenClassification" in arch:
        return [n for n in ("classifier", "score") if n in names]
    return []


def _dtype_class(dtype: torch.dtype) -> str:
    """The kind of number a dtype holds: ``floating-point``, ``complex``, ``boolean`` or ``integer``."""
    if dtype.is_floating_point:
        return "floating-point"
    if dtype.is_complex:
        return "complex"
    return "boolean" if dtype == torch.bool else "integer"


def check_heads(model: nn.Module, delta: Delta, where: str = "delta") -> None:
    """Every head of ``delta`` is a module of ``model`` with tensors of the same names and shapes, and each tensor
    of the same dtype class as the module's (:func:`_dtype_class`): a float head tensor may differ in precision
    (an fp16/bf16 head on an fp32 model is cast when attached or loaded), an integer or boolean one where the
    module holds a float (or the reverse) is refused with :class:`ShapeMismatch` naming the head, the tensor and
    both dtypes.  Every consumer (:func:`apply_delta`, :func:`attach_heads`, :func:`load_heads` for merging and
    composing, the serving store) calls this before it changes the model."""
    for head, tensors in delta.heads.items():
        try:
            module = model.get_submodule(physical_path(model, head))
        except AttributeError:
            raise TargetError(f"{where}: head {head!r} is not a module of this model") from None
        own = (module.base if isinstance(module, DeltaLayer) else module).state_dict()
        for k, t in tensors.items():
            if k not in own or own[k].shape != t.shape:
                got = tuple(own[k].shape) if k in own else "missing"
                raise ShapeMismatch(f"{where}: head tensor {head}.{k} has shape {tuple(t.shape)}, model has {got}")
            found, expected = _dtype_class(t.dtype), _dtype_class(own[k].dtype)
            if found != expected:
                raise ShapeMismatch(f"{where}: head tensor {head}.{k} has dtype {t.dtype}, model has "
                                    f"{own[k].dtype}: head {head!r} needs a {expected} tensor here, not {found}")


def load_heads(model: nn.Module, delta: Delta, where: str = "delta") -> None:
    """Load ``delta``'s task heads into the model's head modules (merging; training), each first given its own
    copy of any tensor it shares with another module (:func:`untie_head`).  Checked first (:func:`check_heads`);
    a float head tensor of another precision is cast into the module's dtype by ``load_state_dict``."""
    check_heads(model, delta, where)
    for head, tensors in delta.heads.items():
        module = get_module(model, head)
        untie_head(model, head, module)
        module.load_state_dict(tensors, strict=True)


def untie_head(model: nn.Module, head: str, module: nn.Module) -> None:
    """Give ``module`` (the head at ``head``) its own copy of every parameter another module shares (GPT-2's
    ``lm_head.weight`` *is* ``wte.weight``): loading the head writes into its tensors in place, so a shared one
    would overwrite the embedding too, where PEFT's ``modules_to_save`` (and attaching, :class:`RoutedHead`)
    changes the head alone.  The other module keeps the original tensor.  The tie is not restored: a loaded head
    is not reverted (:func:`revert_delta` undoes parts only), and the model's config still says tied, so
    ``save_pretrained`` of such a model stores one of the two."""
    shared = {id(p) for n, m in logical_modules(model) if n != head for p in m.parameters(recurse=False)}
    for key, param in list(module.named_parameters(recurse=False)):
        if id(param) in shared:
            setattr(module, key, nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad))


def attach_heads(model: nn.Module, delta: Delta, name: str = DEFAULT, activate: bool = True,
                 where: str = "delta") -> None:
    """Attach ``delta``'s task heads as routable parts under ``name`` (:class:`RoutedHead`): the model's own
    head modules are untouched, rows of a mixed batch may use different heads, detaching restores them.

    Checked first (:func:`check_heads`): names, shapes and dtype class; each tensor is then cast to the device and
    dtype of the module's own tensor of that name."""
    check_heads(model, delta, where)
    for head, tensors in delta.heads.items():
        if tensors:
            own = get_module(model, head).state_dict()
            # each tensor on the device and in the dtype of the module's own (the class is checked above): an
            # fp16 head on an fp32 model computes in fp32, as the merged (loaded) head does
            part = RoutedHead({k: t.to(device=own[k].device, dtype=own[k].dtype) for k, t in tensors.items()})
            _wrapper(model, head).add(name, part, activate)


def _require_one_task(delta: Delta, where: str) -> None:
    """A merge that kept several tasks' heads (``classifier@sst2``, ``classifier@mrpc``) goes on a model one task
    at a time: :class:`ConfigError` pointing at :func:`deltatune.algebra.task_heads.for_task`."""
    from deltatune.algebra.task_heads import require_one_task

    require_one_task(delta, where, holder="a model")


def apply_delta(model: nn.Module, delta: Delta, name: str = DEFAULT, merge: bool = False, force: bool = False,
                where: str = "delta") -> None:
    """Check the base fingerprint, then attach the delta's parts and task heads under ``name`` (or merge the
    parts and load the heads).

    With ``merge`` every part must be additive (:class:`~deltatune.errors.NotMergeable`, before anything is
    written)."""
    if merge:
        merge_delta(model, delta, where=where, force=force)
        return
    _require_one_task(delta, where)
    if not force:
        check_fingerprint(delta.fingerprint, model, delta.heads, where)
    check_heads(model, delta, where)
    attach_parts(model, delta.parts, name)
    attach_heads(model, delta, name, where=where)


def merge_delta(model: nn.Module, delta: Delta, where: str = "delta", force: bool = False,
                heads: bool = True) -> None:
    """``W ← W + ΔW`` for every part, into the (unwrapped) base modules, and the delta's task heads loaded.

    Checked before any weight is written: every part is additive (:class:`~deltatune.errors.NotMergeable`), the
    model is the base the delta was trained on (:class:`~deltatune.errors.FingerprintMismatch` unless ``force``;
    a model that already holds a merged delta is no longer that base: pass ``force`` to stack merges, or use
    :func:`deltatune.algebra.compose`), and the heads fit.  ``heads=False`` leaves the model's heads alone."""
    require_capability(delta, "additive", f"merge ({where})")
    if heads:
        _require_one_task(delta, where)
    if not force:
        check_fingerprint(delta.fingerprint, model, delta.heads, where)
    for module_name, part in delta.parts.items():
        part.check_base(get_module(model, module_name), f"{where}:{module_name}")
    if heads:
        load_heads(model, delta, where)
    for group in _weight_groups(model, delta.parts):
        if _reads_shared_weight(group):
            _merge_on_one_base(model, group)
        else:
            for module_name, part in group:
                part.merge_into(get_module(model, module_name))


def _weight_groups(model: nn.Module, parts: dict[str, Part]) -> list[list[tuple[str, Part]]]:
    """The parts grouped by the weight tensor their module holds (modules with tied weights share one; a part on
    a module without a weight is alone), in the parts' order."""
    groups: dict[int, list[tuple[str, Part]]] = {}
    for name, part in parts.items():
        weight = getattr(get_module(model, name), "weight", None)
        groups.setdefault(id(weight) if isinstance(weight, torch.Tensor) else id(part), []).append((name, part))
    return list(groups.values())


def _reads_shared_weight(group: list[tuple[str, Part]]) -> bool:
    """Whether several parts update one (tied) weight and some part's update reads it (DoRA, (IA)³): merged one after
    another, each would read the weight the previous one rewrote, while the unmerged forward computes every
    update from the base weight (:func:`~deltatune.layer.sum_updates`)."""
    return len(group) > 1 and any(part.base_dependent for _, part in group)


def _merge_on_one_base(model: nn.Module, group: list[tuple[str, Part]]) -> None:
    """``θ ← θ + Σ_p Δθ_p`` with every ``Δθ_p`` computed from the unmerged base first (as the forward computes
    them), summed in fp32 and rounded once."""
    pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(tensor) → (tensor, Σ Δθ in fp32)
    for name, part in group:
        module = get_module(model, name)
        for tensor_name, update in part.updates(module).items():
            tensor = getattr(module, tensor_name, None)
            if not isinstance(tensor, torch.Tensor):
                raise NotMergeable(f"{name}: a {part.kind} part updates {tensor_name!r}, which the module does not "
                                   "have", kind=part.kind)
            _, total = pending.get(id(tensor), (tensor, 0))
            pending[id(tensor)] = (tensor, total + update.to(device=tensor.device, dtype=torch.float32))
    with torch.no_grad():
        for tensor, total in pending.values():
            write_in_place(tensor, tensor.detach().float() + total)


def revert_delta(model: nn.Module, delta: Delta) -> None:
    """``W ← W − ΔW``: undo :func:`merge_delta` (apply stacks in reverse order to restore the base).  Parts that
    update one tied weight and read it (:func:`_reads_shared_weight`) cannot be undone from the merged weight alone:
    :class:`~deltatune.errors.NotMergeable` before anything is written (reload the base instead)."""
    for group in _weight_groups(model, delta.parts):
        if _reads_shared_weight(group):
            names = [name for name, _ in group]
            raise NotMergeable(f"parts on {names} update one tied weight and read it ({group[0][1].kind}): the merged "
                               "weight does not determine their updates, so the merge cannot be undone; reload the "
                               "base model", kind=group[0][1].kind)
    for module_name, part in reversed(list(delta.parts.items())):
        part.unmerge_from(get_module(model, module_name))


def detach(model: nn.Module, name: str | None = None) -> dict[str, Part]:
    """Remove parts (all, or those under ``name``); unwrap layers that have none left.  Returns the removed
    parts that a delta owns, by module name (aliases and routed heads are dropped)."""
    removed: dict[str, Part] = {}

    def wanted(part_name: str) -> bool:
        return name is None or part_name == name or part_name.startswith(f"{name}{TIED_SUFFIX}")

    container = model_parts(model)
    if container is not None:
        for part_name in [n for n in container.parts if wanted(n)]:
            removed[MODEL_LEVEL] = container.remove(part_name)
        if not len(container.parts):
            container.unhook()
            delattr(model, ModelParts.ATTRIBUTE)
    # innermost first, so that every wrapper's path is still valid when it is unwrapped
    for module_name, layer in sorted(delta_layers(model), key=lambda item: -item[0].count(".")):
        for part_name in [n for n in layer.parts if wanted(n)]:
            part = layer.remove(part_name)
            if not part.is_alias:
                removed[module_name] = part
        if not len(layer.parts):
            model.set_submodule(physical_path(model, module_name), layer.base)
    return removed


@contextmanager
def mixed_batch(model: nn.Module, names: Sequence[str | None]):
    """Within the block, row ``i`` of every forward uses the delta ``names[i]`` (``None``: the base).

    Builds a per-row :class:`~deltatune.routing.Routing` and makes it current (see :func:`routed_batch` for a
    routing the caller built, e.g. per token)."""
    with routed_batch(model, Routing.per_row(names)) as routing:
        yield routing


@contextmanager
def routed_batch(model: nn.Module, routing: Routing):
    """Run the block's forwards with ``routing`` (every name must be attached, every part mixed-row capable)."""
    attached: dict[str, list[Part]] = {}
    for container in holders(model):
        for part_name, part in container.parts.items():
            attached.setdefault(part_name, []).append(part)
    missing = [n for n in routing.names if n is not None and n not in attached]
    if missing:
        raise DeltaFormatError(f"no delta named {missing} is attached; attached: {sorted(attached)}")
    for n in routing.names:
        if n is not None:
            require_capability({f"{n}[{i}]": p for i, p in enumerate(attached[n])}, "mixed_rows",
                               f"a mixed batch using {n!r}")
    with routed(routing):
        yield routing


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
