"""Evaluation of a training workdir: its checkpoint, its dataset's held-out split, the zero-shot evaluators,
and what `ctglip eval` writes (`eval.json` + PNG plots).

    pretrained.load(workdir)  ->  evaluation data (split, every case, whole volumes)  ->  evaluators
    ->  eval.json (metrics + what was evaluated)  +  plots (ROC per finding, organ confusion matrix,
        example overlays of the organ mask and text-to-voxel heatmaps on CT slices)

The data is read the way training validates (`eval_inputs.EvaluationData`): the workdir config's pipeline
with the chosen split, no shuffling, no random augmentation, organ slots ordered by id, every case (the last
partial batch included). Organs are pooled over the whole stored volume with sliding windows of the training
crop (`--centre-crop`: inside one centre crop, the protocol before). One pass gives the organ embeddings
shared by organ recognition, abnormality detection and (whole-scan) retrieval.

Called from Python too (the demo and the reproduction script): `evaluate(pretrained.load(workdir), ...)`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ctglip_jax import config_defaults, objective, plots
from ctglip_jax.checkpoint import checkpoint_step_or_none
from ctglip_jax.corpus_dictionary import load_dictionary
from ctglip_jax.data import organs
from ctglip_jax.data.datasets import training_spacing
from ctglip_jax.errors import ConfigError, CTGlipInputError
from ctglip_jax.eval_inputs import EXAMPLE_KEYS, EvaluationData, organ_embeddings  # noqa: F401
from ctglip_jax.evaluators.abnormality_probe import summarise_by_kind
from ctglip_jax.evaluators.label_scoring import pair_probability_fn, prompt_pairs, score_organ_embeddings
from ctglip_jax.evaluators.metrics import json_ready
from ctglip_jax.evaluators.prompts import TextEncoder, ensemble_embeddings, finding_pair_texts
from ctglip_jax.evaluators.retrieval import RetrievalEvaluator
from ctglip_jax.evaluators.zeroshot_abnormality import AbnormalityEvaluator
from ctglip_jax.evaluators.zeroshot_organ import OrganRecognitionEvaluator
from ctglip_jax.progress import stderr
from ctglip_jax.zeroshot import ScanInference

EVALUATORS = ("organ", "abnormality", "retrieval")
EVAL_FILE = "eval.json"


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def parse_evaluators(names: str | Sequence[str]) -> tuple[str, ...]:
    """'organ,abnormality' or a list -> validated names in the canonical order."""
    items = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    unknown = sorted(set(items) - set(EVALUATORS))
    if unknown or not items:
        raise ConfigError(
            "--evaluators",
            f"unknown or no evaluator(s) {unknown or items}; choose from {','.join(EVALUATORS)}",
        )
    return tuple(n for n in EVALUATORS if n in items)


# ---------------------------------------------------------------------------------------------- evaluate
def _example_queries(config, example: dict[str, Any]) -> dict[str, str]:
    """{label: query}: the prompt of the largest organ in the crop, and the first finding the case has."""
    from ctglip_jax.data.findings import FINDINGS  # phantom runs only

    queries = {}
    counts = np.bincount(np.asarray(example["label_map"], np.int64).ravel(), minlength=organs.NUM_CLASSES + 1)
    if counts[1:].any():
        organ = organs.v1_names()[int(np.argmax(counts[1:])) + 1]
        template = config_defaults.value(config, "text.prompt")
        queries[organ] = template.format(organ=organs.readable_name(organ))
    labels = np.asarray(example.get("finding_labels", []))
    if labels.shape == (len(FINDINGS),) and labels.any():
        finding = FINDINGS[int(np.flatnonzero(labels)[0])]
        queries[finding.name] = finding_pair_texts(finding.prompt, finding.organs[0])[0][0]
    return queries


def _example_overlays(pretrained, examples: list[dict[str, Any]], out_dir: Path) -> list[str]:
    inference = ScanInference(pretrained, batch_size=1)
    try:
        spacing = training_spacing(pretrained.config)[0]
    except CTGlipInputError:
        spacing = None  # square pixels then
    written = []
    for example in examples:
        queries = _example_queries(pretrained.config, example)
        maps = inference.heatmaps(example["image"], list(queries.values())) if queries else None
        heatmaps = {q: maps[..., i] for i, q in enumerate(queries.values())} if queries else {}
        tumor = example.get("tumor_mask")
        case_id = str(example.get("case_id") or f"case{len(written)}")
        name = f"overlay_{case_id}.png"
        plots.case_overlay(
            example["image"],
            np.asarray(example["label_map"]),
            heatmaps,
            out_dir / name,
            outline=None if tumor is None else np.asarray(tumor) > 0,
            spacing=spacing,
            title=f"{case_id}: organ mask, text-to-voxel similarity (lesion outlined)",
        )
        written.append(name)
    return written


def _plots(result: dict[str, Any], out_dir: Path) -> list[str]:
    written = []
    abnormality = result.get("abnormality_detection", {})
    if "per_finding" in abnormality:
        plots.roc_curves(
            abnormality["per_finding"],
            out_dir / "roc_curves.png",
            title=f"zero-shot abnormality detection, AUC macro {abnormality['auc_macro'] or 0:.3f}",
        )
        written.append("roc_curves.png")
    recognition = result.get("organ_recognition", {})
    if "confusion_matrix" in recognition:
        names = organs.v1_names()
        plots.confusion_matrix(
            np.asarray(recognition["confusion_matrix"]),
            [names[i] for i in recognition["class_ids"]],
            out_dir / "organ_confusion.png",
            title=f"zero-shot organ recognition, top-1 {recognition['top1']:.3f}",
        )
        written.append("organ_confusion.png")
    return written


def _organ_recognition(model, params, config, embeddings, result: dict, say) -> None:
    start = time.perf_counter()
    template = config_defaults.value(config, "text.prompt")
    min_voxels = int(config_defaults.value(config, "data.min_organ_voxels"))
    organ = OrganRecognitionEvaluator(model, templates=(template,), min_voxels=min_voxels)
    result["organ_recognition"] = organ.run(params, embeddings)
    result["seconds"]["organ_recognition"] = time.perf_counter() - start
    say(
        f"  organ recognition: top-1 {result['organ_recognition']['top1']:.3f}, "
        f"top-5 {result['organ_recognition']['top5']:.3f}"
    )


def _abnormality(model, params, config, embeddings, data, result: dict, say, abnormality_templates) -> None:
    """Zero-shot AD on the dataset's own finding labels (the phantom's catalogue)."""
    from ctglip_jax.data.findings import FINDINGS  # phantom runs only

    start = time.perf_counter()
    min_voxels = int(config_defaults.value(config, "data.min_organ_voxels"))
    extras = embeddings.extras
    labels = extras.get("finding_organ", extras.get("finding_labels"))
    if labels is None or np.shape(labels)[-1] != len(FINDINGS):
        result["abnormality_detection"] = {
            "skipped": f"{data.name} has no finding labels over the {len(FINDINGS)}-finding catalogue: "
            "score your own labels with --labels FILE"
        }
    else:
        by_template = {}
        for templates in abnormality_templates or [None]:
            kw = {} if templates is None else {"templates": tuple(templates)}
            r = AbnormalityEvaluator(model, min_voxels=min_voxels, **kw).run(params, embeddings)
            by_template["+".join(map(str, r["templates"]))] = {
                "auc_macro": r["auc_macro"], "f1_macro": r["f1_macro"],
                "identity_auc_macro": r["finding_identity"].get("auc_macro"),
                **{f"auc_{k}": v for k, v in summarise_by_kind(r["per_finding"]).items()},
            }
            result.setdefault("abnormality_detection", r)
        result["abnormality_by_template"] = by_template
        r = result["abnormality_detection"]
        say(
            f"  abnormality detection: AUC macro {_fmt(r['auc_macro'])}, "
            f"F1 macro {_fmt(r['f1_macro'])} over {r['num_findings_evaluated']} finding(s), "
            f"{len(r['skipped'])} skipped"
        )
    result["seconds"]["abnormality_detection"] = time.perf_counter() - start


def normal_statements(pretrained):
    """`organ name -> [normal statements]` of the run's abnormality dictionary: the corpus dictionary kept in
    the workdir (`dictionary.json`), the phantom's catalogue for phantom runs, nothing otherwise."""
    path = Path(pretrained.workdir) / objective.DICTIONARY_FILE
    table: dict[str, list[str]] = {}
    if path.is_file():
        for organ, entries in load_dictionary(path)["organs"].items():
            table[organ] = [e["text"] for e in entries if not e["abnormal"]]
    elif pretrained.config.data.dataset == objective.SYNTHETIC_DATASET:
        from ctglip_jax.data.phantom_dictionary import normal_phrasings  # phantom runs only

        return normal_phrasings
    return lambda organ: table.get(organ, [])


def _abnormality_from_labels(model, params, pretrained, embeddings, labels, result: dict, say) -> None:
    """Zero-shot AD scored on the user's labels (`--labels FILE`, evaluators/labels.py): per finding, a
    prompt pair per organ (the spec's, else the finding's name against the dictionary's normal statements
    of the organ); plus `any_abnormality` over every labelled organ."""
    start = time.perf_counter()
    pairs = prompt_pairs(labels.findings, normal_statements(pretrained))
    keys = list(pairs)
    encoder = TextEncoder(model.text_features, model.project_text, params)
    vectors = ensemble_embeddings(encoder, [group for k in keys for group in pairs[k]]) if keys else []
    scale = float(np.asarray(model.logit_scale(params)))
    fn = pair_probability_fn({k: (vectors[2 * i], vectors[2 * i + 1]) for i, k in enumerate(keys)}, scale)
    r = score_organ_embeddings(labels, embeddings, fn)
    r["prompts"] = {
        f"{name}/{organs_name(oid)}": {"present": p, "absent": a} for (name, oid), (p, a) in pairs.items()
    }
    r["logit_scale"] = scale
    result["abnormality_detection"] = r
    result["any_abnormality"] = {k: r["any_abnormality"].get(k) for k in ("auc", "f1", "positives", "n")}
    result["seconds"]["abnormality_detection"] = time.perf_counter() - start
    say(
        f"  abnormality detection ({labels.source}): AUC macro {_fmt(r['auc_macro'])}, "
        f"F1 macro {_fmt(r['f1_macro'])} over {r['num_findings_evaluated']} finding(s), "
        f"{len(r['skipped'])} skipped; any abnormality AUC {_fmt(r['any_abnormality'].get('auc'))}; "
        f"{r.get('num_cases_left_out', 0)} case(s) not in the labels file"
    )


def organs_name(organ_id: int) -> str:
    return organs.v1_names()[int(organ_id)]


def evaluate(
    pretrained,
    *,
    evaluators: Sequence[str] = EVALUATORS,
    split: str = "test",
    out_dir: str | Path | None = None,
    batch_size: int | None = None,
    max_cases: int | None = None,
    num_examples: int = 2,
    step: int | None = None,
    data: EvaluationData | None = None,
    progress: Callable[[str], None] | None = stderr,
    abnormality_templates: Sequence[Sequence[str | tuple[str, str]]] | None = None,
    on_embeddings: Callable[[Any], None] | None = None,
    whole_scan: bool = True,
    labels=None,
) -> dict[str, Any]:
    """Runs the zero-shot evaluators on `split` of the workdir's dataset; with `out_dir`, writes eval.json
    and the plots there. Returns the eval.json dict. `step` is only recorded (the params are loaded);
    `data` (an `EvaluationData`, e.g. opened early to fail fast) replaces split/batch_size/max_cases.

    `abnormality_templates`: prompt-pair sets to score abnormality detection with (default: the evaluator's
    one); the first is `abnormality_detection`, each one's summary is in `abnormality_by_template`.
    `on_embeddings` receives the collected `OrganEmbeddings` (e.g. for a probe), so nobody embeds twice.
    `whole_scan` (default): organs pooled over the whole stored volume by sliding windows of the training
    crop; False: inside one centre crop (the protocol before, for comparison; see eval_inputs.py).
    `labels` (`evaluators.labels.read_labels`): score abnormality detection on them instead of the dataset's
    own finding labels (the phantom's catalogue), and add `any_abnormality`."""
    say = progress or (lambda _: None)
    evaluators = parse_evaluators(evaluators)
    config, params = pretrained.config, pretrained.params
    if step is None:  # None stays None for params from elsewhere (an export): nothing to record
        step = checkpoint_step_or_none(pretrained.workdir)
    if data is None:
        data = EvaluationData(config, split, batch_size, max_cases, whole_scan=whole_scan)
    model = pretrained.zero_shot_model()
    result: dict[str, Any] = {
        "workdir": str(pretrained.workdir),
        "step": step,
        "dataset": data.name,
        "split": data.split,
        "num_cases": data.num_cases,
        "protocol": data.protocol,
        "crop_shape": list(data.training_crop),
        "evaluated_shape": list(data.pipeline_config.crop_shape),
        "evaluators": list(evaluators),
        "seconds": {},
    }
    say(
        f"evaluating step {step} on {data.name}: {data.num_cases} case(s), "
        f"{data.protocol.replace('_', ' ')}, batches of {data.batch_size}, evaluators {','.join(evaluators)}"
    )
    examples: list[dict[str, Any]] = []

    def batches_keeping_examples():
        for batch in data.batches():
            for row in range(len(batch["image"])):
                if len(examples) < num_examples:
                    examples.append({k: batch[k][row] for k in EXAMPLE_KEYS if k in batch})
            yield batch

    has_text = {"label_map", "organ_abnormal", "organ_text"} <= data.record_keys
    if "label_map" not in data.record_keys:  # e.g. a tumour dataset without organ label maps
        for name, key in (("organ", "organ_recognition"), ("abnormality", "abnormality_detection")):
            if name in evaluators:
                result[key] = {"skipped": f"{data.name} records have no organ label map"}
    embeddings = None
    need = {"organ", "abnormality"} | ({"retrieval"} if data.whole_scan else set())
    if "label_map" in data.record_keys and need & set(evaluators):
        start = time.perf_counter()
        embeddings = organ_embeddings(pretrained, data, batches_keeping_examples())
        result["seconds"]["organ_embeddings"] = time.perf_counter() - start
        if on_embeddings is not None:
            on_embeddings(embeddings)
        say(
            f"  organ embeddings: {int(embeddings.valid.sum())} organ instances "
            f"({result['seconds']['organ_embeddings']:.1f} s)"
        )
    if embeddings is not None and "organ" in evaluators:
        _organ_recognition(model, params, config, embeddings, result, say)
    if embeddings is not None and "abnormality" in evaluators:
        if labels is not None:
            _abnormality_from_labels(model, params, pretrained, embeddings, labels, result, say)
        else:
            _abnormality(model, params, config, embeddings, data, result, say, abnormality_templates)
    if "retrieval" in evaluators and not has_text:
        result["retrieval"] = {"skipped": f"{data.name} records have no organ label map and organ-level text"}
    elif "retrieval" in evaluators:
        start = time.perf_counter()
        try:
            retrieval = RetrievalEvaluator(model, texts="report")
            result["retrieval"] = (
                retrieval.run_on_embeddings(params, embeddings)
                if embeddings is not None
                else retrieval.run(params, batches_keeping_examples())
            )
            say(f"  retrieval: image->text R@1 {result['retrieval']['image_to_text/R@1']}")
        except ConfigError as e:  # e.g. a dataset without reports
            result["retrieval"] = {"skipped": e.problem}
        result["seconds"]["retrieval"] = time.perf_counter() - start
    result = json_ready(result)
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        result["plots"] = _plots(result, out_dir) + _example_overlays(pretrained, examples, out_dir)
        result["seconds"]["plots"] = time.perf_counter() - start
        (out_dir / EVAL_FILE).write_text(json.dumps(result, indent=2))
        say(f"wrote {out_dir / EVAL_FILE} and {len(result['plots'])} plot(s)")
    return result
