"""The hand-written GLUE metrics agree with sklearn / scipy and with small hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from deltatune.errors import DataError
from deltatune.train.metrics import (
    accuracy,
    compute_metrics,
    f1_binary,
    main_metric,
    matthews_corrcoef,
    pearson,
    spearman,
)


@pytest.mark.parametrize("seed", range(5))
def test_classification_metrics_match_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 300))
    labels = rng.integers(0, 2, size=n)
    preds = np.where(rng.random(n) < 0.7, labels, 1 - labels)
    assert accuracy(preds, labels) == pytest.approx(skm.accuracy_score(labels, preds))
    assert f1_binary(preds, labels) == pytest.approx(skm.f1_score(labels, preds))
    assert matthews_corrcoef(preds, labels) == pytest.approx(skm.matthews_corrcoef(labels, preds))


def test_degenerate_classification_matches_sklearn() -> None:
    labels = np.array([0, 1, 1, 0])
    constant = np.zeros(4, dtype=np.int64)
    assert matthews_corrcoef(constant, labels) == 0.0 == skm.matthews_corrcoef(labels, constant)
    assert f1_binary(constant, np.zeros(4, dtype=np.int64)) == 0.0
    assert matthews_corrcoef(labels, labels) == pytest.approx(1.0)
    assert matthews_corrcoef(1 - labels, labels) == pytest.approx(-1.0)


def test_hand_computed_classification() -> None:
    # preds vs labels: TP=2 (idx 0,1), FN=1 (idx 2), FP=1 (idx 3), TN=2 (idx 4,5)
    preds = np.array([1, 1, 0, 1, 0, 0])
    labels = np.array([1, 1, 1, 0, 0, 0])
    assert accuracy(preds, labels) == pytest.approx(4 / 6)
    assert f1_binary(preds, labels) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert matthews_corrcoef(preds, labels) == pytest.approx((2 * 2 - 1 * 1) / math.sqrt(3 * 3 * 3 * 3))


@pytest.mark.parametrize("seed", range(5))
def test_correlations_match_scipy_with_ties(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(10, 400))
    x = rng.integers(0, 6, size=n).astype(np.float64)  # many ties
    y = x + rng.normal(scale=2.0, size=n)
    y[: n // 3] = np.round(y[: n // 3])  # ties in y too
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)
    z = rng.normal(size=n)
    assert spearman(z, y) == pytest.approx(stats.spearmanr(z, y)[0], abs=1e-12)


def test_hand_computed_correlations() -> None:
    x = np.array([1.0, 2.0, 3.0])
    assert pearson(x, np.array([2.0, 4.0, 6.0])) == pytest.approx(1.0)
    # deviations x: -1,0,1 ; y: 1,-1,0 (mean 2 of 3,1,2) -> cov -1, sum sq 2 and 2 -> -0.5
    assert pearson(x, np.array([3.0, 1.0, 2.0])) == pytest.approx(-0.5)
    # ranks of [10, 20, 20, 30] are [1, 2.5, 2.5, 4]; vs ranks [1, 2, 3, 4]: r = 4.5 / sqrt(4.5 * 5)
    assert spearman(np.array([10.0, 20.0, 20.0, 30.0]), np.arange(4.0)) == pytest.approx(
        4.5 / math.sqrt(4.5 * 5.0)
    )
    assert spearman(np.array([1.0, 5.0, 9.0]), np.array([0.1, 0.2, 100.0])) == pytest.approx(1.0)
    assert math.isnan(pearson(np.ones(3), x))


def test_compute_metrics_per_task() -> None:
    logits = np.array([[2.0, -1.0], [0.1, 0.3], [1.0, 0.0], [-1.0, 1.0]])  # argmax 0, 1, 0, 1
    labels = np.array([0, 1, 1, 1])
    for task in ("sst2", "SST-2", "rte", "wnli", "qnli"):
        assert compute_metrics(task, logits, labels) == {"accuracy": pytest.approx(0.75)}
    mrpc = compute_metrics("mrpc", logits, labels)
    assert set(mrpc) == {"f1", "accuracy"}
    assert mrpc["f1"] == pytest.approx(2 * 2 / (2 * 2 + 0 + 1))
    assert set(compute_metrics("CoLA", np.argmax(logits, -1), labels)) == {"matthews"}
    sts = compute_metrics("sts-b", np.array([[0.5], [1.5], [4.0], [3.0]]), np.array([0.0, 2.0, 5.0, 3.5]))
    assert set(sts) == {"pearson", "spearman"}
    assert sts["spearman"] == pytest.approx(1.0)
    assert all(isinstance(v, float) for v in sts.values())


def test_main_metric_and_errors() -> None:
    assert [main_metric(t) for t in ("sst2", "mrpc", "cola", "stsb", "rte", "wnli", "qnli")] == [
        "accuracy",
        "f1",
        "matthews",
        "pearson",
        "accuracy",
        "accuracy",
        "accuracy",
    ]
    with pytest.raises(DataError, match="known tasks"):
        main_metric("mnli-mm")
    with pytest.raises(DataError, match="predictions"):
        accuracy(np.array([0, 1]), np.array([0, 1, 1]))
