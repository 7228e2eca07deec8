"""One config system: compression options and merges are typed configs parsed by ``parse_config``."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
from conftest import randomize_delta, tiny_llama

import deltatune
from deltatune.algebra.compress import METHODS, compress_delta
from deltatune.algebra.compress_config import COMPRESSORS, CONFIGS, DareConfig, parse_compress_options
from deltatune.algebra.engine import merge, run_merge
from deltatune.algebra.recipe import load_recipe
from deltatune.algebra.spec import MergeSpec
from deltatune.config import parse_config
from deltatune.errors import ConfigError
from deltatune.train.config import TrainConfig

LORA = deltatune.LoRAConfig(r=2, alpha=4.0, targets=["q_proj", "v_proj"])


@pytest.fixture(scope="module")
def deltas() -> list[deltatune.Delta]:
    return [randomize_delta(tiny_llama(0), LORA, seed, 0.02) for seed in (1, 2)]


def _message(fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as err:
        fn(*args, **kwargs)
    return str(err.value)


def test_every_compression_method_is_registered_with_a_documented_config() -> None:
    assert set(COMPRESSORS) == set(CONFIGS) == set(METHODS)
    for name, method in COMPRESSORS.items():
        assert method.config is CONFIGS[name] and dataclasses.is_dataclass(method.config)
        for f in dataclasses.fields(method.config):
            assert f.metadata.get("help"), (name, f.name)


def test_compression_option_errors_are_parse_config_errors(deltas) -> None:
    msg = _message(compress_delta, deltas[0], "dare", density=0.5, alpha=2.0)
    assert msg == _message(parse_config, DareConfig, {"density": 0.5, "alpha": 2.0}, "compress (dare)")
    assert "valid fields are ['density', 'dtype', 'scope', 'seed', 'target']" in msg
    # a bad value reads as it does in a training config: the same coercer, the same words
    nan = _message(compress_delta, deltas[0], "dare", density=float("nan"))
    train_nan = _message(parse_config, TrainConfig, {"lr": float("nan")}, "train")
    assert nan.split(": ", 1)[1] == train_nan.split(": ", 1)[1] == "expected a finite number, got nan"
    assert _message(compress_delta, deltas[0], "dare", density=True).endswith("expected a number, got True")
    assert "'row' is not one of ['global', 'tensor']" in _message(compress_delta, deltas[0], "compeft",
                                                                   density=0.5, scope="row")


def test_command_line_strings_are_coerced_like_any_config(deltas) -> None:
    typed = compress_delta(deltas[0], "dare", density=0.5, seed=4)
    text = compress_delta(deltas[0], "dare", density="0.5", seed="4")
    for name, part in typed.parts.items():
        assert torch.equal(part.delta_weight(), text.parts[name].delta_weight()), name
    cfg = parse_compress_options("compeft", {"density": "0.25", "alphas": "1,2", "alpha": None})
    assert (cfg.density, cfg.alphas, cfg.alpha) == (0.25, [1.0, 2.0], None)


def test_compress_cli_lists_the_method_options(deltas, tmp_path) -> None:
    from typer.testing import CliRunner

    from deltatune.cli import app
    from deltatune.commands.compress import compress_command

    deltas[0].save(tmp_path / "d")
    res = CliRunner().invoke(app, ["compress", str(tmp_path / "d"), "--method", "dare", "--density", "0.5",
                                   "--alpha", "2", "--out", str(tmp_path / "o")])
    assert res.exit_code != 0 and not (tmp_path / "o").exists()
    text = str(res.exception) + res.output
    assert "unknown field(s) ['alpha']" in text and "dare options" in text and "density: float" in text
    doc = " ".join(compress_command.__doc__.split())
    for name, cls in CONFIGS.items():
        names = [f.name for f in dataclasses.fields(cls) if f.name != "alphas"]
        assert f"{name} ({', '.join(names)})" in doc, name
    ok = CliRunner().invoke(app, ["compress", str(tmp_path / "d"), "--method", "dare", "--density", "0.5",
                                  "--out", str(tmp_path / "o")])
    assert ok.exit_code == 0, ok.output


def test_merge_keywords_are_a_typed_spec(deltas) -> None:
    kw = dict(weights=[0.7, 0.3], params={"lambda": 0.5}, seed=3)
    via_api = merge(deltas, "task_arithmetic", **kw)
    spec = parse_config(MergeSpec, {"inputs": deltas, "method": "task_arithmetic", **kw}, "merge")
    via_spec = run_merge(spec)
    assert set(via_api.parts) == set(via_spec.parts)
    for name, part in via_api.parts.items():
        assert torch.equal(part.delta_weight(), via_spec.parts[name].delta_weight()), name
    assert "unknown field(s) ['bogus']" in _message(merge, deltas, "task_arithmetic", bogus=1)
    assert "merge.seed: expected an integer" in _message(merge, deltas, "task_arithmetic", seed="x")


def test_merge_and_recipe_give_the_same_errors(deltas, tmp_path) -> None:
    api = _message(merge, deltas, "task_arithmetic", output="bogus")
    path = tmp_path / "r.yaml"
    path.write_text("method: task_arithmetic\ninputs: [a, b]\noutput: bogus\n")
    yaml = _message(load_recipe, path)
    tail = "'bogus' is not one of ['dense', 'sparse', 'lowrank', 'checkpoint']"
    assert api.endswith(f".output: {tail}") and yaml.endswith(f".output: {tail}")


def test_recipe_becomes_the_spec_the_engine_runs(tmp_path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("method: ties\ninputs: [{path: a, density: 0.5}, b]\nout_dtype: bfloat16\nseed: 5\n")
    spec = load_recipe(path).to_spec(out=str(tmp_path / "o"), progress=True)
    assert isinstance(spec, MergeSpec)
    assert (spec.method, spec.seed, spec.out_dtype, spec.progress) == ("ties", 5, torch.bfloat16, True)
    assert [Path(p).name for p in spec.inputs] == ["a", "b"] and spec.input_params == [{"density": 0.5}, {}]
    assert parse_config(MergeSpec, {"out_dtype": "float16"}).out_dtype is torch.float16
    assert re.search(r"out_dtype must be one of", _message(parse_config, MergeSpec, {"out_dtype": "int4"}))


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_delta_merge_to_checkpoint_streams_without_loading_the_model(deltas, tmp_path, monkeypatch) -> None:
    """Delta inputs → checkpoint: the same tensors as merging into the loaded model, and no model is loaded."""
    from transformers import AutoModel, AutoModelForCausalLM

    from deltatune.api import apply_to_checkpoint

    tiny_llama(0).save_pretrained(tmp_path / "base")
    kw = dict(base=str(tmp_path / "base"), weights=[0.6, 0.4], params={"lambda": 0.8})
    merged = merge(deltas, "task_arithmetic", **kw)
    apply_to_checkpoint(merged, tmp_path / "model_path", model=str(tmp_path / "base"))  # the previous path
    expected = _tensors(tmp_path / "model_path")

    def refuse(*args, **kwargs):
        raise AssertionError("the base model was loaded")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(AutoModel, "from_pretrained", refuse)
    out = merge(deltas, "task_arithmetic", output="checkpoint", out=tmp_path / "streamed", **kw)
    got = _tensors(out)
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key
    assert not torch.equal(got["model.layers.0.self_attn.q_proj.weight"],
                           _tensors(tmp_path / "base")["model.layers.0.self_attn.q_proj.weight"])


def test_streamed_delta_merge_checks_the_base_fingerprint(deltas, tmp_path) -> None:
    from deltatune.errors import FingerprintMismatch

    tiny_llama(1).save_pretrained(tmp_path / "other")  # same architecture, other weights
    with pytest.raises(FingerprintMismatch, match="weights differ"):
        merge(deltas, "task_arithmetic", base=str(tmp_path / "other"), output="checkpoint", out=tmp_path / "o")
    assert not (tmp_path / "o").exists()
    out = merge(deltas, "task_arithmetic", base=str(tmp_path / "other"), output="checkpoint", out=tmp_path / "f",
                force=True)
    assert (out / "model.safetensors").is_file()
