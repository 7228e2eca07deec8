"""The mutation engine itself: seeded (same seed, same mutant), varied, and able to write every edit."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import yaml

from fuzz.mutate import make_mutant, mutate_file
from fuzz.mutate_safetensors import split
from fuzz.mutate_tree import dump_yaml, yaml_alias_bomb

DOC = {"format": "x", "parts": {"a": {"kind": "lora", "meta": {"scale": 2.0, "shape": [3, 4]}}}, "n": [1, 2]}


def test_same_seed_same_mutant(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "manifest.json").write_text(json.dumps(DOC))
    (src / "run.yaml").write_text(yaml.safe_dump(DOC))
    a, b = make_mutant(src, tmp_path / "a", 123), make_mutant(src, tmp_path / "b", 123)
    assert (a.file, a.kind, a.what) == (b.file, b.kind, b.what)
    assert (a.path / a.file).read_bytes() == (b.path / b.file).read_bytes()


def test_mutations_are_varied_and_change_the_file() -> None:
    data = json.dumps(DOC).encode()
    kinds = Counter()
    for seed in range(300):
        import random

        out, kind, _ = mutate_file("manifest.json", data, random.Random(seed))
        kinds[kind.split(":")[0]] += 1
    assert kinds["json.tree.replace"] > 50 and kinds["json.tree.key"] > 10 and kinds["bytes.bitflip"] > 5
    assert len(kinds) >= 12


def test_safetensors_mutations_parse_and_flip_data(tmp_path: Path) -> None:
    import random

    import torch
    from safetensors.torch import save_file

    save_file({"a": torch.ones(4, 4), "b": torch.zeros(4, 4)}, str(tmp_path / "t.safetensors"))
    data = (tmp_path / "t.safetensors").read_bytes()
    kinds = Counter()
    for seed in range(300):
        out, kind, _ = mutate_file("t.safetensors", data, random.Random(seed))
        assert out != data, kind
        kinds[kind.split(":")[0]] += 1
    assert kinds["st.data"] > 20 and kinds["st.shape"] > 5 and kinds["st.offsets"] > 5
    assert split(data) is not None


def test_yaml_raw_values_are_written_verbatim() -> None:
    from fuzz.mutate_tree import Dup, Raw

    text = dump_yaml({"a": Raw(".nan", "nan"), "b": Dup("b", 1, 2), "c": Raw(yaml_alias_bomb(3, 2), "bomb")})
    doc = yaml.safe_load(text)
    assert doc["a"] != doc["a"] and doc["b"] == 2  # NaN; the duplicate's last value wins
    assert len(doc["c"][-1]) == 2 and doc["c"][-1][0] is doc["c"][-1][1]  # aliases share one object


def test_an_alias_bomb_in_the_file_is_never_expanded_by_the_mutator() -> None:
    """Mutating a file that already holds an alias bomb (a second edit of a mutant) stays small."""
    import random

    text = f"a: {yaml_alias_bomb(9, 9)}\nb: [1, 2]\n".encode()
    for seed in range(40):
        out, _, _ = mutate_file("r.yaml", text, random.Random(seed))
        assert len(out) < 300_000
