"""`ctglip_nifti`: the user's own CTs, TotalSegmentator label maps and reports, in one of two layouts.

**Manifest layout** (default): a `cases.jsonl` in the folder (the TFDS `manual_dir`), one JSON object per
line:

    {"case_id": "p001", "ct": "ct/p001.nii.gz", "mask": "seg/p001.nii.gz",
     "report": "reports/p001.txt", "split": "train"}

Paths are relative to the manifest. `report` is either the report text itself or the path of a `.txt`
file; `split` is one of train / validation / test (keep a patient's scans in one split). Masks are
TotalSegmentator v1 label maps; with `--mask-version v2` they are converted to v1 ids (and a mask that is a
folder is read as TotalSegmentator's per-class masks).

**CT-RATE layout** (`--reports-csv PATH[:SPLIT]`, repeatable): reports CSV(s) with a `VolumeName` column
and report text columns, volumes found by name anywhere under the folder, TotalSegmentator masks in
`--mask-dir` (`--mask-version v1|v2` required). For CT-RATE itself:

    ctglip build-data ctglip_nifti --manual-dir CT-RATE --mask-dir seg --mask-version v2 \\
        --reports-csv train_reports.csv:train --reports-csv validation_reports.csv:test

(details in `ctrate.py`). Giving `--reports-csv` for a folder that holds a `cases.jsonl` is an error.

Organ-level texts and abnormal flags come from `ctglip_jax.data.reports.parse_report`. Configs set the
grid: `default` (1.5 x 1.5 x 3 mm, 224 x 224 x 128), `coarse` (3 mm, 128^3), `tiny` (tests), or your own,
named from its values: `grid_1.5x1.5x3_224x224x128_m10` (`--spacing`, `--shape`, `--body-margin`; see
`grid.py`); such a name reads back anywhere a config name is taken.

A broken case (unreadable or corrupt file, mask not matching its CT, missing mask/volume/report, wrong
path, ...) is skipped, not fatal: the build goes on, and the skipped cases with their reasons are written
to `skipped.json` in the dataset folder and printed by `ctglip build-data`. A layout with no usable case is
an error naming the manifest (or the CSVs).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import tensorflow_datasets as tfds

from ctglip_jax.data import records
from ctglip_jax.errors import CTGlipInputError
from tfds_builders.case_examples import BuildsCases
from tfds_builders.ctglip_nifti import ctrate, grid, masks
from tfds_builders.ctglip_nifti.preprocess import Preprocess, preprocess_case
from tfds_builders.ctglip_nifti.source import SPLITS, Case, NiftiSource, resolve

MANIFEST = "cases.jsonl"


@dataclasses.dataclass
class NiftiConfig(tfds.core.BuilderConfig):
    """Preprocessing of the user's volumes (see `preprocess.Preprocess`)."""

    preprocess: Preprocess = dataclasses.field(default_factory=Preprocess)


def resolve_report(value, base: Path, case_id: str) -> str:
    """Report text: inline, or read from a `.txt` path relative to the manifest; raises if missing/empty."""
    from ctglip_jax.data.reports import decode_report

    if not isinstance(value, str) or not value.strip():
        raise CTGlipInputError(case_id, "no report (the manifest's 'report' is missing or empty)")
    candidate = base / value.strip()
    looks_like_path = value.strip().endswith(".txt") and "\n" not in value
    if looks_like_path:
        if not candidate.is_file():
            raise CTGlipInputError(candidate, "report file not found")
        return decode_report(candidate.read_bytes(), source=str(candidate))
    return value


def read_manifest(manual_dir: Path) -> tuple[list[Case], list[dict[str, str]]]:
    """(cases that pass the cheap checks, skipped [{case_id, reason}]); a missing manifest raises."""
    path = manual_dir / MANIFEST
    if not path.is_file():
        problem = "manifest not found: put a cases.jsonl in the manual dir, or give --reports-csv (CT-RATE)"
        raise CTGlipInputError(path, problem)
    cases, skipped, seen = [], [], set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            if not isinstance(entry, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            reason = f"{path}:{number}: not a JSON object ({e})"
            skipped.append({"case_id": f"line {number}", "reason": reason})
            continue
        case_id = str(entry.get("case_id") or f"line {number}")
        try:
            if case_id in seen:
                raise CTGlipInputError(path, f"line {number}: duplicate case_id {case_id!r}")
            split = entry.get("split", "train")
            if split not in SPLITS:
                problem = f"line {number}: split {split!r} is not one of {', '.join(SPLITS)}"
                raise CTGlipInputError(path, problem)
            files = {}
            for key in ("ct", "mask"):
                if not entry.get(key):
                    raise CTGlipInputError(path, f"line {number}: no {key!r} path")
                files[key] = manual_dir / entry[key]
                if not files[key].exists():
                    raise CTGlipInputError(files[key], f"{key} file not found")
            report = resolve_report(entry.get("report"), manual_dir, case_id)
        except CTGlipInputError as e:
            skipped.append({"case_id": case_id, "reason": str(e)})
            continue
        seen.add(case_id)
        cases.append(Case(case_id, files["ct"], files["mask"], report, split))
    return cases, skipped


class Builder(BuildsCases, tfds.core.GeneratorBasedBuilder):
    """The user's NIfTI CTs + TotalSegmentator label maps + reports, preprocessed to one grid.

    `source` says where and how the files are read (`datasets.build(..., source=...)` sets it).
    """

    name = "ctglip_nifti"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__
    BUILDER_CONFIGS = [
        NiftiConfig(name="default", description="1.5 x 1.5 x 3 mm, 224 x 224 x 128 voxels.",
                    preprocess=Preprocess(spacing=(1.5, 1.5, 3.0), shape=(224, 224, 128))),
        NiftiConfig(name="coarse", description="3 mm isotropic, 128^3 voxels (fast experiments).",
                    preprocess=Preprocess(spacing=(3.0, 3.0, 3.0), shape=(128, 128, 128))),
        NiftiConfig(name="tiny", description="Tests: 4 mm isotropic, 16^3 voxels.",
                    preprocess=Preprocess(spacing=(4.0, 4.0, 4.0), shape=(16, 16, 16), body_margin_mm=4.0)),
    ]
    CONFIG_NAME_HINT = f"or a grid: {grid.FORMAT}"
    source: NiftiSource = NiftiSource()

    @classmethod
    def get_builder_config(cls, name: str, version=None) -> NiftiConfig | None:
        """A preset, or a config parsed from a `grid_...` name (malformed: ConfigError); else None."""
        config = super().get_builder_config(name, version)
        parsed = grid.parse_grid_name(name) if config is None else None
        if parsed is not None:
            canonical, preprocess = parsed
            config = NiftiConfig(name=canonical, description=grid.describe(preprocess), preprocess=preprocess)
        return config

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=__doc__,
            disable_shuffling=True,  # record i = case i; the input pipeline shuffles
            features=tfds.features.FeaturesDict(
                {
                    "case_id": tfds.features.Text(),
                    **records.volume_features(tuple(self.builder_config.preprocess.shape)),
                    **records.report_features(),
                }
            ),
            homepage="https://arxiv.org/abs/2404.15272",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        manual_dir = Path(dl_manager.manual_dir)
        if self.source.ctrate:
            if (manual_dir / MANIFEST).exists():
                raise CTGlipInputError(
                    manual_dir / MANIFEST,
                    "the manual dir holds a manifest and --reports-csv was given: use one layout "
                    "(drop --reports-csv, or move the cases.jsonl away)",
                )
            cases, skipped = ctrate.read_cases(manual_dir, self.source)
            where = ", ".join(str(resolve(manual_dir, c.path)) for c in self.source.reports_csvs)
        else:
            cases, skipped = read_manifest(manual_dir)
            where = manual_dir / MANIFEST
        for s in skipped:
            self.skip(**s)
        cases = self.usable_cases(cases, lambda c: c.case_id, where)
        by_split = {split: [c for c in cases if c.split == split] for split in SPLITS}
        return {split: self._generate_examples(split, group) for split, group in by_split.items() if group}

    def _generate_examples(self, split: str, cases: list[Case]):
        make = functools.partial(case_example, preprocess=self.builder_config.preprocess,
                                 mask_version=self.source.mask_version)
        return self.examples(split, cases, make, case_key)


def case_key(case: Case) -> str:
    return case.case_id


def case_example(case: Case, preprocess: Preprocess, mask_version: str | None) -> dict:
    """One case's record (module level: Beam pickles it to its workers); a broken case raises."""
    from ctglip_jax.data.reports import parse_report

    parsed = parse_report(case.report, source=case.case_id)
    load_labels = masks.label_loader(mask_version) if mask_version else None
    arrays = preprocess_case(case.ct, case.mask, preprocess, load_labels)
    label_map = records.as_label_map(arrays["labels"], source=case.mask)
    return {
        "case_id": case.case_id,
        "volume": arrays["volume"],
        "label_map": label_map,
        "spacing": arrays["spacing"],
        "affine": arrays["affine"],
        **records.parsed_report_arrays(case.report, parsed),
    }

__all__ = ["Builder", "Case", "NiftiConfig", "NiftiSource", "Preprocess"]
