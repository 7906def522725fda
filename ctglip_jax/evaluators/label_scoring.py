"""Zero-shot abnormality detection scored on the user's own labels (`labels.py` reads them).

API:

- `score_labels(labels, embeddings (N, 104, E), valid (N, 104), case_ids (N,), probabilities) -> dict`:
  `probabilities(finding_name, organ_id, embeddings (n, E)) -> (n,)` gives P(present) of a finding in an
  organ (the caller chooses prompts and text encoding; `pair_probability_fn` builds one from prompt-pair
  embeddings). It is called once per (finding, organ) with the rows where the organ is valid.
- `score_organ_embeddings(labels, data: OrganEmbeddings, probabilities)`: the same, case ids from
  `data.extras["case_id"]`.
- `default_prompts(spec, organ_name, normal_statements) -> (present, absent)`: the prompts of one finding
  in one organ (see its docstring).
- `prompt_pairs(findings, normal_statements) -> {(finding name, organ id): (present texts, absent texts)}`
  for every evaluable finding and organ, by `default_prompts`; `normal_statements(organ_name)` gives
  the organ's normal statements of the abnormality dictionary. Embed each side with
  `prompts.ensemble_embeddings` and pass the vectors to `pair_probability_fn(pairs, logit_scale)`.
- `score_with_prompts(model, params, labels, data, normal_statements)`: all of it with a `ZeroShotModel`:
  `prompt_pairs`, each side ensembled (`prompts.ensemble_embeddings`), `pair_probability_fn` at the
  model's logit scale, `score_organ_embeddings`; the pairs and the scale are kept in the result.

Samples and labels:

- organ-level labels: a sample is (case, finding, organ) for every labelled case and every organ of the
  finding that is valid in the case; positive iff the file lists the finding under that organ. A finding's
  AUC/F1 pool its organs.
- case-level labels: a sample is (case, finding); its score is the maximum of P(present | organ) over the
  finding's organs valid in the case; a case without any of them is left out for that finding (counted in
  `left_out`). `per_finding_organ` and `per_organ` hold the case label against each organ's own score, and
  a case-level `any_abnormality` calls every organ of a positive finding positive: approximations, flagged
  by `labels: "case_level"` and `approximation`.
- `any_abnormality`: a sample is (case, organ) for every labelled case and every organ that an evaluable
  finding covers and that is valid in the case; positive iff a finding covering the organ is positive there
  (organ-level: listed under that organ; case-level: positive in the case); its score is the maximum of
  P(present | organ) over those findings. Findings skipped for lack of one class still take part here.

Metrics as `metrics.binary_report`: AUC, and F1 at the Youden-optimal threshold (the first maximum of
TPR - FPR along the ROC curve, i.e. the highest such threshold); macro and positives-weighted averages over
the evaluated findings. A finding that is not evaluable (spec), has no column in the file, has no valid
organ, or lacks positives or negatives is listed under `skipped` with its reason and is left out of every
average: averages are never NaN (None when no finding is evaluated).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from ctglip_jax.data import organs
from ctglip_jax.evaluators import metrics as M
from ctglip_jax.evaluators.labels import FindingSpec, LabelFileError, Labels
from ctglip_jax.evaluators.prompts import TextEncoder, ensemble_embeddings, pair_probabilities

ProbabilityFn = Callable[[str, int, np.ndarray], np.ndarray]
NUM_ORGANS = organs.NUM_CLASSES
PAIR_KEYS = ("auc", "f1", "positives", "negatives")
APPROXIMATION = (
    "case-level labels: per_finding_organ, per_organ and any_abnormality score each organ against the "
    "case's label (every organ of a positive finding counts as positive)"
)


def pair_probability_fn(
    pair_embeddings: Mapping[tuple[str, int], tuple[np.ndarray, np.ndarray]], logit_scale: float
) -> ProbabilityFn:
    """P(present) = softmax over the (present, absent) pair, as `prompts.pair_probabilities`."""
    def probabilities(finding: str, organ_id: int, embeddings: np.ndarray) -> np.ndarray:
        present, absent = pair_embeddings[(finding, organ_id)]
        return pair_probabilities(embeddings, present, absent, logit_scale)

    return probabilities


def prompt_pairs(
    findings: Iterable[FindingSpec], normal_statements: Callable[[str], Sequence[str]] = lambda organ: ()
) -> dict[tuple[str, int], tuple[list[str], list[str]]]:
    """`{(finding, organ id): (present, absent)}` per evaluable finding and organ, by `default_prompts`."""
    return {
        (f.name, organs.organ_id(organ)): default_prompts(f, organ, normal_statements(organ))
        for f in findings
        if f.evaluable
        for organ in f.organs
    }


def score_with_prompts(
    model, params: Any, labels: Labels, data, normal_statements: Callable[[str], Sequence[str]]
) -> dict[str, Any]:
    """`score_organ_embeddings` of `data` with the prompt pairs of `prompt_pairs`, each side an ensemble
    embedded by `model` (a `ZeroShotModel`), P(present) the softmax over the pair at its logit scale."""
    pairs = prompt_pairs(labels.findings, normal_statements)
    keys = list(pairs)
    encoder = TextEncoder(model.text_features, model.project_text, params)
    vectors = ensemble_embeddings(encoder, [group for k in keys for group in pairs[k]]) if keys else []
    scale = float(np.asarray(model.logit_scale(params)))
    fn = pair_probability_fn({k: (vectors[2 * i], vectors[2 * i + 1]) for i, k in enumerate(keys)}, scale)
    result = score_organ_embeddings(labels, data, fn)
    names = organs.v1_names()
    result["prompts"] = {
        f"{name}/{names[oid]}": {"present": p, "absent": a} for (name, oid), (p, a) in pairs.items()
    }
    result["logit_scale"] = scale
    return result


def _sentence_case(text: str) -> tuple[str, str]:
    """('Pleural effusion', 'pleural effusion'); an acronym's capitals ('CT ...') are kept."""
    text = text.strip().rstrip(".")
    lower = text if text[1:2].isupper() else text[:1].lower() + text[1:]
    return text[:1].upper() + text[1:], lower


def default_prompts(
    spec: FindingSpec, organ_name: str, normal_statements: Sequence[str] = ()
) -> tuple[list[str], list[str]]:
    """`(present, absent)` prompts for `spec` in one organ (`{organ}` in a text -> the readable organ name).

    present: the spec's own, else "<Finding>." and "<Finding> in the <organ>.". absent: the spec's own,
    else the organ's normal statements (from the abnormality dictionary; the first 8), else
    "No <finding>." and "No <finding> in the <organ>." (both sides then mention the organ alike).
    """
    organ = organs.readable_name(organ_name)
    fill = lambda texts: [t.replace("{organ}", organ) for t in texts]
    upper, lower = _sentence_case(spec.name)
    present = fill(spec.present) if spec.present else [f"{upper}.", f"{upper} in the {organ}."]
    if spec.absent:
        absent = fill(spec.absent)
    elif normal_statements:
        absent = list(dict.fromkeys(normal_statements))[:8]
    else:
        absent = [f"No {lower}.", f"No {lower} in the {organ}."]
    return present, absent


def _probabilities(probabilities, finding: str, organ_id: int, embeddings: np.ndarray) -> np.ndarray:
    out = np.asarray(probabilities(finding, organ_id, embeddings), np.float64).reshape(-1)
    if out.shape != (len(embeddings),):
        raise ValueError(
            f"probabilities({finding!r}, {organ_id}) gave {out.size} values for {len(embeddings)} embeddings"
        )
    if not np.all(np.isfinite(out)):
        raise ValueError(f"probabilities({finding!r}, {organ_id}) gave NaN or Inf")
    return out


def _skip_reason(labels: np.ndarray, left_out: int, left_out_positives: int) -> str | None:
    missing = "positive" if not labels.any() else "negative" if labels.all() else None
    if missing is None:
        return None
    reason = f"no {missing} sample among {len(labels)}"
    if left_out_positives:
        reason += f" ({left_out_positives} positive(s) left out: their organ is not present)"
    return reason


def score_organ_embeddings(labels: Labels, data, probabilities: ProbabilityFn) -> dict[str, Any]:
    """`score_labels` on an `OrganEmbeddings` whose extras carry `case_id`."""
    if "case_id" not in data.extras:
        raise ValueError("the organ embeddings carry no 'case_id': cannot match them to the label file")
    return score_labels(labels, data.embeddings, data.valid, data.extras["case_id"], probabilities)


def score_labels(
    labels: Labels,
    embeddings: np.ndarray,
    valid: np.ndarray,
    case_ids: Sequence[str | bytes],
    probabilities: ProbabilityFn,
) -> dict[str, Any]:
    """Metrics of zero-shot abnormality detection against `labels` (see the module docstring)."""
    embeddings, valid = np.asarray(embeddings), np.asarray(valid, bool)
    if embeddings.shape[:2] != (len(case_ids), NUM_ORGANS) or valid.shape != embeddings.shape[:2]:
        raise ValueError(
            f"embeddings {embeddings.shape} / valid {valid.shape} do not match {len(case_ids)} case ids "
            f"and {NUM_ORGANS} organs"
        )
    aligned = labels.align(case_ids)
    if not len(aligned.rows):
        raise LabelFileError(
            labels.source,
            f"none of its {len(labels.case_ids)} case ids is among the {len(case_ids)} evaluated cases "
            f"(file: {list(labels.case_ids[:3])}, data: {list(aligned.not_in_file[:3])}; "
            "ids are compared without .nii.gz/.nii)",
        )
    organ_level = labels.kind == "organ"
    emb, val, positive = embeddings[aligned.rows], valid[aligned.rows], aligned.positive
    n = len(aligned.rows)
    probs = np.full((n, len(labels.findings), NUM_ORGANS), np.nan)
    for f, spec in enumerate(labels.findings):
        for organ_id in spec.organ_ids if spec.evaluable else ():
            rows = np.flatnonzero(val[:, organ_id - 1])
            if len(rows):
                probs[rows, f, organ_id - 1] = _probabilities(
                    probabilities, spec.name, organ_id, emb[rows, organ_id - 1]
                )

    per_finding, per_pair, skipped = {}, {}, dict(labels.unlabelled)
    organ_scores: dict[str, list[tuple[str, float, float, int]]] = {}
    for f, spec in enumerate(labels.findings):
        if not spec.evaluable:
            skipped[spec.name] = f"not evaluable: {spec.not_evaluable}"
            continue
        columns = np.array(spec.organ_ids) - 1
        present = val[:, columns]  # (n, k)
        used = [o for o, c in zip(spec.organs, columns, strict=True) if val[:, c].any()]
        if organ_level:
            sample_labels = positive[:, f, columns][present]
            sample_probs = probs[:, f, columns][present]
            left_out = int((~present).sum())
            left_out_positives = int(positive[:, f, columns][~present].sum())
        else:
            has_organ = present.any(axis=1)
            sample_labels = positive[has_organ, f]
            sample_probs = np.where(present, probs[:, f, columns], -np.inf).max(axis=1)[has_organ]
            left_out = int((~has_organ).sum())
            left_out_positives = int(positive[~has_organ, f].sum())
        for organ_name, column in zip(spec.organs, columns, strict=True):
            rows = val[:, column]
            pair_labels = positive[rows, f, column] if organ_level else positive[rows, f]
            if M.has_both_classes(pair_labels):
                report = M.binary_report(pair_labels, probs[rows, f, column])
                per_pair[f"{spec.name}/{organ_name}"] = {k: report[k] for k in PAIR_KEYS}
                organ_scores.setdefault(organ_name, []).append(
                    (spec.name, report["auc"], report["f1"], report["positives"])
                )
        if not len(sample_labels):
            skipped[spec.name] = (
                f"none of its organs ({', '.join(spec.organs)}) is present in the {n} labelled cases"
            )
            continue
        reason = _skip_reason(sample_labels, left_out, left_out_positives)
        if reason:
            skipped[spec.name] = reason
            continue
        per_finding[spec.name] = {
            **M.binary_report(sample_labels, sample_probs),
            "organs": used,
            "samples": int(len(sample_labels)),
            "left_out": left_out,
            "left_out_positives": left_out_positives,
            **({"note": spec.note} if spec.note else {}),
        }

    result = {
        **M.finding_summary(per_finding, organ_scores),
        "num_cases": n,
        "num_dataset_cases": len(case_ids),
        "num_cases_left_out": len(aligned.not_in_file),
        "num_label_cases_not_in_dataset": len(aligned.not_in_dataset),
        "cases_left_out_examples": list(aligned.not_in_file[:10]),
        "label_cases_not_in_dataset_examples": list(aligned.not_in_dataset[:10]),
        "labels": "organ_level" if organ_level else "case_level",
        "label_file": labels.source,
        "per_finding": per_finding,
        "per_finding_organ": per_pair,
        "skipped": skipped,
        "any_abnormality": _any_abnormality(labels.findings, organ_level, val, positive, probs),
    }
    if not organ_level:
        result["approximation"] = APPROXIMATION
    return M.json_ready(result)


def _any_abnormality(
    findings: Sequence[FindingSpec],
    organ_level: bool,
    valid: np.ndarray,
    positive: np.ndarray,
    probs: np.ndarray,
) -> dict[str, Any]:
    """(case, organ) samples over every organ an evaluable finding covers (see the module docstring)."""
    covering: dict[int, list[int]] = {}
    for f, spec in enumerate(findings):
        for organ_id in spec.organ_ids if spec.evaluable else ():
            covering.setdefault(organ_id, []).append(f)
    all_labels, all_scores, used = [], [], []
    for organ_id in sorted(covering):
        rows = valid[:, organ_id - 1]
        if not rows.any():
            continue
        fs = covering[organ_id]
        hits = positive[rows][:, fs, organ_id - 1] if organ_level else positive[rows][:, fs]
        all_labels.append(hits.any(axis=1))
        all_scores.append(probs[rows][:, fs, organ_id - 1].max(axis=1))
        used.append(organs.v1_names()[organ_id])
    sample_labels = np.concatenate(all_labels) if all_labels else np.zeros(0, bool)
    out: dict[str, Any] = {
        "n": int(len(sample_labels)),
        "positives": int(sample_labels.sum()),
        "organs": used,
    }
    if M.has_both_classes(sample_labels):
        return {**M.binary_report(sample_labels, np.concatenate(all_scores)), **out}
    missing = (
        "no sample" if not len(sample_labels) else "no positive" if not sample_labels.any() else "no negative"
    )
    return {
        "auc": None,
        "f1": None,
        **out,
        "skipped": f"{missing} among {len(sample_labels)} (case, organ) samples",
    }
