"""Numeric config fields are finite, booleans are not numbers, and JSON metadata refuses NaN/Infinity.

Covers :func:`deltatune.config.parse_config` (method and training configs, ``--set`` strings), the
short value rendering of error messages, and :mod:`deltatune.io.json_io` (manifests, adapter configs).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import deltatune
from deltatune.config import brief, parse_config
from deltatune.errors import ConfigError, DeltaFormatError, NonFiniteError
from deltatune.io.json_io import read_json_object
from deltatune.train.config import TrainConfig


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), "nan", "NaN", "inf", "-Infinity",
                                   "1e999", 10**400, True, False, [1.0], {"x": 1}, None, "abc"])
def test_float_fields_refuse_non_finite_and_non_numbers(value: Any) -> None:
    with pytest.raises(ConfigError, match=r"lora config\.alpha") as err:
        deltatune.make_config("lora", {"alpha": value})
    assert len(str(err.value)) < 200


@pytest.mark.parametrize("value", ["nan", float("nan"), "inf", float("inf"), True])
def test_training_config_numbers_are_finite(value: Any) -> None:
    with pytest.raises(ConfigError, match=r"train config\.lr"):
        parse_config(TrainConfig, {"lr": value}, "train config")


@pytest.mark.parametrize("value", [float("inf"), float("nan"), 2.5, True, "1.5", "x", {"a": 1}, [4]])
def test_integer_fields_refuse_inf_bools_and_fractions(value: Any) -> None:
    with pytest.raises(ConfigError, match=r"lora config\.r"):
        deltatune.make_config("lora", {"r": value})


def test_good_values_still_coerce() -> None:
    cfg = deltatune.make_config("lora", {"alpha": "16", "r": 4.0, "dropout": 0})
    assert (cfg.alpha, cfg.r, cfg.dropout) == (16.0, 4, 0.0)
    assert isinstance(cfg.r, int) and isinstance(cfg.dropout, float)
    assert parse_config(TrainConfig, {"lr": "1e-3"}, "train config").lr == 1e-3


@dataclass
class _Typed:
    name: str = "x"
    tags: list[str] = field(default_factory=list)
    table: dict[str, float] = field(default_factory=dict)
    maybe: float | None = None


@pytest.mark.parametrize(("mapping", "where"), [
    ({"name": {"a": 1}}, r"cfg\.name: expected a string"),
    ({"name": ["a"]}, r"cfg\.name: expected a string"),
    ({"tags": ["a", {"b": 1}]}, r"cfg\.tags\[1\]: expected a string"),
    ({"table": [1, 2]}, r"cfg\.table: expected a mapping"),
    ({"table": {"a": float("nan")}}, r"cfg\.table\.a: expected a finite number"),
    ({"maybe": float("-inf")}, r"cfg\.maybe: expected a finite number"),
    ({"maybe": True}, r"cfg\.maybe: expected a number"),
    ({1: 2}, r"cfg: unknown field\(s\) \[1\]"),
])
def test_objects_where_strings_or_numbers_are_expected(mapping: dict[Any, Any], where: str) -> None:
    with pytest.raises(ConfigError, match=where):
        parse_config(_Typed, mapping, "cfg")


def test_brief_cuts_and_stays_cheap_on_shared_nesting() -> None:
    assert "..." in brief("x" * 10_000) and len(brief("x" * 10_000)) <= 80
    layer: Any = ["x"] * 10
    for _ in range(8):  # 10**9 leaves if expanded
        layer = [layer] * 10
    start = time.perf_counter()
    text = brief(layer)
    assert time.perf_counter() - start < 0.5 and len(text) <= 80


def _manifest(tmp_path: Path, body: bytes) -> Path:
    folder = tmp_path / "delta"
    folder.mkdir(exist_ok=True)
    (folder / "manifest.json").write_bytes(body)
    return folder / "manifest.json"


@pytest.mark.parametrize("body", [b'{"scale": NaN}', b'{"scale": Infinity}', b'{"scale": -Infinity}',
                                  b'{"scale": 1e999}', b'{"a": [1, {"b": -1e400}]}'])
def test_json_non_finite_numbers_are_refused(tmp_path, body: bytes) -> None:
    file = _manifest(tmp_path, body)
    with pytest.raises(NonFiniteError) as err:
        read_json_object(file, "delta", "manifest.json")
    assert str(file) in str(err.value)


@pytest.mark.parametrize(("body", "message"), [
    (b"[" * 200_000 + b"]" * 200_000, "nested too deeply|not valid JSON"),
    (b'{"a": ' * 100_000 + b"1" + b"}" * 100_000, "nested too deeply|not valid JSON"),
    (b'{"n": ' + b"9" * 10_000 + b"}", "not valid JSON"),
    (b'{"name": "caf\xe9"}', "not UTF-8"),
    (b'{"a": 1', "not valid JSON"),
    (b"[1, 2]", "expected a JSON object"),
])
def test_json_structure_errors_are_typed_and_name_the_file(tmp_path, body: bytes, message: str) -> None:
    file = _manifest(tmp_path, body)
    with pytest.raises(DeltaFormatError, match=message) as err:
        read_json_object(file, "delta", "manifest.json")
    assert str(file) in str(err.value) and len(str(err.value)) < 400


def test_json_finite_values_load(tmp_path) -> None:
    file = _manifest(tmp_path, b'{"scale": 0.5, "rank": 4, "big": 1e308, "neg": -2.5e-300}')
    assert read_json_object(file, "delta", "manifest.json") == {"scale": 0.5, "rank": 4, "big": 1e308,
                                                               "neg": -2.5e-300}


@pytest.mark.parametrize("field", ["train_limit", "eval_limit"])
@pytest.mark.parametrize("value", [0, -3])
def test_row_limits_below_one_are_refused(field: str, value: int) -> None:
    # 0 meant "every row" for your own data but "no row" for GLUE; a negative limit emptied the training set and the
    # error then blamed the batch size
    with pytest.raises(ConfigError, match=field):
        TrainConfig(**{field: value})


SEEDED = sorted(name for name, spec in deltatune.methods.METHODS.items()
                if any(f.name == "seed" for f in dataclasses.fields(spec.config_cls)))


@pytest.mark.parametrize("value", [-1, 2**32, 2**64, "18446744073709551616"])
@pytest.mark.parametrize("method", SEEDED)
def test_seeds_outside_what_the_generators_take_are_refused_at_parse(method: str, value: Any) -> None:
    # not an overflow inside torch.Generator.manual_seed (HFT's and SaRA's at their first step)
    with pytest.raises(ConfigError, match=rf"{method} config\.seed must be in \[0, 4294967296\)"):
        deltatune.make_config(method, {"seed": value})
    assert deltatune.make_config(method, {"seed": 2**32 - 1}).seed == 2**32 - 1


def test_the_training_seed_is_checked_too() -> None:
    with pytest.raises(ConfigError, match=r"train config\.seed"):
        parse_config(TrainConfig, {"seed": 2**40}, "train config")


def test_seeds_of_configs_built_in_python_are_checked_where_they_are_used() -> None:
    from conftest import TINY_MODELS

    with pytest.raises(ConfigError, match=r"train config\.seed"):
        TrainConfig(seed=2**32)
    with pytest.raises(ConfigError, match=r"sparse config\.seed"):
        deltatune.attach(TINY_MODELS["llama"](), deltatune.SparseConfig(num_tunable=10, seed=-1))
    with pytest.raises(ConfigError, match="seed"):  # before any model or delta is loaded
        deltatune.generation.generate(["/nonexistent/delta"], ["hi"], seed=2**40)
