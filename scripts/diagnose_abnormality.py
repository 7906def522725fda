"""Why does zero-shot abnormality detection say what it says? Per finding, for one pretrained workdir:

- the AUC of the similarity between organ embeddings and each text (the finding's dictionary phrasings,
  its prompt, the negated prompt, the organ's normal statements), with the mean similarity of abnormal and
  of normal organs to it;
- the zero-shot pair scores of the "short" and "dictionary" prompt pairs;
- the linear-probe AUC (what the organ embeddings hold, whatever the text side says).

    python scripts/diagnose_abnormality.py --workdir RUN [--findings hepatic_steatosis,lung_consolidation]

Organ-level labels come from the test split (`finding_organ`, synthetic data). Prints JSON lines.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

DEFAULT_FINDINGS = "hepatic_steatosis,lung_consolidation,pleural_effusion,splenomegaly,liver_mass"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--findings", default=DEFAULT_FINDINGS, help="comma-separated catalogue names")
    args = p.parse_args(argv)

    from ctglip_jax import config_defaults, pretrained
    from ctglip_jax.data import organs
    from ctglip_jax.evaluation import EvaluationData
    from ctglip_jax.evaluators import metrics as M
    from ctglip_jax.evaluators.abnormality_probe import abnormality_probe
    from ctglip_jax.evaluators.zeroshot_abnormality import AbnormalityEvaluator, sample_labels
    from ctglip_jax.evaluators.zeroshot_organ import collect_organ_embeddings
    from ctglip_jax.phantom.dictionary import normal_phrasings
    from ctglip_jax.phantom.findings import FINDINGS, FINDINGS_BY_NAME, finding_phrasings

    model = pretrained.load(args.workdir)
    zero_shot = model.zero_shot_model()
    min_voxels = int(config_defaults.value(model.config, "data.min_organ_voxels"))
    emb = {
        split: collect_organ_embeddings(zero_shot.embed_organs, model.params,
                                        EvaluationData(model.config, split).batches(), min_voxels=min_voxels)
        for split in ("train", "test")
    }
    wanted = [FINDINGS_BY_NAME[n] for n in args.findings.split(",") if n]
    column = {f.name: i for i, f in enumerate(FINDINGS)}
    probe = abnormality_probe(emb["train"], emb["test"], wanted)["per_finding"]
    pairs = {
        t: AbnormalityEvaluator(zero_shot, templates=(t,), findings=wanted).run(model.params, emb["test"])
        for t in ("short", "dictionary")
    }
    finding_organ = np.asarray(emb["test"].extras["finding_organ"])
    for finding in wanted:
        organ = finding.organs[0]
        oid = organs.organ_id(organ)
        rows = np.flatnonzero(emb["test"].valid[:, oid - 1])
        e = emb["test"].embeddings[rows, oid - 1]
        y = sample_labels(finding_organ[rows], None, column[finding.name], oid)
        texts = [*finding_phrasings(finding, organ), finding.prompt, f"Not {finding.prompt}.",
                 *normal_phrasings(organ)]
        t = np.asarray(zero_shot.project_text(model.params, zero_shot.text_features(texts)))
        sims = e @ t.T
        per_text = [
            {"text": text, "auc": M.binary_report(y, sims[:, j])["auc"] if M.has_both_classes(y) else None,
             "mean_abnormal": float(sims[y, j].mean()) if y.any() else None,
             "mean_normal": float(sims[~y, j].mean()) if (~y).any() else None}
            for j, text in enumerate(texts)
        ]
        print(json.dumps({
            "finding": finding.name, "organ": organ, "positives": int(y.sum()), "negatives": int((~y).sum()),
            "probe_auc": probe.get(finding.name, {}).get("auc"),
            **{f"pair_{k}_auc": r["per_finding"].get(finding.name, {}).get("auc") for k, r in pairs.items()},
            "texts": per_text,
        }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
