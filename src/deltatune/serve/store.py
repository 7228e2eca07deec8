"""The delta store: which deltas a server holds, attached to its one base model, bounded in bytes.

A delta is *registered* under a public name with its source (a folder — deltatune, compact or PEFT adapter
format, read by :func:`deltatune.api.as_delta` — or a live :class:`~deltatune.delta.Delta`), and *resident*
when its parts are attached to the model (never active: only rows routed to it use it).  Resident deltas form
an LRU cache bounded by ``max_bytes``; a registered delta that was evicted is loaded again on its next request.
``preload`` makes a delta resident when it is registered.

Every resident copy is attached under its own key (``name@n``).  A request *leases* the key it started with
(:meth:`DeltaStore.acquire`), so loading a new version under the same name, or unloading the name, never changes
the delta of a request already running: the old copy is detached when its last lease is released.  Detaching,
and any attach that changes the model's structure (wrapping a module for the first time, tied weights, task heads,
an eviction), take ``lock``, the lock the engine holds while it runs the model, so the model never changes under a
forward.  A delta whose parts all go to modules that are already wrapped is attached *without* waiting for the
running step: its parts join those wrappers under a fresh key, inactive, which no forward in flight routes to (the
engine picks them up when it rebuilds its routing for the new ``version``).  The store's own books have a lock of
their own, always taken after ``lock`` when both are needed.
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deltatune.delta import Delta
from deltatune.errors import TargetError
from deltatune.fingerprint import check_fingerprint, fingerprint
from deltatune.layer import DeltaLayer
from deltatune.model import attach_heads, attach_parts, check_heads, detach, logical_modules
from deltatune.parts.capabilities import require_capability
from deltatune.provenance import require_unstacked
from deltatune.serve.errors import BadRequest, UnknownDelta

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")


@dataclass
class Entry:
    """One resident copy of a delta."""

    name: str
    key: str
    delta: Delta
    nbytes: int
    users: int = 0
    retired: bool = False
    loaded_at: float = field(default_factory=time.time)


@dataclass
class Lease:
    """A request's hold on one resident copy (``key`` is ``None`` for the bare base)."""

    key: str | None
    entry: Entry | None = None
    released: bool = False


class DeltaStore:
    def __init__(self, model: nn.Module, base_name: str, max_bytes: int | None = None, verify: bool = True,
                 lock: threading.RLock | None = None) -> None:
        self.model, self.base_name, self.max_bytes, self.verify = model, base_name, max_bytes, verify
        self.lock = lock or threading.RLock()  # the model's: held by the engine while it runs a step
        self._book = threading.RLock()  # the store's books; taken after ``lock`` when both are needed
        self._tied: set[int] | None = None  # ids of weights shared by several modules (found on first use)
        self._sources: dict[str, str | Delta] = {}
        self._resident: OrderedDict[str, Entry] = OrderedDict()  # least recently used first
        self._retiring: list[Entry] = []
        self._count = 0
        #: Bumped whenever the model's attached parts change (the engine then rebuilds its routing).
        self.version = 0
        #: Called under ``lock`` before the store reads the base's values while the base may hold a merged delta
        #: (the engine's :class:`~deltatune.serve.hot.HotMerge` unmerges there).
        self.restore_base: Callable[[], None] | None = None
        self._fingerprints: dict[tuple[str, ...], dict[str, Any]] = {}
        self._turn = threading.Condition()  # counts threads waiting for ``lock`` (see model_lock)
        self._lock_waiters = 0
        self.base_fingerprint()  # of the base as given, before anything can be merged into it

    # --- what the server holds (read without the lock: the HTTP handlers must not wait for a model step) ---
    def names(self) -> list[str]:
        """Every registered delta (resident or not)."""
        return list(self._sources)  # one C-level copy: atomic under the GIL

    def source(self, name: str) -> str | None:
        src = self._sources.get(name)
        return None if src is None or isinstance(src, Delta) else str(src)

    def resident(self) -> dict[str, int]:
        """``{name: bytes}`` of the deltas attached now (retiring copies excluded)."""
        return {n: e.nbytes for n, e in list(self._resident.items())}

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in list(self._resident.values())) + sum(e.nbytes for e in list(self._retiring))

    def attached_keys(self) -> list[str]:
        return [e.key for e in list(self._resident.values())] + [e.key for e in list(self._retiring)]

    def label_names(self, name: str | None) -> list[str] | None:
        """The class names a classification delta was trained with (``None`` when it records none)."""
        from deltatune.errors import DataError
        from deltatune.prediction import reading_of

        entry = self._resident.get(name) if name is not None else None
        src = self._sources.get(name) if name is not None else None
        delta = entry.delta if entry is not None else src if isinstance(src, Delta) else None
        if delta is None:
            return None
        try:
            return reading_of(delta, name or "delta").label_names
        except DataError:
            return None

    # --- registration ---------------------------------------------------------------------------------
    def add(self, name: str, source: str | Path | Delta, preload: bool = True) -> None:
        """Register ``source`` under ``name`` (replacing what the name held: running requests keep their copy);
        with ``preload`` read and attach it now (errors then surface here, before the name is registered)."""
        if not isinstance(name, str) or not NAME.match(name) or name == self.base_name:
            raise BadRequest(f"delta name {name!r} must match {NAME.pattern} and differ from the base model's name "
                             f"{self.base_name!r}", "name")
        src: str | Delta = source if isinstance(source, Delta) else str(source)
        delta = self._read(name, src) if preload else None
        if delta is not None and self._add_beside_step(name, src, delta):
            return
        with self.model_lock(), self._book:
            if delta is not None:
                self._attach(name, delta)  # checks every part first; retires the copy the name held
            else:
                self._unload(name)
            self._sources[name] = src  # registered only once its delta is attached

    def _add_beside_step(self, name: str, src: str | Delta, delta: Delta) -> bool:
        """Attach ``delta`` under a fresh name without waiting for the running step, when that changes no structure
        (:meth:`_wrappers`) and needs no eviction; whether it did.  The wrappers are found without the books, then
        checked again with them held: a detach (which holds the books) may have unwrapped one meanwhile, and a part
        added to a wrapper that is no longer in the model would never run."""
        wrappers = self._wrappers(delta) if name not in self._resident else None
        if wrappers is None:
            return False
        with self._book:
            if name in self._resident or not self._fits(delta) or not self._installed(wrappers):
                return False  # the slow path decides (it may evict, replace or wrap)
            self._attach(name, delta, wrappers)
            self._sources[name] = src
            return True

    def remove(self, name: str) -> None:
        """Forget ``name``: new requests for it get :class:`UnknownDelta`; running ones finish with their copy."""
        with self.model_lock(), self._book:
            if name not in self._sources:
                raise UnknownDelta(name, self.names())
            del self._sources[name]
            self._unload(name)

    def detach_key(self, key: str) -> None:
        """Detach the parts attached under ``key`` by someone other than the store (a co-served training job's
        copy), holding ``lock`` and the books as every detach must: a fast-path :meth:`add` then never picks a
        wrapper that this unwraps."""
        with self.model_lock(), self._book:
            detach(self.model, key)
            self.version += 1

    # --- leases ---------------------------------------------------------------------------------------
    def acquire(self, name: str | None) -> Lease:
        """A lease on ``name``'s current copy (loading it when it was evicted); the base name or ``None``: the
        bare base (no lease needed)."""
        if name is None or name == self.base_name:
            return Lease(None)
        with self._book:  # resident (the usual case): no need to wait for the running step
            entry = self._resident.get(name)
            if entry is not None:
                self._resident.move_to_end(name)
                entry.users += 1
                return Lease(entry.key, entry)
            src = self._sources.get(name)
        if src is None:
            raise UnknownDelta(name, [self.base_name, *self.names()])
        delta = self._read(name, src)  # the disk read and its checks run beside the model's steps, as add()'s do
        with self.model_lock(), self._book:
            if name not in self._sources:
                raise UnknownDelta(name, [self.base_name, *self.names()])
            entry = self._resident.get(name)
            if entry is None:
                if self._sources[name] is not src:  # replaced while it was read: read what the name holds now
                    delta = self._read(name, self._sources[name])
                entry = self._attach(name, delta)
            self._resident.move_to_end(name)
            entry.users += 1
            return Lease(entry.key, entry)

    def release(self, lease: Lease) -> None:
        if lease.released or lease.entry is None:
            lease.released = True
            return
        with self._book:
            lease.released = True
            entry = lease.entry
            entry.users -= 1
            if not ((entry.retired and entry.users == 0) or (not entry.retired and self._over())):
                return
        with self.model_lock(), self._book:  # something to detach
            if entry.retired and entry.users == 0 and entry in self._retiring:
                self._detach(entry)
            elif not entry.retired:
                self._evict()

    # --- internals -------------------------------------------------------------------------------------
    def _read(self, name: str, src: str | Delta) -> Delta:
        from deltatune.api import as_delta

        if not isinstance(src, Delta) and (Path(src) / "adapter_config.json").is_file():
            from deltatune.io.peft_format import load_peft_adapter

            delta = load_peft_adapter(src, model=self.model, verify=self.verify)  # shapes checked against the base
        else:
            delta = as_delta(src, verify=self.verify)
        where = f"delta {name!r}" + ("" if isinstance(src, Delta) else f" ({src})")
        require_capability(delta, "mixed_rows", f"serving {where}")
        require_unstacked(delta, f"serving {where}")  # its rows would need other deltas merged into the shared base
        # the engine serves a model-level part by prefilling the positions it puts before the prompt into the row's
        # KV cache (deltatune.serve.engine): a kind that cannot continue from a cache is refused
        other = sorted({p.kind for p in delta.parts.values() if p.model_level and p.cached_prefix() is None})
        if other:
            raise BadRequest(f"{where}: model-level parts of kind {other} cannot be served: the engine serves "
                             "model-level parts that continue from a KV cache (virtual tokens) only", "path")
        if delta.fingerprint:
            check_fingerprint(delta.fingerprint, self.model, delta.heads, where, self.base_fingerprint(delta.heads))
        check_heads(self.model, delta, where)
        return delta

    @contextmanager
    def model_lock(self) -> Iterator[None]:
        """Hold ``lock`` (the model's), announced to the engine, which lets announced threads in between two steps
        (:meth:`let_waiters_in`) instead of taking the lock straight back: Python's locks are not fair, and a
        structural load would otherwise wait an unbounded number of steps."""
        with self._turn:
            self._lock_waiters += 1
        try:
            self.lock.acquire()
        finally:
            with self._turn:
                self._lock_waiters -= 1
                self._turn.notify_all()
        try:
            yield
        finally:
            self.lock.release()

    def let_waiters_in(self, timeout: float = 0.05) -> None:
        """Called by the engine between steps, without ``lock``: wait (at most ``timeout`` s) until every thread
        announced by :meth:`model_lock` has taken the lock."""
        with self._turn:
            self._turn.wait_for(lambda: self._lock_waiters == 0, timeout)

    def base_fingerprint(self, heads: Iterable[str] = ()) -> dict[str, Any]:
        """The base model's fingerprint without ``heads``, computed once per set of heads from the unmerged base
        (under ``lock``, after :attr:`restore_base`): the store changes no base weight, so it stays valid."""
        key = tuple(sorted(heads))
        kept = self._fingerprints.get(key)
        if kept is None:
            with self.model_lock():
                if self.restore_base is not None:
                    self.restore_base()
                kept = self._fingerprints[key] = fingerprint(self.model, key)
        return kept

    def _fits(self, delta: Delta) -> bool:
        """Whether ``delta`` can be attached with no eviction (no byte bound, or room under it)."""
        return self.max_bytes is None or self.nbytes + delta.nbytes <= self.max_bytes

    def _wrappers(self, delta: Delta) -> dict[str, DeltaLayer] | None:
        """``{module name: its wrapper}`` when attaching ``delta`` changes no structure of the model — every part goes
        to a module already wrapped, none with a weight tied to another module, no task heads, no model-level
        parts; ``None`` otherwise (the attach then waits for the running step)."""
        if delta.heads or not delta.parts:
            return None
        if self._tied is None:
            seen: dict[int, int] = {}
            for _, module in logical_modules(self.model):
                weight = getattr(module, "weight", None)
                if weight is not None:
                    seen[id(weight)] = seen.get(id(weight), 0) + 1
            self._tied = {k for k, n in seen.items() if n > 1}
        found: dict[str, DeltaLayer] = {}
        resolved: dict[str, nn.Module | None] = {"": self.model}  # logical prefix → its module (prefixes are shared)
        for module_name, part in delta.parts.items():
            if part.model_level or not module_name:
                return None
            layer = _logical_module(resolved, module_name)
            if layer is None:
                return None  # attach_parts raises the typed error
            if not isinstance(layer, DeltaLayer) or id(getattr(layer.base, "weight", None)) in self._tied:
                return None
            found[module_name] = layer
        return found

    def _attach(self, name: str, delta: Delta, wrappers: dict[str, DeltaLayer] | None = None) -> Entry:
        """Attach ``delta`` inactive under a fresh key: into the existing ``wrappers`` (:meth:`_wrappers`), or with
        :func:`~deltatune.model.attach_parts` (the caller then holds ``lock``), and retire the copy ``name`` held.
        Every part is checked against its module first, and a failure on the way takes back what was attached:
        a delta that cannot be served leaves the model and the books as they were."""
        self._check_parts(delta, wrappers)
        self._count += 1
        key = f"{name}@{self._count}"
        try:
            if wrappers is not None:
                for module_name, part in delta.parts.items():
                    layer = wrappers[module_name]
                    ref = next(layer.base.parameters(), None)
                    if ref is not None and not _on_device(part, ref.device):
                        part.to(ref.device)
                    layer.add(key, part, activate=False)  # the part takes the layer's train/eval mode
            else:
                attach_parts(self.model, delta.parts, key, activate=False)
                attach_heads(self.model, delta, key, activate=False)
                self.model.eval()
        except BaseException:
            self._undo(key, wrappers)
            raise
        self.version += 1
        entry = Entry(name, key, delta, delta.nbytes + sum(t.numel() * t.element_size() for h in delta.heads.values()
                                                             for t in h.values()))
        self._unload(name)  # the fast path is taken for fresh names only: it never detaches here
        self._resident[name] = entry
        if wrappers is None:  # an eviction detaches: only with ``lock`` held (the caller checked _fits otherwise)
            self._evict(keep=name)
        return entry

    def _check_parts(self, delta: Delta, wrappers: dict[str, DeltaLayer] | None) -> None:
        """Raise :class:`~deltatune.errors.TargetError` or :class:`~deltatune.errors.ShapeMismatch` unless every
        part of ``delta`` fits the module it goes to (``wrappers``' bases when given) — before any is attached."""
        resolved: dict[str, nn.Module | None] = {"": self.model}
        for module_name, part in delta.parts.items():
            if part.model_level:
                part.check_base(self.model, "model")
                continue
            module = wrappers[module_name] if wrappers is not None else _logical_module(resolved, module_name)
            if module is None:
                raise TargetError(f"the delta has a part for {module_name!r}, which is not a module of this model")
            part.check_base(module.base if isinstance(module, DeltaLayer) else module, module_name)

    def _undo(self, key: str, wrappers: dict[str, DeltaLayer] | None) -> None:
        """Take back the parts attached under ``key`` by an attach that failed half-way."""
        if wrappers is None:
            detach(self.model, key)  # the caller holds ``lock``
            return
        for layer in wrappers.values():
            if key in layer.parts:
                layer.remove(key)  # the wrapper keeps its other parts: no structure changes

    def _installed(self, wrappers: dict[str, DeltaLayer]) -> bool:
        """Whether every wrapper of ``wrappers`` is still in the model at its module's path (a detach unwraps a
        module whose last part it removes)."""
        resolved: dict[str, nn.Module | None] = {"": self.model}
        return all(_logical_module(resolved, name) is layer for name, layer in wrappers.items())

    def _unload(self, name: str) -> None:
        """Retire the resident copy of ``name``, if any (running requests keep it until they release it)."""
        entry = self._resident.pop(name, None)
        if entry is not None:
            self._retire(entry)

    def _retire(self, entry: Entry) -> None:
        entry.retired = True
        if entry.users == 0:
            self._detach(entry)
        else:
            self._retiring.append(entry)

    def _detach(self, entry: Entry) -> None:
        detach(self.model, entry.key)
        self.version += 1
        if entry in self._retiring:
            self._retiring.remove(entry)

    def _over(self) -> bool:
        return self.max_bytes is not None and self.nbytes > self.max_bytes

    def _evict(self, keep: str | None = None) -> None:
        """Detach least recently used idle deltas until the resident bytes fit ``max_bytes``."""
        if self.max_bytes is None:
            return
        for name in list(self._resident):
            if self.nbytes <= self.max_bytes:
                return
            entry = self._resident[name]
            if name != keep and entry.users == 0:
                del self._resident[name]
                self._detach(entry)


def _logical_module(seen: dict[str, nn.Module | None], name: str) -> nn.Module | None:
    """The module at the base model's logical path ``name`` (a ``DeltaLayer`` when it is wrapped), seeing through the
    wrappers on the way as :func:`~deltatune.model.physical_path` does, or ``None`` when there is none; ``seen`` maps
    the prefixes resolved so far (``""``: the model) and is extended, so the parts of one delta walk each prefix
    once."""
    head, _, last = name.rpartition(".")
    if name in seen:
        return seen[name]
    parent = _logical_module(seen, head) if head else seen[""]
    if isinstance(parent, DeltaLayer):
        parent = parent.base
    child = None if parent is None else parent._modules.get(last)
    seen[name] = child
    return child


def _on_device(part: nn.Module, device: torch.device) -> bool:
    """Whether every tensor of ``part`` is on ``device`` already (``part.to`` would walk it for nothing)."""
    return all(t.device == device for t in part.parameters()) and all(t.device == device for t in part.buffers())
