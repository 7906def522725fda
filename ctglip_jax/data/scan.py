"""A user's scan on the model grid and back: load (NIfTI or DICOM), check the mask's grid, reorient to
canonical RAS+, resample to the training spacing (image linear, mask nearest), window; and a model-grid
result resampled onto the input file's grid so an output NIfTI overlays the input in any viewer."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from ctglip_jax.data import ct, organs
from ctglip_jax.data.augment import apply_windows
from ctglip_jax.errors import CTGlipInputError


@dataclasses.dataclass(frozen=True)
class InputGrid:
    """The input file's voxel grid as stored (what output NIfTIs must match)."""

    shape: tuple[int, int, int]
    affine: np.ndarray
    orientation: str
    spacing: tuple[float, float, float]


@dataclasses.dataclass
class PreparedScan:
    """A scan on the model grid: `image` in [0, 1] (canonical RAS+, training spacing), `labels` or None."""

    image: np.ndarray  # (X, Y, Z), or (X, Y, Z, C) with several HU windows
    labels: np.ndarray | None
    affine: np.ndarray
    input: InputGrid
    windows: tuple[tuple[float, float], ...]
    source: str


def input_grid(path: str | Path, vol: ct.CTVolume) -> InputGrid:
    """The stored grid of a NIfTI file (a DICOM folder has no stored NIfTI grid: its canonical one)."""
    if Path(path).is_dir():
        affine, shape = vol.affine, vol.shape
    else:
        img = nib.load(str(path))
        affine, shape = np.asarray(img.affine, np.float64), tuple(int(n) for n in img.shape[:3])
    return InputGrid(
        shape,
        affine,
        "".join(nib.aff2axcodes(affine)),
        tuple(float(s) for s in nib.affines.voxel_sizes(affine)),
    )


def prepare_scan(
    ct_path: str | Path,
    mask_path: str | Path | None,
    spacing: Sequence[float],
    windows: Sequence[Sequence[float]],
    mask_version: str = "v1",
) -> PreparedScan:
    """Load, check (mask on the same grid), reorient, resample (image linear, mask nearest) and window
    (one channel per HU window in `windows`, as the model was trained). A TotalSegmentator v2 mask
    (`mask_version="v2"`) is converted to v1 ids first."""
    if mask_version not in ("v1", "v2"):
        raise CTGlipInputError("--mask-version", f"must be v1 or v2, got {mask_version!r}")
    vol = ct.load_ct(ct_path)
    lut = organs.v2_to_v1_lut() if mask_version == "v2" else None
    labels = ct.load_label_map(mask_path, reference=vol, lut=lut) if mask_path is not None else None
    grid = input_grid(ct_path, vol)
    resampled = ct.resample(vol, spacing, order=1)
    model_labels = None
    if labels is not None:
        model_labels = np.asarray(ct.resample(labels, spacing, order=0).data, np.int32)
    windows = tuple(tuple(float(v) for v in w) for w in windows)
    image = np.ascontiguousarray(apply_windows(np.asarray(resampled.data), windows))
    return PreparedScan(image, model_labels, resampled.affine, grid, windows, str(ct_path))


def to_input_grid(values: np.ndarray, model_affine: np.ndarray, grid: InputGrid) -> np.ndarray:
    """Resample a model-grid volume (linear) onto the input grid: voxel j of the input reads the model grid
    at `inv(model_affine) @ input_affine @ j`; points past the last model voxel take the nearest one."""
    to_model = np.linalg.inv(np.asarray(model_affine, np.float64)) @ np.asarray(grid.affine, np.float64)
    return ndimage.affine_transform(
        np.asarray(values, np.float32),
        to_model[:3, :3],
        offset=to_model[:3, 3],
        output_shape=grid.shape,
        order=1,
        mode="nearest",
        output=np.float32,
    )
