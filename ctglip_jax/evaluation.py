"""Evaluation of a training workdir: its checkpoint, its dataset's held-out split, the zero-shot evaluators,
and what `ctglip eval` writes (`eval.json` + PNG plots).

    pretrained.load(workdir)  ->  evaluation data (split, centre crops, every case)  ->  evaluators
    ->  eval.json (metrics + what was evaluated)  +  plots (ROC per finding, organ confusion matrix,
        example overlays of the organ mask and text-to-voxel heatmaps on CT slices)

The data is read the way training validates: `PipelineConfig` from the workdir config with the chosen split,
no shuffling, no random augmentation (centre crop of the training crop size, organ slots ordered by id). The
grain batcher drops the remainder, so the records are read straight from the TFDS data source through the
pipeline's own `RecordTransform` and batched here, the last partial batch included: every case counts.
One pass gives the organ embeddings shared by organ recognition and abnormality detection; retrieval reads
the data once more (it pools the organ slots, with their report texts).

Called from Python too (the demo and the reproduction script): `evaluate(pretrained.load(workdir), ...)`.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ctglip_jax.checkpoint import checkpoint_step  # noqa: F401  (the step `pretrained.load` reads)
from ctglip_jax.errors import ConfigError, InputNotFoundError

EVALUATORS = ("organ", "abnormality", "retrieval")
EVAL_FILE = "eval.json"
EXAMPLE_KEYS = ("image", "label_map", "tumor_mask", "finding_labels", "case_id")


def progress_message(message: str) -> None:
    """Progress goes to stderr (stdout stays for results)."""
    print(message, file=sys.stderr, flush=True)


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


# ---------------------------------------------------------------------------------------------------- data
@dataclasses.dataclass
class EvaluationData:
    """Every record of one split as fixed-size batches (the last one partial), re-iterable."""

    config: Any  # the workdir's ml_collections config
    split: str = "test"
    batch_size: int | None = None
    max_cases: int | None = None

    def __post_init__(self) -> None:
        from ctglip_jax.data import datasets
        from ctglip_jax.data.pipeline import PipelineConfig, RecordTransform

        values = {
            **self.config.data.to_dict(),
            "split": self.split,
            "shuffle": False,
            "random_augment": False,
            "num_epochs": 1,
            "build_if_missing": False,
        }
        values["data_dir"] = values.get("data_dir") or None
        values.pop("spacing", None)  # zero-shot inference's record of the training grid, not a pipeline field
        self.pipeline_config = PipelineConfig.from_mapping(values)
        cfg = self.pipeline_config
        self.source = datasets.data_source(cfg.dataset, cfg.config, cfg.split, cfg.data_dir)
        self.transform = RecordTransform(cfg, None, None)
        self.batch_size = int(self.batch_size or cfg.batch_size)
        if self.batch_size < 1:
            raise ConfigError("--batch-size", f"must be >= 1, got {self.batch_size}")
        self.num_cases = len(self.source) if self.max_cases is None else min(len(self.source), self.max_cases)
        if self.num_cases == 0:
            raise ConfigError(self.name, "the split holds no records")
        self.record_keys = frozenset(self.source[0])

    @property
    def name(self) -> str:
        c = self.pipeline_config
        return f"{c.dataset}/{c.config}:{c.split}"

    def examples(self) -> Iterator[dict[str, Any]]:
        for index in range(self.num_cases):
            yield self.transform(self.source[index], None)

    def batches(self) -> Iterator[dict[str, np.ndarray]]:
        from ctglip_jax.data.pipeline import stack_examples

        chunk: list[dict[str, Any]] = []
        for example in self.examples():
            chunk.append(example)
            if len(chunk) == self.batch_size:
                yield stack_examples(chunk)
                chunk = []
        if chunk:
            yield stack_examples(chunk)


# ---------------------------------------------------------------------------------------------- evaluate
def _example_queries(config, example: dict[str, Any]) -> dict[str, str]:
    """{label: query}: the prompt of the largest organ in the crop, and the first finding the case has."""
    from ctglip_jax.data import organs
    from ctglip_jax.data.findings import FINDINGS
    from ctglip_jax.evaluators.prompts import finding_pair_texts

    queries = {}
    counts = np.bincount(np.asarray(example["label_map"], np.int64).ravel(), minlength=organs.NUM_CLASSES + 1)
    if counts[1:].any():
        organ = organs.v1_names()[int(np.argmax(counts[1:])) + 1]
        template = config.text.get("prompt", "A CT image of the {organ}.")
        queries[organ] = template.format(organ=organs.readable_name(organ))
    labels = np.asarray(example.get("finding_labels", []))
    if labels.shape == (len(FINDINGS),) and labels.any():
        finding = FINDINGS[int(np.flatnonzero(labels)[0])]
        queries[finding.name] = finding_pair_texts(finding.prompt, finding.organs[0])[0][0]
    return queries


def _example_overlays(pretrained, examples: list[dict[str, Any]], out_dir: Path) -> list[str]:
    from ctglip_jax import plots
    from ctglip_jax.errors import CTGlipInputError
    from ctglip_jax.zeroshot import ScanInference, training_spacing

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
    from ctglip_jax import plots
    from ctglip_jax.data import organs

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
    progress: Callable[[str], None] | None = progress_message,
    abnormality_templates: Sequence[Sequence[str | tuple[str, str]]] | None = None,
    on_embeddings: Callable[[Any], None] | None = None,
) -> dict[str, Any]:
    """Runs the zero-shot evaluators on `split` of the workdir's dataset; with `out_dir`, writes eval.json
    and the plots there. Returns the eval.json dict. `step` is only recorded (the params are loaded);
    `data` (an `EvaluationData`, e.g. opened early to fail fast) replaces split/batch_size/max_cases.

    `abnormality_templates`: prompt-pair sets to score abnormality detection with (default: the evaluator's
    one); the first is `abnormality_detection`, each one's summary is in `abnormality_by_template`.
    `on_embeddings` receives the collected `OrganEmbeddings` (e.g. for a probe), so nobody embeds twice."""
    from ctglip_jax.data.findings import FINDINGS
    from ctglip_jax.evaluators.abnormality_probe import summarise_by_kind
    from ctglip_jax.evaluators.metrics import json_ready
    from ctglip_jax.evaluators.retrieval import RetrievalEvaluator
    from ctglip_jax.evaluators.zeroshot_abnormality import AbnormalityEvaluator
    from ctglip_jax.evaluators.zeroshot_organ import OrganRecognitionEvaluator, collect_organ_embeddings

    say = progress or (lambda _: None)
    evaluators = parse_evaluators(evaluators)
    config, params = pretrained.config, pretrained.params
    if step is None:
        try:
            step = checkpoint_step(pretrained.workdir)
        except InputNotFoundError:
            step = None  # params from elsewhere (an export): nothing to record
    if data is None:
        data = EvaluationData(config, split, batch_size, max_cases)
    model = pretrained.zero_shot_model()
    min_voxels = int(config.data.get("min_organ_voxels", 8))
    template = config.text.get("prompt", "A CT image of the {organ}.")
    result: dict[str, Any] = {
        "workdir": str(pretrained.workdir),
        "step": step,
        "dataset": data.name,
        "split": split,
        "num_cases": data.num_cases,
        "crop_shape": list(data.pipeline_config.crop_shape),
        "evaluators": list(evaluators),
        "seconds": {},
    }
    say(
        f"evaluating step {step} on {data.name}: {data.num_cases} case(s), batches of {data.batch_size}, "
        f"evaluators {','.join(evaluators)}"
    )
    examples: list[dict[str, Any]] = []

    def batches_keeping_examples():
        for batch in data.batches():
            for row in range(len(batch["image"])):
                if len(examples) < num_examples:
                    examples.append({k: batch[k][row] for k in EXAMPLE_KEYS if k in batch})
            yield batch

    if "label_map" not in data.record_keys:  # e.g. a tumour dataset without organ label maps
        for name, key in (("organ", "organ_recognition"), ("abnormality", "abnormality_detection")):
            if name in evaluators:
                result[key] = {"skipped": f"{data.name} records have no organ label map"}
    elif {"organ", "abnormality"} & set(evaluators):
        start = time.perf_counter()
        embeddings = collect_organ_embeddings(
            model.embed_organs, params, batches_keeping_examples(), min_voxels=min_voxels
        )
        result["seconds"]["organ_embeddings"] = time.perf_counter() - start
        if on_embeddings is not None:
            on_embeddings(embeddings)
        say(
            f"  organ embeddings: {int(embeddings.valid.sum())} organ instances "
            f"({result['seconds']['organ_embeddings']:.1f} s)"
        )
        if "organ" in evaluators:
            start = time.perf_counter()
            organ = OrganRecognitionEvaluator(model, templates=(template,), min_voxels=min_voxels)
            result["organ_recognition"] = organ.run(params, embeddings)
            result["seconds"]["organ_recognition"] = time.perf_counter() - start
            say(
                f"  organ recognition: top-1 {result['organ_recognition']['top1']:.3f}, "
                f"top-5 {result['organ_recognition']['top5']:.3f}"
            )
        if "abnormality" in evaluators:
            start = time.perf_counter()
            extras = embeddings.extras
            labels = extras.get("finding_organ", extras.get("finding_labels"))
            if labels is None or np.shape(labels)[-1] != len(FINDINGS):
                result["abnormality_detection"] = {
                    "skipped": f"{data.name} has no finding labels over the {len(FINDINGS)}-finding catalogue"
                }
            else:
                by_template = {}
                for templates in abnormality_templates or [None]:
                    kw = {} if templates is None else {"templates": tuple(templates)}
                    r = AbnormalityEvaluator(model, min_voxels=min_voxels, **kw).run(params, embeddings)
                    by_template["+".join(map(str, r["templates"]))] = {
                        "auc_macro": r["auc_macro"], "f1_macro": r["f1_macro"],
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
    if "retrieval" in evaluators and not {"label_map", "organ_abnormal", "organ_text"} <= data.record_keys:
        result["retrieval"] = {"skipped": f"{data.name} records have no organ label map and organ-level text"}
    elif "retrieval" in evaluators:
        start = time.perf_counter()
        try:
            result["retrieval"] = RetrievalEvaluator(model, texts="report").run(
                params, batches_keeping_examples()
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
