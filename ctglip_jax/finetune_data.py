"""The data side of fine-tuning (`finetune.py`): which dataset, built if missing, and its batches.

Training batches are random crops from the pretraining input pipeline (seeded); evaluation batches are
centred crops of every record once, in order, the last batch partial; segmentation batches put a share of
every batch on tumour voxels (`data/seg_batches.py`); whole test volumes feed the sliding-window Dice. All
are windowed as the pretrained model's data (one channel per HU window).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from ctglip_jax import config_defaults
from ctglip_jax.data import datasets
from ctglip_jax.data.augment import apply_windows, windows_of
from ctglip_jax.data.pipeline import InputPipeline, PipelineConfig
from ctglip_jax.data.seg_batches import SegBatchConfig, TumourBatches
from ctglip_jax.errors import ConfigError, CTGlipInputError
from ctglip_jax.eval_inputs import every_record_once
from ctglip_jax.progress import Log

MSD_MANIFEST = "dataset.json"




@dataclasses.dataclass(frozen=True)
class DataSpec:
    """A TFDS dataset to fine-tune on; `manual_dir` is the user's folder for builders that need one."""

    name: str
    config: str | None
    data_dir: str | None
    manual_dir: str | None = None

    @property
    def label(self) -> str:
        return f"{self.name}:{self.config}" if self.config else self.name


def parse_data(spec: str, data_dir: str | None = None, manual_dir: str | None = None) -> DataSpec:
    """`NAME[:CONFIG]`, or an MSD task folder `PATH[:CONFIG]` (-> `msd_tumor` with that manual dir)."""
    spec = str(spec).strip()
    for path, config in ((spec, None), *([tuple(spec.rsplit(":", 1))] if ":" in spec else [])):
        if (Path(path).expanduser() / MSD_MANIFEST).is_file():
            return DataSpec("msd_tumor", config or "default", data_dir, str(Path(path).expanduser()))
    name, _, config = spec.partition(":")
    if name not in datasets.BUILDER_NAMES:
        if Path(name).expanduser().exists():
            raise CTGlipInputError(name, f"not an MSD task folder (no {MSD_MANIFEST} in it)")
        raise ConfigError(
            "--data", f"unknown dataset {name!r}; use one of {', '.join(datasets.BUILDER_NAMES)} "
                      "(optionally NAME:CONFIG) or an MSD task folder"
        )
    return DataSpec(name, config or None, data_dir, manual_dir)


def prepare_data(data: DataSpec, task: str, log: Log) -> tuple[DataSpec, set[str], dict[str, int]]:
    """Checks the dataset has tumour labels, builds it if missing; returns the spec (config filled in), its
    feature keys and split sizes."""
    builder = datasets.make_builder(data.name, data.config, data.data_dir)
    keys = set(builder.info.features.keys())
    if "tumor_mask" not in keys and not (task == "detection" and "has_tumor" in keys):
        raise ConfigError(data.label, "has no tumour labels (tumor_mask / has_tumor); use ctglip_synthetic "
                                      "or an msd_tumor build")
    if not builder.is_prepared():
        if data.name != "ctglip_synthetic" and not data.manual_dir:
            raise CTGlipInputError(
                builder.data_dir, f"{data.label} is not built; pass --manual-dir (your folder) to build it"
            )
        log(f"building {data.label} under {data.data_dir or datasets.default_data_dir()} ...")
    summary = datasets.build(data.name, data.config, data.data_dir, data.manual_dir)
    return dataclasses.replace(data, config=summary.config), keys, dict(summary.records)


def _pretrained(pretrained, field: str):
    """The pretrained model's `data.<field>` (its shared default for a workdir older than the field)."""
    return config_defaults.value(pretrained.config, f"data.{field}")


def _pipeline_config(data: DataSpec, pretrained, crop, batch_size: int, seed: int, *, split: str,
                     train: bool):
    pre = pretrained.config.data
    return PipelineConfig(
        dataset=data.name,
        config=data.config,
        split=split,
        data_dir=data.data_dir,
        batch_size=batch_size,
        crop_shape=tuple(crop),
        num_slots=1,  # slots are for the contrastive objective; keep their cost negligible here
        flip_axes=tuple(_pretrained(pretrained, "flip_axes")),
        hu_scale_jitter=float(_pretrained(pretrained, "hu_scale_jitter")) if train else 0.0,
        hu_shift_jitter=float(_pretrained(pretrained, "hu_shift_jitter")) if train else 0.0,
        window=tuple(_pretrained(pretrained, "window")),
        windows=tuple(tuple(w) for w in (pre.get("windows", None) or ())),
        seed=seed,
        shuffle=train,
        random_augment=train,
        num_epochs=None if train else 1,
        read_threads=1,
    )


def training_batches(data: DataSpec, pretrained, crop, batch_size: int, seed: int):
    """An endless, seeded stream of random-crop training batches (numpy), as the pretraining pipeline's."""
    cfg = _pipeline_config(data, pretrained, crop, batch_size, seed, split="train", train=True)
    return InputPipeline(cfg)


def evaluation_batches(
    data: DataSpec, pretrained, crop, batch_size: int, split: str, keys: Sequence[str]
) -> Iterator[dict[str, np.ndarray]]:
    """Every record of `split` once, centre-cropped, in order, in batches of `batch_size` (last one partial).

    The pipeline runs with batches of one (its batching drops the remainder) regrouped here; lazily, so a
    large split never sits in memory at once.
    """
    cfg = _pipeline_config(data, pretrained, crop, 1, 0, split=split, train=False)
    with InputPipeline(cfg) as pipeline:
        yield from every_record_once(
            pipeline, batch_size, lambda chunk: {k: np.concatenate([b[k] for b in chunk]) for k in keys
                                                 if k in chunk[0]}
        )


def segmentation_batches(data: DataSpec, pretrained, crop, batch_size: int, seed: int,
                         foreground_fraction: float, tumour_case_fraction: float | None):
    """The seeded, endless stream of segmentation training batches (`data/seg_batches.py`): in every
    batch `round(foreground_fraction * batch_size)` crops centred on a tumour voxel, windowed and jittered
    as the pretrained model's training data."""
    pre = pretrained.config.data
    cfg = SegBatchConfig(
        batch_size=batch_size, crop_shape=tuple(crop), foreground_fraction=foreground_fraction,
        tumour_case_fraction=tumour_case_fraction, windows=windows_of(pre),
        flip_axes=tuple(_pretrained(pretrained, "flip_axes")),
        hu_scale_jitter=float(_pretrained(pretrained, "hu_scale_jitter")),
        hu_shift_jitter=float(_pretrained(pretrained, "hu_shift_jitter")), seed=seed,
    )
    cfg.check()
    return TumourBatches(datasets.data_source(data.name, data.config, "train", data.data_dir), cfg)


def tumour_types(data: DataSpec, keys: set[str]) -> dict[int, str]:
    """`{lesion_map value: tumour type}` where the dataset says which voxel is which finding (the
    synthetic phantom: 1 + catalogue index; the catalogue's `is_tumor` findings); else {}."""
    if data.name != "ctglip_synthetic" or "lesion_map" not in keys:
        return {}
    from ctglip_jax.phantom.findings import FINDINGS  # phantom runs only

    return {i + 1: f.name for i, f in enumerate(FINDINGS) if f.is_tumor}


def whole_volumes(data: DataSpec, pretrained, split: str) -> Iterator[dict[str, np.ndarray]]:
    """Uncropped test cases `{image (1, X, Y, Z[, C]) in [0, 1], tumor_mask (1, X, Y, Z)[, lesion_map]}`
    (sliding window), windowed as the pretrained model's data (one channel per HU window)."""
    windows = windows_of(pretrained.config.data)
    source = datasets.data_source(data.name, data.config, split, data.data_dir)
    for i in range(len(source)):
        record = source[i]
        case = {
            "image": apply_windows(np.asarray(record["volume"]), windows)[None],
            "tumor_mask": (np.asarray(record["tumor_mask"]) > 0).astype(np.int32)[None],
        }
        if "lesion_map" in record:
            case["lesion_map"] = np.asarray(record["lesion_map"])[None]
        yield case
