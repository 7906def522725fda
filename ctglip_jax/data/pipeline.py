"""The training input pipeline: TFDS array_record records -> Grain -> sharded global batches.

    source (tfds data source, random access)
      -> this process's shard (grain ShardOptions; default ShardByJaxProcess: process i of n takes
         records i, i + n, ...; drop_remainder keeps every process at the same length)
      -> seeded shuffle, re-drawn every epoch; repeat
      -> per record, with a Grain RNG derived from (seed, process, position):
         augment (crop/flip identical on image and labels, HU jitter, window to [0, 1]),
         K organ slots (`slots.py`), optional tokenisation of slot and report texts
      -> batch (global batch / process count, drop remainder)
      -> optional worker processes (grain mp_prefetch)
      -> `jax.make_array_from_process_local_data` onto a NamedSharding over the mesh's data axes.

Every random choice is a function of the config seed and the record's position in the stream, so a run
restored from `get_state()` (JSON-serialisable; store it with the checkpoint) continues with exactly the
batches an uninterrupted run would have seen, in this process or a new one.

Batch keys: `image` float32 (B, X, Y, Z) in [0, 1], or (B, X, Y, Z, C) with C HU windows (`windows`);
`label_map` uint8 (B, X, Y, Z) v1 ids; slot arrays `slot_organ` int32 (B, K), `slot_valid` bool,
`slot_abnormal` int8 (-1 = not mentioned), `slot_voxels`; `organ_abnormal` int8 (B, 104); passed through
when the dataset has them: `tumor_mask`, `label` (cropped like the image), `finding_labels`, `has_tumor`.
With `tokenize`: `slot_text_ids`/`_mask` (B, K, L) and `report_ids`/`_mask` (B, L). Host-only (numpy, never
placed on devices): `slot_text` (B, K) and `report` (B,) strings, `case_id` (B,).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import absl.flags
import grain
import jax
import numpy as np

from ctglip_jax import config_defaults
from ctglip_jax.data import datasets, slots
from ctglip_jax.data.augment import DEFAULT_WINDOW, AugmentConfig, augment
from ctglip_jax.errors import ConfigError
from ctglip_jax.sharding import batch_sharding

Tokenize = Callable[[list[str]], tuple[np.ndarray, np.ndarray]]
LABEL_KEYS = ("label_map", "tumor_mask", "label", "lesion_map")  # voxel-aligned: cropped like the volume
PASS_KEYS = ("finding_labels", "finding_organ", "has_tumor", "organ_abnormal")
HOST_KEYS = ("slot_text", "report", "case_id")
STATE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """What to read and how to augment it. `batch_size` is global (all processes together)."""

    dataset: str = "ctglip_synthetic"
    config: str = "tiny"
    split: str = "train"
    data_dir: str | None = None
    batch_size: int = 4
    crop_shape: tuple[int, int, int] = (32, 32, 32)
    num_slots: int = 16
    min_organ_voxels: int = config_defaults.value(None, "data.min_organ_voxels")
    flip_axes: tuple[int, ...] = ()  # never 0 (left-right) for organ-level training: see augment.py
    hu_scale_jitter: float = config_defaults.value(None, "data.hu_scale_jitter")
    hu_shift_jitter: float = config_defaults.value(None, "data.hu_shift_jitter")
    window: tuple[float, float] = DEFAULT_WINDOW
    windows: tuple[tuple[float, float], ...] = ()  # several HU windows as image channels; () = `window`
    crop_aware_labels: bool = True  # drop abnormal flags whose lesion is outside the crop (slots.py)
    seed: int = 0
    shuffle: bool = True
    random_augment: bool = True  # False: centre crop, no flips/jitter, slots ordered by id (evaluation)
    num_epochs: int | None = None  # None = repeat forever
    worker_count: int = 0
    # Grain's defaults (16 threads, 500 elements ahead) would augment hundreds of batches ahead of the
    # consumer; elements here are whole batches, so a couple ahead keeps the device fed.
    read_threads: int = 2
    prefetch_batches: int = 2
    build_if_missing: bool = False

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> PipelineConfig:
        """From a dict or ml_collections ConfigDict; unknown keys are an error (typos must not pass)."""
        values = dict(values)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ConfigError("<data config>", f"unknown fields {unknown}; known: {sorted(fields)}")
        for key in ("crop_shape", "flip_axes", "window"):
            if key in values and values[key] is not None:
                values[key] = tuple(values[key])
        if values.get("windows"):
            try:
                values["windows"] = tuple(tuple(float(v) for v in w) for w in values["windows"])
            except (TypeError, ValueError):
                values["windows"] = ((),)
            bad = [w for w in values["windows"] if len(w) != 2 or not w[1] > w[0]]
            if bad:
                raise ConfigError(
                    "config.data.windows",
                    f"each HU window is (lo, hi) with hi > lo, got {list(values['windows'])}",
                )
        return cls(**values)

    def augment_config(self) -> AugmentConfig:
        if any(a not in (0, 1, 2) for a in self.flip_axes):
            raise ConfigError("<data config>", f"flip_axes {self.flip_axes} must be among 0, 1, 2")
        return AugmentConfig(
            crop_shape=tuple(self.crop_shape),
            random_crop=self.random_augment,
            flip_axes=tuple(self.flip_axes),
            hu_scale=self.hu_scale_jitter,
            hu_shift=self.hu_shift_jitter,
            window=tuple(self.window),
            windows=tuple(self.windows),
        )


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class RecordTransform:
    """One raw record + rng -> one training example (numpy). A class so worker processes can pickle it."""

    def __init__(self, cfg: PipelineConfig, tokenize: Tokenize | None, tokenize_report: Tokenize | None):
        self.cfg = cfg
        self.aug = cfg.augment_config()
        self.tokenize = tokenize
        self.tokenize_report = tokenize_report or tokenize

    def __call__(self, record: Mapping[str, Any], rng: np.random.Generator | None) -> dict[str, Any]:
        rng = rng if self.cfg.random_augment else None
        labels = {k: np.asarray(record[k]) for k in LABEL_KEYS if k in record}
        image, labels = augment(np.asarray(record["volume"]), labels, self.aug, rng)
        out: dict[str, Any] = {"image": image, **labels}
        for key in PASS_KEYS:
            if key in record:
                value = np.asarray(record[key])
                out[key] = value.astype(np.int32) if value.dtype == np.int64 else value  # no x64 on device
        out["case_id"] = _text(record.get("case_id", ""))
        if "label_map" in labels and "organ_abnormal" in record:
            flags, texts = record["organ_abnormal"], record["organ_text"]
            if self.cfg.crop_aware_labels and "lesion_map" in labels and "finding_organ" in record:
                flags = slots.hide_unseen_findings(
                    flags, record["finding_organ"], record["lesion_map"], labels["lesion_map"]
                )
                hidden = np.flatnonzero(flags != np.asarray(record["organ_abnormal"]))
                texts = [("" if i in hidden else t) for i, t in enumerate(texts)]
            out.update(
                slots.choose_slots(
                    labels["label_map"],
                    flags,
                    texts,
                    self.cfg.num_slots,
                    self.cfg.min_organ_voxels,
                    rng,
                )
            )
            if self.tokenize is not None:
                ids, mask = self.tokenize(list(out["slot_text"]))
                out["slot_text_ids"], out["slot_text_mask"] = np.asarray(ids), np.asarray(mask)
        out.pop("lesion_map", None)  # only decides the slot flags above; never a model input
        if "report" in record:
            out["report"] = _text(record["report"])
            if self.tokenize_report is not None:
                ids, mask = self.tokenize_report([out["report"]])
                out["report_ids"], out["report_mask"] = np.asarray(ids)[0], np.asarray(mask)[0]
        return out


def stack_examples(examples: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Batch: numeric arrays stacked; strings as numpy object arrays (host-only)."""
    out = {}
    for key in examples[0]:
        values = [e[key] for e in examples]
        if key in HOST_KEYS:
            out[key] = np.array(values, dtype=object)
        else:
            out[key] = np.stack(values)
    return out


def local_batch_size(global_batch: int, process_count: int) -> int:
    if global_batch % process_count:
        raise ConfigError(
            "<data config>", f"batch_size {global_batch} is not divisible by {process_count} processes"
        )
    return global_batch // process_count


def _derived_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def make_dataset(
    cfg: PipelineConfig,
    source=None,
    *,
    tokenize: Tokenize | None = None,
    tokenize_report: Tokenize | None = None,
    shard_options=None,
    text_stages: tuple[Any, Any] | None = None,
):
    """The grain IterDataset of this process's local batches (numpy dicts).

    `source`: any random-access sequence of records (default: the TFDS data source named by `cfg`).
    `shard_options`: a grain ShardOptions (default `ShardByJaxProcess(drop_remainder=True)`).
    `text_stages`: `(sampler, table)` of joint text training (text_table.py): the sampler is a seeded
    per-batch `random_map` (it may run in worker processes), the table a `map` in this process (it runs the
    frozen text layers, which must not run in forked workers). Either may be None.
    """
    if source is None:
        source = datasets.data_source(
            cfg.dataset, cfg.config, cfg.split, cfg.data_dir, build_if_missing=cfg.build_if_missing
        )
    if shard_options is None:
        shard_options = grain.sharding.ShardByJaxProcess(drop_remainder=True)
    index, count = shard_options.shard_index, shard_options.shard_count
    ds = grain.MapDataset.source(source)
    if shard_options.drop_remainder:
        ds = ds[: len(ds) - len(ds) % count]
    ds = ds[index::count]
    batch = local_batch_size(cfg.batch_size, count)
    if len(ds) < batch:
        raise ConfigError(
            "<data config>",
            f"{cfg.dataset}/{cfg.config}:{cfg.split} gives this process {len(ds)} records, "
            f"fewer than one local batch of {batch}",
        )
    if cfg.shuffle:
        ds = ds.shuffle(seed=_derived_seed(cfg.seed, 0))
    ds = ds.repeat(cfg.num_epochs)
    transform = RecordTransform(cfg, tokenize, tokenize_report)
    ds = ds.random_map(transform, seed=_derived_seed(cfg.seed, 1, index))
    ds = ds.batch(batch, drop_remainder=True, batch_fn=stack_examples)
    sampler, table = text_stages or (None, None)
    if sampler is not None:
        ds = ds.random_map(sampler, seed=_derived_seed(cfg.seed, 2, index))
    ids = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=cfg.prefetch_batches)
    )
    if cfg.worker_count > 0:
        _absl_flags_parsed()
        ids = ids.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count))
    if table is not None:
        ids = ids.map(table)
    return ids


def _absl_flags_parsed() -> None:
    """Grain's worker processes read absl flags and fail on unparsed ones; our CLI parses its own arguments
    (argparse + ml_collections), so absl's are marked parsed (their defaults) unless an absl app did it."""
    if not absl.flags.FLAGS.is_parsed():
        absl.flags.FLAGS.mark_as_parsed()


def check_batch_divides(batch_size: int, mesh) -> None:
    """The global batch must split evenly over the devices of the batch axes."""
    ways = int(np.prod([mesh.shape[a] for a in ("data", "fsdp") if a in mesh.axis_names]))
    if batch_size % ways:
        raise ConfigError("<data config>", f"batch_size {batch_size} does not split over {ways} devices "
                                           f"of the mesh's batch axes {dict(mesh.shape)}")


def to_global(batch: Mapping[str, np.ndarray], sharding) -> dict[str, Any]:
    """Numeric arrays -> global jax.Arrays (this process holds its rows); strings stay host numpy."""
    out = {}
    for key, value in batch.items():
        if value.dtype == object:
            out[key] = value
        else:
            out[key] = jax.make_array_from_process_local_data(sharding, value)
    return out


class InputPipeline:
    """Iterator of batches with JSON-serialisable state for checkpointing.

    pipeline = InputPipeline(cfg, mesh=mesh); batch = next(pipeline)
    state = pipeline.get_state()          # store with the model checkpoint (json.dumps works)
    InputPipeline(cfg, mesh=mesh).set_state(state)   # continues with the very next batch
    Without `mesh`, batches stay host numpy (tests, evaluation on one host).
    """

    def __init__(
        self,
        cfg: PipelineConfig,
        *,
        mesh=None,
        source=None,
        tokenize: Tokenize | None = None,
        tokenize_report: Tokenize | None = None,
        shard_options=None,
        text_stages: tuple[Any, Any] | None = None,
    ):
        self.cfg = cfg
        self._dataset = make_dataset(
            cfg, source, tokenize=tokenize, tokenize_report=tokenize_report, shard_options=shard_options,
            text_stages=text_stages,
        )
        self._iterator = iter(self._dataset)
        self._sharding = None
        if mesh is not None:
            self._sharding = batch_sharding(mesh)
            check_batch_divides(cfg.batch_size, mesh)

    def __iter__(self):
        return self

    def __enter__(self) -> InputPipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop reader threads and worker processes (else grain complains noisily at interpreter exit)."""
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()
        self._iterator = iter(())  # drop grain's iterator now, not during interpreter teardown

    def __next__(self) -> dict[str, Any]:
        batch = next(self._iterator)
        if self.cfg.worker_count > 0:  # own the memory: worker batches are views of shared memory blocks
            batch = {k: np.array(v) for k, v in batch.items()}
        return to_global(batch, self._sharding) if self._sharding is not None else batch

    def _identity(self) -> dict[str, Any]:
        c = self.cfg
        return {
            "dataset": c.dataset,
            "config": c.config,
            "split": c.split,
            "seed": c.seed,
            "batch_size": c.batch_size,
        }

    def get_state(self) -> dict[str, Any]:
        state = self._iterator.get_state()
        json.dumps(state)  # fail here, not at checkpoint time, if grain ever returns something else
        return {"version": STATE_VERSION, "pipeline": self._identity(), "grain": state}

    def set_state(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != STATE_VERSION or state.get("pipeline") != self._identity():
            raise ConfigError(
                "<input pipeline state>",
                f"state from another pipeline {state.get('pipeline')} cannot resume {self._identity()}",
            )
        self._iterator.set_state(state["grain"])
