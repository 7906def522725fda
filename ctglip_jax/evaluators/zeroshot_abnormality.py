"""Zero-shot abnormality detection: per finding, a (present, absent) prompt pair scored on organ embeddings.

For finding f (from the phantom's catalogue, `phantom.findings.FINDINGS`, by default) and each organ o it can
occur in, the embedding of organ o in a case is compared with the pair's two text embeddings; a softmax over
the pair, with the model's logit scale, gives P(present) = sigmoid(scale * (e·t_present - e·t_absent)).
Several template pairs form an ensemble (each side averaged and renormalised, see `prompts.py`).

Labels: a sample (case, finding, organ) is positive when the finding lies in *that organ* of that case.
Batches give this as `finding_organ` `(B, F)`: the v1 id of the organ holding finding f, 0 when absent
(the phantom puts each finding in at most one organ per case). Without it, `finding_labels` `(B, F)` (case
level) is used: exact for single-organ findings; for multi-organ findings (e.g. a renal cyst, left or right)
every candidate organ that the report calls abnormal (`organ_abnormal`) counts as positive - an
approximation, flagged in the result (`labels: "case_level"`).

Also "which finding" (`finding_identity`): in an organ with several catalogue findings, the finding's prompt
against the organ's other findings' prompts, over the abnormal organs only.

Reported per finding (pooled over its organs): AUC and F1 at the Youden-optimal threshold (`metrics.py`),
ROC points; per (finding, organ); per organ (macro over its findings); macro and positives-weighted
averages over findings. A finding with no positive or no negative sample is listed under `skipped` with
the reason and left out of every average, never averaged in as NaN.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ctglip_jax import config_defaults
from ctglip_jax.data import organs
from ctglip_jax.errors import ConfigError
from ctglip_jax.evaluators import metrics as M
from ctglip_jax.evaluators.label_scoring import score_with_prompts
from ctglip_jax.evaluators.prompts import (
    DEFAULT_PAIR_TEMPLATES,
    TextEncoder,
    ensemble_embeddings,
    finding_pair_texts,
    pair_probabilities,
)
from ctglip_jax.evaluators.zeroshot_model import SectionEvaluator, ZeroShotModel
from ctglip_jax.evaluators.zeroshot_organ import OrganEmbeddings, collect_organ_embeddings

if TYPE_CHECKING:
    from ctglip_jax.phantom.findings import Finding

UNKNOWN_ORGAN = -1  # finding present in the case, organ not recorded


def phantom_catalogue(given: Sequence[Finding] | None = None) -> Sequence[Finding]:
    """`given`, else the phantom's finding catalogue: the label columns of the phantom's records (no other
    dataset has them), the default `findings` and `catalogue` below. Imported on first use, so user data
    never loads the phantom."""
    if given is not None:
        return given
    from ctglip_jax.phantom.findings import FINDINGS  # phantom runs only

    return FINDINGS


def finding_organ_from_case_labels(
    finding_labels: np.ndarray, findings: Sequence[Finding] | None = None
) -> np.ndarray:
    """`(N, F)` organ ids from case-level flags: the organ for single-organ findings, else UNKNOWN_ORGAN."""
    findings = phantom_catalogue(findings)
    finding_labels = np.asarray(finding_labels)
    out = np.zeros(finding_labels.shape, np.int32)
    for f, finding in enumerate(findings):
        present = finding_labels[:, f] > 0
        out[present, f] = organs.organ_id(finding.organs[0]) if len(finding.organs) == 1 else UNKNOWN_ORGAN
    return out


def finding_organ_row(
    case_findings: Sequence[Mapping[str, Any]], catalogue: Sequence[Finding] | None = None
) -> np.ndarray:
    """`(F,)` int32 organ id per catalogue finding (0 = absent) from a synthetic case's `findings` list
    (dicts with `name` and `organ`): the organ-level labels a dataset record should carry."""
    catalogue = phantom_catalogue(catalogue)
    column = {f.name: i for i, f in enumerate(catalogue)}
    row = np.zeros(len(catalogue), np.int32)
    for finding in case_findings:
        row[column[finding["name"]]] = organs.organ_id(finding["organ"])
    return row


def sample_labels(
    finding_organ: np.ndarray, organ_abnormal: np.ndarray | None, f: int, organ_id: int
) -> np.ndarray:
    """`(N,)` bool: finding f lies in organ `organ_id` (see the module docstring for UNKNOWN_ORGAN)."""
    located = finding_organ[:, f] == organ_id
    unknown = finding_organ[:, f] == UNKNOWN_ORGAN
    if organ_abnormal is None:
        return located | unknown
    return located | (unknown & (np.asarray(organ_abnormal)[:, organ_id - 1] == 1))


def abnormality_detection(
    data: OrganEmbeddings,
    pair_embeddings: Mapping[tuple[str, int], tuple[np.ndarray, np.ndarray]],
    logit_scale: float,
    findings: Sequence[Finding] | None = None,
    catalogue: Sequence[Finding] | None = None,
) -> dict[str, Any]:
    """Metrics from precomputed organ embeddings and `{(finding name, organ id): (present, absent)}`.

    Label columns (`finding_organ`, `finding_labels`) follow `catalogue` (the dataset's finding list);
    `findings` (a subset of it) are the ones evaluated.
    """
    findings, catalogue = phantom_catalogue(findings), phantom_catalogue(catalogue)
    column = {f.name: i for i, f in enumerate(catalogue)}
    missing = [f.name for f in findings if f.name not in column]
    if missing:
        raise ConfigError("abnormality evaluation", f"findings {missing} are not in the label catalogue")
    if "finding_organ" in data.extras:
        finding_organ, label_source = np.asarray(data.extras["finding_organ"]), "organ_level"
    elif "finding_labels" in data.extras:
        finding_organ = finding_organ_from_case_labels(data.extras["finding_labels"], catalogue)
        label_source = "case_level"
    else:
        raise ConfigError(
            "abnormality evaluation",
            "the batches carry neither 'finding_organ' nor 'finding_labels': nothing to score against",
        )
    if finding_organ.shape != (len(data), len(catalogue)):
        raise ConfigError(
            "abnormality evaluation",
            f"finding labels have shape {finding_organ.shape}, expected ({len(data)}, {len(catalogue)})",
        )
    organ_abnormal = data.extras.get("organ_abnormal")
    per_finding, per_pair, skipped = {}, {}, {}
    organ_scores: dict[str, list[tuple[str, float, float, int]]] = {}
    for finding in findings:
        f = column[finding.name]
        all_labels, all_probs, used_organs = [], [], []
        for organ_name in finding.organs:
            organ_id = organs.organ_id(organ_name)
            rows = np.flatnonzero(data.valid[:, organ_id - 1])
            if not len(rows):
                continue
            present, absent = pair_embeddings[(finding.name, organ_id)]
            probs = pair_probabilities(data.embeddings[rows, organ_id - 1], present, absent, logit_scale)
            labels = sample_labels(
                finding_organ[rows], None if organ_abnormal is None else organ_abnormal[rows], f, organ_id
            )
            all_labels.append(labels)
            all_probs.append(probs)
            used_organs.append(organ_name)
            if M.has_both_classes(labels):
                report = M.binary_report(labels, probs)
                per_pair[f"{finding.name}/{organ_name}"] = {
                    k: report[k] for k in ("auc", "f1", "positives", "negatives")
                }
                organ_scores.setdefault(organ_name, []).append(
                    (finding.name, report["auc"], report["f1"], report["positives"])
                )
        labels = np.concatenate(all_labels) if all_labels else np.zeros(0, bool)
        probs = np.concatenate(all_probs) if all_probs else np.zeros(0)
        if not len(labels):
            skipped[finding.name] = "none of its organs is present in the evaluated data"
        elif not labels.any():
            skipped[finding.name] = f"no positive sample among {len(labels)}"
        elif labels.all():
            skipped[finding.name] = f"no negative sample among {len(labels)}"
        else:
            per_finding[finding.name] = {**M.binary_report(labels, probs), "organs": used_organs}
    return M.json_ready(
        {
            **M.finding_summary(per_finding, organ_scores),
            "num_cases": len(data),
            "labels": label_source,
            "per_finding": per_finding,
            "per_finding_organ": per_pair,
            "skipped": skipped,
        }
    )


def finding_identity(
    data: OrganEmbeddings,
    pair_embeddings: Mapping[tuple[str, int], tuple[np.ndarray, np.ndarray]],
    logit_scale: float,
    findings: Sequence[Finding] | None = None,
    catalogue: Sequence[Finding] | None = None,
) -> dict[str, Any]:
    """Which abnormality, not only whether: per organ with several catalogue findings, over the cases where
    that organ holds one of them, P(f) = softmax over the organ's findings' "present" prompts (model's scale);
    per finding, AUC of P(f) against "f is the organ's finding" (chance 0.5 whatever the number of rivals).

    Needs organ-level labels (`finding_organ`). A finding with no positive or negative case is skipped.
    """
    findings, catalogue = phantom_catalogue(findings), phantom_catalogue(catalogue)
    if "finding_organ" not in data.extras:
        return {"skipped": "needs organ-level finding labels (finding_organ)"}
    column = {f.name: i for i, f in enumerate(catalogue)}
    finding_organ = np.asarray(data.extras["finding_organ"])
    by_organ: dict[str, list[Finding]] = {}
    for finding in findings:
        for organ_name in finding.organs:
            by_organ.setdefault(organ_name, []).append(finding)
    samples: dict[str, tuple[list, list]] = {}
    for organ_name, rivals in by_organ.items():
        if len(rivals) < 2:
            continue
        organ_id = organs.organ_id(organ_name)
        cols = [column[f.name] for f in rivals]
        held = (finding_organ[:, cols] == organ_id) & data.valid[:, organ_id - 1][:, None]
        rows = np.flatnonzero(held.any(axis=1))
        if not len(rows):
            continue
        texts = np.stack([np.asarray(pair_embeddings[(f.name, organ_id)][0], np.float64) for f in rivals])
        logits = float(logit_scale) * np.asarray(data.embeddings[rows, organ_id - 1], np.float64) @ texts.T
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        for j, finding in enumerate(rivals):
            labels, scores = samples.setdefault(finding.name, ([], []))
            labels.append(held[rows, j])
            scores.append(probs[:, j])
    per_finding, skipped = {}, {}
    for name, (labels, scores) in samples.items():
        labels, scores = np.concatenate(labels), np.concatenate(scores)
        if M.has_both_classes(labels):
            report = M.binary_report(labels, scores)
            per_finding[name] = {k: report[k] for k in ("auc", "f1", "positives", "negatives")}
        else:
            skipped[name] = f"{int(labels.sum())} positive(s) among {len(labels)} abnormal organs"
    auc = M.macro_and_weighted([r["auc"] for r in per_finding.values()],
                               [r["positives"] for r in per_finding.values()])
    return M.json_ready({"auc_macro": auc["macro"], "auc_weighted": auc["weighted"],
                         "num_findings_evaluated": len(per_finding), "per_finding": per_finding,
                         "skipped": skipped})


class AbnormalityEvaluator:
    """Zero-shot abnormality detection with paired prompts (template pairs configurable, ensembled)."""


    def __init__(
        self,
        model: ZeroShotModel,
        *,
        templates: Sequence[str | tuple[str, str]] = DEFAULT_PAIR_TEMPLATES,
        findings: Sequence[Finding] | None = None,
        catalogue: Sequence[Finding] | None = None,
        min_voxels: int = 8,
    ):
        """`findings`: those evaluated; `catalogue`: the finding list the data's label columns follow (both
        the phantom's catalogue by default)."""
        findings, catalogue = phantom_catalogue(findings), phantom_catalogue(catalogue)
        self.model = model
        self.catalogue = tuple(catalogue)
        self.templates = tuple(templates)
        self.findings = tuple(findings)
        self.min_voxels = min_voxels
        self.pair_texts = {
            (finding.name, organs.organ_id(organ)): finding_pair_texts(finding, organ, self.templates)
            for finding in self.findings
            for organ in finding.organs
        }

    def pair_embeddings(self, params: Any) -> dict[tuple[str, int], tuple[np.ndarray, np.ndarray]]:
        encoder = TextEncoder(self.model.text_features, self.model.project_text, params)
        keys = list(self.pair_texts)
        groups = [g for k in keys for g in self.pair_texts[k]]  # present, absent, present, absent, ...
        emb = ensemble_embeddings(encoder, groups)
        return {k: (emb[2 * i], emb[2 * i + 1]) for i, k in enumerate(keys)}

    def run(self, params: Any, batches: Iterable[Mapping[str, Any]] | OrganEmbeddings) -> dict[str, Any]:
        data = (
            batches
            if isinstance(batches, OrganEmbeddings)
            else collect_organ_embeddings(
                self.model.embed_organs, params, batches, min_voxels=self.min_voxels
            )
        )
        scale = float(np.asarray(self.model.logit_scale(params)))
        pairs = self.pair_embeddings(params)
        result = abnormality_detection(data, pairs, scale, self.findings, self.catalogue)
        result["finding_identity"] = finding_identity(data, pairs, scale, self.findings, self.catalogue)
        result["templates"] = [t if isinstance(t, str) else list(t) for t in self.templates]
        result["logit_scale"] = scale
        return result


def summarise_by_kind(per_finding: Mapping[str, Mapping[str, Any]]) -> dict[str, float | None]:
    """Macro AUC over focal findings and over the rest: `{"focal": ..., "nonfocal": ...}`."""
    by_name = {f.name: f for f in phantom_catalogue()}
    groups: dict[str, list[float]] = {"focal": [], "nonfocal": []}
    for name, row in per_finding.items():
        kind = by_name[name].kind if name in by_name else None
        if kind is not None and row.get("auc") is not None:
            groups["focal" if kind == "focal" else "nonfocal"].append(float(row["auc"]))
    return {k: (float(np.mean(v)) if v else None) for k, v in groups.items()}


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


class Evaluator(SectionEvaluator):
    """`config.evals.<name> = {"type": "abnormality"}`: zero-shot abnormality detection on the organ
    embeddings `inputs` (an `eval_inputs.Inputs`) shares, scored on the dataset's own finding labels (the
    phantom's catalogue), or with `labels` (`labels.read_labels`) on the user's labels plus
    `any_abnormality`. `templates`: prompt-pair sets; the first is `abnormality_detection`, each one's
    summary is in `abnormality_by_template`."""

    section = "abnormality_detection"

    def __init__(self, config, inputs, *, templates: Sequence[Sequence[str | tuple[str, str]]] | None = None,
                 labels=None):
        self.inputs, self.labels = inputs, labels
        self.templates = list(templates or [None])
        self.min_voxels = int(config_defaults.value(config, "data.min_organ_voxels"))

    def evaluate(self, params: Any) -> dict[str, Any]:
        """Its eval.json sections."""
        data = self.inputs.data
        if "label_map" not in data.record_keys:
            return {self.section: {"skipped": f"{data.name} records have no organ label map"}}
        embeddings, model = self.inputs.embeddings(params), self.inputs.model(params)
        if self.labels is not None:
            normal = self.inputs.normal_statements(params)
            r = score_with_prompts(model, params, self.labels, embeddings, normal)
            any_abnormality = {k: r["any_abnormality"].get(k) for k in ("auc", "f1", "positives", "n")}
            return {self.section: r, "any_abnormality": any_abnormality}
        labels = embeddings.extras.get("finding_organ", embeddings.extras.get("finding_labels"))
        catalogue = phantom_catalogue()  # only the phantom's records carry finding labels
        if labels is None or np.shape(labels)[-1] != len(catalogue):
            return {self.section: {
                "skipped": f"{data.name} has no finding labels over the {len(catalogue)}-finding catalogue: "
                "score your own labels with --labels FILE"
            }}
        first, by_template = None, {}
        for templates in self.templates:
            kw = {} if templates is None else {"templates": tuple(templates)}
            r = AbnormalityEvaluator(model, min_voxels=self.min_voxels, **kw).run(params, embeddings)
            by_template["+".join(map(str, r["templates"]))] = {
                "auc_macro": r["auc_macro"], "f1_macro": r["f1_macro"],
                "identity_auc_macro": r["finding_identity"].get("auc_macro"),
                **{f"auc_{k}": v for k, v in summarise_by_kind(r["per_finding"]).items()},
            }
            first = first or r
        return {self.section: first, "abnormality_by_template": by_template}

    def summary(self, sections: Mapping[str, Any]) -> str | None:
        """The first prompt-pair set's line, then one line per further set (`abnormality_by_template`)."""
        first = super().summary(sections)
        if first is None or self.labels is not None:
            return first
        by_template = list(sections.get("abnormality_by_template", {}).items())[1:]
        return "\n".join([first] + [
            f"  abnormality detection ({name}): AUC macro {_fmt(r['auc_macro'])}, "
            f"F1 macro {_fmt(r['f1_macro'])}"
            for name, r in by_template
        ])

    def line(self, r: Mapping[str, Any]) -> str:
        line = (
            f"AUC macro {_fmt(r['auc_macro'])}, F1 macro {_fmt(r['f1_macro'])} over "
            f"{r['num_findings_evaluated']} finding(s), {len(r['skipped'])} skipped"
        )
        if self.labels is None:
            return f"  abnormality detection ({'+'.join(map(str, r['templates']))}): {line}"
        return (
            f"  abnormality detection ({self.labels.source}): {line}; any abnormality AUC "
            f"{_fmt(r['any_abnormality'].get('auc'))}; {r.get('num_cases_left_out', 0)} case(s) not in the "
            "labels file"
        )
