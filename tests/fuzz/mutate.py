"""The seeded mutation engine: one mutant = a copy of an original folder with one file mutated.

``make_mutant(src, dst, seed, weights, max_edits)`` is a pure function of its seed, so any failure reproduces from
``(target, seed)``.  Files are mutated by their type: JSON and YAML structurally (``mutate_tree``),
safetensors by header and data (``mutate_safetensors``), and any file as bytes (bit flips, byte
replacements, truncation, appended or inserted garbage, encodings).
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from fuzz.mutate_safetensors import mutate_safetensors
from fuzz.mutate_tree import JSON_VALUES, YAML_VALUES, dump_json, dump_yaml, mutate_tree

INTERESTING = [0x00, 0xFF, 0x7F, 0x80, 0x20, 0x22, 0x5C, 0x7B, 0x7D, 0x30, 0x39]


@dataclass(frozen=True)
class Mutant:
    """A mutated copy of an original folder."""

    path: Path
    seed: int
    file: str
    kind: str
    what: str

    def describe(self) -> str:
        return f"{self.file}: {self.what}"


def mutate_bytes(data: bytes, rng: random.Random) -> tuple[bytes, str, str]:
    """A format-blind edit: bit flips, byte replacements, truncation, garbage, encodings."""
    n = len(data)
    op = rng.choice(["bitflip", "bitflip", "bytes", "truncate", "truncate", "append", "insert", "delete",
                     "duplicate", "non-utf8", "encoding", "empty"])
    buf = bytearray(data)
    if op == "bitflip" and n:
        flips = [(rng.randrange(n), rng.randrange(8)) for _ in range(rng.choice([1, 1, 2, 8]))]
        for pos, bit in flips:
            buf[pos] ^= 1 << bit
        return bytes(buf), "bytes.bitflip", f"flipped bits (byte, bit) {flips[:4]}"
    if op == "bytes" and n:
        pos = [rng.randrange(n) for _ in range(rng.choice([1, 4]))]
        for p in pos:
            buf[p] = rng.choice(INTERESTING + [rng.randrange(256)])
        return bytes(buf), "bytes.replace", f"replaced bytes at {pos[:4]}"
    if op == "truncate" and n:
        cut = rng.choice([0, 1, 8, n // 2, n - 1, rng.randrange(n)])
        return bytes(buf[:cut]), "bytes.truncate", f"truncated to {cut} of {n} bytes"
    if op == "append":
        garbage = rng.choice([bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))), b"\0" * 4096,
                              b"{}", b"\n- x\n", b"\xff\xfe"])
        return bytes(buf) + garbage, "bytes.append", f"appended {len(garbage)} garbage bytes"
    if op == "insert":
        pos = rng.randrange(n + 1)
        junk = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 16)))
        return bytes(buf[:pos]) + junk + bytes(buf[pos:]), "bytes.insert", f"inserted {len(junk)} bytes at {pos}"
    if op == "delete" and n > 1:
        pos = rng.randrange(n - 1)
        k = rng.randrange(1, min(64, n - pos) + 1)
        return bytes(buf[:pos] + buf[pos + k:]), "bytes.delete", f"deleted {k} bytes at {pos}"
    if op == "duplicate" and n > 1:
        pos = rng.randrange(n - 1)
        k = rng.randrange(1, min(256, n - pos) + 1)
        return bytes(buf[:pos + k] + buf[pos:]), "bytes.duplicate", f"duplicated {k} bytes at {pos}"
    if op == "non-utf8" and n:
        quote = [i for i, b in enumerate(data) if b == 0x22] or [rng.randrange(n)]
        pos = rng.choice(quote) + 1
        return bytes(buf[:pos]) + b"\xff\xc3\x28\x80" + bytes(buf[pos:]), "bytes.non-utf8", \
            f"inserted invalid UTF-8 at {pos}"
    if op == "encoding":
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            return b"\xef\xbb\xbf" + data, "bytes.bom", "prepended a UTF-8 BOM"
        enc = rng.choice(["utf-16", "utf-32", "utf-8-sig", "latin-1"])
        return text.encode(enc, "replace"), f"bytes.encoding:{enc}", f"re-encoded as {enc}"
    return b"", "bytes.empty", "emptied the file"


def _mutate_text(data: bytes, rng: random.Random, suffix: str) -> tuple[bytes, str, str] | None:
    try:
        text = data.decode("utf-8")
        tree = json.loads(text) if suffix == ".json" else yaml.safe_load(text)
    except (UnicodeDecodeError, ValueError, RecursionError, yaml.YAMLError):
        return None
    if suffix == ".json":
        tree, kind, what = mutate_tree(tree, rng, JSON_VALUES)
        out = dump_json(tree)
        if rng.random() < 0.3:  # pretty-printed like the writers, to reach the same code through other bytes
            with contextlib.suppress(ValueError, RecursionError):
                out = json.dumps(json.loads(out), indent=2)
        return out.encode("utf-8", "surrogatepass"), "json." + kind, what
    tree, kind, what = mutate_tree(tree, rng, YAML_VALUES)
    return dump_yaml(tree).encode("utf-8", "surrogatepass"), "yaml." + kind, what


def mutate_file(name: str, data: bytes, rng: random.Random) -> tuple[bytes, str, str]:
    """One edit of file ``name`` holding ``data``: structure-aware for its type (75 %) or as bytes; an edit
    that happens to leave the bytes unchanged is drawn again."""
    for _ in range(8):
        out = _mutate_once(name, data, rng)
        if out[0] != data:
            break
    return out


def _mutate_once(name: str, data: bytes, rng: random.Random) -> tuple[bytes, str, str]:
    suffix = Path(name).suffix
    if rng.random() < 0.75:
        out = None
        if suffix in (".json", ".yaml", ".yml"):
            out = _mutate_text(data, rng, ".json" if suffix == ".json" else ".yaml")
        elif suffix == ".safetensors":
            out = mutate_safetensors(data, rng)
        if out is not None:
            return out
    return mutate_bytes(data, rng)


def make_mutant(src: Path, dst: Path, seed: int, weights: dict[str, float] | None = None,
                max_edits: int = 1) -> Mutant:
    """Copy folder (or file) ``src`` to ``dst`` and mutate it: 1 to ``max_edits`` edits, each of one file
    chosen by ``weights`` (file name → weight; files not named there weigh 1)."""
    rng = random.Random(seed)
    if src.is_dir():
        shutil.copytree(src, dst)
        files = sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*") if p.is_file())
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
        files = [""]
    w = [(weights or {}).get(f, 1.0) for f in files]
    edits = 1 if max_edits <= 1 else rng.choice([1, 1, 1] + list(range(2, max_edits + 1)))
    names, kinds, whats = [], [], []
    for _ in range(edits):
        name = rng.choices(files, weights=w)[0]
        file = dst / name if name else dst
        data, kind, what = mutate_file(file.name, file.read_bytes(), rng)
        file.write_bytes(data)
        names.append(name or file.name)
        kinds.append(kind)
        whats.append(f"{name or file.name}: {what}" if edits > 1 else what)
    return Mutant(dst, seed, "+".join(dict.fromkeys(names)), "+".join(kinds), "; ".join(whats))
