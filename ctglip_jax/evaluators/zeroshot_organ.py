"""Zero-shot organ recognition: which of the 104 organ prompts is nearest to each organ embedding?

For every case, every organ with at least `min_voxels` voxels in the label map gets an embedding (one
image-tower pass pools all 104 organs at once: the pooling computes every label's sum anyway). Its cosine
similarity to the organ prompts (one template, or an ensemble of templates: see `prompts.py`) ranks the
organs; we report top-1/top-5 accuracy over all organ instances, per-organ accuracy and the confusion
matrix (rows = true organ, columns = predicted organ, both indexed by v1 id - 1).

`collect_organ_embeddings` is shared with the abnormality evaluator: run it once and pass the result to
both to pay for one pass over the data. `Evaluator` is the `config.evals` entry of type `organ` (evals.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from ctglip_jax import config_defaults
from ctglip_jax.data import organs
from ctglip_jax.errors import ConfigError
from ctglip_jax.evaluators import metrics as M
from ctglip_jax.evaluators.prompts import (
    ORGAN_TEMPLATES,
    TextEncoder,
    ensemble_embeddings,
    organ_prompt_groups,
)
from ctglip_jax.evaluators.zeroshot_model import SectionEvaluator, ZeroShotModel

NUM_ORGANS = organs.NUM_CLASSES
# Per-case keys carried along with the embeddings (labels for the abnormality evaluator, ids for reports).
CARRIED_KEYS = (
    "finding_organ", "finding_labels", "organ_abnormal", "case_id", "has_tumor", "slot_organ", "slot_text"
)


@dataclasses.dataclass
class OrganEmbeddings:
    """Embeddings of all 104 organs for N cases: `(N, 104, E)` (index = v1 id - 1), validity `(N, 104)`,
    and the per-case `extras` named in `CARRIED_KEYS` when the batches had them."""

    embeddings: np.ndarray
    valid: np.ndarray
    extras: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.embeddings)


def organ_presence(label_map: np.ndarray, min_voxels: int) -> np.ndarray:
    """`(B, 104)` bool: organ id i+1 has at least `min_voxels` voxels in each case's label map."""
    label_map = np.asarray(label_map, np.int64)
    out = np.zeros((label_map.shape[0], NUM_ORGANS), bool)
    for b, lab in enumerate(label_map):
        counts = np.bincount(lab.reshape(-1), minlength=NUM_ORGANS + 1)[1 : NUM_ORGANS + 1]
        out[b] = counts >= max(min_voxels, 1)
    return out


def pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    """Zero rows appended up to `rows` (a fixed batch size keeps one compiled function)."""
    return np.concatenate([x, np.zeros((rows - len(x), *x.shape[1:]), x.dtype)]) if rows > len(x) else x


def collect_organ_embeddings(
    embed_organs, params: Any, batches: Iterable[Mapping[str, Any]], *, min_voxels: int = 8
) -> OrganEmbeddings:
    """One pass over `batches` (dicts with `image` and `label_map`, e.g. the eval input pipeline).

    `embed_organs` is jitted here once; every batch is padded to the first batch's size so it compiles
    once. An organ is valid when the label map has `min_voxels` voxels of it *and* the model says valid.
    """
    jitted = jax.jit(embed_organs)
    batch_size = None
    embeddings, valids, extras = [], [], {k: [] for k in CARRIED_KEYS}
    for batch in batches:
        images = np.asarray(batch["image"], np.float32)
        label_map = np.asarray(batch["label_map"])
        n = len(images)
        if batch_size is None:
            batch_size = n
        if n > batch_size:
            raise ConfigError(
                "organ evaluation",
                f"batch of {n} cases after a first batch of {batch_size}: keep the batch size fixed",
            )
        present = organ_presence(label_map, min_voxels)
        ids = np.broadcast_to(np.arange(1, NUM_ORGANS + 1, dtype=np.int32), (batch_size, NUM_ORGANS))
        emb, valid = jitted(
            params,
            pad_rows(images, batch_size),
            pad_rows(label_map, batch_size),
            ids,
            pad_rows(present, batch_size),
        )
        embeddings.append(np.asarray(emb, np.float32)[:n])
        valids.append(np.asarray(valid, bool)[:n] & present)
        for key in CARRIED_KEYS:
            if key in batch:
                extras[key].append(np.asarray(batch[key]))
    if not embeddings:
        raise ConfigError("organ evaluation", "the evaluation data is empty")
    return OrganEmbeddings(
        np.concatenate(embeddings),
        np.concatenate(valids),
        {k: np.concatenate(v) for k, v in extras.items() if v},
    )


def organ_recognition(
    data: OrganEmbeddings,
    prompt_embeddings: np.ndarray,
    candidate_ids: Sequence[int] | None = None,
    ks: Sequence[int] = (1, 5),
) -> dict[str, Any]:
    """Top-k accuracy, per-organ accuracy and confusion matrix from precomputed embeddings.

    `prompt_embeddings` `(104, E)` (row = v1 id - 1). `candidate_ids` restricts the classes competed over
    (and evaluated) to a subset of ids, e.g. the organs a phantom draws; default all 104.
    """
    prompt_embeddings = np.asarray(prompt_embeddings, np.float32)
    if prompt_embeddings.shape[0] != NUM_ORGANS:
        raise ConfigError(
            "organ recognition", f"need {NUM_ORGANS} prompt embeddings, got {prompt_embeddings.shape[0]}"
        )
    ids = np.arange(1, NUM_ORGANS + 1) if candidate_ids is None else np.asarray(sorted(candidate_ids))
    columns = ids - 1
    case_idx, organ_idx = np.nonzero(data.valid[:, columns])
    true_class = organ_idx  # index into `ids`
    if not len(true_class):
        raise ConfigError("organ recognition", "no organ of the candidate list is present in the data")
    emb = data.embeddings[case_idx, columns[organ_idx]]
    scores = emb @ prompt_embeddings[columns].T
    predicted = np.argmax(scores, axis=1)
    names = organs.v1_names()
    confusion = M.confusion_matrix(true_class, predicted, len(ids))
    per_organ = {}
    for j, organ_id in enumerate(ids):
        count = int(confusion[j].sum())
        if count:
            per_organ[names[int(organ_id)]] = {"accuracy": float(confusion[j, j] / count), "count": count}
    out: dict[str, Any] = {f"top{k}": M.top_k_accuracy(scores, true_class, k) for k in ks}
    out.update(
        {
            "num_instances": int(len(true_class)),
            "num_cases": int(len(data)),
            "mean_per_organ_accuracy": float(np.mean([v["accuracy"] for v in per_organ.values()])),
            "per_organ": per_organ,
            "class_ids": [int(i) for i in ids],
            "confusion_matrix": confusion.tolist(),
        }
    )
    return M.json_ready(out)


class OrganRecognitionEvaluator:
    """Zero-shot organ recognition over the organ prompts (a template or an averaged ensemble)."""

    def __init__(
        self,
        model: ZeroShotModel,
        *,
        templates: Sequence[str] = ORGAN_TEMPLATES,
        min_voxels: int = 8,
        candidate_ids: Sequence[int] | None = None,
        ks: Sequence[int] = (1, 5),
    ):
        self.model = model
        self.templates = tuple(templates)
        self.min_voxels = min_voxels
        self.candidate_ids = candidate_ids
        self.ks = tuple(ks)
        self.prompt_groups = organ_prompt_groups(self.templates)  # validates the templates early

    def prompt_embeddings(self, params: Any) -> np.ndarray:
        encoder = TextEncoder(self.model.text_features, self.model.project_text, params)
        return ensemble_embeddings(encoder, self.prompt_groups)

    def run(self, params: Any, batches: Iterable[Mapping[str, Any]] | OrganEmbeddings) -> dict[str, Any]:
        data = (
            batches
            if isinstance(batches, OrganEmbeddings)
            else collect_organ_embeddings(
                self.model.embed_organs, params, batches, min_voxels=self.min_voxels
            )
        )
        result = organ_recognition(data, self.prompt_embeddings(params), self.candidate_ids, self.ks)
        result["templates"] = list(self.templates)
        return result


class Evaluator(SectionEvaluator):
    """`config.evals.<name> = {"type": "organ"}`: organ recognition over the run's prompt template, on the
    organ embeddings `inputs` (an `eval_inputs.Inputs`) shares with the other evaluators of its split."""

    section = "organ_recognition"  # its eval.json key

    def __init__(self, config, inputs):
        self.inputs = inputs
        self.template = config_defaults.value(config, "text.prompt")
        self.min_voxels = int(config_defaults.value(config, "data.min_organ_voxels"))

    def evaluate(self, params: Any) -> dict[str, Any]:
        """Its eval.json sections."""
        data = self.inputs.data
        if "label_map" not in data.record_keys:  # e.g. a tumour dataset without organ label maps
            return {self.section: {"skipped": f"{data.name} records have no organ label map"}}
        model = self.inputs.model(params)
        evaluator = OrganRecognitionEvaluator(model, templates=(self.template,), min_voxels=self.min_voxels)
        return {self.section: evaluator.run(params, self.inputs.embeddings(params))}

    def line(self, r: Mapping[str, Any]) -> str:
        return f"  organ recognition: top-1 {r['top1']:.3f}, top-5 {r['top5']:.3f}"
