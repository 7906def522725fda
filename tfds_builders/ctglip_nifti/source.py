"""Where `ctglip_nifti` reads the user's files: the options that `ctglip build-data` flags set.

The builder has one attribute, `source` (a `NiftiSource`); `datasets.build(..., source=NiftiSource(...))`
sets it before `download_and_prepare`. The default reads the `cases.jsonl` manifest layout exactly as
before. With `reports_csvs` the manual dir is read in the CT-RATE layout instead (see `ctrate.py`).
The options are not part of the dataset's name: an existing build of the same config is reused.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from ctglip_jax.errors import ConfigError

SPLITS = ("train", "validation", "test")
CSV_SPLITS = (*SPLITS, "auto")
MASK_VERSIONS = ("v1", "v2")
DEFAULT_VOLUME_COLUMN = "VolumeName"
DEFAULT_TEXT_COLUMNS = ("Findings_EN", "Impressions_EN")
DEFAULT_VALIDATION_FRACTION = 0.05


@dataclasses.dataclass
class Case:
    """One scan ready to preprocess: ids, files (a mask may be a folder of per-class masks), report, split."""

    case_id: str
    ct: Path
    mask: Path
    report: str
    split: str


@dataclasses.dataclass(frozen=True)
class ReportsCsv:
    """One reports CSV and the split of its cases (`auto`: 80/10/10 by a stable hash of the patient)."""

    path: str
    split: str = "auto"

    @classmethod
    def parse(cls, text: str) -> ReportsCsv:
        """`PATH[:SPLIT]`; a `:suffix` that is not a split name stays part of the path."""
        path, sep, split = text.rpartition(":")
        if sep and split in CSV_SPLITS:
            return cls(path, split)
        if sep and "/" not in split and "\\" not in split and not split.lower().endswith(".csv"):
            raise ConfigError(text, f"--reports-csv split {split!r} is not one of {', '.join(CSV_SPLITS)}")
        return cls(text)


@dataclasses.dataclass(frozen=True)
class NiftiSource:
    """How to read the manual dir.

    reports_csvs: CT-RATE layout when non-empty (else the `cases.jsonl` manifest).
    mask_dir: folder of TotalSegmentator outputs (CT-RATE layout; relative to the manual dir or absolute).
    mask_version: which TotalSegmentator made the masks; `v2` maps are converted to v1 ids. Required in
        the CT-RATE layout; optional for the manifest (None = v1 label maps, read as before).
    volume_column, text_columns: the CSV's volume-name column and the columns joined into the report.
    validation_fraction: share of a `train` CSV's patients moved to `validation` (stable hash).
    """

    reports_csvs: tuple[ReportsCsv, ...] = ()
    mask_dir: str | None = None
    mask_version: str | None = None
    volume_column: str = DEFAULT_VOLUME_COLUMN
    text_columns: tuple[str, ...] = DEFAULT_TEXT_COLUMNS
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION

    def __post_init__(self):
        object.__setattr__(self, "reports_csvs", tuple(self.reports_csvs))
        object.__setattr__(self, "text_columns", tuple(c.strip() for c in self.text_columns if c.strip()))
        for csv in self.reports_csvs:
            if csv.split not in CSV_SPLITS:
                raise ConfigError(csv.path, f"split {csv.split!r} is not one of {', '.join(CSV_SPLITS)}")
        if self.mask_version is not None and self.mask_version not in MASK_VERSIONS:
            raise ConfigError("--mask-version", f"{self.mask_version!r} is not one of v1, v2")
        if not (isinstance(self.validation_fraction, (int, float)) and math.isfinite(self.validation_fraction)
                and 0 <= self.validation_fraction < 1):
            raise ConfigError("--validation-fraction", f"must be in [0, 1), got {self.validation_fraction!r}")
        if not self.ctrate:
            if self.mask_dir is not None:
                raise ConfigError("--mask-dir", "is for the CT-RATE layout: give --reports-csv too")
            return
        if self.mask_version is None:
            raise ConfigError(
                "--mask-version",
                "the CT-RATE layout needs --mask-version v1|v2 (which TotalSegmentator made the masks; "
                "a wrong guess would mislabel every organ)",
            )
        if not self.mask_dir:
            raise ConfigError("--mask-dir", "the CT-RATE layout needs --mask-dir (TotalSegmentator outputs)")
        if not self.volume_column.strip():
            raise ConfigError("--volume-column", "is empty")
        if not self.text_columns:
            raise ConfigError("--text-columns", "names no column")

    @property
    def ctrate(self) -> bool:
        return bool(self.reports_csvs)


def resolve(manual_dir: Path, path: str) -> Path:
    """`path` as given if absolute (after `~`), else relative to the manual dir."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else manual_dir / p
