"""Mutations of a safetensors file: its JSON header (dtype, shape, offsets, names, metadata, length) and
its data (bit flips, NaN/Inf written into a float tensor)."""

from __future__ import annotations

import json
import random
import struct
from typing import Any

from fuzz.mutate_tree import JSON_VALUES, dump_json, mutate_tree

DTYPES = ["F16", "BF16", "F32", "F64", "I8", "I16", "I32", "I64", "U8", "U16", "BOOL", "F8_E4M3", "XX", ""]
NON_FINITE = {  # dtype → (item size, NaN bytes, +Inf bytes)
    "F32": (4, struct.pack("<f", float("nan")), struct.pack("<f", float("inf"))),
    "F64": (8, struct.pack("<d", float("nan")), struct.pack("<d", float("inf"))),
    "F16": (2, b"\x00\x7e", b"\x00\x7c"),
    "BF16": (2, b"\xc0\x7f", b"\x80\x7f"),
}


def split(data: bytes) -> tuple[dict[str, Any], bytes] | None:
    """``(header, body)`` of a well-formed file, else ``None``."""
    if len(data) < 8:
        return None
    n = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8:8 + n])
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return (header, data[8 + n:]) if isinstance(header, dict) else None


def join(header_text: str, body: bytes, length: int | None = None) -> bytes:
    raw = header_text.encode("utf-8", "surrogatepass")
    raw += b" " * (-len(raw) % 8)
    return (len(raw) if length is None else length).to_bytes(8, "little") + raw + body


def _tensors(header: dict[str, Any]) -> list[str]:
    return [k for k in header if k != "__metadata__"]


def _shape_edit(shape: list[int], rng: random.Random) -> tuple[Any, str]:
    i = rng.randrange(len(shape)) if shape else 0
    edits: list[tuple[Any, str]] = [(shape + [1], "add-dim"), (shape[:-1], "drop-dim"), ([], "scalar"),
                                    ([2**40] + shape[1:], "2^40"), ([-1] + shape[1:], "negative"),
                                    ([1.5] + shape[1:], "float-dim"), (shape[::-1], "reverse"),
                                    ([2**64] + shape[1:], "2^64")]
    if shape:
        for label, new in (("+1", shape[i] + 1), ("x2", shape[i] * 2), ("zero", 0)):
            edits.append((shape[:i] + [new] + shape[i + 1:], label))
    return rng.choice(edits)


def mutate_safetensors(data: bytes, rng: random.Random) -> tuple[bytes, str, str] | None:
    """One structure-aware edit, or ``None`` when ``data`` is not a well-formed safetensors file (an earlier
    edit of the same mutant may have broken it; it is then mutated as bytes)."""
    try:
        return _mutate(data, rng)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError):
        return None


def _mutate(data: bytes, rng: random.Random) -> tuple[bytes, str, str] | None:
    parsed = split(data)
    if parsed is None:
        return None
    header, body = parsed
    names = _tensors(header)
    if not names:
        return None
    name = rng.choice(names)
    entry = header[name]
    op = rng.choice(["dtype", "shape", "offsets", "name", "swap-names", "delete", "metadata", "length", "tree",
                     "data-bitflip", "data-bitflip", "data-nonfinite"])
    text = None
    if op == "dtype":
        entry["dtype"] = rng.choice([d for d in DTYPES if d != entry.get("dtype")])
        kind, what = f"st.dtype:{entry['dtype'] or 'empty'}", f"tensor {name!r} dtype := {entry['dtype']!r}"
    elif op == "shape":
        entry["shape"], label = _shape_edit(list(entry.get("shape", [])), rng)
        kind, what = f"st.shape:{label}", f"tensor {name!r} shape := {str(entry['shape'])[:40]}"
    elif op == "offsets":
        start, end = entry["data_offsets"]
        label, new = rng.choice([("shift+1", [start + 1, end + 1]), ("shift-1", [max(0, start - 1), end - 1]),
                                 ("end+4", [start, end + 4]), ("end-1", [start, end - 1]), ("swap", [end, start]),
                                 ("beyond-file", [start, len(body) + 8]), ("huge", [start, 2**63]),
                                 ("all", [0, len(body)]), ("empty", [start, start])])
        entry["data_offsets"] = new
        kind, what = f"st.offsets:{label}", f"tensor {name!r} data_offsets := {new}"
    elif op == "name":
        new = rng.choice([n for n in (name + "x", name[:-1], name.replace(".", "_", 1), name.swapcase(), "",
                                      "\ud800") if n != name])
        header = {(new if k == name else k): v for k, v in header.items()}
        kind, what = "st.rename", f"tensor {name!r} renamed to {new[:60]!r}"
    elif op == "swap-names":
        same = [k for k in names if k != name and header[k].get("shape") == entry.get("shape")
                and header[k].get("dtype") == entry.get("dtype")]
        if not same:
            return None
        other = rng.choice(same)
        header[name], header[other] = header[other], header[name]
        kind, what = "st.swap-names", f"tensors {name!r} and {other!r} swapped (same shape and dtype)"
    elif op == "delete":
        del header[name]
        kind, what = "st.delete", f"tensor {name!r} removed from the header"
    elif op == "metadata":
        meta = header.get("__metadata__")
        if isinstance(meta, dict) and meta and rng.random() < 0.6:
            key = rng.choice(list(meta))
            choice = rng.choice(["delete", "edit", "non-string"])
            if choice == "delete":
                del meta[key]
            elif choice == "edit":
                value = str(meta[key])
                meta[key] = value[:-1] + ("0" if value[-1:] != "0" else "1") if value else "x"
            else:
                meta[key] = rng.choice([1, None, ["a"], {"a": 1}])
            kind, what = f"st.metadata:{choice}", f"__metadata__[{key!r}] {choice}"
        else:
            header["__metadata__"] = rng.choice([{"format": "pt", "x": "y"}, {}, None, {"format": 1}, []])
            kind, what = "st.metadata:replace", f"__metadata__ := {header['__metadata__']!r}"
    elif op == "length":
        raw = json.dumps(header, separators=(",", ":")).encode()
        n = len(raw) + (-len(raw) % 8)
        label, length = rng.choice([("+1", n + 1), ("-1", n - 1), ("+8", n + 8), ("huge", 2**62), ("zero", 0),
                                    ("file+1", len(data) + 1)])
        return join(json.dumps(header, separators=(",", ":")), body, length), f"st.length:{label}", \
            f"header length field := {length}"
    elif op == "tree":
        header, kind, what = mutate_tree(header, rng, JSON_VALUES)
        kind, what = "st.header-" + kind, "header " + what
        text = dump_json(header)
    else:
        return _mutate_data(header, body, name, op, rng)
    return join(text if text is not None else json.dumps(header, separators=(",", ":")), body), kind, what


def _mutate_data(header: dict[str, Any], body: bytes, name: str, op: str,
                 rng: random.Random) -> tuple[bytes, str, str] | None:
    entry = header[name]
    start, end = entry["data_offsets"]
    if end <= start:
        return None
    text = json.dumps(header, separators=(",", ":"))
    buf = bytearray(body)
    if op == "data-bitflip":
        pos, bit = rng.randrange(start, end), rng.randrange(8)
        buf[pos] ^= 1 << bit
        return join(text, bytes(buf)), "st.data:bitflip", f"tensor {name!r} byte {pos - start} bit {bit} flipped"
    floats = [k for k in _tensors(header) if header[k].get("dtype") in NON_FINITE
              and header[k]["data_offsets"][1] > header[k]["data_offsets"][0]]
    if not floats:
        return None
    name = rng.choice(floats)
    entry = header[name]
    size, nan, inf = NON_FINITE[entry["dtype"]]
    start, end = entry["data_offsets"]
    pos = start + size * rng.randrange((end - start) // size)
    value = rng.choice([("nan", nan), ("inf", inf)])
    buf[pos:pos + size] = value[1]
    return join(text, bytes(buf)), f"st.data:{value[0]}", f"tensor {name!r} element {(pos - start) // size} := " \
                                                            f"{value[0]}"
