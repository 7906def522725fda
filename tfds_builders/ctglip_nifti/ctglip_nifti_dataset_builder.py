"""`ctglip_nifti`: the user's own CTs, TotalSegmentator v1 label maps and reports, from a manifest.

Put a `cases.jsonl` in a folder (the TFDS `manual_dir`), one JSON object per line:

    {"case_id": "p001", "ct": "ct/p001.nii.gz", "mask": "seg/p001.nii.gz",
     "report": "reports/p001.txt", "split": "train"}

Paths are relative to the manifest. `report` is either the report text itself or the path of a `.txt`
file; `split` is one of train / validation / test (keep a patient's scans in one split). Organ-level texts
and abnormal flags come from `ctglip_jax.data.reports.parse_report`.

A broken case (unreadable or corrupt file, mask not matching its CT, missing report, wrong path, ...) is
skipped, not fatal: the build goes on, and the skipped cases with their reasons are written to
`skipped.json` in the dataset folder and printed by `ctglip build-data`. A manifest with no usable case is
an error naming the manifest.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import tensorflow_datasets as tfds

from ctglip_jax.data import datasets
from ctglip_jax.errors import CTGlipInputError
from tfds_builders.ctglip_nifti.preprocess import Preprocess, preprocess_case
from tfds_builders.ctglip_nifti.skipping import SkipsBrokenCases

MANIFEST = "cases.jsonl"
SPLITS = ("train", "validation", "test")


@dataclasses.dataclass
class NiftiConfig(tfds.core.BuilderConfig):
    """Preprocessing of the user's volumes (see `preprocess.Preprocess`)."""

    preprocess: Preprocess = dataclasses.field(default_factory=Preprocess)


@dataclasses.dataclass
class Case:
    case_id: str
    ct: Path
    mask: Path
    report: str
    split: str


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
        raise CTGlipInputError(path, "manifest not found: put a cases.jsonl in the manual dir")
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


class Builder(SkipsBrokenCases, tfds.core.GeneratorBasedBuilder):
    """The user's NIfTI CTs + TotalSegmentator v1 label maps + reports, preprocessed to one grid."""

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

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=__doc__,
            disable_shuffling=True,  # record i = case i; the input pipeline shuffles
            features=tfds.features.FeaturesDict(
                {
                    "case_id": tfds.features.Text(),
                    **datasets.volume_features(tuple(self.builder_config.preprocess.shape)),
                    **datasets.report_features(),
                }
            ),
            homepage="https://arxiv.org/abs/2404.15272",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        manual_dir = Path(dl_manager.manual_dir)
        cases, skipped = read_manifest(manual_dir)
        for s in skipped:
            self.skip(**s)
        cases = self.usable_cases(cases, lambda c: c.case_id, manual_dir / MANIFEST)
        by_split = {split: [c for c in cases if c.split == split] for split in SPLITS}
        return {split: self._generate_examples(group) for split, group in by_split.items() if group}

    def _generate_examples(self, cases: list[Case]):
        from ctglip_jax.data.reports import parse_report

        cfg = self.builder_config.preprocess
        for case in cases:
            try:
                parsed = parse_report(case.report, source=case.case_id)
                arrays = preprocess_case(case.ct, case.mask, cfg)
                label_map = datasets.as_label_map(arrays["labels"], source=case.mask)
            except CTGlipInputError as e:
                self.skip(case.case_id, str(e))
                continue
            yield case.case_id, {
                "case_id": case.case_id,
                "volume": arrays["volume"],
                "label_map": label_map,
                "spacing": arrays["spacing"],
                "affine": arrays["affine"],
                **datasets.parsed_report_arrays(case.report, parsed),
            }


__all__ = ["Builder", "NiftiConfig", "Preprocess"]
