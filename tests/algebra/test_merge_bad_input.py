"""Bad merge input gets a typed error naming what is wrong; a failed write leaves nothing behind."""

from __future__ import annotations

import errno
import json

import pytest
import torch
from merge_fixtures import TINY, checkpoints, random_delta, save_finetune  # noqa: F401  (fixture)
from transformers import LlamaConfig, LlamaForCausalLM

import deltatune
from deltatune.algebra import load_recipe, merge
from deltatune.algebra.checkpoint import CheckpointReader
from deltatune.errors import ConfigError, DeltaFormatError, FingerprintMismatch, ShapeMismatch

pytestmark = pytest.mark.usefixtures("one_thread")
LORA = deltatune.LoRAConfig(r=2, alpha=4.0)


def fts(paths):
    return [paths[f"ft{i}"] for i in range(3)]


def test_deltas_of_different_bases_are_refused_unless_forced() -> None:
    a, b = random_delta(LORA, seed=1), random_delta(LORA, seed=2, model_seed=1)
    with pytest.raises(FingerprintMismatch, match="input 0 and input 1 were trained on different base models"):
        merge([a, b], "task_arithmetic")
    assert merge([a, b], "task_arithmetic", force=True).parts


def test_checkpoint_of_another_shape_names_the_tensor(checkpoints, tmp_path) -> None:  # noqa: F811
    LlamaForCausalLM(LlamaConfig(**{**TINY, "intermediate_size": 40})).save_pretrained(tmp_path / "other")
    with pytest.raises(ShapeMismatch, match=r"mlp\.(down|gate|up)_proj\.weight.*has shape"):
        merge([checkpoints["ft0"], tmp_path / "other"], "ties", base=checkpoints["base"], params={"density": 0.5},
              output="checkpoint", out=tmp_path / "o")


def test_vocabulary_mismatch_errors_then_aligns_on_request(checkpoints, tmp_path) -> None:  # noqa: F811
    base = LlamaForCausalLM.from_pretrained(checkpoints["base"])
    grown = save_finetune(base, tmp_path / "grown", seed=5, vocab=TINY["vocab_size"] + 8)
    ins = [checkpoints["ft0"], grown]
    with pytest.raises(ShapeMismatch, match="vocabulary mismatch.*vocab='truncate' or 'extend'"):
        merge(ins, "task_arithmetic", base=checkpoints["base"], output="checkpoint", out=tmp_path / "x")
    assert not (tmp_path / "x").exists()
    key = "model.embed_tokens.weight"
    truncated = CheckpointReader(merge(ins, "task_arithmetic", base=checkpoints["base"], output="checkpoint",
                                       out=tmp_path / "t", vocab="truncate"))
    assert truncated.shape(key) == (TINY["vocab_size"], TINY["hidden_size"])
    extended = CheckpointReader(merge(ins, "task_arithmetic", base=checkpoints["base"], output="checkpoint",
                                      out=tmp_path / "e", vocab="extend"))
    rows = TINY["vocab_size"] + 8
    assert extended.shape(key) == (rows, TINY["hidden_size"])
    assert json.loads((tmp_path / "e" / "config.json").read_text())["vocab_size"] == rows
    b = CheckpointReader(checkpoints["base"]).get(key)
    g = CheckpointReader(grown).get(key)
    # new rows: base mean row + the grown model's delta against it; old rows: the usual sum of deltas
    assert torch.allclose(extended.get(key)[-1], g[-1], atol=1e-6)
    f0 = CheckpointReader(checkpoints["ft0"]).get(key)
    assert torch.allclose(extended.get(key)[:3], b[:3] + (f0[:3] - b[:3]) + (g[:3] - b[:3]), atol=1e-6)


@pytest.mark.parametrize("vocab", ["truncate", "extend"])
def test_vocabulary_alignment_skips_zero_dim_tensors(tmp_path, vocab) -> None:
    """A 0-d tensor (CLIP's ``logit_scale``) has no vocabulary axis: aligning rows leaves it to the plain merge."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    state = {"text.embed_tokens.weight": torch.randn(10, 4, generator=g), "logit_scale": torch.tensor(2.5),
             "proj.weight": torch.randn(4, 4, generator=g)}
    paths = []
    for name, rows, noise in (("base", 10, 0.0), ("ft0", 12, 0.01), ("ft1", 10, 0.02)):
        folder = tmp_path / name
        folder.mkdir()
        tensors = {k: v + noise for k, v in state.items()}
        extra = torch.randn(rows - 10, 4, generator=g)
        tensors["text.embed_tokens.weight"] = torch.cat([tensors["text.embed_tokens.weight"], extra])
        save_file(tensors, folder / "model.safetensors")
        paths.append(folder)
    out = CheckpointReader(merge(paths[1:], "task_arithmetic", base=paths[0], output="checkpoint",
                                 out=tmp_path / "out", vocab=vocab))
    assert torch.allclose(out.get("logit_scale"), torch.tensor(2.53))
    assert out.shape("text.embed_tokens.weight") == ((12 if vocab == "extend" else 10), 4)


def test_nan_in_an_input_names_input_and_tensor(tmp_path) -> None:
    a = random_delta(LORA, seed=1)
    module = next(iter(a.parts))
    with torch.no_grad():
        a.parts[module].lora_B[0, 0] = float("nan")
    with pytest.raises(DeltaFormatError, match=rf"input 0:{module}\.weight: \d+ NaN/Inf"):
        merge([a], "task_arithmetic")


@pytest.mark.parametrize("density", [0.0, 1.5, -0.1])
def test_density_outside_unit_interval_is_refused(density) -> None:
    a = random_delta(LORA, seed=1)
    with pytest.raises(ConfigError, match="density must be in"):
        merge([a], "ties", params={"density": density})


def test_missing_density_is_an_error_outside_the_mergekit_preset() -> None:
    a = random_delta(LORA, seed=1)
    with pytest.raises(ConfigError, match="explicit density"):
        merge([a], "dare_ties")
    assert merge([a], "dare_ties", preset="mergekit").parts  # mergekit's default: density 1.0


def test_weights_summing_to_zero_under_normalize_are_refused() -> None:
    a, b = random_delta(LORA, seed=1), random_delta(LORA, seed=2)
    with pytest.raises(ConfigError, match="weights sum to 0"):
        merge([a, b], "linear", weights=[1.0, -1.0])
    assert merge([a, b], "task_arithmetic", weights=[1.0, -1.0]).parts  # negation needs normalize: false


def test_disk_full_mid_write_leaves_no_partial_output(checkpoints, tmp_path, monkeypatch) -> None:  # noqa: F811
    from deltatune.io.shards import PlannedShardWriter

    target = tmp_path / "out"
    merge(fts(checkpoints), "task_arithmetic", base=checkpoints["base"], output="checkpoint", out=target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    real, calls = PlannedShardWriter.add, []

    def full_disk(self, name, tensor):
        calls.append(name)
        if len(calls) == 7:  # part-way through the second shard
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, name, tensor)

    monkeypatch.setattr(PlannedShardWriter, "add", full_disk)
    with pytest.raises(OSError, match="No space left"):
        merge(fts(checkpoints), "ties", base=checkpoints["base"], params={"density": 0.2}, output="checkpoint",
              out=target, shard_size="30KB")
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize(("text", "message"), [
    ("method: ties\ninputs: [a]\ndensity: 0.2\n", r"unknown key\(s\) \['density'\]"),
    ("merge_method: ties\nmodels: [{model: a}]\nbase_model: b\nmerge_options: 1\n",
     r"unknown key\(s\) \['merge_options'\]"),
    ("merge_method: ties\nslices: []\n", "slices.*not supported"),
    ("merge_method: ties\nmodels: [{model: 'a+lora'}]\n", "model\\+lora"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a}, {model: c}, {model: ./a}]\n",
     r"models\[2\] \('./a'\) is the model models\[0\] already lists; mergekit refuses duplicate merge inputs"),
    ("method: ties\ninputs: [{path: a, strength: 2}]\n", None),
])
def test_recipe_keys_are_checked(tmp_path, text, message) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    if message is not None:
        with pytest.raises(ConfigError, match=message):
            load_recipe(path)
    else:
        recipe = load_recipe(path)
        a = random_delta(LORA, seed=1)
        with pytest.raises(ConfigError, match="unknown per-input parameter 'strength'"):
            merge([a], recipe.method, input_params=recipe.input_params, params={"density": 0.5})


def test_unknown_method_parameter_and_list_values_are_refused() -> None:
    a = random_delta(LORA, seed=1)
    with pytest.raises(ConfigError, match="unknown merge method 'tie'"):
        merge([a], "tie")
    with pytest.raises(ConfigError, match="unknown parameter 'gamma'"):
        merge([a], "ties", params={"density": 0.5, "gamma": 0.1})
    with pytest.raises(ConfigError, match="per-layer gradients"):
        merge([a], "ties", params={"density": [0.1, 0.5]})


@pytest.mark.parametrize(("method", "preset", "params", "message"), [
    ("ties", "mergekit", {"scope": "row"}, r"ties: scope 'row' is not implemented by ties"),
    ("ties", "paper", {"rescale": "inverse"}, r"ties: rescale 'inverse' is not implemented by ties"),
    ("breadcrumbs", "mergekit", {"scope": "global"}, r"breadcrumbs: scope 'global' is not implemented"),
    ("breadcrumbs_ties", "paper", {"scope": "global"}, r"breadcrumbs_ties: scope 'global' is not implemented"),
    ("pcb", "mergekit", {"scope": "row"}, r"pcb: scope 'row' is not implemented by pcb"),
    ("ties", "peft", {"normalize": False}, r"ties: normalize false is not implemented with divide 'count'"),
    ("dare_ties", "mergekit", {"normalize": False, "divide": "count"}, r"dare_ties: normalize false"),
    ("task_arithmetic", "paper", {"density": 0.5}, r"task_arithmetic: unknown parameter 'density'"),
    ("dare_linear", "paper", {"scope": "global"}, r"dare_linear: scope has no effect on dare_linear \(it reads "
                                                  r"\['rescale'\]\)"),
    ("dare_linear", "mergekit", {"sign_tie": "majority"}, r"dare_linear: sign_tie has no effect"),
    ("della", "paper", {"k_rule": "count"}, r"della: k_rule has no effect on della"),
])
def test_options_a_method_does_not_implement_are_refused(method, preset, params, message) -> None:
    """A value that would be read as another (TIES has no per-row trim, PEFT's count division always divides)
    is refused, naming the option and the method; ``density`` is a no-op for ``task_arithmetic`` only where
    mergekit's recipes need it (the mergekit preset)."""
    a = random_delta(LORA, seed=1)
    with pytest.raises(ConfigError, match=message):
        merge([a], method, preset=preset, params={"density": 0.5, **params})


def test_task_arithmetic_refuses_every_preset_option_outside_mergekit_s_no_ops() -> None:
    a = random_delta(LORA, seed=1)
    with pytest.raises(ConfigError, match=r"task_arithmetic: divide has no effect on task_arithmetic \(it reads "
                                          r"none of the preset options\)"):
        merge([a], "task_arithmetic", params={"divide": "count"})
    merge([a], "ties", preset="paper", params={"density": 0.5, "k_rule": "count", "sign_tie": "plus"})  # it reads them


def test_mergekit_rescale_booleans_and_no_op_density_are_taken(tmp_path) -> None:
    """mergekit spells ``rescale`` true/false (L1 norm matching or none) and takes ``density`` for
    ``task_arithmetic`` without effect; both recipes load and merge."""
    from deltatune.algebra.options import coerce_param

    assert coerce_param("rescale", True, "x") == "l1" and coerce_param("rescale", False, "x") == "none"
    path = tmp_path / "r.yaml"
    path.write_text("merge_method: dare_linear\nbase_model: b\nmodels: [{model: a, parameters: {density: 0.5}}]\n"
                    "parameters: {rescale: false}\n")
    assert load_recipe(path).params == {"rescale": "none"}
    a = random_delta(LORA, seed=1)
    plain = merge([a], "task_arithmetic", preset="mergekit")
    ignored = merge([a], "task_arithmetic", preset="mergekit", params={"density": 0.3, "rescale": True})
    for module, part in plain.parts.items():
        for name, value in part.state_dict().items():
            assert torch.equal(value, ignored.parts[module].state_dict()[name]), (module, name)


def test_mixed_inputs_and_missing_base_are_refused(checkpoints, tmp_path) -> None:  # noqa: F811
    a = random_delta(LORA, seed=1)
    with pytest.raises(ConfigError, match="mix full checkpoints and deltas"):
        merge([a, checkpoints["ft0"]], "task_arithmetic", base=checkpoints["base"])
    with pytest.raises(ConfigError, match="needs base"):
        merge([checkpoints["ft0"]], "task_arithmetic", output="checkpoint", out=tmp_path / "o")
    with pytest.raises(ConfigError, match="model_stock needs the base weights"):
        merge([a, a], "model_stock")


def test_truncated_checkpoint_shard_names_the_file(checkpoints, tmp_path) -> None:  # noqa: F811
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(checkpoints["ft0"], broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(DeltaFormatError, match=r"broken/model\.safetensors: tensor .* does not hold"):
        merge([broken], "task_arithmetic", base=checkpoints["base"], output="checkpoint", out=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_mergekit_tokenizer_source_base_keeps_the_bases_vocabulary(tmp_path) -> None:
    # mergekit's tokenizer_source: base drops the rows a fine-tune added: deltatune's vocab: truncate (it was
    # accepted and ignored, and the merge then failed on the added rows)
    path = tmp_path / "r.yaml"
    path.write_text("merge_method: task_arithmetic\nbase_model: b\nmodels: [{model: a}]\ntokenizer_source: base\n")
    assert load_recipe(path).vocab == "truncate"
    path.write_text("merge_method: task_arithmetic\nbase_model: b\nmodels: [{model: a}]\n")
    assert load_recipe(path).vocab == "error"


@pytest.mark.parametrize("method", ["slerp", "model_stock"])
def test_a_per_input_weight_a_method_does_not_read_is_refused_or_warned(method) -> None:
    # slerp and model_stock read no weights: weight 0.1 and 1.0 gave bit-identical merges without a word
    from deltatune.algebra.methods import METHODS
    from deltatune.algebra.options import resolve_params

    spec, params = METHODS[method].params, {"t": 0.5} if method == "slerp" else {}
    with pytest.raises(ConfigError, match=f"{method}: input 0: unknown per-input parameter 'weight'"):
        resolve_params(method, spec, "paper", params, [{"weight": 0.1}, {}])
    with pytest.warns(UserWarning, match="weight is ignored"):  # mergekit's own recipes may carry it: as mergekit
        resolve_params(method, spec, "mergekit", params, [{"weight": 0.1}, {}])
