"""What evaluation reads: every record of a split once (the last batch partial), and the organ embeddings
of those cases, pooled over the whole stored volume or inside one centre crop.

Whole-scan (the default): each organ is pooled over the *whole* stored volume with sliding windows of the
training crop (`zeroshot.ScanInference`, as `ctglip zeroshot` does on a user's scan): on real-size scans a
centre crop of the training size holds only the organs near the middle, so the others (the lungs of a
whole-body scan) would never be evaluated. Centre crop (`whole_scan=False`, `ctglip eval --centre-crop`):
one crop of the training size in the middle of the volume, the protocol before whole-scan evaluation, kept
for comparison.

`Inputs` is one split read one way as the evaluators that read it share it (evals.py): the model of the
params they run on and its organ embeddings, each made once.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ctglip_jax import config_defaults, objective
from ctglip_jax import pretrained as pretrained_lib
from ctglip_jax.corpus_dictionary import load_dictionary
from ctglip_jax.data import datasets
from ctglip_jax.data.pipeline import PipelineConfig, RecordTransform, stack_examples
from ctglip_jax.errors import ConfigError
from ctglip_jax.evaluators.zeroshot_organ import CARRIED_KEYS, OrganEmbeddings, collect_organ_embeddings
from ctglip_jax.zeroshot import ScanInference

EXAMPLE_KEYS = ("image", "label_map", "tumor_mask", "finding_labels", "case_id")


@dataclasses.dataclass
class EvaluationData:
    """Every record of one split as fixed-size batches (the last one partial), re-iterable.

    `whole_scan`: examples are the whole stored volumes (windowed like training, not cropped), organ slots
    chosen over the whole label map; else centre crops of the training crop size.
    """

    config: Any  # the workdir's ml_collections config
    split: str = "test"
    batch_size: int | None = None
    max_cases: int | None = None
    whole_scan: bool = True

    def __post_init__(self) -> None:
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
        self.training_crop = tuple(int(s) for s in values["crop_shape"])
        cfg = PipelineConfig.from_mapping(values)
        self.source = datasets.data_source(cfg.dataset, cfg.config, cfg.split, cfg.data_dir)
        self.num_cases = len(self.source) if self.max_cases is None else min(len(self.source), self.max_cases)
        if self.num_cases == 0:
            raise ConfigError(f"{cfg.dataset}/{cfg.config}:{cfg.split}", "the split holds no records")
        first = self.source[0]
        self.record_keys = frozenset(first)
        if self.whole_scan and "volume" in first:  # a "crop" of the stored size keeps the whole volume
            cfg = dataclasses.replace(cfg, crop_shape=tuple(int(s) for s in np.shape(first["volume"])))
        self.pipeline_config = cfg
        self.transform = RecordTransform(cfg, None, None)
        self.batch_size = int(self.batch_size or cfg.batch_size)
        if self.batch_size < 1:
            raise ConfigError("--batch-size", f"must be >= 1, got {self.batch_size}")

    @property
    def name(self) -> str:
        c = self.pipeline_config
        return f"{c.dataset}/{c.config}:{c.split}"

    @property
    def protocol(self) -> str:
        return "whole_scan" if self.whole_scan else "centre_crop"

    def examples(self) -> Iterator[dict[str, Any]]:
        for index in range(self.num_cases):
            yield self.transform(self.source[index], None)

    def batches(self) -> Iterator[dict[str, np.ndarray]]:
        return every_record_once(self.examples(), self.batch_size)


def every_record_once(
    examples: Iterable[Mapping[str, Any]],
    batch_size: int,
    stack: Callable[[list], dict[str, np.ndarray]] = stack_examples,
) -> Iterator[dict[str, np.ndarray]]:
    """The evaluation input: every example once, in order, `stack`ed in batches of `batch_size`, the last
    one partial (evaluators pad it to their fixed batch themselves). Lazy: a split never sits in memory."""
    iterator = iter(examples)
    while chunk := list(itertools.islice(iterator, batch_size)):
        yield stack(chunk)


def collect_scan_embeddings(inference, batches: Iterable[Mapping[str, Any]], *, min_voxels: int = 8):
    """`OrganEmbeddings` of whole volumes: every organ pooled over all sliding windows of the training crop
    (`inference` is a `zeroshot.ScanInference`); the per-case extras as `collect_organ_embeddings` keeps."""
    embeddings, valids, extras = [], [], {k: [] for k in CARRIED_KEYS}
    for batch in batches:
        for image, labels in zip(batch["image"], batch["label_map"], strict=True):
            emb, voxels = inference.organ_embeddings(np.asarray(image), np.asarray(labels))
            embeddings.append(np.asarray(emb, np.float32))
            valids.append(voxels >= max(min_voxels, 1))
        for key in CARRIED_KEYS:
            if key in batch:
                extras[key].append(np.asarray(batch[key]))
    if not embeddings:
        raise ConfigError("organ evaluation", "the evaluation data is empty")
    return OrganEmbeddings(
        np.stack(embeddings), np.stack(valids), {k: np.concatenate(v) for k, v in extras.items() if v}
    )


def organ_embeddings(pretrained, data: EvaluationData, batches: Iterable[Mapping[str, Any]] | None = None):
    """The organ embeddings of `data`'s cases under its protocol (whole scan or centre crop)."""
    min_voxels = int(config_defaults.value(pretrained.config, "data.min_organ_voxels"))
    batches = data.batches() if batches is None else batches
    if data.whole_scan:
        inference = ScanInference(pretrained, batch_size=max(1, min(4, data.batch_size)))
        return collect_scan_embeddings(inference, batches, min_voxels=min_voxels)
    model = pretrained.zero_shot_model()
    return collect_organ_embeddings(model.embed_organs, pretrained.params, batches, min_voxels=min_voxels)


def normal_statements(pretrained) -> Callable[[str], list[str]]:
    """`organ name -> [normal statements]` of the run's abnormality dictionary: the corpus dictionary kept in
    the workdir (`dictionary.json`), the phantom's catalogue for phantom runs, nothing otherwise."""
    path = Path(pretrained.workdir) / objective.DICTIONARY_FILE
    table: dict[str, list[str]] = {}
    if path.is_file():
        for organ, entries in load_dictionary(path)["organs"].items():
            table[organ] = [e["text"] for e in entries if not e["abnormal"]]
    elif pretrained.config.data.dataset == objective.SYNTHETIC_DATASET:
        from ctglip_jax.phantom.dictionary import normal_phrasings  # phantom runs only

        return normal_phrasings
    return lambda organ: table.get(organ, [])


class Inputs:
    """One `EvaluationData` shared by the evaluators that read it (evals.py). Per params object, the model
    (`pretrained`, `model`) and the organ embeddings are made once: organ recognition, abnormality
    detection and retrieval pool the same organs, so they pool once. The first `num_examples` examples
    read are kept (`examples`, for the overlay figures)."""

    def __init__(self, data: EvaluationData, workdir, *, pretrained=None, num_examples: int = 0):
        self.data, self.workdir, self.num_examples = data, workdir, num_examples
        self.examples: list[dict[str, Any]] = []
        self._params: Any = None
        self._cache: dict[str, Any] = {}
        if pretrained is not None:
            self._params, self._cache = pretrained.params, {"pretrained": pretrained}

    def pretrained(self, params):
        """The run's model with `params` (`pretrained.from_params`: the text tower too, when trained)."""
        if params is not self._params or "pretrained" not in self._cache:
            self._params = params
            self._cache = {"pretrained": pretrained_lib.from_params(self.data.config, params, self.workdir)}
        return self._cache["pretrained"]

    def model(self, params):
        """The `ZeroShotModel` of `params` (one per params: its jitted functions compile once)."""
        pretrained = self.pretrained(params)
        if "model" not in self._cache:
            self._cache["model"] = pretrained.zero_shot_model()
        return self._cache["model"]

    def batches(self) -> Iterator[dict[str, np.ndarray]]:
        """`data.batches()`, keeping the first `num_examples` examples."""
        for batch in self.data.batches():
            for row in range(len(batch["image"])):
                if len(self.examples) < self.num_examples:
                    self.examples.append({k: batch[k][row] for k in EXAMPLE_KEYS if k in batch})
            yield batch

    def embeddings(self, params) -> OrganEmbeddings:
        """The organ embeddings of every case under the data's protocol, pooled once per params."""
        pretrained = self.pretrained(params)
        if "embeddings" not in self._cache:
            self._cache["embeddings"] = organ_embeddings(pretrained, self.data, self.batches())
        return self._cache["embeddings"]

    def pooled(self, params) -> bool:
        """Whether the organ embeddings of `params` are already pooled."""
        return params is self._params and "embeddings" in self._cache

    def normal_statements(self, params) -> Callable[[str], list[str]]:
        return normal_statements(self.pretrained(params))
