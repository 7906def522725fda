"""The abnormality probe: a finding written into the embeddings is found, noise is not, and the labels are
the zero-shot evaluator's organ-level ones."""

import numpy as np
import pytest

from ctglip_jax.data import organs
from ctglip_jax.evaluators.abnormality_probe import abnormality_probe
from ctglip_jax.evaluators.zeroshot_abnormality import summarise_by_kind
from ctglip_jax.evaluators.zeroshot_organ import OrganEmbeddings
from ctglip_jax.phantom.findings import FINDINGS, FINDINGS_BY_NAME

COLUMN = {f.name: i for i, f in enumerate(FINDINGS)}
LIVER = organs.organ_id("liver")


def embeddings(n, rng, steatosis_signal):
    """n cases, only the liver present; steatosis in a third of them, written into dimension 0 (or not)."""
    emb = rng.normal(size=(n, 104, 8)).astype(np.float32)
    valid = np.zeros((n, 104), bool)
    valid[:, LIVER - 1] = True
    finding_organ = np.zeros((n, len(FINDINGS)), np.int32)
    sick = np.arange(n) % 3 == 0
    finding_organ[sick, COLUMN["hepatic_steatosis"]] = LIVER
    finding_organ[np.arange(n) % 5 == 0, COLUMN["liver_cyst"]] = LIVER
    if steatosis_signal:
        emb[sick, LIVER - 1, 0] += 4.0
    return OrganEmbeddings(emb, valid, {"finding_organ": finding_organ})


def test_probe_finds_what_is_in_the_embeddings_and_nothing_else():
    rng = np.random.default_rng(0)
    train, test = embeddings(90, rng, True), embeddings(60, rng, True)
    wanted = [FINDINGS_BY_NAME[n] for n in ("hepatic_steatosis", "liver_cyst", "splenomegaly")]
    result = abnormality_probe(train, test, wanted)
    assert result["per_finding"]["hepatic_steatosis"]["auc"] > 0.95
    assert abs(result["per_finding"]["liver_cyst"]["auc"] - 0.5) < 0.25  # noise only
    assert result["per_finding"]["hepatic_steatosis"]["positives"] == 20
    assert "splenomegaly" in result["skipped"]  # no spleen, no positives: left out of the macro
    assert result["auc_macro"] == pytest.approx(
        np.mean([result["per_finding"][n]["auc"] for n in ("hepatic_steatosis", "liver_cyst")])
    )
    assert result["auc_focal"] == result["per_finding"]["liver_cyst"]["auc"]
    assert result["auc_nonfocal"] == result["per_finding"]["hepatic_steatosis"]["auc"]


def test_probe_needs_organ_level_labels():
    rng = np.random.default_rng(1)
    bare = OrganEmbeddings(np.zeros((4, 104, 8), np.float32), np.ones((4, 104), bool), {})
    with pytest.raises(ValueError, match="finding_organ"):
        abnormality_probe(bare, embeddings(9, rng, False))


def test_summary_by_kind_ignores_unknown_and_missing():
    table = {"liver_cyst": {"auc": 0.6}, "renal_cyst": {"auc": 0.8}, "hepatic_steatosis": {"auc": 0.9},
             "made_up": {"auc": 0.1}, "splenomegaly": {"auc": None}}
    assert summarise_by_kind(table) == {"focal": pytest.approx(0.7), "nonfocal": pytest.approx(0.9)}
    assert summarise_by_kind({}) == {"focal": None, "nonfocal": None}
