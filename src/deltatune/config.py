"""Typed, validated configs: one dataclass drives the Python API, CLI ``--set key=value`` and YAML.

``parse_config(cls, mapping)`` coerces strings from the command line to the field's declared type
and rejects unknown or missing fields with a :class:`ConfigError` that names them.  Numbers must be
finite (NaN and ±Inf are refused, and so is a boolean where a number is expected); error messages
show at most :data:`BRIEF` characters of an offending value (:func:`brief`).  YAML configs are read by
:func:`read_yaml`, which bounds their size before building anything.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import reprlib
import stat
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from deltatune.errors import ConfigError, InputTooLarge

C = TypeVar("C")
BRIEF = 80
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict, _REPR.maxset = 3, 6, 6, 4, 4
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = BRIEF, BRIEF, 40
MAX_YAML_BYTES = 1 << 20
"""Size limit of a YAML config file (a 256-input merge recipe takes about 20 KB)."""
MAX_YAML_NODES = 100_000
"""YAML nodes after alias expansion (a 256-input recipe has about 2,000)."""
MAX_YAML_DEPTH = 32
"""YAML nesting depth (recipes and training configs need 4)."""


def brief(value: Any, limit: int = BRIEF) -> str:
    """``repr(value)`` cut to about ``limit`` characters; bounded work even for huge or shared nested values."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else f"{text[:limit - 3]}..."


def finite_float(value: Any, field: str) -> float:
    """``value`` as a finite float (ints, floats, or numeric strings from the command line); booleans, NaN and
    ±Inf are a :class:`ConfigError` naming ``field``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real | str):
        raise ConfigError(f"{field}: expected a number, got {brief(value)}")
    try:
        number = float(value)
    except (ValueError, OverflowError):
        raise ConfigError(f"{field}: expected a number, got {brief(value)}") from None
    if not math.isfinite(number):
        raise ConfigError(f"{field}: expected a finite number, got {brief(value)}")
    return number


def _coerce(value: Any, tp: Any, field: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        is_none = value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        if is_none and type(None) in typing.get_args(tp):
            return None
        if len(args) == 1:
            return _coerce(value, args[0], field)
        for arg in args:
            try:
                return _coerce(value, arg, field)
            except ConfigError:
                continue
        raise ConfigError(f"{field}: cannot read {brief(value)} as {tp}")
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{field}: {brief(value)} is not one of {list(typing.get_args(tp))}")
        return value
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{field}: expected a list, got {brief(value)}")
        return [_coerce(v, item_tp, f"{field}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if isinstance(value, str):  # a mapping from the command line (``--set 'v_heads={0: [1, 3]}'``): YAML flow
            value = parse_yaml(value, field)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{field}: expected a mapping, got {brief(value)}")
        key_tp, value_tp = typing.get_args(tp) or (Any, Any)
        return {_coerce(k, key_tp, field): _coerce(v, value_tp, f"{field}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{field}: expected true/false, got {brief(value)}")
    if tp is int:
        return _integer(value, field)
    if tp is float:
        return finite_float(value, field)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{field}: expected a string, got {brief(value)}")
        return value
    return value


def _integer(value: Any, field: str) -> int:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            raise ConfigError(f"{field}: expected an integer, got {brief(value)}") from None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{field}: expected an integer, got {brief(value)}")
    return int(value)


def parse_config(cls: type[C], mapping: Mapping[str, Any], where: str = "config") -> C:
    """Build ``cls`` from a mapping, coercing types; unknown keys are an error listing valid ones, and a field with a
    ``range`` in its metadata (:func:`seed_option`) is checked against it."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(mapping) - set(fields), key=str)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {brief(unknown)}; valid fields are {sorted(fields)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in mapping.items()}
    try:
        config = cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where}: {str(exc)[:200]}") from None
    check_ranges(config, where)
    return config


def check_ranges(config: Any, where: str) -> None:
    """:class:`ConfigError` unless every field of the dataclass ``config`` with a ``range`` in its metadata
    (:func:`seed_option`) lies in it: at parse, and where a config built in Python is used (``attach``, training)."""
    for f in dataclasses.fields(config):
        bounds, value = f.metadata.get("range"), getattr(config, f.name, None)
        if bounds is not None and isinstance(value, int) and not bounds[0] <= value < bounds[1]:
            raise ConfigError(f"{where}.{f.name} must be in [{bounds[0]}, {bounds[1]}), got {brief(value)}")


def option(text: str, default: Any = None, *, default_factory: Any = None) -> Any:
    """A config dataclass field with ``default`` (or ``default_factory``) and the ``--help`` line that
    :func:`describe_fields` shows."""
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata={"help": text})
    return dataclasses.field(default=default, metadata={"help": text})


#: What a config's ``seed`` may be: what every generator it reaches takes (numpy's ``[0, 2³²)``, the narrowest).
SEED_RANGE = (0, 2**32)


def seed_option(text: str) -> Any:
    """A ``seed`` field (default 0) that :func:`parse_config` checks against :data:`SEED_RANGE` (a typed error, not
    an overflow inside ``torch.Generator.manual_seed`` or numpy once training has started)."""
    return dataclasses.field(default=0, metadata={"help": text, "range": SEED_RANGE})


def describe_fields(cls: type) -> list[tuple[str, str, str, str]]:
    """``(name, type, default, help)`` rows for ``--help`` style listings."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = repr(f.default_factory())
        else:
            default = "required"
        rows.append((f.name, _type_name(hints[f.name]), default, f.metadata.get("help", "")))
    return rows


def _type_name(tp: Any) -> str:
    """A readable type: ``Literal`` fields list their choices (``one of: a, b``), optionals end in ``| None``."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "one of: " + ", ".join(str(c) for c in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        return " | ".join(_type_name(a) for a in args if a is not type(None)) + (
            " | None" if type(None) in args else "")
    return getattr(tp, "__name__", None) if origin is None else str(tp).replace("typing.", "")


def require(cond: bool, message: str) -> None:
    """Validation helper for ``__post_init__``: raise :class:`ConfigError` unless ``cond``."""
    if not cond:
        raise ConfigError(message)


def _expanded_size(root: yaml.Node, where: str) -> int:
    """Nodes in the YAML graph ``root`` with every alias expanded, counted without expanding (each shared node
    once, iteratively): :class:`InputTooLarge` past :data:`MAX_YAML_NODES`, :class:`ConfigError` for a recursive
    alias or nesting deeper than :data:`MAX_YAML_DEPTH`."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, int, bool]] = [(root, 0, False)]
    while stack:
        node, depth, done = stack.pop()
        children = ([c for pair in node.value for c in pair] if isinstance(node, yaml.MappingNode)
                    else node.value if isinstance(node, yaml.SequenceNode) else [])
        if done:
            open_nodes.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes[id(c)] for c in children)
            if sizes[id(node)] > MAX_YAML_NODES:
                raise InputTooLarge(f"{where}: more than {MAX_YAML_NODES:,} YAML nodes once aliases are expanded "
                                    f"(line {node.start_mark.line + 1}); a config needs far fewer")
            continue
        if id(node) in sizes:
            continue
        if id(node) in open_nodes:
            raise ConfigError(f"{where}: recursive YAML alias (line {node.start_mark.line + 1})")
        if depth > MAX_YAML_DEPTH:
            line = node.start_mark.line + 1
            raise ConfigError(f"{where}: YAML nested deeper than {MAX_YAML_DEPTH} levels (line {line})")
        open_nodes.add(id(node))
        stack.append((node, depth, True))
        stack.extend((c, depth + 1, False) for c in children if id(c) not in sizes)
    return sizes[id(root)]


def read_yaml(path: str | Path) -> Any:
    """The YAML document in ``path`` (a recipe, a training config), read as untrusted input: UTF-8, at most
    :data:`MAX_YAML_BYTES`, its alias-expanded size and its depth bounded before any Python object is built
    (``yaml.safe_load`` would build an alias bomb's shared lists, which any later walk expands); every
    failure a :class:`ConfigError` (:class:`InputTooLarge` for size) naming ``path``."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block, /dev/zero never end
            raise ConfigError(f"{path}: cannot read (not a regular file)")
        with open(path, "rb") as f:
            raw = f.read(MAX_YAML_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if len(raw) > MAX_YAML_BYTES:
        raise InputTooLarge(f"{path}: larger than {MAX_YAML_BYTES:,} bytes; a config needs far less")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})") from None
    return parse_yaml(text, str(path))


def parse_yaml(text: str, where: str) -> Any:
    """The YAML document ``text`` (a file's contents, or a ``--set`` value), its alias-expanded size and depth
    bounded before any object is built; every failure a :class:`ConfigError` naming ``where``."""
    if len(text.encode("utf-8")) > MAX_YAML_BYTES:
        raise InputTooLarge(f"{where}: larger than {MAX_YAML_BYTES:,} bytes; a config needs far less")
    try:
        loader = yaml.SafeLoader(text)  # checks for unprintable characters
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            _expanded_size(node, where)
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: cannot read YAML ({str(exc)[:200]})") from None
    except RecursionError:
        raise ConfigError(f"{where}: YAML nested too deeply (at most {MAX_YAML_DEPTH} levels)") from None
    except (ConfigError, InputTooLarge):
        raise
    except (ValueError, OverflowError) as exc:  # an integer of thousands of digits, a date out of range
        raise ConfigError(f"{where}: a YAML value cannot be read ({str(exc)[:120]})") from None


def read_sections(path: str | Path, names: tuple[str, ...]) -> tuple[dict[str, Any], ...]:
    """The mappings under the top-level keys ``names`` of the YAML file ``path`` (read by :func:`read_yaml`), in
    that order (``{}`` for a missing one); ConfigError naming the file for any other key or a non-mapping."""
    expected = " and ".join(f"'{n}'" for n in names)
    doc = read_yaml(path) or {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a mapping with {expected}, got {brief(doc)}")
    unknown = sorted(set(doc) - set(names), key=str)
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) {brief(unknown)}; expected {expected}")
    sections = []
    for name in names:
        value = doc.get(name) or {}
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: '{name}' must be a mapping of fields, got {brief(value)}")
        sections.append(dict(value))
    return tuple(sections)
