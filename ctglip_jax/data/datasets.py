"""Finding, building and opening the project's TFDS datasets (array_record, read without TensorFlow).

The builders live in the top-level package `tfds_builders` (TFDS needs a builder inside a package);
importing `tfds_builders.<name>` registers it. Everything here reads datasets with
`builder.as_data_source()` - random access records that Grain can shard, shuffle and checkpoint - and
never with `as_dataset()`/tf.data, which would need TensorFlow.

The record layout shared by all builders (so the input pipeline handles any of them):
`volume` int16 HU (X, Y, Z) RAS+, `label_map` uint8 v1 organ ids, `spacing` float32 (3,) mm, `affine`
float32 (4, 4), `report` text, `organ_text` 104 strings and `organ_abnormal` int8 (104,) indexed by
`v1 id - 1` (-1 = the report does not mention the organ).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ctglip_jax.data import organs
from ctglip_jax.errors import ConfigError, CTGlipInputError, UnknownLabelError

DATA_DIR_ENV = "CTGLIP_DATA_DIR"
BUILDER_NAMES = ("ctglip_synthetic", "ctglip_nifti", "msd_tumor")
SKIPPED_FILE = "skipped.json"


def default_data_dir() -> str:
    """`$CTGLIP_DATA_DIR`, else TFDS's usual `~/tensorflow_datasets`."""
    return os.environ.get(DATA_DIR_ENV) or os.path.expanduser("~/tensorflow_datasets")


# ----------------------------------------------------------------------------------------------------------
# Record layout helpers (used by the builders).


def volume_features(shape: tuple[int, int, int]) -> dict:
    """Image features: zlib-compressed int16 volume (else TFDS upcasts ints to int64) and uint8 label map."""
    import tensorflow_datasets as tfds

    return {
        "volume": tfds.features.Tensor(shape=shape, dtype=np.int16, encoding="zlib"),
        "label_map": tfds.features.Tensor(shape=shape, dtype=np.uint8, encoding="zlib"),
        "spacing": tfds.features.Tensor(shape=(3,), dtype=np.float32),
        "affine": tfds.features.Tensor(shape=(4, 4), dtype=np.float32),
    }


def report_features() -> dict:
    """Report and its organ-level split, indexed by vocabulary position (v1 id - 1)."""
    import tensorflow_datasets as tfds

    return {
        "report": tfds.features.Text(),
        "organ_text": tfds.features.Sequence(tfds.features.Text(), length=organs.NUM_CLASSES),
        "organ_abnormal": tfds.features.Tensor(shape=(organs.NUM_CLASSES,), dtype=np.int8),
    }


def organ_report_arrays(
    report: str, organ_texts: Mapping[str, str], abnormal: Mapping[str, bool]
) -> dict[str, Any]:
    """{report, organ_text (104 str), organ_abnormal (104 int8, -1 = not mentioned)} from per-organ dicts.

    Keys are v1 names; an organ with a flag but no text keeps its flag (its text stays '').
    """
    ids = organs.v1_ids()
    texts = [""] * organs.NUM_CLASSES
    flags = np.full(organs.NUM_CLASSES, -1, np.int8)
    for name, text in organ_texts.items():
        texts[ids[name] - 1] = str(text)
    for name, is_abnormal in abnormal.items():
        flags[ids[name] - 1] = int(bool(is_abnormal))
    for name in organ_texts:
        if flags[ids[name] - 1] < 0:
            flags[ids[name] - 1] = 0
    return {"report": report, "organ_text": texts, "organ_abnormal": flags}


def parsed_report_arrays(report: str, parsed: Mapping[str, Any]) -> dict[str, Any]:
    """Same as `organ_report_arrays` from `reports.parse_report` output ({name: OrganFinding})."""
    return organ_report_arrays(
        report, {k: v.text for k, v in parsed.items()}, {k: v.abnormal for k, v in parsed.items()}
    )


def as_label_map(label_map: np.ndarray, source: object) -> np.ndarray:
    """uint8 label map; ids beyond the v1 vocabulary are an error naming `source`."""
    label_map = np.asarray(label_map)
    if label_map.size and (label_map.min() < 0 or label_map.max() > organs.NUM_CLASSES):
        raise UnknownLabelError(
            source,
            f"label ids {int(label_map.min())}..{int(label_map.max())} outside 0..{organs.NUM_CLASSES}",
        )
    return label_map.astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------
# Builders by name.


def builder_class(name: str):
    """The builder class registered as `name` (imports `tfds_builders.<name>`)."""
    if name not in BUILDER_NAMES:
        raise ConfigError("<dataset>", f"unknown dataset {name!r}; choose one of {', '.join(BUILDER_NAMES)}")
    try:
        module = importlib.import_module(f"tfds_builders.{name}")
    except ModuleNotFoundError as e:
        if e.name != "tfds_builders":
            raise
        raise ImportError(
            "the package `tfds_builders` (part of ctglip-jax) is not importable; an editable install made "
            "before it existed does not map it: rerun `pip install -e .`"
        ) from e
    return module.Builder


def config_names(name: str) -> list[str]:
    return [c.name for c in builder_class(name).BUILDER_CONFIGS]


def make_builder(name: str, config: str | None = None, data_dir: str | None = None):
    """An array_record builder of dataset `name`/`config` under `data_dir` (default `default_data_dir()`).

    `config` is a preset name or, where the builder parses names (`ctglip_nifti`, `msd_tumor`), a config
    named from its grid (`grid_1.5x1.5x3_224x224x128_m10`); a malformed grid name raises ConfigError.
    """
    cls = builder_class(name)
    names = [c.name for c in cls.BUILDER_CONFIGS]
    config = config or names[0]
    if config not in names and cls.get_builder_config(config) is None:
        hint = f" {cls.CONFIG_NAME_HINT}" if getattr(cls, "CONFIG_NAME_HINT", "") else ""
        problem = f"{name} has no config {config!r}; choose one of {', '.join(names)}{hint}"
        raise ConfigError("<dataset>", problem)
    return cls(config=config, data_dir=data_dir or default_data_dir(), file_format="array_record")


@dataclasses.dataclass
class BuildSummary:
    """What a build produced: records per split, cases skipped with reasons, where it lives."""

    name: str
    config: str
    data_dir: str
    records: dict[str, int]
    skipped: list[dict[str, str]]
    reused: bool
    seconds: float = 0.0

    def lines(self) -> list[str]:
        how = " (already built)" if self.reused else f" (built in {self.seconds:.1f} s)"
        out = [f"{self.name}/{self.config} at {self.data_dir}{how}"]
        out += [f"  {split}: {n} records" for split, n in self.records.items()]
        if self.skipped:
            out.append(f"  skipped {len(self.skipped)} case(s):")
            out += [f"    {s['case_id']}: {s['reason']}" for s in self.skipped]
        return out


def build(
    name: str,
    config: str | None = None,
    data_dir: str | None = None,
    manual_dir: str | None = None,
    source: Any = None,
    beam: tuple[Any, Any] | None = None,
) -> BuildSummary:
    """Build (if missing) and summarise. Problems with user files raise `CTGlipInputError`.

    `beam` = (runner, PipelineOptions) (see `tfds_builders.beam_options.pipeline_setup`) builds on Apache
    Beam: the same records in the same order, the cases processed by the runner's workers.

    `source` (e.g. `tfds_builders.ctglip_nifti.NiftiSource`) tells a builder with a `source` attribute how
    to read `manual_dir` (the CT-RATE layout, TotalSegmentator v2 masks); it is set on the builder before
    `download_and_prepare`. It does not name the dataset: an existing build is reused as it is.
    """
    import tensorflow_datasets as tfds

    start = time.perf_counter()
    builder = make_builder(name, config, data_dir)
    if source is not None:
        if not hasattr(type(builder), "source"):
            problem = f"{name} takes no source options (--reports-csv, --mask-version, ...)"
            raise ConfigError("<dataset>", problem)
        builder.source = source
    reused = builder.is_prepared()
    if not reused:
        if manual_dir is not None and not Path(manual_dir).is_dir():
            raise CTGlipInputError(manual_dir, "manual dir does not exist")
        runner, options = beam or (None, None)
        download_config = tfds.download.DownloadConfig(
            manual_dir=manual_dir, beam_runner=runner, beam_options=options
        )
        builder.download_and_prepare(file_format="array_record", download_config=download_config)
    return BuildSummary(
        name=name,
        config=builder.builder_config.name,
        data_dir=str(builder.data_dir),
        records={split: int(info.num_examples) for split, info in builder.info.splits.items()},
        skipped=read_skipped(builder.data_dir),
        reused=reused,
        seconds=time.perf_counter() - start,
    )


def read_skipped(dataset_dir: str | os.PathLike) -> list[dict[str, str]]:
    path = Path(dataset_dir) / SKIPPED_FILE
    return json.loads(path.read_text()) if path.exists() else []


def data_source(
    name: str,
    config: str | None = None,
    split: str = "train",
    data_dir: str | None = None,
    build_if_missing: bool = False,
    manual_dir: str | None = None,
    source: Any = None,
):
    """Random-access records of one split (a TFDS ArrayRecordDataSource; records decode to numpy/bytes)."""
    builder = make_builder(name, config, data_dir)
    if not builder.is_prepared():
        if not build_if_missing:
            cfg_name = builder.builder_config.name
            raise CTGlipInputError(
                builder.data_dir,
                f"dataset {name}/{cfg_name} is not built; run "
                f"`ctglip build-data {name} --config {cfg_name} --data-dir {data_dir or default_data_dir()}`",
            )
        build(name, config, data_dir, manual_dir, source)
        builder = make_builder(name, config, data_dir)
    if split not in builder.info.splits:
        raise ConfigError(
            split,
            f"{name}/{builder.builder_config.name} has no split {split!r}; "
            f"splits: {', '.join(builder.info.splits)}",
        )
    return builder.as_data_source(split=split)
