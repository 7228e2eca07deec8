"""GLUE evaluation metrics, written by hand in numpy (no sklearn or scipy at run time).

Notation: ``TP, TN, FP, FN`` are the binary confusion counts with class 1 as the positive class.

* accuracy  = mean(pred == label)
* F1        = 2 TP / (2 TP + FP + FN)                         (0.0 when the denominator is 0)
* Matthews  = (TP TN - FP FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN))   (0.0 when the denominator is 0)
* Pearson   = sum((x - mean x)(y - mean y)) / sqrt(sum((x - mean x)^2) sum((y - mean y)^2))
              (NaN when either input is constant, as scipy)
* Spearman  = Pearson of the ranks of x and y, tied values taking the average of their ranks

Multi-class (``--task classify``), per class ``c`` with ``TP_c, FP_c, FN_c`` one-vs-rest counts:

* precision_c = TP_c / (TP_c + FP_c), recall_c = TP_c / (TP_c + FN_c), F1_c = 2 TP_c / (2 TP_c + FP_c + FN_c)
  (each 0.0 when its denominator is 0)
* macro-F1    = mean of F1_c over the classes present in the labels or the predictions (sklearn's
  ``f1_score(average="macro")``)

Entity-level precision / recall / F1 of ``--task tokens`` are in :mod:`deltatune.train.entities`.
"""

from __future__ import annotations

import numpy as np

from deltatune.errors import DataError

_CLASSIFICATION_METRICS: dict[str, tuple[str, ...]] = {
    "sst2": ("accuracy",),
    "rte": ("accuracy",),
    "wnli": ("accuracy",),
    "qnli": ("accuracy",),
    "mrpc": ("f1", "accuracy"),
    "cola": ("matthews",),
}
_MAIN_METRIC: dict[str, str] = {
    "sst2": "accuracy",
    "rte": "accuracy",
    "wnli": "accuracy",
    "qnli": "accuracy",
    "mrpc": "f1",
    "cola": "matthews",
    "stsb": "pearson",
}


def _normalize_task(task_name: str) -> str:
    """``"SST-2"``, ``"sst_2"``, ``"sst2"`` -> ``"sst2"``; unknown names raise DataError."""
    key = task_name.strip().lower().replace("-", "").replace("_", "")
    if key not in _MAIN_METRIC:
        raise DataError(f"unknown GLUE task {task_name!r}; known tasks: {', '.join(sorted(_MAIN_METRIC))}")
    return key


def _pair(a: np.ndarray, b: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Flatten both inputs to 1-D and check they have the same length."""
    a = np.asarray(a).reshape(-1)
    b = np.asarray(b).reshape(-1)
    if a.shape != b.shape:
        raise DataError(f"{what}: got {a.shape[0]} predictions for {b.shape[0]} labels")
    if a.size == 0:
        raise DataError(f"{what}: empty inputs")
    return a, b


def _confusion(preds: np.ndarray, labels: np.ndarray, what: str) -> tuple[int, int, int, int]:
    """Binary confusion counts ``(TP, TN, FP, FN)`` with class 1 positive."""
    p, y = _pair(preds, labels, what)
    p = p == 1
    y = y == 1
    tp = int(np.sum(p & y))
    tn = int(np.sum(~p & ~y))
    fp = int(np.sum(p & ~y))
    fn = int(np.sum(~p & y))
    return tp, tn, fp, fn


def accuracy(preds: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of exact matches: ``mean(preds == labels)``."""
    p, y = _pair(preds, labels, "accuracy")
    return float(np.mean(p == y))


def f1_binary(preds: np.ndarray, labels: np.ndarray) -> float:
    """Binary F1 of class 1: ``2 TP / (2 TP + FP + FN)``, 0.0 when there is no positive at all."""
    tp, _, fp, fn = _confusion(preds, labels, "f1")
    denom = 2 * tp + fp + fn
    return 0.0 if denom == 0 else float(2 * tp / denom)


def matthews_corrcoef(preds: np.ndarray, labels: np.ndarray) -> float:
    """Binary Matthews correlation ``(TP TN - FP FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN))``.

    Returns 0.0 when the denominator is 0 (a constant prediction or label vector), as sklearn does.
    """
    tp, tn, fp, fn = _confusion(preds, labels, "matthews")
    denom = float(tp + fp) * float(tp + fn) * float(tn + fp) * float(tn + fn)
    if denom == 0.0:
        return 0.0
    return float((float(tp) * tn - float(fp) * fn) / np.sqrt(denom))


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation ``cov(x, y) / (std x * std y)``; NaN when x or y is constant."""
    a, b = _pair(x, y, "pearson")
    a = a.astype(np.float64) - a.astype(np.float64).mean()
    b = b.astype(np.float64) - b.astype(np.float64).mean()
    denom = np.sqrt(np.dot(a, a) * np.dot(b, b))
    if denom == 0.0:
        return float("nan")
    r = float(np.dot(a, b) / denom)
    return max(-1.0, min(1.0, r))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks; a group of ``c`` ties occupying positions ``s+1 .. s+c`` all get ``s + (c+1)/2``."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    starts = ends - counts
    avg = (starts + 1 + ends) / 2.0
    return avg[inverse.reshape(-1)]


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation: Pearson of the average ranks of x and y (ties share their mean rank)."""
    a, b = _pair(x, y, "spearman")
    return pearson(_average_ranks(a), _average_ranks(b))


def main_metric(task_name: str) -> str:
    """The metric that ranks models on a task: accuracy (sst2, rte, wnli, qnli), f1 (mrpc),
    matthews (cola), pearson (stsb)."""
    return _MAIN_METRIC[_normalize_task(task_name)]


def compute_metrics(task_name: str, logits_or_preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """GLUE official metrics for one task.

    Classification tasks take ``argmax(logits, axis=-1)`` when given 2-D logits ``(n, num_labels)``, or use
    a 1-D array as the predicted classes. STS-B takes the squeezed float predictions ``(n,)`` or ``(n, 1)``.
    Returns sst2/rte/wnli/qnli ``{"accuracy"}``, mrpc ``{"f1", "accuracy"}``, cola ``{"matthews"}``,
    stsb ``{"pearson", "spearman"}``.
    """
    key = _normalize_task(task_name)
    out = np.asarray(logits_or_preds)
    y = np.asarray(labels).reshape(-1)
    if key == "stsb":
        preds = out.astype(np.float64)
        if preds.ndim == 2 and preds.shape[1] == 1:
            preds = preds[:, 0]
        if preds.ndim != 1:
            raise DataError(f"stsb: expected predictions of shape (n,) or (n, 1), got {tuple(out.shape)}")
        y = y.astype(np.float64)
        return {"pearson": pearson(preds, y), "spearman": spearman(preds, y)}
    if out.ndim == 2:
        preds = np.argmax(out, axis=-1)
    elif out.ndim == 1:
        preds = out
    else:
        raise DataError(f"{key}: expected logits (n, num_labels) or predictions (n,), got {tuple(out.shape)}")
    preds = preds.astype(np.int64)
    y = y.astype(np.int64)
    funcs = {"accuracy": accuracy, "f1": f1_binary, "matthews": matthews_corrcoef}
    return {name: funcs[name](preds, y) for name in _CLASSIFICATION_METRICS[key]}


def _class_preds(logits_or_preds: np.ndarray, what: str) -> np.ndarray:
    out = np.asarray(logits_or_preds)
    if out.ndim == 2:
        return np.argmax(out, axis=-1).astype(np.int64)
    if out.ndim == 1:
        return out.astype(np.int64)
    raise DataError(f"{what}: expected logits (n, num_labels) or predictions (n,), got {tuple(out.shape)}")


def _per_class_counts(preds: np.ndarray, labels: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """``(len(classes), 3)`` one-vs-rest counts ``TP, FP, FN`` per class (``preds``/``labels`` already paired)."""
    p, y = preds, labels
    tp = np.array([np.sum((p == c) & (y == c)) for c in classes], dtype=np.int64)
    fp = np.array([np.sum((p == c) & (y != c)) for c in classes], dtype=np.int64)
    fn = np.array([np.sum((p != c) & (y == c)) for c in classes], dtype=np.int64)
    return np.stack([tp, fp, fn], axis=1)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.where(den > 0, num / np.maximum(den, 1), 0.0).astype(np.float64)


def macro_f1(preds: np.ndarray, labels: np.ndarray) -> float:
    """Unweighted mean of the per-class F1 ``2 TP_c / (2 TP_c + FP_c + FN_c)`` over the classes present in
    ``labels`` or ``preds`` (as sklearn's ``average="macro"``)."""
    p, y = _pair(preds, labels, "macro_f1")
    classes = np.union1d(p, y)
    tp, fp, fn = _per_class_counts(p, y, classes).T
    return float(np.mean(_ratio(2 * tp, 2 * tp + fp + fn)))


def per_class_report(logits_or_preds: np.ndarray, labels: np.ndarray,
                     label_names: list[str]) -> dict[str, dict[str, float]]:
    """``{label name: {precision, recall, f1, support}}`` for every class of the label map (class ``i`` is
    ``label_names[i]``; a class absent from both labels and predictions has all zeros)."""
    p, y = _pair(_class_preds(logits_or_preds, "per_class_report"),
                 np.asarray(labels).reshape(-1).astype(np.int64), "per_class_report")
    classes = np.arange(len(label_names))
    tp, fp, fn = _per_class_counts(p, y, classes).T
    precision, recall, f1 = _ratio(tp, tp + fp), _ratio(tp, tp + fn), _ratio(2 * tp, 2 * tp + fp + fn)
    return {str(name): {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                        "support": int(tp[i] + fn[i])} for i, name in enumerate(label_names)}


def user_metrics(task: str, logits_or_preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """``classify``: ``{"accuracy", "macro_f1"}`` of ``argmax(logits)``; ``regress``: ``{"pearson", "spearman"}``
    of the squeezed predictions ``(n,)`` or ``(n, 1)``."""
    y = np.asarray(labels).reshape(-1)
    if task == "regress":
        preds = np.asarray(logits_or_preds).astype(np.float64)
        if preds.ndim == 2 and preds.shape[1] == 1:
            preds = preds[:, 0]
        if preds.ndim != 1:
            raise DataError(f"regress: expected predictions of shape (n,) or (n, 1), got {tuple(preds.shape)}")
        return {"pearson": pearson(preds, y), "spearman": spearman(preds, y)}
    if task != "classify":
        raise DataError(f"unknown user task {task!r}; known: classify, regress")
    preds = _class_preds(logits_or_preds, "classify")
    y = y.astype(np.int64)
    return {"accuracy": accuracy(preds, y), "macro_f1": macro_f1(preds, y)}
