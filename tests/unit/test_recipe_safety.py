"""Merge recipes are untrusted input: bounded size (alias bombs, input counts), typed errors, short messages.

Every bad recipe ends in :class:`ConfigError` or :class:`InputTooLarge` naming the file and the field
(and the input's index), fast and in little memory; a recipe at the input cap loads and merges.
"""

from __future__ import annotations

import contextlib
import os
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
from conftest import randomize_delta, tiny_llama

import deltatune
from deltatune.algebra import load_recipe, merge, run_recipe
from deltatune.algebra.options import MAX_INPUTS
from deltatune.config import MAX_YAML_DEPTH as MAX_DEPTH
from deltatune.errors import ConfigError, DeltaTuneError, InputTooLarge

LORA = deltatune.LoRAConfig(r=1, alpha=2.0, targets=["q_proj"])


def _write(tmp_path: Path, text: str | bytes, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def _deltas(root: Path, count: int) -> list[Path]:
    """``count`` tiny LoRA deltas on disk (one q_proj adapter each on a 2-layer Llama)."""
    model, paths = tiny_llama(0), []
    for i in range(count):
        delta = randomize_delta(model, LORA, i, 0.02)
        delta.save(root / f"d{i}")
        deltatune.detach(model)
        paths.append(root / f"d{i}")
    return paths


def _bomb(levels: int = 8) -> str:
    """A ~500-byte recipe whose single input path expands to 10**levels scalars ("billion laughs")."""
    lines = ["params:", "  a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"  a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "\n".join(lines) + f"\nmethod: ties\ninputs:\n  - {{path: *a{levels - 1}, weight: 1}}\n"


def test_alias_bomb_fails_fast_in_little_memory(tmp_path) -> None:
    path = _write(tmp_path, _bomb())
    assert path.stat().st_size < 600
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(InputTooLarge, match="YAML nodes once aliases are expanded") as err:
        load_recipe(path)
    elapsed = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert elapsed < 2.0
    assert peak < 20 * 2**20
    assert str(path) in str(err.value) and len(str(err.value)) < 300


def test_small_aliases_still_work(tmp_path) -> None:
    path = _write(tmp_path, "method: ties\nparams: &p {density: 0.5}\ninputs:\n  - {path: a, weight: 0.5}\n"
                            "  - {path: b, weight: 0.5}\n")
    recipe = load_recipe(path)
    assert recipe.params == {"density": 0.5} and [p["weight"] for p in recipe.input_params] == [0.5, 0.5]


def test_recursive_alias_is_refused(tmp_path) -> None:
    with pytest.raises(ConfigError, match="recursive YAML alias"):
        load_recipe(_write(tmp_path, "method: ties\ninputs: &a [*a]\n"))


@pytest.mark.parametrize("text", [
    "method: ties\ninputs: " + "[" * 100_000 + "]" * 100_000 + "\n",
    "method: ties\ninputs: " + "[" * (MAX_DEPTH + 2) + "a" + "]" * (MAX_DEPTH + 2) + "\n",
    "method: ties\ninputs: " + "{a: " * 5000 + "1" + "}" * 5000 + "\n",
], ids=["100k-deep", "just-past-the-limit", "deep-mapping"])
def test_deep_nesting_is_a_config_error(tmp_path, text: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match="nested") as err:
        load_recipe(path)
    assert str(path) in str(err.value)


def test_non_utf8_recipe_names_the_file(tmp_path) -> None:
    path = _write(tmp_path, b"method: ties\ninputs: [caf\xe9]\n")
    with pytest.raises(ConfigError, match="not UTF-8") as err:
        load_recipe(path)
    assert str(path) in str(err.value)


def test_oversized_recipe_and_unreadable_path(tmp_path) -> None:
    path = _write(tmp_path, "method: ties\ninputs: [a]\n" + "# padding\n" * 200_000)
    with pytest.raises(InputTooLarge, match="bytes"):
        load_recipe(path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_recipe(tmp_path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_recipe(tmp_path / "missing.yaml")
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="not a regular file"):
        load_recipe(fifo)


@pytest.mark.parametrize(("text", "field"), [
    ("method: {a: 1}\ninputs: [a]\n", "'method'"),
    ("method: ties\ninputs: [{path: {x: 1}}]\n", r"inputs\[0\]\.path"),
    ("method: ties\ninputs: [a, [b]]\n", r"inputs\[1\]"),
    ("method: ties\ninputs: [a]\npreset: [paper]\n", "preset"),
    ("method: ties\ninputs: [a]\noutput: {dense: 1}\n", "output"),
    ("method: ties\ninputs: [a]\nout: {dir: x}\n", "out"),
    ("method: ties\ninputs: [a]\nbase: [x]\n", "base"),
    ("method: ties\ninputs: [a]\nvocab: {x: 1}\n", "vocab"),
    ("method: ties\ninputs: [a]\nseed: {x: 1}\n", "seed"),
    ("method: ties\ninputs: [a]\nseed: -1\n", "seed"),
    ("method: ties\ninputs: [a]\nrank: 0\n", "rank"),
    ("method: ties\ninputs: [a]\nparams: [1, 2]\n", "params"),
    ("method: ties\ninputs: [a]\nout_dtype: {x: 1}\n", "dtype"),
    ("method: ties\ninputs: [a]\nverify: {x: 1}\n", "verify"),
    ("method: ties\ninputs: [a]\nlines: [1]\n", "lines"),
    ("method: ties\ninputs: [a]\nout: \"a\\0b\"\n", "out"),
    ("method: ties\ninputs: [a]\n? [k]\n: v\n", "YAML"),
    ("method: ties\ninputs: [a]\n1: 2\n", "unknown key"),
    ("merge_method: ties\nmodels: [{model: a, parameters: [1]}]\n", r"models\[0\]\.parameters"),
    ("merge_method: {x: 1}\nmodels: [{model: a}]\n", "merge_method"),
    ("merge_method: ties\nmodels: [{model: {x: 1}}]\n", r"models\[0\]\.model"),
    ("merge_method: ties\nmodels: [{model: a}]\ndtype: [x]\n", "dtype"),
    ("merge_method: ties\nmodels: [{model: a}]\nparameters: x\n", "parameters"),
    ("- just a list\n", "mapping at the top level"),
    ("method: ties\ninputs: [a]\nseed: " + "9" * 5000 + "\n", "cannot be read"),
    ("method: ties\ninputs: [a]\nseed: 2001-02-30\n", "cannot be read"),
])
def test_wrong_types_are_config_errors_naming_the_field(tmp_path, text: str, field: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=field) as err:
        load_recipe(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(("entry", "params", "field"), [
    ("{path: a, weight: .nan}", "", r"inputs\[1\].*'weight'"),
    ("{path: a, weight: .inf}", "", r"inputs\[1\].*'weight'"),
    ("{path: a, weight: true}", "", r"inputs\[1\].*'weight'"),
    ("{path: a, weight: '1.0'}", "", r"inputs\[1\].*'weight'"),
    ("{path: a, density: -.inf}", "", r"inputs\[1\].*'density'"),
    ("{path: a, density: .NaN}", "", r"inputs\[1\].*'density'"),
    ("{path: a, weighd: -.inf}", "", r"inputs\[1\].*'weighd'"),
    ("a", "params: {lambda: .nan}\n", r"params.*'lambda'"),
    ("a", "params: {lambda: 1e999}\n", r"params.*'lambda'"),
    ("{path: a, weight: 1.0e+308}", "", r"inputs\[1\].*'weight'.*float32 range"),  # finite, overflows fp32
    ("a", "params: {normalize: 1}\n", r"params.*'normalize'"),
    ("a", "lines: {alpha: 1.0, beta: .nan}\n", r"lines\.beta"),
    ("a", "lines: {alpha: .inf, beta: 1}\n", r"lines\.alpha"),
])
def test_non_finite_numbers_are_refused_naming_input_and_field(tmp_path, entry: str, params: str, field: str) -> None:
    path = _write(tmp_path, f"method: ties\ninputs:\n  - {{path: a, weight: 1}}\n  - {entry}\n{params}")
    with pytest.raises(ConfigError, match=field) as err:
        load_recipe(path)
    assert str(path) in str(err.value)


def test_an_input_path_too_long_for_the_file_system_is_a_config_error(tmp_path) -> None:
    a = randomize_delta(tiny_llama(0), LORA, 1, 0.02)
    with pytest.raises(ConfigError, match="cannot be inspected"):
        merge([a, tmp_path / ("x" * 100_000)], "task_arithmetic")


def test_mergekit_parameters_must_be_finite(tmp_path) -> None:
    path = _write(tmp_path, "merge_method: ties\nmodels:\n  - {model: a, parameters: {weight: 1}}\n"
                            "  - {model: b, parameters: {weight: .nan, density: 0.5}}\n")
    with pytest.raises(ConfigError, match=r"models\[1\]\.parameters.*'weight'"):
        load_recipe(path)


def test_api_refuses_non_finite_parameters() -> None:
    a = randomize_delta(tiny_llama(0), LORA, 1, 0.02)
    with pytest.raises(ConfigError, match="input 0.*'weight'"):
        merge([a], "task_arithmetic", weights=[float("nan")])
    with pytest.raises(ConfigError, match="'lambda'"):
        merge([a], "task_arithmetic", params={"lambda": float("inf")})
    with pytest.raises(ConfigError, match="input 0.*'density'"):
        merge([a], "ties", input_params=[{"density": float("nan")}])
    with pytest.raises(ConfigError, match=r"lines\.beta"):
        merge([a], "task_arithmetic", lines={"alpha": 1.0, "beta": float("nan")})


def test_long_values_are_cut_in_messages(tmp_path) -> None:
    long = "x" * 10_000
    for text in (f"method: ties\ninputs: ['{long}+lora']\n", f"method: ties\ninputs: [{{path: [{long}]}}]\n",
                 f"method: ties\ninputs: [a]\n{long}: 1\n", f"method: {long}\ninputs: [a]\npreset: {long}\n"):
        with pytest.raises(ConfigError) as err:
            load_recipe(_write(tmp_path, text))
        assert len(str(err.value)) < 400


def _many(tmp_path: Path, count: int, mergekit: bool = False) -> Path:
    if mergekit:
        body = "merge_method: task_arithmetic\nmodels:\n" + "".join(
            f"  - {{model: d{i}, parameters: {{weight: 0.001}}}}\n" for i in range(count))
    else:
        body = "method: task_arithmetic\ninputs:\n" + "".join(f"  - {{path: d{i}, weight: 0.001}}\n"
                                                              for i in range(count))
    return _write(tmp_path, body, f"many{count}{'mk' if mergekit else ''}.yaml")


@pytest.mark.parametrize("mergekit", [False, True], ids=["native", "mergekit"])
def test_too_many_inputs(tmp_path, mergekit: bool) -> None:
    with pytest.raises(InputTooLarge, match=f"1001 inputs; at most {MAX_INPUTS}"):
        load_recipe(_many(tmp_path, 1001, mergekit))
    with pytest.raises(InputTooLarge, match=f"{MAX_INPUTS + 1} inputs"):
        load_recipe(_many(tmp_path, MAX_INPUTS + 1, mergekit))
    a = randomize_delta(tiny_llama(0), LORA, 1, 0.02)
    with pytest.raises(InputTooLarge, match="merge"):
        merge([a] * (MAX_INPUTS + 1), "task_arithmetic")


def test_thousand_inputs_load_in_bounded_time_with_the_cap_raised(tmp_path) -> None:
    path = _many(tmp_path, 1000)
    start = time.perf_counter()
    recipe = load_recipe(path, max_inputs=1000)
    assert time.perf_counter() - start < 10.0
    assert len(recipe.inputs) == 1000 and recipe.input_params[999] == {"weight": 0.001}


def test_merge_at_the_input_cap_runs_in_bounded_time(tmp_path) -> None:
    paths = _deltas(tmp_path, MAX_INPUTS)
    recipe = _many(tmp_path, MAX_INPUTS)
    start = time.perf_counter()
    result = run_recipe(load_recipe(recipe))
    assert time.perf_counter() - start < 60.0
    key = "model.layers.1.self_attn.q_proj"
    with torch.no_grad():
        expected = sum(deltatune.load_delta(p).parts[key].delta_weight() for p in paths) * 0.001
        torch.testing.assert_close(result.parts[key].delta_weight(), expected, rtol=1e-5, atol=1e-7)


def test_verify_flag_reaches_the_delta_loader(tmp_path, monkeypatch) -> None:
    import deltatune.api as api

    (path,) = _deltas(tmp_path, 1)
    seen: list[bool] = []
    real = api.as_delta

    def spy(delta, verify: bool = True):
        seen.append(verify)
        return real(delta, verify=verify)

    monkeypatch.setattr(api, "as_delta", spy)
    for flag, expected in (("", True), ("verify: false\n", False), ("verify: true\n", True)):
        recipe = load_recipe(_write(tmp_path, f"method: task_arithmetic\ninputs: [d0]\n{flag}"))
        assert recipe.verify is expected
        run_recipe(recipe)
        assert seen.pop() is expected


def test_every_failure_is_typed(tmp_path) -> None:
    """Byte mutations of a valid recipe: each loads or raises a DeltaTuneError (nothing else escapes)."""
    good = b"method: ties\npreset: paper\ninputs:\n  - {path: a, weight: 1.0, density: 0.5}\nparams: {lambda: 1.0}\n"
    loaded = 0
    for i in range(len(good)):
        for repl in (b"", b"[", b"{", b"&x", b"*x", b"\x00", b"\xff", b": ", b"- ", b".nan"):
            with contextlib.suppress(DeltaTuneError):
                load_recipe(_write(tmp_path, good[:i] + repl + good[i + 1:]))
                loaded += 1
    assert 0 < loaded < len(good) * 10


def test_planning_does_not_densify_and_inputs_are_left_intact(monkeypatch) -> None:
    """Planning reads LoRA shapes from metadata (no ``B·A`` per input just for a shape, a cost once paid by
    every input of a large merge), and in-place kernels never touch the inputs' own tensors."""
    from deltatune.algebra.engine import plan_keys
    from deltatune.algebra.inputs import DeltaInput
    from deltatune.parts import LoRAPart

    model = tiny_llama(0)
    lora = randomize_delta(model, deltatune.LoRAConfig(r=2, alpha=4.0, targets=["all-linear"]), 1, 0.02)
    deltatune.detach(model)
    full = randomize_delta(model, deltatune.FullConfig(targets=["q_proj"]), 2, 0.02)
    calls: list[int] = []
    real = LoRAPart.delta_weight
    monkeypatch.setattr(LoRAPart, "delta_weight", lambda self: calls.append(1) or real(self))
    shapes = plan_keys([DeltaInput(lora, "a")])
    assert not calls and shapes["model.layers.0.mlp.down_proj.weight"] == (64, 128)
    monkeypatch.undo()
    own = [(m, k, v) for d in (lora, full) for m, p in d.parts.items() for k, v in p.state_dict().items()]
    before = {(m, k): v.clone() for m, k, v in own}
    for method, params in (("task_arithmetic", {}), ("ties", {"density": 0.5})):
        first = merge([full, lora], method, params=params)  # kernels accumulate into the first input's τ
        second = merge([full, lora], method, params=params)
        assert len(before) == len(own) and all(torch.equal(before[m, k], v) for m, k, v in own)
        for key, part in first.parts.items():
            assert torch.equal(part.delta_weight(), second.parts[key].delta_weight())


def test_yaml_text_number_gets_a_hint(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"'density' must be a number, got '1e-3' \(YAML reads 1e-3 as text"):
        load_recipe(_write(tmp_path, "method: ties\ninputs: [{path: a, density: 1e-3}]\n"))


def test_a_relative_path_is_read_from_wherever_it_exists_and_refused_where_it_names_two(tmp_path,
                                                                                      monkeypatch) -> None:
    recipes, elsewhere = tmp_path / "recipes", tmp_path / "elsewhere"
    recipes.mkdir(), elsewhere.mkdir()
    _deltas(recipes, 1)
    text = "method: linear\ninputs:\n  - {path: d0, weight: 1.0}\n"
    recipe = _write(recipes, text)
    monkeypatch.chdir(elsewhere)  # d0 exists only beside the recipe
    assert Path(load_recipe(recipe).inputs[0]).resolve() == (recipes / "d0").resolve()
    monkeypatch.chdir(recipes)  # the same folder both ways: not ambiguous
    assert Path(load_recipe(recipe).inputs[0]).resolve() == (recipes / "d0").resolve()
    _deltas(elsewhere, 1)
    monkeypatch.chdir(elsewhere)  # d0 from here is another delta than the recipe's own d0
    with pytest.raises(ConfigError, match=r"inputs\[0\]\.path.*two different things.*absolute path"):
        load_recipe(recipe)
    absolute = _write(recipes, text.replace("d0", str(recipes / "d0")), "abs.yaml")
    assert Path(load_recipe(absolute).inputs[0]) == recipes / "d0"
    (recipes / "d0").rename(recipes / "base+lora")  # a folder so named beside the recipe is no mergekit reference
    plus = _write(recipes, text.replace("d0", "base+lora"), "plus.yaml")
    assert Path(load_recipe(plus).inputs[0]) == recipes / "base+lora"
