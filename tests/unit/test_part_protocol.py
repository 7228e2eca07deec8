"""The Part protocol: parts carry their own algebra, so nothing outside ``parts/`` asks which class a part is.

(a) an AST scan finds no ``isinstance``/``issubclass``/``type(...) is`` check on a Part class outside
    ``src/deltatune/parts/`` (and the scan is shown to catch such checks);
(b) a non-additive kind registered here is refused, before anything is written, by merge, compose,
    compress, rebase and apply with merging, with :class:`NotMergeable` naming the module and kind;
(c) each existing kind's ``updates`` / ``values_view`` / ``with_values`` / ``sum_with`` round trips.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import deltatune
import deltatune.parts
from deltatune.algebra.compose import compose
from deltatune.algebra.compress import compress_delta
from deltatune.algebra.engine import merge
from deltatune.algebra.rebase import rebase_delta
from deltatune.algebra.sum_deltas import compose_deltas, sum_parts
from deltatune.delta import Delta
from deltatune.errors import NotMergeable
from deltatune.model import apply_delta, delta_layers, detach, get_module, merge_delta
from deltatune.parts.base import PART_KINDS, Part
from deltatune.parts.capabilities import require_capability
from deltatune.parts.dense import DensePart
from deltatune.parts.layers import LayerKind
from deltatune.parts.lora import LoRAPart
from deltatune.parts.sparse import SparsePart, scatter_delta
from deltatune.parts.tied import TiedAlias

SRC = Path(deltatune.__file__).parent
PARTS_DIR = SRC / "parts"


# --------------------------------------------------------------------------------------------------
# (a) no class checks on parts outside parts/
# --------------------------------------------------------------------------------------------------
def part_class_names() -> set[str]:
    """Names of ``Part`` and every subclass defined in a module of ``deltatune.parts``."""
    for info in pkgutil.iter_modules(deltatune.parts.__path__):
        importlib.import_module(f"deltatune.parts.{info.name}")
    names, stack = set(), [Part]
    while stack:
        cls = stack.pop()
        if cls.__module__.startswith("deltatune.parts"):
            names.add(cls.__name__)
        stack.extend(cls.__subclasses__())
    return names


def _names_in(node: ast.AST) -> set[str]:
    return {n.id if isinstance(n, ast.Name) else n.attr for n in ast.walk(node)
            if isinstance(n, ast.Name | ast.Attribute)}


def class_checks(source: str, classes: set[str]) -> list[int]:
    """Lines of ``isinstance(x, C)`` / ``issubclass(x, C)`` / ``type(x) is C`` where ``C`` names a class of
    ``classes`` (alone, in a tuple, a union or as ``module.C``)."""
    hits = []
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id in ("isinstance", "issubclass") and len(node.args) == 2):
            if _names_in(node.args[1]) & classes:
                hits.append(node.lineno)
        elif isinstance(node, ast.Compare) and any(isinstance(op, ast.Is | ast.IsNot | ast.Eq | ast.NotEq)
                                                   for op in node.ops):
            sides = [node.left, *node.comparators]
            is_type_call = any(isinstance(s, ast.Call) and isinstance(s.func, ast.Name) and s.func.id == "type"
                               for s in sides)
            if is_type_call and any(_names_in(s) & classes for s in sides if not isinstance(s, ast.Call)):
                hits.append(node.lineno)
    return sorted(hits)


def test_part_classes_are_found():
    names = part_class_names()
    assert {"Part", "LoRAPart", "SparsePart", "DensePart", "TiedAlias"} <= names


@pytest.mark.parametrize("snippet", [
    "isinstance(p, LoRAPart)",
    "isinstance(p, (int, SparsePart))",
    "isinstance(p, LoRAPart | SparsePart)",
    "isinstance(p, parts.dense.DensePart)",
    "all(isinstance(q, TiedAlias) for q in ps)",
    "issubclass(cls, Part)",
    "type(p) is DensePart",
    "if type(p) != LoRAPart:\n    pass",
])
def test_scan_catches_class_checks(snippet):
    assert class_checks(snippet, part_class_names()), snippet


@pytest.mark.parametrize("snippet", [
    "isinstance(p, int)",
    "isinstance(p, DeltaLayer)",
    "p.kind == 'lora'",
    "type(p) is cls",
    "LoRAPart(1, 2, 1, 1.0)",
])
def test_scan_ignores_other_code(snippet):
    assert class_checks(snippet, part_class_names()) == []


def test_scan_sees_the_checks_parts_may_make():
    """The scan is not vacuous on the real tree: inside ``parts/`` (where class checks are allowed) it finds some."""
    names = part_class_names()
    inside = {f.name: class_checks(f.read_text(), names) for f in PARTS_DIR.glob("*.py")}
    assert any(inside.values()), inside


def test_no_part_class_checks_outside_parts():
    names = part_class_names()
    files = [f for f in SRC.rglob("*.py") if PARTS_DIR not in f.parents]
    assert len(files) > 30
    found = {str(f.relative_to(SRC)): lines for f in files if (lines := class_checks(f.read_text(), names))}
    assert found == {}, f"modules outside parts/ branch on a part's class: {found}"


# --------------------------------------------------------------------------------------------------
# (b) a non-additive kind is refused up front
# --------------------------------------------------------------------------------------------------
TOY_KIND = "test_toy_adapter"


@pytest.fixture
def toy_kind():
    """A bottleneck-style adapter ``y = h + U relu(D h)`` with ``h = base(x)``: non-linear, not additive."""

    class ToyAdapter(Part):
        kind = TOY_KIND
        additive, base_dependent, mixed_rows, has_aux_loss = False, False, True, False

        def __init__(self, d: int, gen: torch.Generator) -> None:
            super().__init__()
            self.down = nn.Parameter(torch.randn(2, d, generator=gen))
            self.up = nn.Parameter(torch.randn(d, 2, generator=gen))

        def forward(self, x: Tensor, base: nn.Module) -> Tensor:
            h = base(x)
            return h + torch.relu(h @ self.down.t()) @ self.up.t()

        def meta(self) -> dict[str, int]:
            return {"d": self.down.shape[1]}

    assert PART_KINDS[TOY_KIND] is ToyAdapter
    yield ToyAdapter
    PART_KINDS.pop(TOY_KIND, None)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))


def _lora_on(module: nn.Module, gen: torch.Generator) -> LoRAPart:
    part = LoRAPart(module.in_features, module.out_features, 2, 0.5)
    with torch.no_grad():
        part.lora_A.copy_(torch.randn(2, module.in_features, generator=gen))
        part.lora_B.copy_(torch.randn(module.out_features, 2, generator=gen))
    return part


@pytest.fixture
def mixed(toy_kind):
    """A model and a delta whose *first* part is LoRA (mergeable) and whose second, on module ``1``, is the toy."""
    model, gen = _model(), torch.Generator().manual_seed(1)
    parts = {"0": _lora_on(model[0], gen), "1": toy_kind(4, gen)}
    return model, Delta("toy", {}, parts), Delta("lora", {}, {"0": _lora_on(model[0], gen)})


def _state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _refused(excinfo: pytest.ExceptionInfo[NotMergeable]) -> None:
    err = excinfo.value
    assert (err.module, err.kind) == ("1", TOY_KIND)
    assert "'1'" in str(err) and TOY_KIND in str(err)


def _unchanged(model: nn.Module, before: dict[str, Tensor]) -> None:
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert list(delta_layers(model)) == []


def test_merge_delta_and_apply_with_merging_refuse_before_writing(mixed):
    model, delta, _ = mixed
    before = _state(model)
    with pytest.raises(NotMergeable) as exc:
        merge_delta(model, delta)
    _refused(exc)
    _unchanged(model, before)
    with pytest.raises(NotMergeable) as exc:
        apply_delta(model, delta, merge=True, force=True)
    _refused(exc)
    _unchanged(model, before)


def test_apply_to_checkpoint_refuses_before_loading_the_base(mixed, tmp_path, monkeypatch):
    import deltatune.api as api

    _, delta, _ = mixed
    monkeypatch.setattr(api, "load_base_for", lambda *a, **k: pytest.fail("the base was loaded"))
    with pytest.raises(NotMergeable) as exc:
        api.apply_to_checkpoint(delta, tmp_path / "out")
    _refused(exc)
    assert not (tmp_path / "out").exists()


def test_attaching_without_merging_still_works(mixed):
    model, delta, _ = mixed
    x = torch.randn(3, 4)
    apply_delta(model, delta, merge=False, force=True)
    with torch.no_grad():
        out = model(x)
    detach(model)
    with torch.no_grad():
        h = model[0](x) + (x @ delta.parts["0"].lora_A.t()) @ delta.parts["0"].lora_B.t() * 0.5
        assert torch.allclose(out, delta.parts["1"](h, model[1]), atol=1e-6)


@pytest.mark.parametrize("mode", ["merge", "attach"])
def test_compose_refuses_before_writing(mixed, mode):
    model, delta, lora = mixed
    before = _state(model)
    with pytest.raises(NotMergeable) as exc:
        compose(model, [lora, delta], mode=mode)
    _refused(exc)
    _unchanged(model, before)


def test_compose_deltas_refuses(mixed):
    _, delta, lora = mixed
    with pytest.raises(NotMergeable) as exc:
        compose_deltas([lora, delta])
    _refused(exc)


@pytest.mark.parametrize("method,kwargs", [("magnitude", {"density": 0.5}), ("quantize", {"dtype": "int8"}),
                                           ("lowrank", {"rank": 1})])
def test_compress_refuses(mixed, method, kwargs):
    _, delta, _ = mixed
    with pytest.raises(NotMergeable) as exc:
        compress_delta(delta, method, **kwargs)
    _refused(exc)


def test_merge_engine_refuses_and_writes_nothing(mixed, tmp_path):
    _, delta, lora = mixed
    out = tmp_path / "merged"
    with pytest.raises(NotMergeable) as exc:
        merge([lora, delta], "linear", output="dense", out=out)
    _refused(exc)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_rebase_refuses(mixed):
    model, delta, _ = mixed
    with pytest.raises(NotMergeable) as exc:
        rebase_delta(delta, model, force=True)
    _refused(exc)


def test_require_capability_passes_additive_kinds_and_knows_its_capabilities(mixed):
    _, _, lora = mixed
    require_capability(lora, "additive", "merge")
    require_capability(lora.parts, "base_dependent", "merge", value=False)
    with pytest.raises(NotMergeable, match="every part to be base-dependent"):
        require_capability(lora, "base_dependent", "transfer", value=True)
    with pytest.raises(KeyError):
        require_capability(lora, "mergeable", "merge")


# --------------------------------------------------------------------------------------------------
# (c) the protocol of each existing kind
# --------------------------------------------------------------------------------------------------
def _lora(layer: LayerKind = LayerKind.LINEAR, seed: int = 0, rank: int = 2, scale: float = 0.5) -> LoRAPart:
    gen = torch.Generator().manual_seed(seed)
    part = LoRAPart(5, 3, rank, scale, layer=layer)
    with torch.no_grad():
        part.lora_A.copy_(torch.randn(rank, 5, generator=gen))
        part.lora_B.copy_(torch.randn(3, rank, generator=gen))
    return part


def _sparse(indices: list[int], values: list[float]) -> SparsePart:
    part = SparsePart((3, 5), torch.tensor(indices), LayerKind.LINEAR)
    with torch.no_grad():
        part.values.copy_(torch.tensor(values))
    return part


def _dense(seed: int = 0) -> DensePart:
    gen = torch.Generator().manual_seed(seed)
    part = DensePart({"weight": (3, 5), "bias": (3,)})
    with torch.no_grad():
        for k, shape in part.shapes.items():
            part.delta_for(k).copy_(torch.randn(shape, generator=gen))
    return part


def _same_part(a: Part, b: Part) -> None:
    assert type(a) is type(b) and a.meta() == b.meta()
    sa, sb = a.state(), b.state()
    assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("kind", [LoRAPart, SparsePart, DensePart, TiedAlias])
def test_capabilities_of_existing_kinds(kind):
    assert (kind.additive, kind.base_dependent, kind.mixed_rows, kind.has_aux_loss) == (True, False, True, False)
    assert kind.is_alias is (kind is TiedAlias)


@pytest.mark.parametrize("layer", [LayerKind.LINEAR, LayerKind.CONV1D])
def test_lora_protocol(layer):
    part = _lora(layer)
    upd = part.updates(None)
    hand = 0.5 * part.lora_B.detach() @ part.lora_A.detach()
    assert set(upd) == {"weight"} and torch.allclose(upd["weight"], hand.t() if layer is LayerKind.CONV1D else hand)
    assert part.update_shapes() == {"weight": tuple(upd["weight"].shape)}
    assert part.touched_parameters() == ("weight",) and part.covered_entries() == 15
    assert part.layer_kind() is layer and part.merge_sites() is None and part.index_layout() == {}
    a, b, s = part.factors()
    assert a is part.lora_A and b is part.lora_B and s == 0.5
    _same_part(part.with_values(part.values_view()), part)
    assert part.value_names() == tuple(part.values_view()) == ("lora_A", "lora_B")
    assert part.value_names(product=True) == tuple(part.values_view(product=True)) == ("",)
    product = part.with_values(part.values_view(product=True), product=True)
    assert isinstance(product, SparsePart) and torch.equal(product.updates()["weight"], upd["weight"])


def test_lora_sum_with():
    p, q = _lora(seed=0), _lora(seed=1, rank=3, scale=2.0)
    out = p.sum_with([q], "m")
    assert isinstance(out, LoRAPart) and out.rank == 5
    assert torch.allclose(out.updates()["weight"], p.updates()["weight"] + q.updates()["weight"], atol=1e-5)
    assert p.sum_with([_sparse([0], [1.0])], "m") is None


def test_sparse_protocol():
    part = _sparse([1, 7, 12], [-1.0, 0.5, 0.0])
    upd = part.updates()
    assert set(upd) == {"weight"}
    assert torch.equal(upd["weight"], scatter_delta((3, 5), part.indices, part.values.detach()))
    assert part.update_shapes() == {"weight": (3, 5)} and part.covered_entries() == 15
    assert torch.equal(part.merge_sites()["weight"], part.indices)
    assert part.index_layout() == {"values": ("indices", (3, 5))}
    view = part.values_view()
    assert set(view) == {""} and part.values_view(product=True).keys() == view.keys()
    assert part.value_names() == part.value_names(product=True) == ("",)
    rebuilt = part.with_values(view)  # the explicit zero at index 12 is dropped
    assert rebuilt.indices.tolist() == [1, 7] and rebuilt.values.tolist() == [-1.0, 0.5]
    assert torch.equal(rebuilt.updates()["weight"], upd["weight"])
    _same_part(rebuilt.with_values(rebuilt.values_view()), rebuilt)


def test_sparse_sum_with():
    a, b = _sparse([1, 7], [1.0, 2.0]), _sparse([7, 9], [0.5, 4.0])
    out = a.sum_with([b], "m")
    assert isinstance(out, SparsePart) and out.indices.tolist() == [1, 7, 9] and out.values.tolist() == [1.0, 2.5, 4.0]
    assert a.sum_with([_lora()], "m") is None


def test_dense_protocol():
    part = _dense()
    upd = part.updates()
    assert set(upd) == {"weight", "bias"}
    assert all(upd[k] is part.delta_for(k) for k in upd)  # no copies: the merge engine's per-tensor path
    assert part.update("bias") is part.delta_for("bias")
    assert part.update_shapes() == {"weight": (3, 5), "bias": (3,)} and part.covered_entries() == 18
    assert part.layer_kind() is None and part.factors() is None and part.merge_sites() is None
    _same_part(part.with_values(part.values_view()), part)
    assert part.value_names() == ("weight", "bias")
    assert part.sum_with([_dense(1)], "m") is None


def test_sum_parts_uses_the_kind_sum_or_falls_back_to_dense():
    lora, sparse, dense = _lora(), _sparse([0, 4], [1.0, -2.0]), _dense()
    assert isinstance(sum_parts([lora, _lora(seed=2)], "m"), LoRAPart)
    assert isinstance(sum_parts([sparse, _sparse([4], [1.0])], "m"), SparsePart)
    mixed = sum_parts([lora, sparse, dense], "m")
    assert isinstance(mixed, DensePart) and set(mixed.shapes) == {"weight", "bias"}
    hand = lora.updates()["weight"] + sparse.updates()["weight"] + dense.delta_for("weight")
    assert torch.allclose(mixed.delta_for("weight"), hand, atol=1e-6)
    assert torch.equal(mixed.delta_for("bias"), dense.delta_for("bias"))


def test_tied_alias_sees_the_owner_update():
    owner = _lora()
    alias = TiedAlias(owner, "m")
    assert torch.equal(alias.updates()["weight"], owner.delta_weight())
    assert alias.update_shapes() == owner.update_shapes() and alias.touched_parameters() == ("weight",)


def test_get_module_is_what_the_toy_model_uses():
    model = _model()
    assert get_module(model, "1") is model[1]
