"""Organ text <-> organ image retrieval, R@1/5/10 in both directions.

The gallery is every (case, organ slot) of the evaluation data: its organ embedding, and a text - either the
organ-level report sentences of that organ (`texts="report"`, the pipeline's `slot_text`) or the organ's
prompt (`texts="prompt"`). Relevance is *text identity*: synthetic and real reports repeat their normal
phrasings ("The spleen is unremarkable."), and retrieving another case's identical sentence is correct, so
every item with the same text (for prompts: the same organ) is relevant. R@k counts a query as a hit when
any relevant item is among its top k, ties broken against the query (`metrics.recall_at_k`).
`Evaluator` is the `config.evals` entry of type `retrieval` (evals.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from ctglip_jax.data import organs
from ctglip_jax.errors import ConfigError
from ctglip_jax.evaluators import metrics as M
from ctglip_jax.evaluators.prompts import ORGAN_TEMPLATES, TextEncoder
from ctglip_jax.evaluators.zeroshot_model import SectionEvaluator, ZeroShotModel
from ctglip_jax.evaluators.zeroshot_organ import pad_rows


def retrieval_metrics(
    image_emb: np.ndarray, text_emb: np.ndarray, text_ids: Sequence[Any], ks: Sequence[int] = (1, 5, 10)
) -> dict[str, Any]:
    """R@k image->text and text->image for aligned `(M, E)` pairs; items with equal `text_ids` match."""
    image_emb = np.asarray(image_emb, np.float32)
    text_emb = np.asarray(text_emb, np.float32)
    if image_emb.shape != text_emb.shape:
        raise ConfigError("retrieval", f"image {image_emb.shape} and text {text_emb.shape} embeddings differ")
    ids = np.asarray(text_ids)
    relevant = ids[:, None] == ids[None, :]
    similarity = image_emb @ text_emb.T
    i2t = M.recall_at_k(similarity, relevant, ks)
    t2i = M.recall_at_k(similarity.T, relevant.T, ks)
    out: dict[str, Any] = {f"image_to_text/R@{k}": v for k, v in i2t.items()}
    out.update({f"text_to_image/R@{k}": v for k, v in t2i.items()})
    out["num_items"] = int(len(ids))
    out["num_distinct_texts"] = int(len(np.unique(ids)))
    return M.json_ready(out)


class RetrievalEvaluator:
    """Organ-level retrieval on batches with `image`, `label_map`, `slot_organ`, `slot_valid`, `slot_text`."""

    def __init__(
        self,
        model: ZeroShotModel,
        *,
        texts: str = "report",
        template: str = ORGAN_TEMPLATES[0],
        ks: Sequence[int] = (1, 5, 10),
    ):
        if texts not in ("report", "prompt"):
            raise ConfigError("retrieval", f"texts must be 'report' or 'prompt', got {texts!r}")
        self.model, self.texts, self.template, self.ks = model, texts, template, tuple(ks)

    def collect(self, params: Any, batches: Iterable[Mapping[str, Any]]) -> tuple[np.ndarray, list[str]]:
        jitted = jax.jit(self.model.embed_organs)
        names = organs.v1_names()
        embeddings, texts, batch_size = [], [], None
        for batch in batches:
            n = len(batch["image"])
            batch_size = batch_size or n
            arrays = [np.asarray(batch[k]) for k in ("image", "label_map", "slot_organ", "slot_valid")]
            emb, valid = jitted(params, *(pad_rows(a, batch_size) for a in arrays))
            emb, valid = np.asarray(emb)[:n], np.asarray(valid)[:n] & arrays[3].astype(bool)
            for b, k in zip(*np.nonzero(valid), strict=True):
                organ_id = int(arrays[2][b, k])
                if self.texts == "report":
                    text = str(batch["slot_text"][b, k]) if "slot_text" in batch else ""
                    if not text.strip():
                        continue  # the report does not speak of this organ
                else:
                    text = self.template.format(organ=organs.readable_name(names[organ_id]))
                embeddings.append(emb[b, k])
                texts.append(text)
        return (np.stack(embeddings) if embeddings else np.zeros((0, 0), np.float32)), texts

    def collect_from_embeddings(self, data) -> tuple[np.ndarray, list[str]]:
        """The same gallery from already pooled `OrganEmbeddings` (e.g. whole-scan): each case's organ
        slots (`slot_organ`, `slot_text` carried in its extras) that are valid there."""
        if "slot_organ" not in data.extras:
            raise ConfigError("retrieval", "the organ embeddings carry no organ slots")
        names = organs.v1_names()
        embeddings, texts = [], []
        slot_text = data.extras.get("slot_text")
        for b, k in zip(*np.nonzero(np.asarray(data.extras["slot_organ"]) > 0), strict=True):
            organ_id = int(data.extras["slot_organ"][b, k])
            if not data.valid[b, organ_id - 1]:
                continue
            if self.texts == "report":
                text = "" if slot_text is None else str(slot_text[b, k])
                if not text.strip():
                    continue
            else:
                text = self.template.format(organ=organs.readable_name(names[organ_id]))
            embeddings.append(data.embeddings[b, organ_id - 1])
            texts.append(text)
        return (np.stack(embeddings) if embeddings else np.zeros((0, 0), np.float32)), texts

    def run_on_embeddings(self, params: Any, data) -> dict[str, Any]:
        return self._score(params, *self.collect_from_embeddings(data))

    def run(self, params: Any, batches: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
        return self._score(params, *self.collect(params, batches))

    def _score(self, params: Any, image_emb: np.ndarray, texts: list[str]) -> dict[str, Any]:
        if not texts:
            raise ConfigError("retrieval", "no organ slot with a text in the evaluation data")
        encoder = TextEncoder(self.model.text_features, self.model.project_text, params)
        text_emb = encoder(texts)
        result = retrieval_metrics(image_emb, text_emb, texts, self.ks)
        result["texts"] = self.texts
        return result


class Evaluator(SectionEvaluator):
    """`config.evals.<name> = {"type": "retrieval"}`: organ report sentence <-> organ image retrieval. On the
    organ embeddings `inputs` (an `eval_inputs.Inputs`) shares when they are pooled anyway (whole scan, or
    for another evaluator of the split), else on the centre crops' organ slots."""

    section = "retrieval"

    def __init__(self, config, inputs):
        self.inputs = inputs

    @property
    def needs_embeddings(self) -> bool:
        return self.inputs.data.whole_scan

    def evaluate(self, params: Any) -> dict[str, Any]:
        """Its eval.json sections."""
        data = self.inputs.data
        if not {"label_map", "organ_abnormal", "organ_text"} <= data.record_keys:
            skipped = f"{data.name} records have no organ label map and organ-level text"
            return {self.section: {"skipped": skipped}}
        try:
            retrieval = RetrievalEvaluator(self.inputs.model(params), texts="report")
            if self.needs_embeddings or self.inputs.pooled(params):
                return {self.section: retrieval.run_on_embeddings(params, self.inputs.embeddings(params))}
            return {self.section: retrieval.run(params, self.inputs.batches())}
        except ConfigError as e:  # e.g. a dataset without reports
            return {self.section: {"skipped": e.problem}}

    def line(self, r: Mapping[str, Any]) -> str:
        return f"  retrieval: image->text R@1 {r['image_to_text/R@1']}"
