"""No pickle anywhere in the package: nothing deltatune reads can run code (issue 8, finding 2).

The scan parses every module of ``src/deltatune`` and flags imports of pickle-based serialisers,
``torch.load`` (and ``torch.jit.load`` / ``torch.serialization``), ``weights_only=False`` and
``allow_pickle=True``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import deltatune

PACKAGE = Path(deltatune.__file__).parent
BANNED_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "joblib", "marshal", "shelve", "copyreg",
                  "torch.serialization"}
BANNED_CALLS = {"torch.load", "torch.jit.load", "torch.serialization.load", "pd.read_pickle", "pandas.read_pickle"}
BANNED_KEYWORDS = {("weights_only", False), ("allow_pickle", True)}


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def pickle_uses(source: str, filename: str = "<source>") -> list[str]:
    """``"line: what"`` for every pickle-capable use in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            found += [f"{node.lineno}: import {a.name}" for a in node.names
                      if a.name in BANNED_MODULES or a.name.split(".")[0] in BANNED_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = {f"{node.module}.{a.name}" for a in node.names}
            if node.module.split(".")[0] in BANNED_MODULES or node.module in BANNED_MODULES \
                    or names & (BANNED_CALLS | BANNED_MODULES):
                found.append(f"{node.lineno}: from {node.module} import {[a.name for a in node.names]}")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name in BANNED_CALLS:
                found.append(f"{node.lineno}: call {name}")
            for kw in node.keywords:
                if isinstance(kw.value, ast.Constant) and (kw.arg, kw.value.value) in BANNED_KEYWORDS:
                    found.append(f"{node.lineno}: {kw.arg}={kw.value.value}")
    return found


@pytest.mark.parametrize("source", [
    "import pickle", "import cloudpickle as cp", "from dill import loads", "import joblib", "import marshal",
    "from pickle import loads", "import torch\ntorch.load(f)", "import torch\ntorch.load(f, weights_only=True)",
    "from torch import load", "from torch.serialization import load", "import torch.serialization",
    "np.load(f, allow_pickle=True)", "safetensors_load(f, weights_only=False)", "torch.jit.load(f)",
])
def test_scanner_flags_each_pattern(source: str) -> None:
    assert pickle_uses(source)


def test_scanner_accepts_safe_code() -> None:
    assert pickle_uses("from safetensors.torch import load_file\nimport json\nnp.load(f)\nload_file(f)\n"
                       "'''torch.load is gone'''") == []


def test_package_uses_no_pickle() -> None:
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20
    found = {str(f.relative_to(PACKAGE)): uses for f in files if (uses := pickle_uses(f.read_text(), str(f)))}
    assert found == {}
