"""End-to-end parity with mergekit 0.1.5: one mergekit YAML, run by mergekit and by ``deltatune merge``.

Three tiny random Llama fine-tunes (base + N(0, 1e-3²) noise on every tensor, fp32 safetensors) are
merged by mergekit (``mergekit.merge.run_merge``, in process, ``random_seed=0``, no tokenizer copy;
the ``mergekit-yaml`` CLI once, in the slow tier) and by ``deltatune merge CONFIG --out DIR`` (the
CLI, in process), which reads mergekit YAML under the ``mergekit`` preset.  Every output tensor is
compared: deterministic methods to 1e-5 in fp32 (they come out bit-exact), DARE/DELLA in
distribution (the two draw masks from different seeds).  Paths in the YAML are absolute
(merging.md §B: relative ones can be taken for Hub ids).
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest.importorskip("mergekit")
from mergekit.config import MergeConfiguration  # noqa: E402
from mergekit.merge import run_merge  # noqa: E402
from mergekit.options import MergeOptions  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from deltatune.cli import app  # noqa: E402

TOL = 1e-5
WEIGHTS = [1.0, 0.5, 2.0]
NOISE = 1e-3


# --------------------------------------------------------------------------------------------------
# checkpoints and runners
# --------------------------------------------------------------------------------------------------
def _config(tied: bool) -> LlamaConfig:
    return LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=tied)


def _checkpoints(root: Path, dtype: torch.dtype = torch.float32, tied: bool = False) -> dict[str, str]:
    cfg = _config(tied)
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg)
    state = base.state_dict()
    paths = {"base": root / "base"}
    base.to(dtype).save_pretrained(paths["base"])
    for i in range(3):
        g = torch.Generator().manual_seed(100 + i)
        ft = LlamaForCausalLM(cfg)
        ft.load_state_dict({k: v + NOISE * torch.randn(v.shape, generator=g) for k, v in state.items()})
        paths[f"ft{i}"] = root / f"ft{i}"
        ft.to(dtype).save_pretrained(paths[f"ft{i}"])
    return {k: str(v.resolve()) for k, v in paths.items()}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> dict[str, str]:
    return _checkpoints(tmp_path_factory.mktemp("fp32"))


def _doc(ckpt: dict[str, str], method: str, per_model: dict[str, Any] | None = None,
         weights: list[float] = WEIGHTS, params: dict[str, Any] | None = None, dtype: str = "float32",
         base: bool = True, n: int = 3) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "merge_method": method,
        "models": [{"model": ckpt[f"ft{i}"], "parameters": {"weight": weights[i], **(per_model or {})}}
                   for i in range(n)],
        "dtype": dtype,
    }
    if base:
        doc["base_model"] = ckpt["base"]
    if params:
        doc["parameters"] = params
    return doc


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _run_both(tmp_path: Path, doc: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Write ``doc`` once; merge it with mergekit and with ``deltatune merge``; return both outputs."""
    config = tmp_path / "merge.yml"
    config.write_text(yaml.safe_dump(doc))
    options = MergeOptions(copy_tokenizer=False, random_seed=0, write_model_card=False, quiet=True)
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(config.read_text())), str(tmp_path / "mk"), options)
    result = CliRunner().invoke(app, ["merge", str(config), "--out", str(tmp_path / "dt"), "--no-progress"])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return _tensors(tmp_path / "mk"), _tensors(tmp_path / "dt")


def _compare(ref: dict[str, torch.Tensor], ours: dict[str, torch.Tensor], tol: float = TOL) -> float:
    assert set(ours) == set(ref)
    worst = 0.0
    for key, value in ref.items():
        assert ours[key].shape == value.shape and ours[key].dtype == value.dtype, key
        diff = (ours[key].float() - value.float()).abs().max().item()
        assert diff <= tol, f"{key}: max abs diff {diff:.3g} > {tol}"
        worst = max(worst, diff)
    return worst


# --------------------------------------------------------------------------------------------------
# deterministic methods: fp32, every tensor ≤ 1e-5
# --------------------------------------------------------------------------------------------------
CASES: dict[str, dict[str, Any]] = {
    "task_arithmetic": {"method": "task_arithmetic", "weights": [1.0, -0.5, 0.7], "params": {"lambda": 0.8}},
    "task_arithmetic_normalized": {"method": "task_arithmetic", "params": {"normalize": True, "lambda": 1.7}},
    "ties_0.2": {"method": "ties", "per_model": {"density": 0.2}, "params": {"lambda": 1.2}},
    "ties_0.5": {"method": "ties", "per_model": {"density": 0.5}},
    "ties_sum_int8": {"method": "ties", "per_model": {"density": 0.2},
                      "params": {"normalize": False, "int8_mask": True}},
    "breadcrumbs": {"method": "breadcrumbs", "per_model": {"density": 0.3, "gamma": 0.05}},
    "breadcrumbs_ties": {"method": "breadcrumbs_ties", "per_model": {"density": 0.3, "gamma": 0.05},
                         "params": {"normalize": True}},
    "ties_rescale": {"method": "ties", "per_model": {"density": 0.2}, "params": {"rescale": True}},
    "breadcrumbs_rescale": {"method": "breadcrumbs", "per_model": {"density": 0.3, "gamma": 0.05},
                            "params": {"rescale": True}},
    "task_arithmetic_density": {"method": "task_arithmetic", "per_model": {"density": 0.5},
                                "params": {"rescale": False}},
    "model_stock": {"method": "model_stock"},
    "slerp": {"method": "slerp", "n": 1, "params": {"t": 0.3}},
}


@pytest.mark.parametrize("case", list(CASES))
def test_deterministic_methods_match(tmp_path, ckpt, case):
    ref, ours = _run_both(tmp_path, _doc(ckpt, **CASES[case]))
    _compare(ref, ours)


def test_linear_with_zero_weight_base_entry(tmp_path, ckpt):
    """mergekit's linear counts a listed base as an input; with weight 0 it is the plain weighted soup."""
    doc = _doc(ckpt, "linear")
    doc["models"].insert(0, {"model": ckpt["base"], "parameters": {"weight": 0.0}})
    ref, ours = _run_both(tmp_path, doc)
    _compare(ref, ours)
    base = _tensors(Path(ckpt["base"]))
    fts = [_tensors(Path(ckpt[f"ft{i}"])) for i in range(3)]
    key = "model.layers.0.mlp.up_proj.weight"
    soup = sum(w * ft[key] for w, ft in zip(WEIGHTS, fts, strict=True)) / sum(WEIGHTS)
    assert (ours[key] - soup).abs().max() <= TOL and (ours[key] - base[key]).abs().max() > 1e-4


def test_linear_with_weighted_base_entry(tmp_path, ckpt):
    doc = _doc(ckpt, "linear")
    doc["models"].insert(0, {"model": ckpt["base"], "parameters": {"weight": 1.0}})
    _compare(*_run_both(tmp_path, doc))


def test_linear_without_base(tmp_path, ckpt):
    _compare(*_run_both(tmp_path, _doc(ckpt, "linear", base=False)))


@pytest.mark.parametrize("normalize", [False, True])
def test_ties_negative_weight(tmp_path, ckpt, normalize):
    """mergekit selects agreeing entries by the sign of ``w_t·τ_t`` and divides by the signed ``Σ w_t·mask``."""
    _compare(*_run_both(tmp_path, _doc(ckpt, "ties", {"density": 0.5}, weights=[1.0, -0.5, 0.7],
                                       params={"normalize": normalize})))


def test_tied_embeddings(tmp_path):
    paths = _checkpoints(tmp_path / "models", tied=True)
    ref, ours = _run_both(tmp_path, _doc(paths, "ties", {"density": 0.2}))
    assert "lm_head.weight" not in ref
    _compare(ref, ours)


def test_bf16_within_bf16_rounding(tmp_path):
    """bf16 checkpoints, ``dtype: bfloat16``: mergekit does the arithmetic in bf16 (``w_t·τ_t``, their sum
    and ``θ₀ + Σ`` are each rounded), deltatune in fp32 with one final rounding — so outputs differ by at
    most a couple of bf16 ulps of the largest intermediate (|θ₀|, Σ|w_t τ_t| or the result)."""
    paths = _checkpoints(tmp_path / "models", dtype=torch.bfloat16)
    ref, ours = _run_both(tmp_path, _doc(paths, "task_arithmetic", dtype="bfloat16"))
    assert set(ours) == set(ref)
    base = _tensors(Path(paths["base"]))
    fts = [_tensors(Path(paths[f"ft{i}"])) for i in range(3)]
    differing = 0
    for key, value in ref.items():
        assert ours[key].dtype == value.dtype == torch.bfloat16
        b = base[key].float()
        mixed = sum(abs(w) * (ft[key].float() - b).abs() for w, ft in zip(WEIGHTS, fts, strict=True))
        scale = torch.maximum(torch.maximum(value.float().abs(), b.abs()), mixed)
        diff = (ours[key].float() - value.float()).abs()
        assert (diff <= 2 * 2.0 ** -7 * scale).all(), key  # 1 bf16 ulp ≤ 2⁻⁷·|x|
        differing += int((diff > 0).sum())
    assert differing < 0.1 * sum(v.numel() for v in ref.values())  # measured: ≈ 5 % of the entries


# --------------------------------------------------------------------------------------------------
# random masks: in distribution
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "della"])
@pytest.mark.parametrize("density", [0.2, 0.5])
def test_random_methods_in_distribution(tmp_path, ckpt, method, density):
    per_model = {"density": density, **({"epsilon": 0.1} if method == "della" else {})}
    ref, ours = _run_both(tmp_path, _doc(ckpt, method, per_model))
    assert set(ours) == set(ref)
    base = _tensors(Path(ckpt["base"]))
    union = 1 - (1 - density) ** 3  # a coordinate moves when at least one model keeps it (and it agrees)
    totals = {"ref": [0, 0.0], "ours": [0, 0.0]}
    n_all = 0
    for key, b in base.items():
        n = b.numel()
        n_all += n
        for name, out in (("ref", ref), ("ours", ours)):
            moved = out[key] - b
            totals[name][0] += int((moved != 0).sum())
            totals[name][1] += moved.abs().sum().item()
        if n >= 4096:  # per tensor, for the big ones: support size within a binomial tolerance
            for out in (ref, ours):
                assert abs(int((out[key] != b).sum()) - n * union) <= 6 * math.sqrt(n * union * (1 - union)) + 1, key
    if method != "dare_ties":  # sign consensus removes disagreeing survivors; the rate is then below union
        for count, _ in totals.values():
            assert abs(count - n_all * union) <= 6 * math.sqrt(n_all * union * (1 - union)) + 1
    (n_ref, l1_ref), (n_ours, l1_ours) = totals["ref"], totals["ours"]
    assert abs(n_ours - n_ref) <= 8 * math.sqrt(n_all)
    assert l1_ours == pytest.approx(l1_ref, rel=0.05)


# --------------------------------------------------------------------------------------------------
# the mergekit-yaml CLI itself (≈ 7 s of start-up)
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_mergekit_yaml_cli(tmp_path, ckpt):
    exe = shutil.which("mergekit-yaml")
    if exe is None:
        pytest.skip("mergekit-yaml not on PATH")
    config = tmp_path / "merge.yml"
    config.write_text(yaml.safe_dump(_doc(ckpt, "ties", {"density": 0.2}, params={"lambda": 1.2})))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([exe, str(config), str(tmp_path / "mk"), "--no-copy-tokenizer", "--random-seed", "0"],
                   check=True, env=env, capture_output=True)
    result = CliRunner().invoke(app, ["merge", str(config), "--out", str(tmp_path / "dt"), "--no-progress"])
    assert result.exit_code == 0, result.output
    _compare(_tensors(tmp_path / "mk"), _tensors(tmp_path / "dt"))
