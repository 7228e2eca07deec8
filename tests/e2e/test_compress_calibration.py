"""ComPEFT's α and DAREx-q's q are calibrated by default on the delta's own eval data (or ``--data``), never a
lossy constant (issue 13 §7): on a real MiniLM classify delta the calibrated default keeps the accuracy where
α = 1 loses it; without data to calibrate on, a typed error says to pass ``--alpha``/``--q``."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import deltatune
from deltatune.algebra.compress import compress_delta
from deltatune.algebra.compress_calibration import CalibrationNeeded, calibrated_compress
from deltatune.api import evaluate_delta
from deltatune.train import loop
from deltatune.train.config import TrainConfig

WORDS = [["happy", "glad", "great"], ["angry", "mad", "furious"], ["scared", "afraid", "nervous"]]
LABELS = ["joy", "anger", "fear"]


def _write(path, n: int, start: int) -> str:
    path.write_text("".join(json.dumps({"text": f"{WORDS[i % 3][(i // 3) % 3]} day {i}", "label": LABELS[i % 3]})
                            + "\n" for i in range(start, start + n)))
    return str(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, minilm_path):
    tmp = tmp_path_factory.mktemp("calibration")
    cfg = TrainConfig(model=minilm_path, task="classify", data=_write(tmp / "train.jsonl", 60, 0),
                      eval_data=_write(tmp / "eval.jsonl", 48, 1000), out_dir=str(tmp / "run"), max_steps=12,
                      batch_size=8, max_length=16, lr=5e-3, eval_every=0, eval_before=False, checkpoint_every=0,
                      progress=False, keep_best=False)
    loop.train(cfg, deltatune.make_config("lora", {"r": 4}))
    return tmp / "run" / "delta", tmp


def _accuracy(delta) -> float:
    return evaluate_delta(delta)["delta"]["accuracy"]


def test_calibrated_alpha_keeps_the_accuracy_that_alpha_one_loses(trained):
    path, _ = trained
    delta = deltatune.load_delta(path)
    original = _accuracy(delta)
    alpha_one = _accuracy(compress_delta(delta, "compeft", density=0.1, alpha=1.0, scope="tensor"))
    calibrated = calibrated_compress(delta, "compeft", density=0.1, scope="tensor")  # σ and top-k per factor
    result = calibrated.metrics["compression"][-1]
    accuracy = _accuracy(calibrated)
    print(f"original {original:.4f}  alpha=1 {alpha_one:.4f}  calibrated (alpha {result['alpha']}) {accuracy:.4f}  "
          f"sweep {result['alpha_sweep']}")
    assert result["calibrated_on"]["rows"] == 48 and result["calibrated_on"]["metric"] == "accuracy"
    assert result["alpha_sweep"][repr(result["alpha"])] == max(result["alpha_sweep"].values())  # the best wins
    assert accuracy >= original - 0.05
    assert accuracy >= alpha_one
    assert alpha_one < original - 0.1, "α = 1 no longer loses accuracy here: the test lost its point"


def test_calibrated_q_keeps_the_accuracy(trained):
    path, _ = trained
    delta = deltatune.load_delta(path)
    original = _accuracy(delta)
    calibrated = calibrated_compress(delta, "darex-q", density=0.3)
    result = calibrated.metrics["compression"][-1]
    assert 0.3 <= result["q"] <= 1.0 and len(result["q_sweep"]) == 10
    assert result["q_sweep"][repr(result["q"])] == max(result["q_sweep"].values())  # the best metric wins
    assert _accuracy(calibrated) >= original - 0.05


def test_given_alpha_is_used_as_given(trained):
    path, _ = trained
    delta = deltatune.load_delta(path)
    out = calibrated_compress(delta, "compeft", density=0.1, alpha=2.0)
    assert out.metrics["compression"][-1]["alpha"] == 2.0 and "calibrated_on" not in out.metrics["compression"][-1]


def test_without_data_the_lossy_default_is_refused(minilm, tmp_path):
    delta = deltatune.attach(minilm, deltatune.make_config("lora", {"r": 2}))  # not trained by deltatune: no data
    with pytest.raises(CalibrationNeeded, match=r"pass alpha explicitly \(CLI --alpha\)"):
        calibrated_compress(delta, "compeft", density=0.1)
    with pytest.raises(CalibrationNeeded, match=r"pass q explicitly \(CLI --q\)"):
        calibrated_compress(delta, "darex-q", density=0.1)
    with pytest.raises(CalibrationNeeded, match="alpha has no safe default"):
        compress_delta(delta, "compeft", density=0.1)  # the algebra call without alpha or eval_fn
    delta.save(tmp_path / "d")
    from deltatune.cli import app

    res = CliRunner().invoke(app, ["compress", str(tmp_path / "d"), "--method", "compeft", "--density", "0.1",
                                   "--out", str(tmp_path / "c")])
    assert res.exit_code != 0 and isinstance(res.exception, CalibrationNeeded)
    assert "--alpha" in str(res.exception) and not (tmp_path / "c").exists()


def test_cli_calibrates_on_data(trained, tmp_path):
    path, tmp = trained
    from deltatune.cli import app

    res = CliRunner().invoke(app, ["compress", str(path), "--method", "compeft", "--density", "0.1", "--data",
                                   str(tmp / "eval.jsonl"), "--calibration-rows", "24", "--out", str(tmp_path / "c")])
    assert res.exit_code == 0, res.output
    assert "calibrated on" in res.output and "24 rows" in res.output
    saved = deltatune.load_delta(tmp_path / "c")
    result = saved.metrics["compression"][-1]
    assert result["calibrated_on"]["data"] == str(tmp / "eval.jsonl") and result["alpha"] in (0.5, 1.0, 2.0, 3.0,
                                                                                              4.0, 6.0, 8.0, 10.0)
