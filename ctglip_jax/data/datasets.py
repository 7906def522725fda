"""Finding, building and opening the project's TFDS datasets (array_record, read without TensorFlow).

The builders live in the top-level package `tfds_builders` (TFDS needs a builder inside a package);
importing `tfds_builders.<name>` registers it. Everything here reads datasets with
`builder.as_data_source()` - random access records that Grain can shard, shuffle and checkpoint - and
never with `as_dataset()`/tf.data, which would need TensorFlow.

The record layout shared by all builders is in `records.py`: the builders import that, never this
module, so the dependency goes one way (this module imports the builders by name).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ctglip_jax.data.records import read_skipped
from ctglip_jax.errors import ConfigError, CTGlipInputError

DATA_DIR_ENV = "CTGLIP_DATA_DIR"
BUILDER_NAMES = ("ctglip_synthetic", "ctglip_nifti", "msd_tumor")


def default_data_dir() -> str:
    """`$CTGLIP_DATA_DIR`, else TFDS's usual `~/tensorflow_datasets`."""
    return os.environ.get(DATA_DIR_ENV) or os.path.expanduser("~/tensorflow_datasets")


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
    import tensorflow_datasets as tfds  # seconds to import; reading records never needs it

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


# ----------------------------------------------------------------------------------------------------------
# The voxel spacing a model was trained at (zero-shot inference resamples a scan onto it).


def _builder_spacing(dataset: str, config_name: str | None, data_dir: str | None) -> tuple[Any, str]:
    """(spacing or None, source) from the dataset's records when built, else from its builder config."""
    try:
        builder = make_builder(dataset, config_name or None, data_dir or None)
    except (CTGlipInputError, ImportError):
        return None, ""
    name = f"{dataset}/{builder.builder_config.name}"
    if builder.is_prepared():
        for split in builder.info.splits:
            source = builder.as_data_source(split=split)
            if len(source):
                return np.asarray(source[0]["spacing"], np.float64), f"records of {name} ({split}[0])"
    cfg = builder.builder_config
    if hasattr(cfg, "preprocess"):
        return np.asarray(cfg.preprocess.spacing, np.float64), f"builder config {name} (preprocess.spacing)"
    if hasattr(cfg, "preset"):
        from ctglip_jax.phantom.synthetic import PhantomConfig  # phantom runs only

        return np.asarray(PhantomConfig.preset(cfg.preset).spacing, np.float64), f"builder config {name}"
    return None, ""


def training_spacing(config, override: Sequence[float] | None = None) -> tuple[tuple[float, ...], str]:
    """`(spacing mm, where it came from)` of the data the model was trained on, in this order: an explicit
    `override`; `spacing` in the config's `data` section; the training dataset's records when it is built
    here (field `spacing`); its builder config (the synthetic phantom preset, or `ctglip_nifti`'s
    `preprocess.spacing`), which needs no data."""
    if override is not None:
        spacing, source = np.asarray(override, np.float64), "given explicitly"
    elif config.data.get("spacing"):
        spacing, source = np.asarray(config.data.spacing, np.float64), "workdir config (data.spacing)"
    else:
        spacing, source = _builder_spacing(
            config.data.dataset, config.data.get("config"), config.data.get("data_dir")
        )
        if spacing is None:
            raise ConfigError(
                "spacing",
                f"cannot tell the training spacing of dataset "
                f"{config.data.dataset!r}: pass it explicitly (--spacing X Y Z)",
            )
    spacing = np.broadcast_to(spacing, (3,))
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise ConfigError("spacing", f"spacing must be three positive numbers (mm), got {spacing.tolist()}")
    return tuple(float(s) for s in spacing), source
