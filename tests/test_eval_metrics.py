"""Evaluation metrics against independent references: scikit-learn (ROC, AUC, F1, confusion, top-k) and
numpy loops written here (Dice, recall@k)."""

import numpy as np
import pytest
from sklearn import metrics as skm

from ctglip_jax.evaluators import metrics as M


def _random_binary(seed, n=60, decimals=None):
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < rng.uniform(0.2, 0.8)
    labels[:2] = [True, False]  # both classes present
    scores = rng.normal(size=n) + labels * rng.uniform(0, 2)
    if decimals is not None:  # coarse scores: many ties, including ties across classes
        scores = np.round(scores, decimals)
    return labels, scores


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("decimals", [None, 1, 0])
def test_auc_and_roc_equal_sklearn(seed, decimals):
    labels, scores = _random_binary(seed, decimals=decimals)
    assert M.roc_auc(labels, scores) == pytest.approx(skm.roc_auc_score(labels, scores), abs=1e-12)
    fpr, tpr, thr = M.roc_curve(labels, scores)
    sk_fpr, sk_tpr, sk_thr = skm.roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    np.testing.assert_array_equal(thr[1:], sk_thr[1:])
    assert np.isinf(thr[0]) and np.isinf(sk_thr[0])


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("decimals", [None, 1])
def test_f1_at_youden_threshold_equals_sklearn(seed, decimals):
    labels, scores = _random_binary(seed + 100, decimals=decimals)
    sk_fpr, sk_tpr, sk_thr = skm.roc_curve(labels, scores, drop_intermediate=False)
    best = np.argmax(sk_tpr - sk_fpr)
    expected_f1 = skm.f1_score(labels, scores >= sk_thr[best])
    report = M.binary_report(labels, scores)
    assert report["threshold"] == sk_thr[best]
    assert report["f1"] == pytest.approx(expected_f1, abs=1e-12)
    assert report["auc"] == pytest.approx(skm.roc_auc_score(labels, scores), abs=1e-12)
    assert report["sensitivity"] == pytest.approx(skm.recall_score(labels, scores >= sk_thr[best]))
    assert M.f1_score(labels, scores > 0) == pytest.approx(skm.f1_score(labels, scores > 0))


def test_separable_and_constant_scores():
    labels = np.array([0, 0, 0, 1, 1])
    assert M.roc_auc(labels, [0.1, 0.2, 0.3, 0.8, 0.9]) == 1.0
    assert M.binary_report(labels, [0.1, 0.2, 0.3, 0.8, 0.9])["f1"] == 1.0
    assert M.roc_auc(labels, [0.9, 0.8, 0.7, 0.2, 0.1]) == 0.0
    assert M.roc_auc(labels, np.full(5, 0.5)) == 0.5
    # Constant scores: J is 0 at both points; the first maximum (+inf) predicts nothing positive.
    assert M.binary_report(labels, np.full(5, 0.5))["f1"] == 0.0


def test_binary_inputs_rejected():
    with pytest.raises(ValueError, match="positive and one negative"):
        M.roc_auc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="positive and one negative"):
        M.roc_curve([0, 0], [0.1, 0.2])
    with pytest.raises(ValueError, match="differ in length"):
        M.roc_auc([0, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="NaN"):
        M.roc_auc([0, 1], [0.1, np.nan])
    assert M.f1_score([0, 0], [0, 0]) == 0.0


def test_macro_and_weighted():
    out = M.macro_and_weighted([1.0, 0.5], [3, 1])
    assert out["macro"] == 0.75 and out["weighted"] == pytest.approx(0.875)
    assert np.isnan(M.macro_and_weighted([], [])["macro"])


@pytest.mark.parametrize("k", [1, 3])
def test_top_k_equals_sklearn_without_ties(k):
    rng = np.random.default_rng(k)
    scores = rng.normal(size=(40, 6))
    labels = rng.integers(0, 6, 40)
    expected = skm.top_k_accuracy_score(labels, scores, k=k, labels=np.arange(6))
    assert M.top_k_accuracy(scores, labels, k) == pytest.approx(expected)


def test_top_k_ties_count_against_the_truth():
    scores = np.zeros((4, 5))
    assert M.top_k_accuracy(scores, [0, 1, 2, 3], 1) == 0.0
    assert M.top_k_accuracy(scores, [0, 1, 2, 3], 5) == 1.0


def test_confusion_matrix_equals_sklearn():
    rng = np.random.default_rng(0)
    true, pred = rng.integers(0, 7, 200), rng.integers(0, 7, 200)
    np.testing.assert_array_equal(
        M.confusion_matrix(true, pred, 7), skm.confusion_matrix(true, pred, labels=range(7))
    )
    with pytest.raises(ValueError, match="class ids"):
        M.confusion_matrix([0, 7], [0, 1], 7)


def _dice_reference(pred, target, num_classes):
    out = []
    for c in range(1, num_classes):
        p, t = pred == c, target == c
        if not p.any() and not t.any():
            out.append(np.nan)
        else:
            out.append(2 * np.logical_and(p, t).sum() / (p.sum() + t.sum()))
    return np.array(out)


@pytest.mark.parametrize("seed", range(4))
def test_dice_equals_numpy_reference(seed):
    rng = np.random.default_rng(seed)
    target = rng.integers(0, 3, (9, 8, 7))
    pred = np.where(rng.random(target.shape) < 0.7, target, rng.integers(0, 3, target.shape))
    pred[pred == 3] = 0
    np.testing.assert_allclose(M.dice_per_class(pred, target, 4), _dice_reference(pred, target, 4))
    assert np.isnan(M.dice_per_class(pred, target, 4)[2])  # class 3: empty in both


def test_dice_conventions():
    empty = np.zeros((4, 4, 4), int)
    full = np.ones((4, 4, 4), int)
    assert np.isnan(M.dice_per_class(empty, empty, 2)[0])
    assert M.dice_per_class(empty, empty, 2, empty_value=1.0)[0] == 1.0
    assert M.dice_per_class(empty, full, 2)[0] == 0.0
    assert M.dice_per_class(full, full, 2)[0] == 1.0
    assert M.dice_per_class(full, full, 2, include_background=True).shape == (2,)
    with pytest.raises(ValueError, match="shape"):
        M.dice_per_class(empty, np.zeros((4, 4, 3), int), 2)
    with pytest.raises(ValueError, match="class ids"):
        M.dice_per_class(empty, full * 2, 2)


def test_json_ready():
    out = M.json_ready(
        {"a": np.float32(0.5), "b": [np.nan, np.int64(3)], "c": np.array([True]), 1: (np.inf,)}
    )
    assert out == {"a": 0.5, "b": [None, 3], "c": [True], "1": [None]}


def _recall_reference(similarity, relevant, k):
    hits = []
    for sim, rel in zip(similarity, relevant, strict=True):
        if not rel.any():
            continue
        # Stable sort with irrelevant items first among ties = ties broken against the query.
        order = sorted(range(len(sim)), key=lambda j: (-sim[j], rel[j]))
        hits.append(any(rel[j] for j in order[:k]))
    return float(np.mean(hits))


@pytest.mark.parametrize("seed", range(3))
def test_recall_at_k_equals_reference(seed):
    rng = np.random.default_rng(seed)
    similarity = np.round(rng.normal(size=(30, 40)), 1)  # ties
    relevant = rng.random((30, 40)) < 0.05
    relevant[0] = False  # a query without relevant items is excluded
    out = M.recall_at_k(similarity, relevant, (1, 5, 10))
    for k in (1, 5, 10):
        assert out[k] == pytest.approx(_recall_reference(similarity, relevant, k))


def test_recall_identity_and_constant():
    eye = np.eye(12)
    assert M.recall_at_k(eye, eye.astype(bool), (1,))[1] == 1.0
    assert M.recall_at_k(np.zeros((12, 12)), eye.astype(bool), (1, 11, 12)) == {1: 0.0, 11: 0.0, 12: 1.0}


def test_finding_identity_against_sklearn():
    """Which of an organ's findings: softmax over its findings' prompts, AUC per finding over the organ's
    abnormal cases only (sklearn's roc_auc_score computed here on the same samples)."""
    from sklearn.metrics import roc_auc_score

    from ctglip_jax.data import organs as org
    from ctglip_jax.evaluators.zeroshot_abnormality import finding_identity
    from ctglip_jax.evaluators.zeroshot_organ import OrganEmbeddings
    from ctglip_jax.phantom.findings import FINDINGS

    rng = np.random.default_rng(0)
    liver = org.organ_id("liver")
    rivals = [f for f in FINDINGS if "liver" in f.organs]
    assert len(rivals) >= 2
    column = {f.name: i for i, f in enumerate(FINDINGS)}
    dim, n = 8, 40
    prompts = {(f.name, liver): (rng.normal(size=dim), rng.normal(size=dim)) for f in rivals}
    truth = rng.integers(0, len(rivals) + 1, n)  # len(rivals) = no liver finding
    finding_organ = np.zeros((n, len(FINDINGS)), np.int32)
    emb = np.zeros((n, 104, dim), np.float32)
    for i, t in enumerate(truth):
        emb[i, liver - 1] = rng.normal(size=dim)
        if t < len(rivals):
            finding_organ[i, column[rivals[t].name]] = liver
            emb[i, liver - 1] += prompts[(rivals[t].name, liver)][0]  # leans towards its own finding
    valid = np.zeros((n, 104), bool)
    valid[:, liver - 1] = True
    data = OrganEmbeddings(emb, valid, {"finding_organ": finding_organ})
    result = finding_identity(data, prompts, 3.0, FINDINGS, FINDINGS)
    abnormal = truth < len(rivals)
    texts = np.stack([prompts[(f.name, liver)][0] for f in rivals])
    logits = 3.0 * emb[abnormal, liver - 1].astype(np.float64) @ texts.T
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    for j, f in enumerate(rivals):
        labels = truth[abnormal] == j
        if labels.any() and not labels.all():
            assert result["per_finding"][f.name]["auc"] == pytest.approx(roc_auc_score(labels, probs[:, j]))
        else:
            assert f.name in result["skipped"]
    assert result["auc_macro"] > 0.6
