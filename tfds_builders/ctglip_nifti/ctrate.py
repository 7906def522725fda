"""The CT-RATE layout: reports CSV(s) + volumes anywhere under the manual dir + TotalSegmentator masks.

    MANUAL_DIR/
      train_reports.csv        VolumeName, ClinicalInformation_EN, Technique_EN, Findings_EN, Impressions_EN
      validation_reports.csv
      dataset/train/train_1/train_1_a/train_1_a_1.nii.gz      (any depth, any folder names)
      seg/train_1_a_1.nii.gz                                  (--mask-dir seg: TotalSegmentator --ml output)
      seg/train_1_a_2/liver.nii.gz, ...                       (or a folder of its per-class masks)

One case per CSV row. `case_id` is the VolumeName without `.nii.gz`/`.nii` (the CSV may give it with or
without the suffix). The report is the configured text columns joined (default Findings_EN, Impressions_EN).
The volume is the one file of that name anywhere under the manual dir (outside the mask dir); the mask is
the file of the same name in the mask dir (at any depth), or a folder named after the case holding
per-class masks (a file wins over a folder). The split is the CSV's (`PATH:SPLIT`): `auto` gives each
patient (`train_123_a_1` -> `train_123`; the whole name if it does not look like CT-RATE's) to train /
validation / test by a stable hash (80/10/10); a `train` CSV gives `validation_fraction` of its patients to
validation by another stable hash. A row without a volume, without a mask, with two candidate files, with
an empty report or a repeated VolumeName is skipped with its reason, never guessed. A CSV that is missing
or lacks a configured column is an error naming it.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
from collections.abc import Iterable
from pathlib import Path

from ctglip_jax.errors import CTGlipInputError, InputNotFoundError
from tfds_builders.ctglip_nifti.masks import nifti_stem
from tfds_builders.ctglip_nifti.source import Case, NiftiSource, ReportsCsv, resolve

AUTO_FRACTIONS = {"train": 0.8, "validation": 0.1, "test": 0.1}
_PATIENT = re.compile(r"([A-Za-z]+_\d+)_[A-Za-z]+_\d+")


def case_id_of(volume_name: str) -> str:
    """VolumeName without its `.nii.gz` / `.nii` suffix."""
    name = volume_name.strip()
    return nifti_stem(name) or name


def patient_of(case_id: str) -> str:
    """CT-RATE's patient of a volume (`train_123_a_1` -> `train_123`); the whole id if it is not CT-RATE's."""
    match = _PATIENT.fullmatch(case_id)
    return match.group(1) if match else case_id


def _unit(key: str) -> float:
    """A stable number in [0, 1) for `key` (same on every machine and Python run)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2.0**64


def assign_split(case_id: str, csv_split: str, validation_fraction: float) -> str:
    """The split of one case given its CSV's split (see the module docstring)."""
    patient = patient_of(case_id)
    if csv_split == "auto":
        u, edge = _unit(f"auto:{patient}"), 0.0
        for split, fraction in AUTO_FRACTIONS.items():
            edge += fraction
            if u < edge:
                return split
        return "test"
    if csv_split == "train" and _unit(f"validation:{patient}") < validation_fraction:
        return "validation"
    return csv_split


def read_reports_csv(
    path: Path, volume_column: str, text_columns: Iterable[str]
) -> list[tuple[int, str, str]]:
    """[(line number, VolumeName, report)] of one CSV; a missing CSV or column raises naming the CSV.

    The line number is that of the row's last line (line 1 = the header), as `csv` counts them.
    """
    text_columns = tuple(text_columns)
    if not path.is_file():
        raise InputNotFoundError(path, "reports CSV not found")
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            missing = [c for c in (volume_column, *text_columns) if c not in header]
            if missing:
                have = ", ".join(header) if header else "none (empty file)"
                raise CTGlipInputError(
                    path, f"no column {', '.join(map(repr, missing))} (columns: {have}); "
                    "see --volume-column / --text-columns",
                )
            rows = []
            for row in reader:
                texts = [(row.get(c) or "").strip() for c in text_columns]
                rows.append((reader.line_num, (row.get(volume_column) or "").strip(),
                             "\n".join(t for t in texts if t)))
    except UnicodeDecodeError as e:
        raise CTGlipInputError(path, f"not valid UTF-8 (byte {e.start}: {e.reason})") from None
    except csv.Error as e:
        raise CTGlipInputError(path, f"not a readable CSV ({e})") from None
    return rows


def _walk(root: Path, skip: Path | None = None):
    """(folder, subfolder names, file names) under `root`, following links once, never entering `skip`."""
    seen, skip = set(), (os.path.realpath(skip) if skip else None)
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen or real == skip:
            dirs[:] = []
            continue
        seen.add(real)
        yield Path(folder), dirs, files


def index_volumes(manual_dir: Path, wanted: set[str], mask_dir: Path) -> dict[str, list[Path]]:
    """{case_id: [NIfTI files named case_id.nii(.gz) under manual_dir, outside mask_dir]} for wanted ids."""
    found: dict[str, list[Path]] = {}
    for folder, _, files in _walk(manual_dir, skip=mask_dir):
        for name in files:
            stem = nifti_stem(name)
            if stem in wanted:
                found.setdefault(stem, []).append(folder / name)
    return found


def index_masks(mask_dir: Path, wanted: set[str]) -> tuple[dict[str, list[Path]], dict[str, list[Path]]]:
    """({case_id: [multilabel files]}, {case_id: [per-class mask folders]}) in the mask dir, any depth."""
    files_by_id: dict[str, list[Path]] = {}
    folders_by_id: dict[str, list[Path]] = {}
    for folder, dirs, files in _walk(mask_dir):
        for name in files:
            stem = nifti_stem(name)
            if stem in wanted:
                files_by_id.setdefault(stem, []).append(folder / name)
        for name in list(dirs):
            if name in wanted:  # a case's per-class folder: no need to look inside
                folders_by_id.setdefault(name, []).append(folder / name)
                dirs.remove(name)
    return files_by_id, folders_by_id


def _one(paths: list[Path], what: str) -> Path:
    if len(paths) > 1:
        shown = ", ".join(str(p) for p in sorted(paths))
        raise CTGlipInputError(paths[0].name, f"{len(paths)} {what} of that name, cannot tell which: {shown}")
    return paths[0]


def read_cases(manual_dir: Path, source: NiftiSource) -> tuple[list[Case], list[dict[str, str]]]:
    """(cases that pass the cheap checks, skipped [{case_id, reason}]) of the CT-RATE layout."""
    mask_dir = resolve(manual_dir, source.mask_dir)
    if not mask_dir.is_dir():
        raise InputNotFoundError(mask_dir, "mask dir (--mask-dir) not found")
    if mask_dir.resolve() == manual_dir.resolve():
        raise CTGlipInputError(mask_dir, "the mask dir must be its own folder, not the manual dir itself")
    rows: list[tuple[ReportsCsv, Path, int, str, str]] = []
    for spec in source.reports_csvs:
        path = resolve(manual_dir, spec.path)
        for number, volume, report in read_reports_csv(path, source.volume_column, source.text_columns):
            rows.append((spec, path, number, volume, report))
    wanted = {case_id_of(volume) for *_, volume, _ in rows if volume}
    volumes = index_volumes(manual_dir, wanted, mask_dir)
    mask_files, mask_folders = index_masks(mask_dir, wanted)
    cases, skipped, seen = [], [], {}
    for spec, path, number, volume, report in rows:
        where = f"{path.name} line {number}"
        case_id = case_id_of(volume) if volume else where
        try:
            if not volume:
                raise CTGlipInputError(path, f"line {number}: empty {source.volume_column}")
            if case_id in seen:
                raise CTGlipInputError(path, f"line {number}: {volume} repeats {seen[case_id]}")
            seen[case_id] = where
            if not report:
                columns = ", ".join(source.text_columns)
                raise CTGlipInputError(path, f"line {number}: empty report (columns {columns})")
            if case_id not in volumes:
                raise InputNotFoundError(manual_dir, f"no volume {case_id}.nii.gz/.nii under it ({where})")
            ct_path = _one(volumes[case_id], "volumes")
            if case_id in mask_files:
                mask = _one(mask_files[case_id], "masks")
            elif case_id in mask_folders:
                mask = _one(mask_folders[case_id], "mask folders")
            else:
                problem = f"no TotalSegmentator mask {case_id}.nii.gz or folder {case_id}/ in it ({where})"
                raise InputNotFoundError(mask_dir, problem)
        except CTGlipInputError as e:
            skipped.append({"case_id": case_id, "reason": str(e)})
            continue
        split = assign_split(case_id, spec.split, source.validation_fraction)
        cases.append(Case(case_id, ct_path, mask, report, split))
    return cases, skipped
