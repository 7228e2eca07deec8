"""Structure-aware mutations of JSON and YAML documents (a parsed tree, edited, then written back as text).

A mutation picks one node of the tree and replaces its value (NaN/±Inf literals, huge or negative numbers,
strings, objects, lists, deep nesting, overlong values, lone surrogates, YAML alias bombs …), or edits the
key that leads to it (delete, duplicate, rename).  Values that a Python object cannot express (``NaN`` in
YAML, an alias bomb, a duplicate key, 10⁵ nested brackets) are written as raw text through placeholders.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

import yaml

Path_ = tuple[Any, ...]


@dataclass(frozen=True)
class Raw:
    """Text written verbatim where the value goes (JSON or YAML source)."""

    text: str
    label: str


def deep_nesting(depth: int) -> str:
    return "[" * depth + "]" * depth


def yaml_alias_bomb(levels: int = 9, width: int = 9) -> str:
    """A flow list whose last element expands to ``width**levels`` leaves (a few hundred bytes of text)."""
    items = [f"&b0 [{', '.join(['lol'] * width)}]"]
    for i in range(1, levels):
        items.append(f"&b{i} [{', '.join([f'*b{i - 1}'] * width)}]")
    return "[" + ", ".join(items) + "]"


HUGE_DIGITS = "1" + "0" * 5000  # beyond Python's 4300-digit int-from-text limit (3e38: near float32 max)

JSON_VALUES: list[Any] = [
    Raw("NaN", "nan"), Raw("Infinity", "inf"), Raw("-Infinity", "-inf"), 2**40, 2**63, 2**64 + 1, -(2**63) - 1,
    Raw(HUGE_DIGITS, "int5000digits"), Raw("1e400", "1e400"), 1e308, -1e308, 3e38, 5e-324, -1, 0, -0.0, 0.5, 1.5,
    True, False, None, "", "x", "0", "NaN", "../../../../tmp/x", "a::b", "\ud800", "\u202eé\u0000",
    {}, [], {"k": 1}, [1, 2, 3], Raw(deep_nesting(100_000), "deep-nesting"), "A" * 100_000,
    Raw("[" + ",".join(["0"] * 100_000) + "]", "long-list"),
]
YAML_VALUES: list[Any] = [
    Raw(".nan", "nan"), Raw(".inf", "inf"), Raw("-.inf", "-inf"), Raw("1.0e+400", "1e400"), 2**40, 2**63,
    Raw(HUGE_DIGITS, "int5000digits"), 1e308, 3e38, -1, 0, 0.5, True, None, "", "x", "NaN", "\ud800",
    Raw("2001-12-14", "date"), Raw("0x7fffffff", "hex-int"), Raw("yes", "yes"), Raw("!!binary aGVsbG8=", "binary"),
    Raw("!!python/object/apply:os.getcwd []", "python-tag"), Raw("!!set {a, b}", "set"),
    {}, [], {"k": 1}, [1, 2, 3], Raw(deep_nesting(20_000), "deep-nesting"), "A" * 100_000,
    Raw(yaml_alias_bomb(), "alias-bomb"), Raw("*undefined_anchor", "undefined-alias"),
]


@dataclass
class Dup:
    """An object entry written twice: ``key: first`` then ``key: value`` (the original)."""

    key: str
    first: Any
    value: Any


def walk(obj: Any, limit: int = 100_000) -> list[tuple[Path_, Any]]:
    """Nodes below the root as ``(path, value)``: each container once (YAML aliases share one object, so an
    alias bomb is not expanded) and at most ``limit`` of them."""
    out: list[tuple[Path_, Any]] = []
    seen: set[int] = set()
    stack: list[tuple[Path_, Any]] = [((), obj)]
    while stack and len(out) < limit:
        path, node = stack.pop()
        if isinstance(node, dict | list):
            if id(node) in seen:
                continue
            seen.add(id(node))
            items = node.items() if isinstance(node, dict) else enumerate(node)
            kids = [((*path, k), v) for k, v in items]
            out.extend(kids[: limit - len(out)])
            stack.extend(reversed(kids))
    return out


def path_text(path: Path_) -> str:
    parts = [str(p)[:40] for p in path]
    return ".".join(parts) or "<root>"


def _parent(tree: Any, path: Path_) -> Any:
    node = tree
    for p in path[:-1]:
        node = node[p]
    return node


def _tweaks(value: Any, rng: random.Random) -> list[tuple[Any, str]]:
    """Type-preserving edits of ``value`` (off-by-one, sign, scale, reorder)."""
    if isinstance(value, bool):
        return [(not value, "flip-bool"), (int(value), "bool-as-int")]
    if isinstance(value, int):
        return [(value + 1, "+1"), (value - 1, "-1"), (-value - 1, "negate"), (value * 2**20 + 1, "x2^20"),
                (float(value), "as-float"), (str(value), "as-string")]
    if isinstance(value, float):
        return [(value * 2, "x2"), (-value, "negate"), (value + 1e-7, "+1e-7"), (str(value), "as-string")]
    if isinstance(value, str):
        return [(value + "x", "append-char"), (value.upper(), "upper"), (value[:-1], "drop-char"),
                (value + "\u0301", "combining-accent"), (value * 2, "double")]
    if isinstance(value, list) and value:
        return [(value[:-1], "drop-last"), (value + value[-1:], "repeat-last"), (value[::-1], "reverse"),
                ([value], "wrap-list"), ((value * (2000 // len(value) + 1))[:max(2000, len(value))],
                                         "repeat-to-2000")]
    if isinstance(value, dict):
        return [({}, "empty-object"), ([value], "wrap-list")]
    return []


def mutate_tree(tree: Any, rng: random.Random, values: list[Any]) -> tuple[Any, str, str]:
    """One edit of ``tree`` (in place where possible); returns ``(tree, kind, description)``."""
    nodes = list(walk(tree))
    if not nodes:
        return rng.choice(values), "tree.replace-root", "replaced the whole document"
    path, value = rng.choice(nodes)
    parent = _parent(tree, path)
    key = path[-1]
    where = path_text(path)
    op = rng.choices(["replace", "tweak", "swap", "key"], weights=[5, 3, 1, 2])[0]
    if op == "tweak":
        tweaks = _tweaks(value, rng)
        if tweaks:
            new, label = rng.choice(tweaks)
            parent[key] = new
            return tree, f"tree.tweak:{label}", f"{label} of {where}"
        op = "replace"
    if op == "swap":
        other_path, other = rng.choice(nodes)
        if other_path[: len(path)] != path and path[: len(other_path)] != other_path:
            parent[key], _parent(tree, other_path)[other_path[-1]] = other, value
            return tree, "tree.swap", f"swapped {where} with {path_text(other_path)}"
        op = "replace"
    if op == "key" and isinstance(parent, dict):
        action = rng.choice(["delete", "duplicate", "rename", "rename-sibling"])
        if action == "delete":
            del parent[key]
            return tree, "tree.key:delete", f"deleted key {where}"
        if action == "duplicate":
            first = rng.choice(values + [value])
            parent[key] = Dup(str(key), first, value)
            return tree, "tree.key:duplicate", f"duplicated key {where} (first value {_label(first)})"
        if action == "rename":
            new = rng.choice([f"{key}x", str(key).upper(), "", f"{key} ", "\u0391" + str(key)[1:]])
        else:
            new = rng.choice([k for k in parent if k != key] or [f"{key}_"])
        if new in parent and new != key:
            parent[new], parent[key] = parent[key], parent[new]
            return tree, "tree.key:swap-names", f"swapped keys {where} and {new!r}"
        _replace_key(parent, key, new, value)
        return tree, "tree.key:rename", f"renamed key {where} to {str(new)[:40]!r}"
    if op == "key" and isinstance(parent, list):
        if rng.random() < 0.5:
            del parent[key]
            return tree, "tree.list:delete", f"deleted item {where}"
        parent.insert(key, value)
        return tree, "tree.list:duplicate", f"duplicated item {where}"
    new = rng.choice(values)
    parent[key] = new
    return tree, f"tree.replace:{_label(new)}", f"{where} := {_label(new)}"


def _label(value: Any) -> str:
    if isinstance(value, Raw):
        return value.label
    if isinstance(value, str):
        return f"str[{len(value)}]" if len(value) > 20 else f"str:{value!r}"
    if isinstance(value, dict | list):
        return f"{type(value).__name__}[{len(value)}]"
    return repr(value)[:30]


def _replace_key(parent: dict, old: Any, new: Any, value: Any) -> None:
    items = [(new if k == old else k, value if k == old else v) for k, v in parent.items()]
    parent.clear()
    parent.update(items)


# --- writing the tree back ----------------------------------------------------------------------
def dump_json(obj: Any) -> str:
    """JSON text of ``obj`` with :class:`Raw` values verbatim and :class:`Dup` keys written twice."""
    if isinstance(obj, Raw):
        return obj.text
    if isinstance(obj, dict):
        items = []
        for k, v in obj.items():
            name = json.dumps(k if isinstance(k, str) else str(k))
            if isinstance(v, Dup):
                items.append(f"{name}:{dump_json(v.first)}")
                v = v.value
            items.append(f"{name}:{dump_json(v)}")
        return "{" + ",".join(items) + "}"
    if isinstance(obj, list):
        return "[" + ",".join(dump_json(v) for v in obj) + "]"
    return json.dumps(obj)


def dump_yaml(obj: Any) -> str:
    """Block-style YAML of ``obj`` (``yaml.safe_dump``) with :class:`Raw` values and :class:`Dup` keys put
    in as text."""
    raws: dict[str, str] = {}

    def token(prefix: str, text: str) -> str:
        name = f"{prefix}{len(raws)}X"
        raws[name] = text
        return name

    done: dict[int, Any] = {}  # shared objects stay shared (written as YAML aliases): an alias bomb in the
    # parsed tree is never expanded

    def sub(o: Any) -> Any:
        if isinstance(o, Raw):
            return token("RAWTOKEN", o.text)
        if not isinstance(o, dict | list):
            return o
        if id(o) in done:
            return done[id(o)]
        out: Any = {} if isinstance(o, dict) else []
        done[id(o)] = out
        if isinstance(o, list):
            out.extend(sub(v) for v in o)
            return out
        for k, v in o.items():
            if isinstance(v, Dup):
                out[token("DUPKEY", v.key)] = sub(v.first)
                v = v.value
            out[k] = sub(v)
        return out

    text = yaml.safe_dump(sub(obj), sort_keys=False, allow_unicode=False, width=10**9)
    for name in sorted(raws, key=len, reverse=True):  # RAWTOKEN12X before RAWTOKEN1X
        text = text.replace(f"'{name}'", raws[name]).replace(name, raws[name])
    return text
