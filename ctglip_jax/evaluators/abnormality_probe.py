"""Abnormality probe: do the organ embeddings *carry* a finding, whatever the text side says?

Zero-shot abnormality detection needs two things at once: organ embeddings that differ between normal and
abnormal organs, and text embeddings that point the right way. This probe isolates the first: per finding,
an L2-regularised logistic regression (scikit-learn, balanced class weights) on the embeddings of the
organs that can hold it, fitted on one split and scored (AUC) on another, with the same organ-level labels
as the zero-shot evaluator. A large gap between probe and zero-shot AUC points at the text alignment (or the
prompts), not the image tower.

`summarise_by_kind` (zeroshot_abnormality.py) splits any per-finding AUC table into focal lesions and the
rest (diffuse change, enlargement, fluid, wall thickening): focal lesions in small synthetic volumes are a
few dozen voxels, and the two groups behave differently enough that one macro average hides what the model
learnt.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ctglip_jax.data import organs
from ctglip_jax.evaluators import metrics as M
from ctglip_jax.evaluators.zeroshot_abnormality import phantom_catalogue, sample_labels, summarise_by_kind
from ctglip_jax.evaluators.zeroshot_organ import OrganEmbeddings

if TYPE_CHECKING:
    from ctglip_jax.phantom.findings import Finding

MIN_TRAIN_POSITIVES = 3


def _samples(data: OrganEmbeddings, finding: Finding, column: int) -> tuple[np.ndarray, np.ndarray]:
    finding_organ = np.asarray(data.extras["finding_organ"])
    xs, ys = [], []
    for organ_name in finding.organs:
        organ_id = organs.organ_id(organ_name)
        rows = np.flatnonzero(data.valid[:, organ_id - 1])
        xs.append(data.embeddings[rows, organ_id - 1])
        ys.append(sample_labels(finding_organ[rows], None, column, organ_id))
    return np.concatenate(xs), np.concatenate(ys)


def abnormality_probe(
    train: OrganEmbeddings,
    test: OrganEmbeddings,
    findings: Sequence[Finding] | None = None,
    catalogue: Sequence[Finding] | None = None,
    *,
    l2: float = 1.0,
) -> dict[str, Any]:
    """Per-finding probe AUC on `test` (fitted on `train`); macro over the findings with enough labels.

    Both need organ-level labels (`extras["finding_organ"]`, columns in `catalogue` order). A finding with
    fewer than `MIN_TRAIN_POSITIVES` training positives, or one class in the test split, is `skipped`.
    """
    from sklearn.linear_model import LogisticRegression  # scikit-learn is slow to import

    findings, catalogue = phantom_catalogue(findings), phantom_catalogue(catalogue)

    for name, data in (("train", train), ("test", test)):
        if "finding_organ" not in data.extras:
            raise ValueError(f"the {name} embeddings carry no organ-level finding labels (finding_organ)")
    column = {f.name: i for i, f in enumerate(catalogue)}
    per_finding, skipped = {}, {}
    for finding in findings:
        x_train, y_train = _samples(train, finding, column[finding.name])
        x_test, y_test = _samples(test, finding, column[finding.name])
        if y_train.sum() < MIN_TRAIN_POSITIVES or y_train.all():
            skipped[finding.name] = f"{int(y_train.sum())} training positives of {len(y_train)}"
            continue
        if not M.has_both_classes(y_test):
            skipped[finding.name] = f"one class among the {len(y_test)} test samples"
            continue
        probe = LogisticRegression(C=1.0 / l2, max_iter=2000, class_weight="balanced")
        probe.fit(x_train, y_train)
        scores = probe.decision_function(x_test)
        per_finding[finding.name] = {
            "auc": M.binary_report(y_test, scores)["auc"],
            "positives": int(y_test.sum()),
            "negatives": int((~y_test).sum()),
        }
    aucs = [r["auc"] for r in per_finding.values()]
    return M.json_ready({
        "auc_macro": float(np.mean(aucs)) if aucs else None,
        "num_findings_evaluated": len(aucs),
        "per_finding": per_finding,
        "skipped": skipped,
        **{f"auc_{k}": v for k, v in summarise_by_kind(per_finding).items()},
    })
