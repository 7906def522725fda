"""Evaluation of a training workdir: its checkpoint, its dataset's held-out split, the zero-shot evaluators,
and what `ctglip eval` writes (`eval.json` + PNG plots).

    pretrained.load(workdir)  ->  evaluation data (split, every case, whole volumes)  ->  evaluators
    ->  eval.json (metrics + what was evaluated)  +  plots (ROC per finding, organ confusion matrix,
        example overlays of the organ mask and text-to-voxel heatmaps on CT slices)

The data is read the way training validates (`eval_inputs.EvaluationData`): the workdir config's pipeline
with the chosen split, no shuffling, no random augmentation, organ slots ordered by id, every case (the last
partial batch included). Organs are pooled over the whole stored volume with sliding windows of the training
crop (`--centre-crop`: inside one centre crop, the protocol before). The evaluators are the classes of
`evals.REGISTRY` (the ones training runs from `config.evals`); one pass gives the organ embeddings shared by
organ recognition, abnormality detection and (whole-scan) retrieval.

Called from Python too (the demo and the reproduction script): `evaluate(pretrained.load(workdir), ...)`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ctglip_jax import config_defaults, evals, plots
from ctglip_jax.checkpoint import checkpoint_step_or_none
from ctglip_jax.data import organs
from ctglip_jax.data.datasets import training_spacing
from ctglip_jax.errors import ConfigError, CTGlipInputError
from ctglip_jax.eval_inputs import EvaluationData, Inputs, organ_embeddings  # noqa: F401 (the Python API)
from ctglip_jax.evaluators.metrics import json_ready
from ctglip_jax.evaluators.prompts import finding_pair_texts
from ctglip_jax.progress import stderr
from ctglip_jax.zeroshot import ScanInference

EVALUATORS = tuple(evals.REGISTRY)  # the zero-shot evaluators, in the order they run
EVAL_FILE = "eval.json"


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
    from ctglip_jax.phantom.findings import FINDINGS  # phantom runs only

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
    config = pretrained.config
    if step is None:  # None stays None for params from elsewhere (an export): nothing to record
        step = checkpoint_step_or_none(pretrained.workdir)
    if data is None:
        data = EvaluationData(config, split, batch_size, max_cases, whole_scan=whole_scan)
    inputs = Inputs(data, pretrained.workdir, pretrained=pretrained, num_examples=num_examples)
    options = {"abnormality": {"templates": abnormality_templates, "labels": labels}}
    built = [evals.REGISTRY[name](config, inputs, **options.get(name, {})) for name in evaluators]
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
    sections = evals.evaluate_sections(inputs, built, pretrained.params, say=say, on_embeddings=on_embeddings)
    result["seconds"].update(sections.pop("seconds"))
    result.update(sections)
    result = json_ready(result)
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        result["plots"] = _plots(result, out_dir) + _example_overlays(pretrained, inputs.examples, out_dir)
        result["seconds"]["plots"] = time.perf_counter() - start
        (out_dir / EVAL_FILE).write_text(json.dumps(result, indent=2))
        say(f"wrote {out_dir / EVAL_FILE} and {len(result['plots'])} plot(s)")
    return result
