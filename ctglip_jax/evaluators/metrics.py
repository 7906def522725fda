"""Evaluation metrics in plain numpy: ROC/AUC, F1 at the ROC-optimal threshold, top-k, confusion, Dice, R@k.

Written by hand (ranks and cumulative counts) rather than wrapped from scikit-learn so that the tests can
hold them against scikit-learn as an independent reference. Every function returns Python floats or
numpy arrays, never JAX arrays: evaluators turn them into JSON as they are.

Conventions (chosen, and what the tests pin):
- ROC curve: thresholds are the distinct scores in decreasing order, preceded by `+inf` (the "predict
  nothing positive" point), exactly `sklearn.metrics.roc_curve(..., drop_intermediate=False)`. A sample
  is predicted positive when `score >= threshold`.
- AUC is the Mann-Whitney statistic with tied scores counted half (average ranks), which equals the area
  under the ROC curve with linear interpolation between points (sklearn's `roc_auc_score`).
- ROC-optimal threshold: the curve point that maximises Youden's J = TPR - FPR (the point farthest above
  the chance diagonal; CT-GLIP and fVLM report F1 "at the optimal threshold" without a further definition,
  and Youden's J is the usual reading). Ties go to the highest threshold (the first maximum along the
  curve), i.e. the most conservative classifier among the equally good ones.
- Dice of a class that is empty in both prediction and target is undefined (0/0): it is returned as NaN
  (`empty_value`) and left out of means (`nanmean`); the number of such cases is reported beside the mean.
  Counting empty-empty as 1.0 would reward a model for every tumour-free case it leaves alone and
  inflate the mean Dice; pass `empty_value=1.0` to get that convention instead.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from ctglip_jax.data import organs


def _binary_inputs(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).reshape(-1)
    scores = np.asarray(scores, np.float64).reshape(-1)
    if labels.shape != scores.shape:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} differ in length")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores contain NaN or Inf")
    return labels.astype(bool), scores


def has_both_classes(labels) -> bool:
    """True when there is at least one positive and one negative (else AUC and the ROC are undefined)."""
    labels = np.asarray(labels).astype(bool)
    return bool(labels.any() and (~labels).any())


def roc_curve(labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(fpr, tpr, thresholds)`; thresholds decreasing from +inf, one point per distinct score."""
    labels, scores = _binary_inputs(labels, scores)
    if not has_both_classes(labels):
        raise ValueError("ROC needs at least one positive and one negative label")
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_labels = scores[order], labels[order]
    # The last index of each run of equal scores: counts up to there belong to that threshold.
    last_of_run = np.r_[np.flatnonzero(np.diff(sorted_scores) != 0), sorted_scores.size - 1]
    tp = np.cumsum(sorted_labels)[last_of_run]
    fp = (last_of_run + 1) - tp
    tpr = np.r_[0.0, tp / labels.sum()]
    fpr = np.r_[0.0, fp / (~labels).sum()]
    thresholds = np.r_[np.inf, sorted_scores[last_of_run]]
    return fpr, tpr, thresholds


def roc_auc(labels, scores) -> float:
    """Area under the ROC curve (ties count half). Raises ValueError without both classes."""
    labels, scores = _binary_inputs(labels, scores)
    if not has_both_classes(labels):
        raise ValueError("AUC needs at least one positive and one negative label")
    ranks = _average_ranks(scores)
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of their ranks (scipy's rankdata 'average')."""
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_x) != 0) + 1]
    ends = np.r_[starts[1:], x.size]
    mean_rank = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(x.size)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def youden_threshold(labels, scores) -> float:
    """Threshold maximising TPR - FPR on the ROC curve (first maximum = highest threshold)."""
    fpr, tpr, thresholds = roc_curve(labels, scores)
    return float(thresholds[int(np.argmax(tpr - fpr))])


def binary_counts(labels, predicted) -> dict[str, int]:
    labels = np.asarray(labels).astype(bool).reshape(-1)
    predicted = np.asarray(predicted).astype(bool).reshape(-1)
    return {
        "tp": int(np.sum(labels & predicted)),
        "fp": int(np.sum(~labels & predicted)),
        "fn": int(np.sum(labels & ~predicted)),
        "tn": int(np.sum(~labels & ~predicted)),
    }


def f1_score(labels, predicted) -> float:
    """Binary F1 = 2TP / (2TP + FP + FN); 0.0 when there is nothing to find and nothing found."""
    c = binary_counts(labels, predicted)
    denominator = 2 * c["tp"] + c["fp"] + c["fn"]
    return float(2 * c["tp"] / denominator) if denominator else 0.0


def binary_report(labels, scores) -> dict[str, float]:
    """AUC, the Youden threshold and F1/sensitivity/specificity/precision at it, plus the ROC points."""
    labels, scores = _binary_inputs(labels, scores)
    fpr, tpr, thresholds = roc_curve(labels, scores)
    best = int(np.argmax(tpr - fpr))
    threshold = float(thresholds[best])
    predicted = scores >= threshold
    c = binary_counts(labels, predicted)
    return {
        "auc": roc_auc(labels, scores),
        "f1": f1_score(labels, predicted),
        "threshold": threshold,
        "sensitivity": float(tpr[best]),
        "specificity": float(1.0 - fpr[best]),
        "precision": float(c["tp"] / (c["tp"] + c["fp"])) if c["tp"] + c["fp"] else 0.0,
        "positives": int(labels.sum()),
        "negatives": int((~labels).sum()),
        "roc_fpr": fpr.tolist(),
        "roc_tpr": tpr.tolist(),
    }


def macro_and_weighted(values: Sequence[float], weights: Sequence[float]) -> dict[str, float]:
    """Unweighted mean and `weights`-weighted mean (e.g. by number of positives) of per-item values."""
    values = np.asarray(values, np.float64)
    weights = np.asarray(weights, np.float64)
    if values.size == 0:
        return {"macro": float("nan"), "weighted": float("nan")}
    total = weights.sum()
    weighted = float((values * weights).sum() / total) if total > 0 else float("nan")
    return {"macro": float(values.mean()), "weighted": weighted}


def finding_summary(
    per_finding: dict[str, dict[str, Any]], organ_scores: dict[str, list[tuple[str, float, float, int]]]
) -> dict[str, Any]:
    """Averages over evaluated findings (macro and positives-weighted AUC/F1) and the per-organ table
    (mean AUC/F1 over an organ's findings, their positives) from `organ_scores`: {organ: [(finding, auc,
    f1, positives)]}. Organs in v1 id order."""
    evaluated = list(per_finding.values())
    weights = [r["positives"] for r in evaluated]
    auc = macro_and_weighted([r["auc"] for r in evaluated], weights)
    f1 = macro_and_weighted([r["f1"] for r in evaluated], weights)
    per_organ = {
        organ: {
            "auc": float(np.mean([s[1] for s in scores])),
            "f1": float(np.mean([s[2] for s in scores])),
            "positives": int(sum(s[3] for s in scores)),
            "findings": [s[0] for s in scores],
        }
        for organ, scores in sorted(organ_scores.items(), key=lambda kv: organs.organ_id(kv[0]))
    }
    return {"auc_macro": auc["macro"], "auc_weighted": auc["weighted"], "f1_macro": f1["macro"],
            "f1_weighted": f1["weighted"], "num_findings_evaluated": len(evaluated), "per_organ": per_organ}


def top_k_hits(scores, labels, k: int) -> np.ndarray:
    """Per row: is `labels[i]` among the `k` highest `scores[i]`? Ties are broken against the truth
    (a tied competitor counts as ranked above), so a constant model never scores a hit by luck."""
    scores = np.asarray(scores, np.float64)
    labels = np.asarray(labels).reshape(-1)
    true_score = scores[np.arange(len(labels)), labels]
    rank = np.sum(scores >= true_score[:, None], axis=1)  # 1 + number of strictly/equally better others
    return rank <= k


def top_k_accuracy(scores, labels, k: int) -> float:
    """Fraction of rows whose true class is among the top `k` scores (pessimistic ties, see top_k_hits)."""
    hits = top_k_hits(scores, labels, k)
    return float(hits.mean()) if hits.size else float("nan")


def confusion_matrix(true, predicted, num_classes: int) -> np.ndarray:
    """`(num_classes, num_classes)` int64 counts; row = true class, column = predicted class."""
    true = np.asarray(true, np.int64).reshape(-1)
    predicted = np.asarray(predicted, np.int64).reshape(-1)
    if true.shape != predicted.shape:
        raise ValueError(f"true {true.shape} and predicted {predicted.shape} differ in length")
    if true.size and (
        min(true.min(), predicted.min()) < 0 or max(true.max(), predicted.max()) >= num_classes
    ):
        raise ValueError(f"class ids must lie in [0, {num_classes})")
    return np.bincount(true * num_classes + predicted, minlength=num_classes**2).reshape(
        num_classes, num_classes
    )


def dice_per_class(
    predicted,
    target,
    num_classes: int,
    *,
    empty_value: float = float("nan"),
    include_background: bool = False,
) -> np.ndarray:
    """Dice 2|P∩T| / (|P| + |T|) per class of one case (integer label volumes of equal shape).

    Returns `(num_classes,)` or `(num_classes - 1,)` without the background (class 0). A class empty in both
    volumes gets `empty_value` (NaN by default; see the module docstring).
    """
    predicted = np.asarray(predicted, np.int64)
    target = np.asarray(target, np.int64)
    if predicted.shape != target.shape:
        raise ValueError(f"prediction {predicted.shape} and target {target.shape} differ in shape")
    joint = confusion_matrix(target, predicted, num_classes)  # also checks the ids are in range
    intersection = np.diag(joint).astype(np.float64)
    sizes = joint.sum(axis=0) + joint.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = np.where(sizes > 0, 2 * intersection / np.maximum(sizes, 1), empty_value)
    return dice if include_background else dice[1:]


def recall_at_k(similarity, relevant, ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
    """Retrieval R@k: fraction of queries (rows) with at least one relevant item among their top `k`.

    `similarity` and `relevant` are `(queries, gallery)`. Ties are broken against the query (a tied
    irrelevant item ranks first), and queries without any relevant item are excluded.
    """
    similarity = np.asarray(similarity, np.float64)
    relevant = np.asarray(relevant, bool)
    if similarity.shape != relevant.shape:
        raise ValueError(f"similarity {similarity.shape} and relevant {relevant.shape} differ in shape")
    keep = relevant.any(axis=1)
    similarity, relevant = similarity[keep], relevant[keep]
    if not len(similarity):
        return {int(k): float("nan") for k in ks}
    best_relevant = np.where(relevant, similarity, -np.inf).max(axis=1)
    # Rank of the best relevant item = 1 + number of irrelevant items scoring at least as high.
    rank = 1 + np.sum(~relevant & (similarity >= best_relevant[:, None]), axis=1)
    return {int(k): float(np.mean(rank <= k)) for k in ks}


def json_ready(value: Any) -> Any:
    """Nested dicts/lists/tuples/numpy values -> plain Python, NaN/Inf floats -> None (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_ready(value.tolist())
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    return value


def scalars(section: Mapping[str, Any]) -> Iterator[tuple[str, float]]:
    """`(key, value)` of the plain numbers of one evaluator's result (what a training log can plot; lists,
    tables, flags and a skipped evaluator's reason carry none)."""
    for key, value in section.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            yield key, float(value)
