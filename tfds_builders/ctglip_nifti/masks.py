"""TotalSegmentator outputs as v1 label maps: a multilabel file (v1 or v2 ids) or a folder of class masks.

- A multilabel NIfTI (TotalSegmentator `--ml`): v1 ids are read as they are; v2 ids go through
  `organs.v2_to_v1_lut()` (v2 classes without a v1 counterpart, e.g. v2's single `heart`, become 0).
- A folder of per-class masks `<class>.nii.gz` (TotalSegmentator's default output): each file named after
  a class of that version is one organ (voxels > 0); they are combined in v1 id order (a later id wins where
  two overlap). Files named after no class of that version are ignored; a folder with none is an error.
Every mask must lie on its CT's voxel grid (`ct.load_label_map` checks it).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from ctglip_jax.data import ct, organs
from ctglip_jax.errors import CTGlipInputError

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def nifti_stem(name: str) -> str | None:
    """`x` for `x.nii.gz` / `x.nii` (case-insensitive suffix), else None."""
    lower = name.lower()
    for suffix in NIFTI_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return None


@functools.cache
def class_ids(version: str) -> dict[str, int]:
    """{class name of that TotalSegmentator version: v1 id, 0 where v1 has no such class}."""
    if version == "v1":
        return dict(organs.v1_ids())
    return {name: (organs.organ_id(v1) if v1 else 0) for name, v1 in organs.v2_to_v1().items()}


def load_multilabel(path, reference: ct.CTVolume, version: str) -> ct.CTVolume:
    lut = organs.v2_to_v1_lut() if version == "v2" else None
    return ct.load_label_map(path, reference=reference, lut=lut)


def load_class_folder(folder: Path, reference: ct.CTVolume, version: str) -> ct.CTVolume:
    """One v1 label map from TotalSegmentator's per-class masks in `folder`."""
    ids = class_ids(version)
    found = []
    for path in sorted(Path(folder).iterdir()):
        stem = nifti_stem(path.name)
        if stem in ids and path.is_file():
            found.append((ids[stem], path))
    if not found:
        problem = f"no TotalSegmentator {version} class mask (<class>.nii.gz, e.g. liver.nii.gz) in it"
        raise CTGlipInputError(folder, problem)
    combined, first = None, None
    for v1_id, path in sorted(found, key=lambda item: item[0]):
        mask = ct.load_label_map(path, reference=reference)
        if combined is None:
            combined, first = np.zeros(mask.shape, np.int16), mask
        if v1_id:
            combined[np.asarray(mask.data) > 0] = v1_id
    return ct.CTVolume(combined, first.affine, str(folder), first.stored_orientation)


def label_loader(version: str):
    """`load(mask, reference=image) -> CTVolume` for `preprocess_case`: a file or a per-class folder."""

    def load(mask, reference: ct.CTVolume) -> ct.CTVolume:
        if Path(mask).is_dir():
            return load_class_folder(Path(mask), reference, version)
        return load_multilabel(mask, reference, version)

    return load
